"""Lanes: a CPU backbone instance cuts a batch into slices that run at once on 1-thread sessions, and runs a
lone request on every thread. The decisions on fixed inputs; the real model code (onnx_cpu.py) run in this
process on the build's ONNX files, where the rows must come back in order and equal to one session's; the
same model in the real tritonserver. Nothing here asserts a speed."""

from __future__ import annotations

import itertools
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest

from vitserve.contract import CpuBackboneParams
from vitserve.exporter.repository import read_config, read_params, set_params, write_config
from vitserve.exporter.triton_models.onnx_cpu import LANES_AUTO_MAX_BYTES, choose_lanes, split_rows
from vitserve.perf.bench_lanes import load  # the real model, initialised in this process


def test_batches_are_cut_into_contiguous_near_equal_slices():
    assert split_rows(1, 2) == [(0, 1)]  # a lone image: the wide session, every thread
    assert split_rows(3, 4) == [(0, 3)]  # fewer rows than lanes: not cut
    assert split_rows(1, 1) == [(0, 1)] and split_rows(16, 1) == [(0, 16)]
    assert split_rows(2, 2) == [(0, 1), (1, 2)]
    assert split_rows(5, 2) == [(0, 2), (2, 5)]
    for n in range(1, 40):
        for lanes in range(1, 9):
            s = split_rows(n, lanes)
            assert s[0][0] == 0 and s[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(s))  # contiguous, in order
            sizes = [b - a for a, b in s]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_lanes_decision():
    small, big = 100 * 2**20, LANES_AUTO_MAX_BYTES + 1
    assert choose_lanes("auto", 1, small)[0] == 1  # one thread: nothing to cut the batch for
    assert choose_lanes("auto", 2, small)[0] == 2 and choose_lanes(None, 8, small)[0] == 8
    lanes, why = choose_lanes("auto", 8, big)  # a second copy of large weights is not taken unasked
    assert lanes == 1 and "GiB" in why
    assert choose_lanes(4, 8, big)[0] == 4  # asked for: taken
    assert choose_lanes(4, 2, small)[0] == 2  # never more lanes than threads
    assert choose_lanes(1, 8, small)[0] == 1
    assert choose_lanes("auto", 2, small, "openvino")[0] == 1  # OpenVINO threads a batch itself
    assert choose_lanes(2, 2, small, "openvino")[0] == 2  # asked for: taken
    with pytest.raises(ValueError, match="lanes"):
        choose_lanes(0, 2, small)


def _pixels(n: int) -> np.ndarray:
    from vitserve.exporter.backbones import get_backbone
    from vitserve.exporter.precision import eval_pixels

    return np.ascontiguousarray(
        eval_pixels(get_backbone("ViT-B-32"), get_backbone("ViT-B-32").preprocess, n)[1], np.float32
    )


@pytest.mark.parametrize("variant", ["fp32", "cpu-int8"])
def test_slices_come_back_in_order_equal_to_one_session(vitb32_build, variant):
    model_dir = vitb32_build["repository"] / f"vitb32_{variant}_cpu"
    if not model_dir.exists():
        pytest.skip(f"{variant} was not published by this build (its gate); fp32 always is")
    pixels = _pixels(5)
    lanes = load(model_dir, cpu_threads=2, cpu_lanes=2)
    one = load(model_dir, cpu_threads=2, cpu_lanes=1)
    try:
        assert lanes.lanes == 2 and one.lanes == 1 and one.pool is None
        got = dict(zip(lanes.outputs, lanes._run(pixels), strict=True))
        # the same slices on one session: a slice's rows do not depend on the thread that ran them
        # (cpu-int8's activation scales are per call, so the comparison is slice for slice)
        parts = [one._run(pixels[a:b]) for a, b in split_rows(len(pixels), 2)]
        want = {n: np.concatenate([p[i] for p in parts]) for i, n in enumerate(one.outputs)}
        for name in one.outputs:
            assert got[name].shape == want[name].shape
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)
        # each row is its own image's: row i equals image i run alone (fp32: batch-independent)
        if variant == "fp32":
            for i in (0, 2, 4):
                alone = dict(zip(one.outputs, one._run(pixels[i : i + 1]), strict=True))
                np.testing.assert_allclose(got["embeddings"][i], alone["embeddings"][0], rtol=1e-4, atol=1e-5)
        # a lone image runs on the wide session: the same as one session's
        single = dict(zip(lanes.outputs, lanes._run(pixels[:1]), strict=True))
        ref = dict(zip(one.outputs, one._run(pixels[:1]), strict=True))
        np.testing.assert_allclose(single["embeddings"], ref["embeddings"], rtol=1e-4, atol=1e-5)
    finally:
        lanes.finalize()
        one.finalize()


@pytest.mark.triton
def test_served_batches_through_lanes_match_the_single_session(vitb32_build, tmp_path):
    """The fp32 backbone served with lanes 2 and with lanes 1 (both 2 threads) in the real tritonserver:
    a dynamic batch of requests of 3 and 2 images (cut across the requests' boundary: 5 rows -> 2 + 3) and
    a lone image give every request its own rows; the server log says how each instance runs."""
    from concurrent.futures import ThreadPoolExecutor

    import tritonclient.grpc as grpcclient

    from vitserve.server import TritonServer

    src = vitb32_build["repository"] / "vitb32_fp32_cpu"
    repo = tmp_path / "repo"
    for name, lanes in (("with_lanes", 2), ("one_session", 1)):
        dst = repo / name
        shutil.copytree(src, dst)
        cfg = read_config(dst / "config.pbtxt")
        cfg.name = name
        set_params(cfg, replace(read_params(cfg, CpuBackboneParams), cpu_threads=2, cpu_lanes=lanes))
        cfg.dynamic_batching.max_queue_delay_microseconds = 200_000  # the two requests meet in one batch
        write_config(dst, cfg)
    pixels = _pixels(5)
    log = tmp_path / "server.log"
    with TritonServer(repo, log_path=log) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)

        def infer(model: str, x: np.ndarray) -> np.ndarray:
            inp = grpcclient.InferInput("pixel_values", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            return client.infer(model, [inp]).as_numpy("embeddings")

        try:
            out = {}
            for model in ("with_lanes", "one_session"):
                with ThreadPoolExecutor(2) as pool:
                    a, b = pool.map(lambda x, m=model: infer(m, x), [pixels[:3], pixels[3:]])
                out[model] = (np.concatenate([a, b]), infer(model, pixels[1:2]))
            stats = client.get_inference_statistics("with_lanes", as_json=True)["model_stats"][0]
        finally:
            client.close()
    batched, single = out["with_lanes"]
    np.testing.assert_allclose(batched, out["one_session"][0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(single[0], batched[1], rtol=1e-4, atol=1e-5)  # image 1, alone and batched
    sizes = {int(s["batch_size"]) for s in stats["batch_stats"]}
    assert 1 in sizes  # the lone image; the pair of requests: batched (5) or not (3, 2), both cut in lanes
    text = log.read_text()
    # the engine is the host's pick (onnx_cpu.FLAVOUR_ORDER): OpenVINO or onnxruntime
    assert re.search(r"with_lanes: (onnxruntime|openvino) CPU, 2 thread\(s\).*lanes 2 \(set\)", text), text[
        -2000:
    ]
    assert re.search(r"one_session: (onnxruntime|openvino) CPU, 2 thread\(s\).*lanes 1 \(set\)", text)
