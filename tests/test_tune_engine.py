"""The engine knob (issue 26): a CPU backbone's `flavour` pin (contract, onnx_cpu.flavour_order), the
tuner's `engine` stage and its candidates (flavours scored on the probe in this process), the pin through
config.pbtxt and models.yaml `tuned:`, and a pinned model serving what it was pinned to.

Nothing here depends on which flavour this host's CPU picks: a pin is asserted to serve where it passed its
probe in this process, else the host order's first passing flavour.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest

from vitserve import contract
from vitserve.contract import CPU_BACKBONE_PARAM, ContractError, CpuBackboneParams
from vitserve.errors import ConfigError
from vitserve.exporter.triton_models.onnx_cpu import FLAVOUR_ORDER, flavour_order
from vitserve.perf.tune.configs import Target, backbone_override, cpu_params, current_knobs
from vitserve.perf.tune.search import Knobs, Point, Space, choose, knob_effects, search, stage_plan

EVERY = list(contract.CPU_FLAVOURS)
FP32, ORT_FP32, OV_INT8 = contract.OPENVINO_FP32, contract.ONNXRUNTIME_FP32, contract.OPENVINO_INT8


def test_a_pinned_flavour_is_tried_first_then_the_host_order():
    for isa, order in FLAVOUR_ORDER.items():
        assert flavour_order(isa, EVERY) == list(order) == flavour_order(isa, EVERY, None)
        for pin in order:  # first, and the rest of the host's order unchanged
            assert flavour_order(isa, EVERY, pin) == [pin, *(f for f in order if f != pin)]
    # a flavour the host's order leaves out is still tried when pinned (its probe decides), before the order
    assert flavour_order("avx2", EVERY, OV_INT8) == [OV_INT8, "avx2", *contract.FP32_FLAVOURS]
    # a pin the model does not have changes nothing (the contract refuses it before this)
    assert flavour_order("avx2", list(contract.FP32_FLAVOURS), OV_INT8) == list(contract.FP32_FLAVOURS)


def _params(**kw) -> CpuBackboneParams:
    flavours = {FP32: contract.ONNX_FILE, ORT_FP32: contract.ONNX_FILE}
    return CpuBackboneParams(flavours=flavours, probe="probe.npz", probe_min_cosine=0.999, **kw)


def test_the_contract_refuses_an_unknown_flavour_or_one_the_model_does_not_have():
    assert _params(flavour=ORT_FP32).flavour == ORT_FP32
    assert _params().flavour is None
    with pytest.raises(ContractError, match=r"flavour='tpu-int4': expected one of .*'openvino-int8'"):
        _params(flavour="tpu-int4")
    with pytest.raises(
        ContractError, match=r"flavour='openvino-int8': this model has no such flavour .*openvino-fp32"
    ):
        _params(flavour=OV_INT8)
    # as a served model reads it (config.pbtxt JSON): the parameter is named too
    text = json.dumps({**json.loads(_params().to_json()), "flavour": "vnni"})
    with pytest.raises(ContractError, match=r"parameter 'onnx_cpu': flavour='vnni': this model has no such"):
        CpuBackboneParams.from_json(text)
    old = {k: v for k, v in json.loads(_params().to_json()).items() if k != "flavour"}  # built before the pin
    assert CpuBackboneParams.from_json(json.dumps(old)).flavour is None


def _backbone_config(name: str, **params) -> dict:
    return {
        "name": name,
        "backend": "python",
        "max_batch_size": 8,
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
        "dynamic_batching": {"preferred_batch_size": [4], "max_queue_delay_microseconds": "0"},
        "parameters": {CPU_BACKBONE_PARAM: {"string_value": _params(**params).to_json()}},
    }


def test_the_engine_knob_round_trips_through_config_pbtxt(tmp_path):
    """The knob -> the served config's `onnx_cpu` parameter -> config.pbtxt (Triton's schema) -> the knobs the
    tuner reads back; None leaves the served pin; a pin the model lacks is refused naming it."""
    from google.protobuf import json_format

    from vitserve.exporter.repository import _pb, read_config, read_params, write_config

    served = _backbone_config("m_fp32_cpu")
    knobs = Knobs("fp32", 1, 2, False, 0, (4,), None, cpu_lanes=1, flavour=ORT_FP32)
    assert knobs.key().startswith(f"fp32@{ORT_FP32} i1 t2") and "@" not in replace(knobs, flavour=None).key()
    cfg = backbone_override(served, knobs, onnx_cpu=True)
    write_config(tmp_path / "m_fp32_cpu", json_format.ParseDict(cfg, _pb().ModelConfig()))
    pbtxt = read_config(tmp_path / "m_fp32_cpu" / "config.pbtxt")
    assert read_params(pbtxt, CpuBackboneParams).flavour == ORT_FP32
    back = json_format.MessageToDict(pbtxt, preserving_proto_field_name=True)
    target = Target("m_fp32_cpu", {"m_fp32_cpu": "m_fp32_cpu"}, None, None, True, {"m_fp32_cpu": back})
    got = current_knobs(target)
    assert got.flavour == ORT_FP32 and (got.cpu_threads, got.cpu_lanes) == (2, 1)
    # None: as served (the served pin kept), another pin replaces it
    assert cpu_params(read_params(pbtxt, CpuBackboneParams), replace(knobs, flavour=None)).flavour == ORT_FP32
    assert cpu_params(read_params(pbtxt, CpuBackboneParams), replace(knobs, flavour=FP32)).flavour == FP32
    with pytest.raises(ContractError, match="flavour='vnni'"):
        backbone_override(served, replace(knobs, flavour="vnni"), onnx_cpu=True)
    # a point stored before the knob (no `flavour`) still loads, as served
    old = asdict(Point(replace(knobs, flavour=None), "compute", "m", 1, 1, 10.0, 1.0, 2.0))
    del old["knobs"]["flavour"]
    assert Point.from_json(json.dumps(old)).knobs == replace(knobs, flavour=None)


CURRENT = Knobs("fp32", 1, 2, None, 0, (4,), None, cpu_lanes=1)


def _recorded(knobs: Knobs, c: int) -> list[Point]:
    """A host where the fp32 variant runs 2.5x on onnxruntime-fp32 and cpu-int8 2x fp32 on its served pick
    but 0.5x on `avx2`; two instances 1.1x."""
    ips = {"fp32": 30.0, "cpu-int8": 60.0}[knobs.variant]
    ips *= {ORT_FP32: 2.5, "avx2": 0.5}.get(knobs.flavour, 1.0) * (1.1 if knobs.instances == 2 else 1.0)
    return [Point(knobs, "x", "m", c, 1, ips, 500.0, c * 1e6 / ips)]


def test_the_engine_stage_pins_each_variant_to_its_other_engines_around_the_best():
    space = Space(
        variants=["fp32", "cpu-int8"], instance_threads=[(1, 2), (2, 1)], spinning=[False], queue_delays_us=[0],
        preferred=[(4,)], flavours={"fp32": [ORT_FP32], "cpu-int8": ["avx2"]},
    )  # fmt: skip
    calls: list[tuple[Knobs, str]] = []

    def measure(knobs: Knobs, stage: str) -> list[Point]:
        calls.append((knobs, stage))
        return [replace(p, stage=stage) for c in (1, 4) for p in _recorded(knobs, c)]

    pinned = replace(CURRENT, flavour=FP32)  # served pinned: another variant serves as served
    assert {k.flavour for k in stage_plan("compute", space, pinned, pinned) if k.variant == "cpu-int8"} == {
        None
    }
    assert {k.flavour for k in stage_plan("compute", space, pinned, pinned) if k.variant == "fp32"} == {FP32}
    out = search(space, CURRENT, measure, p99_budget_us=None, out_of_time=lambda: False)
    engine = [k for k, s in calls if s == "engine"]
    best = replace(CURRENT, variant="cpu-int8", instances=2, cpu_threads=1, cpu_spinning=None)  # compute's
    # (fp32 unpinned with these settings, the reference, was measured in `compute` already)
    assert engine == [replace(best, variant="fp32", flavour=ORT_FP32), replace(best, flavour="avx2")]
    chosen = choose(out.points, None).knobs
    assert chosen == replace(best, variant="fp32", flavour=ORT_FP32)  # 2.5 x 30 > 60
    # refine: the compute knobs again on the chosen engine; the other variant as served
    refine = [k for k, s in calls if s == "refine"]
    assert {k.flavour for k in refine if k.variant == "fp32"} == {ORT_FP32}
    plan = stage_plan("refine", space, chosen, CURRENT)  # (cpu-int8 with these settings: measured already)
    assert [k for k in plan if k.variant == "cpu-int8"] == [replace(chosen, variant="cpu-int8", flavour=None)]
    assert len({k for k, _ in calls}) == len(calls)  # nothing measured twice
    effects = {(e["knob"], e["from"], e["to"], e["concurrency"]): e for e in knob_effects(out.points)}
    assert effects[("engine", ORT_FP32, "default", 1)]["images_per_s_x"] == pytest.approx(1 / 2.5)
    # no candidates (one engine passes, or the space was given without them): nothing to plan
    assert stage_plan("engine", replace(space, flavours={}), best, CURRENT) == []


def test_tuned_flavour_goes_into_config_pbtxt_of_its_precision_only(tmp_path):
    """models.yaml `tuned: flavour` (what the tuner writes back) -> the tuned precision's CPU backbone is
    pinned where it has that flavour; the others are not; a bad flavour is refused naming it."""
    from test_tune import MANIFEST, TUNED

    from vitserve.exporter.config import Kind, ModelSpec, Precision, Tuned
    from vitserve.exporter.repository import Variant, read_config, read_params, write_model

    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")
    probe = tmp_path / "probe.npz"
    probe.write_bytes(b"npz")
    flavours = {
        Precision.FP32: ((FP32, onnx), (ORT_FP32, onnx), ("probe", probe)),
        Precision.CPU_INT8: (("vnni", onnx), ("avx2", onnx), (ORT_FP32, onnx), ("probe", probe)),
    }
    variants = [Variant(p, Kind.CPU, onnx, flavours=f) for p, f in flavours.items()]
    spec = ModelSpec.from_dict(
        {"name": "vitb32", "backbone": "ViT-B-32", "precisions": ["fp32", "cpu-int8"],
         "tuned": {**TUNED, "flavour": ORT_FP32}}
    )  # fmt: skip
    write_model(tmp_path / "repo", spec, MANIFEST, variants, None)

    def pin(precision: str) -> str | None:
        cfg = read_config(tmp_path / "repo" / f"vitb32_{precision}_cpu" / "config.pbtxt")
        return read_params(cfg, CpuBackboneParams).flavour

    assert (pin("fp32"), pin("cpu-int8")) == (ORT_FP32, None)  # tuned precision fp32
    with pytest.raises(ConfigError, match="tuned flavour='cuda'"):
        Tuned.parse({"flavour": "cuda"}, "model vitb32 tuned")


def test_a_pinned_model_serves_its_flavour_where_it_passes_its_probe(vitb32_build, capsys):
    """The real onnx_cpu model on the built fp32 CPU backbone (several flavours), pinned to each in turn:
    it serves the pin where the pin passed its probe in this process, else the host order's first passing
    one, and says so; the tuner's candidates are those that passed, less what serves unpinned."""
    from google.protobuf import json_format

    from vitserve.exporter.repository import read_config, read_params
    from vitserve.exporter.triton_models.onnx_cpu import cpu_flags, host_isa, probe_flavours, probe_passed
    from vitserve.perf.bench_lanes import load
    from vitserve.perf.tune.configs import engine_candidates

    name = "vitb32_fp32_cpu"
    d = vitb32_build["repository"] / name
    cfg = read_config(d / "config.pbtxt")
    params = read_params(cfg, CpuBackboneParams)
    assert len(params.flavours) >= 2 and params.flavour is None
    isa = host_isa(cpu_flags(), forced=params.isa)

    def passed(f: str) -> bool:
        try:
            r = probe_flavours(str(d), params.isa, 1, every=True, only=[f])
        except Exception:  # an engine missing here: not a candidate
            return False
        return probe_passed(r, f)

    ok = {f: passed(f) for f in params.flavours}
    unpinned = next(f for f in flavour_order(isa, list(params.flavours)) if ok[f])
    for pin in params.flavours:
        model = load(d, cpu_threads=1, cpu_lanes=1, flavour=pin)
        try:
            assert model.flavour == (pin if ok[pin] else unpinned), (pin, ok, isa)
        finally:
            model.finalize()
        assert f"{name}: flavour '{pin}' pinned" in capsys.readouterr().out
    configs = {
        m: json_format.MessageToDict(
            read_config(d.parent / m / "config.pbtxt"), preserving_proto_field_name=True
        )
        for m in (name, "vitb32_bf16_cpu")
    }
    target = Target("vitb32", {"fp32": name, "bf16": "vitb32_bf16_cpu"}, "vitb32", None, True, configs)
    engines = engine_candidates(target, vitb32_build["repository"])
    assert engines["fp32"]["serves"] == unpinned
    assert engines["fp32"]["sweep"] == [
        f for f in flavour_order(isa, list(params.flavours)) if ok[f] and f != unpinned
    ]
    # a quantized model's FP32 flavours are its fallback (the fp32 variant's engines): never swept there
    bf16 = engines["bf16"]
    assert not set(bf16["sweep"]) & set(contract.FP32_FLAVOURS) and bf16["serves"] is not None, bf16


