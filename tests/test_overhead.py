"""Per-request overhead (issue 26): the served CPU backbone's batching without a queue delay, through the real
tritonserver's statistics, and the tuner's untuned/tuned reference. Nothing here asserts a speed."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from vitserve.perf.tune.search import Knobs, Point, Space, search, stage_plan, untuned_over_tuned

ROOT = Path(__file__).resolve().parent.parent


def test_the_project_cpu_backbone_does_not_delay_a_lone_request(tmp_path):
    """models.yaml's CPU backbones are written with no queue delay: Triton's batcher holds a batch smaller
    than a preferred size for max_queue_delay from its oldest request, so a lone request waited it out
    (2 ms per request before), while requests that arrive during an execution are batched anyway (below)."""
    from vitserve.contract import Kind
    from vitserve.exporter.config import load_models
    from vitserve.exporter.repository import Variant, backbone_config

    manifest = {"input": {"shape": [-1, 3, 224, 224]}, "feature_dim": 8, "head": {"num_classes": 0},
                "outputs": ["embeddings"]}  # fmt: skip
    for spec in load_models(ROOT / "models.yaml"):
        if Kind.CPU in spec.kinds:
            spec = spec.serving()
            cfg = backbone_config("m", spec, manifest, Variant(spec.precisions[0], Kind.CPU, tmp_path / "x"))
            assert cfg.dynamic_batching.max_queue_delay_microseconds == 0, spec.name


@pytest.mark.triton
def test_concurrent_single_images_run_as_one_batch_while_the_instance_is_busy(vitb32_build, vitb32_server):
    """Four single-image requests that arrive while the CPU backbone's instance runs other batches are
    executed as one batch (Triton's statistics: one execution, four inferences): the batch forms while the
    instance is busy, which is what makes a queue delay unnecessary at concurrency."""
    import tritonclient.grpc as grpcclient
    from conftest import served_backbone

    from vitserve.contract import PIXELS
    from vitserve.perf import server_stats

    backbone = served_backbone(vitb32_build["repository"])
    client = grpcclient.InferenceServerClient(vitb32_server.grpc_url)
    try:
        full = int(client.get_model_config(backbone, as_json=True)["config"]["max_batch_size"])
        rng = np.random.default_rng(0)

        def request(n: int) -> list:
            x = rng.standard_normal([n, 3, 224, 224]).astype(np.float32)
            inp = grpcclient.InferInput(PIXELS, list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            return [inp]

        # how long one full batch takes here decides how many keep the instance busy for two seconds
        client.infer(backbone, request(full))
        t = time.monotonic()
        client.infer(backbone, request(full))
        blockers = min(40, max(3, math.ceil(2.0 / (time.monotonic() - t)) + 1))
        results, errors = [], []

        def done(result, error):
            (errors if error is not None else results).append(error or result)

        before = server_stats.snapshot(client, backbone)
        for _ in range(blockers):  # full batches: nothing can join them (max_batch_size)
            client.async_infer(backbone, request(full), callback=done)
        singles = [request(1) for _ in range(4)]  # made first: sent back to back, they arrive together
        time.sleep(0.5)  # received; the instance has at least a second and a half of them left to run
        for inputs in singles:
            client.async_infer(backbone, inputs, callback=done)
        t0 = time.monotonic()
        while len(results) + len(errors) < blockers + 4 and time.monotonic() - t0 < 300:
            time.sleep(0.05)
        assert not errors, errors[:1]
        assert len(results) == blockers + 4
        d = server_stats.delta(before, server_stats.snapshot(client, backbone))
    finally:
        client.close()
    assert d.failures == 0
    assert d.requests == blockers + 4 and d.inferences == blockers * full + 4
    assert d.executions == blockers + 1, (d.executions, blockers)  # the four singles: one execution


CURRENT = Knobs("cpu-int8", 1, None, None, 0, (4, 8, 16), None)
SPACE = Space(
    variants=["fp32", "cpu-int8"],
    instance_threads=[(1, 2), (2, 1)],
    spinning=[True, False],
    queue_delays_us=[0, 2000],
    preferred=[(4, 8, 16)],
)


def _measure(knobs: Knobs, stage: str) -> list[Point]:
    ips = {"fp32": 30.0, "cpu-int8": 60.0}[knobs.variant] * (1.2 if knobs.instances == 2 else 1.0)
    ips *= 1.1 if knobs.cpu_spinning is False else 1.0
    return [Point(knobs, stage, "m", c, 1, ips * (1 + c / 10), 50e3, 100e3) for c in (1, 4)]


def test_the_untuned_configuration_is_measured_as_it_is_and_compared_with_the_choice():
    """The search ends with the configuration the server had (its `auto` threads and default spinning, which
    no other stage measures), so the report can say what tuning bought at every workload point."""
    calls: list[tuple[Knobs, str]] = []
    out = search(
        SPACE, CURRENT, lambda k, s: calls.append((k, s)) or _measure(k, s), p99_budget_us=None,
        out_of_time=lambda: False,
    )  # fmt: skip
    assert stage_plan("untuned", SPACE, replace(CURRENT, instances=2), CURRENT) == [CURRENT]
    assert calls[-1] == (CURRENT, "untuned") and [k for k, _ in calls].count(CURRENT) == 1
    chosen = max((p for p in out.points if p.concurrency == 4), key=lambda p: p.images_per_s).knobs
    u = untuned_over_tuned(out.points, CURRENT, chosen)
    assert u["knobs"] == CURRENT.key() and u["chosen"] == chosen.key()
    assert [(r["concurrency"], r["batch_size"]) for r in u["points"]] == [(1, 1), (4, 1)]
    assert (chosen.variant, chosen.instances, chosen.cpu_threads) == ("cpu-int8", 2, 1)
    assert all(r["ratio"] == pytest.approx(1 / 1.2) for r in u["points"])  # two 1-thread instances
    assert u["geomean"] == pytest.approx(1 / 1.2)
    assert (
        untuned_over_tuned(out.points, replace(CURRENT, queue_delay_us=7), chosen) is None
    )  # never measured


def test_instances_that_share_every_core_are_tried_with_spinning_off_only():
    """Two instances of every core each overlap one another's serving work with compute; two spinning pools
    on the same cores stall each other, so they are tried with spinning off (lanes off and on)."""
    from vitserve.perf.tune.search import default_space

    current = Knobs("fp32", 1, None, None, 0, (4, 8, 16), None)
    space = default_space(["fp32"], 2, True, 16, [1, 4], current, ensemble=False, shared_cores=True)
    assert space.shared_cores == [(2, 2)]
    shared = [(k.cpu_lanes, k.cpu_spinning) for k in stage_plan("compute", space, current, current)
              if (k.instances, k.cpu_threads) == (2, 2)]  # fmt: skip
    assert shared == [(1, False), (2, False)]
    assert default_space(["fp32"], 2, True, 16, [1, 4], current, ensemble=False).shared_cores == []
    assert (
        default_space(["m"], 2, False, 16, [1, 4], current, ensemble=False, shared_cores=True).shared_cores
        == []
    )