def test_the_report_shows_the_engines_and_the_pinned_configurations(tmp_path):
    from vitserve.perf.tune.report import TuneResult, write_tune_report

    chosen = replace(CURRENT, flavour=ORT_FP32)
    points = [p for k in (CURRENT, chosen) for p in _recorded(k, 1)]
    engines = {
        "fp32": {"model": "m_fp32_cpu", "isa": "avx2", "min_cosine": 0.999, "serves": FP32, "sweep": [ORT_FP32],
                 "flavours": {FP32: {"cosine": 0.9999999, "max_abs": 1e-7, "passed": True},
                              ORT_FP32: {"cosine": 1.0, "max_abs": 0.0, "passed": True}}},
        "int8": {"model": "m_int8_cpu", "sweep": [], "note": "m_int8_cpu not found: engines not swept"},
    }  # fmt: skip
    r = TuneResult(
        model="m", measured_model="m", host="test host", command=None, p99_budget_ms=None, max_minutes=1,
        concurrencies=[1], batch_sizes=[1], duration_s=1.0, server_mode="test", current=CURRENT, points=points,
        front=points, chosen=choose(points, None), measured_configs=2, reused_configs=0, truncated=False,
        note=None, elapsed_s=1.0, engines=engines,
    )  # fmt: skip
    files = write_tune_report(r, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert f"`fp32@{ORT_FP32} i1 t2" in report  # the chosen configuration names its engine
    assert f"| fp32 | {ORT_FP32} | 1.000000 | yes |  | yes |" in report
    assert f"| fp32 | {FP32} | 1.000000 | yes | yes |  |" in report
    assert "| int8 | - | - | - | - | no: m_int8_cpu not found" in report
    data = json.loads((tmp_path / "tune.json").read_text())
    assert data["engines"] == engines and data["chosen"]["knobs"]["flavour"] == ORT_FP32
    assert Knobs.from_dict(data["chosen"]["knobs"]) == chosen and files["json"].endswith("tune.json")
