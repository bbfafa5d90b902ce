"""Correct on every x86-64 CPU: CPU INT8 flavours picked by the serving host, fidelity scored independently
of the scoring host, threads decided where the model loads.

Nothing here asserts what this host's CPU does (which flavour it picks, how fast it runs): each test either
uses fixed inputs, or forces the ISA, or checks that what the server did agrees with what it logged.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vitserve.contract import CpuBackboneParams
from vitserve.exporter import onnxrt
from vitserve.exporter.config import Gates, Precision
from vitserve.exporter.precision import (
    CPU_INT8_FLAVOURS,
    PORTABLE_FLAVOUR,
    PROBE_NAME,
    apply_gates,
    check_gate,
)
from vitserve.exporter.repository import read_config, read_params, set_params, write_config
from vitserve.exporter.triton_models.onnx_cpu import (
    choose_threads,
    cpu_flags,
    flavour_order,
    int8_isa,
    usable_cores,
)

# -- detection and decisions, on fixed inputs ------------------------------------------------------------


def test_int8_isa_from_flags_and_overrides():
    avx2 = {"sse4_2", "avx", "avx2", "fma"}
    assert int8_isa(avx2, env={}) == "avx2"
    assert int8_isa(avx2 | {"avx512f", "avx512bw"}, env={}) == "avx2"  # AVX-512 without VNNI saturates too
    for vnni in ("avx512_vnni", "avx_vnni", "amx_int8"):
        assert int8_isa(avx2 | {vnni}, env={}) == "vnni"
    assert int8_isa(avx2, env={"VITSERVE_CPU_ISA": "VNNI"}) == "vnni"
    assert int8_isa(avx2 | {"avx512_vnni"}, env={"VITSERVE_CPU_ISA": "avx2"}) == "avx2"
    assert int8_isa(avx2, env={"VITSERVE_CPU_ISA": "avx2"}, forced="vnni") == "vnni"  # parameter first
    with pytest.raises(ValueError, match=r"'sse'.*vnni.*avx2"):
        int8_isa(avx2, env={"VITSERVE_CPU_ISA": "sse"})
    assert cpu_flags("processor: 0\nflags\t\t: fpu avx2 avx512_vnni\n") == {"fpu", "avx2", "avx512_vnni"}


def test_flavour_order_falls_back_to_the_portable_one():
    both = ["vnni", "avx2"]
    assert flavour_order("vnni", both) == ["vnni", "avx2"]
    assert flavour_order("avx2", both) == ["avx2"]  # a saturating host never tries the full-range weights
    assert flavour_order("vnni", ["avx2"]) == ["avx2"]
    assert flavour_order("avx2", ["vnni"]) == []


def test_threads_come_from_the_serving_host(tmp_path):
    assert choose_threads("auto", cores=16, instances=1, share=1) == 16
    assert choose_threads("auto", cores=16, instances=2, share=2) == 4
    assert choose_threads(None, cores=2, instances=4, share=1) == 1
    assert choose_threads(3, cores=64, instances=1, share=1) == 3
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")  # a 1.5-CPU container limit
    assert usable_cores(str(v2)) == 1
    (v2 / "cpu.max").write_text("max 100000\n")
    assert usable_cores(str(v2)) == usable_cores(str(tmp_path / "none"))
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cores(str(v1.parent)) == 1


def _report(vnni_cos: float, avx2_cos: float) -> dict:
    def fid(cos):
        return {"outputs": {"embeddings": {"cosine_mean": cos, "cosine_min": cos}}}

    return {
        "fidelity": fid(avx2_cos),
        "flavours": {"vnni": {"fidelity": fid(vnni_cos)}, "avx2": {"fidelity": fid(avx2_cos)}},
    }


def test_gate_logic_on_fixed_numbers():
    gates = Gates(cpu_int8_mean_cosine=0.999)
    r = apply_gates(Precision.CPU_INT8, _report(0.9999, 0.9995), gates)
    assert r["passed"] and r["published_flavours"] == ["vnni", "avx2"]
    r = apply_gates(Precision.CPU_INT8, _report(0.9980, 0.9995), gates)
    assert r["passed"] and r["published_flavours"] == ["avx2"]
    assert r["flavours"]["vnni"]["gate"] == "FAIL: embeddings mean cosine 0.998000 < 0.999"
    r = apply_gates(Precision.CPU_INT8, _report(0.9999, 0.9980), gates)  # no portable flavour: not published
    assert not r["passed"] and r["published_flavours"] == ["vnni"]
    ok, text = check_gate(
        Precision.INT8,
        {"outputs": {"embeddings": {"cosine_mean": 0.99}, "logits": {"top1_agreement": 0.9}}},
        Gates(),
    )
    assert not ok and text == "FAIL: embeddings mean cosine 0.990000 >= 0.98, top-1 agreement 0.900 < 0.95"


# -- the hardware-independent evaluator -------------------------------------------------------------------


def _matmul_integer_model(a_zero: int, b: np.ndarray, b_zero: np.ndarray) -> onnx.ModelProto:
    k, n = b.shape
    node = helper.make_node("MatMulInteger", ["A", "B", "az", "bz"], ["Y"], name="mmi")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [None, k])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [None, n])],
        [
            numpy_helper.from_array(b, "B"),
            numpy_helper.from_array(np.array(a_zero, np.uint8), "az"),
            numpy_helper.from_array(b_zero, "bz"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_exact_integer_matmuls_compute_the_int32_result():
    """Values chosen so that u8 x s8 pairs overflow int16 (255*127*2): the rewrite still gives the exact
    int32 product, whatever this host's int8 kernels would do with it."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    a = rng.integers(200, 256, (3, 64), dtype=np.uint8)
    b = rng.integers(100, 128, (64, 5), dtype=np.int8)
    b_zero = np.array([0, 1, -2, 3, 0], np.int8)
    model = onnxrt.exact_integer_matmuls(_matmul_integer_model(7, b, b_zero))
    assert "MatMulInteger" not in {n.op_type for n in model.graph.node}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(["Y"], {"A": a})[0]
    want = (a.astype(np.int64) - 7) @ (b.astype(np.int64) - b_zero.astype(np.int64))
    assert got.dtype == np.int32 and np.array_equal(got, want)


def test_portable_flavour_runs_exactly_on_this_host(vitb32_build):
    """The `avx2` flavour (7-bit weights) cannot saturate, so on ANY x86-64 host onnxruntime's own kernels
    give what the exact evaluator gives: the build's fidelity score is the served one."""
    from vitserve.exporter.backbones import get_backbone
    from vitserve.exporter.precision import eval_pixels

    path = vitb32_build["artifacts"] / "vitb32" / "cpu-int8" / CPU_INT8_FLAVOURS[PORTABLE_FLAVOUR]["file"]
    _, pixels = eval_pixels(get_backbone("ViT-B-32"), get_backbone("ViT-B-32").preprocess, 8)
    native = onnxrt.run(onnxrt.cpu_session(path), pixels)["embeddings"]
    exact_session, how = onnxrt.exact_session(path)
    exact = onnxrt.run(exact_session, pixels)["embeddings"]
    assert "exactly" in how
    cos = (native * exact).sum(1) / np.linalg.norm(native, axis=1) / np.linalg.norm(exact, axis=1)
    assert cos.min() > 0.99999, cos


def test_reports_are_hardware_independent_and_consistent(vitb32_build):
    art = vitb32_build["artifacts"] / "vitb32"
    cpu = json.loads((art / "cpu-int8" / "variant.json").read_text())
    int8 = json.loads((art / "int8" / "variant.json").read_text())
    assert cpu["fidelity"]["hardware_independent"] and int8["fidelity"]["hardware_independent"]
    assert "computed exactly" in cpu["fidelity"]["evaluator"]
    assert "disable_quant_qdq" in int8["fidelity"]["evaluator"]
    assert set(cpu["flavours"]) == set(CPU_INT8_FLAVOURS)
    for flavour, f in cpu["flavours"].items():
        assert (art / "cpu-int8" / f["file"]).is_file(), flavour
        assert f["passed"] == check_gate(Precision.CPU_INT8, f["fidelity"], Gates())[0]
    assert cpu["passed"] == cpu["flavours"][PORTABLE_FLAVOUR]["passed"]
    # exact int8 arithmetic, 7-bit weights: the bar for the default model on every host
    assert cpu["flavours"][PORTABLE_FLAVOUR]["fidelity"]["outputs"]["embeddings"]["cosine_mean"] >= 0.999
    summary = vitb32_build["summary"]["models"]["vitb32"]
    served = {m["precision"] for m in summary["triton_models"].values() if m["role"] == "backbone"}
    bf16 = json.loads((art / "bf16" / "variant.json").read_text())
    # what the build's cpu_precisions list, of what passed its gate (fp16 and int8 are not listed there)
    assert served == {"fp32"} | ({"cpu-int8"} if cpu["passed"] else set()) | (
        {"bf16"} if bf16["passed"] else set()
    )
    params = read_params(
        read_config(vitb32_build["repository"] / "vitb32_fp32_cpu" / "config.pbtxt"), CpuBackboneParams
    )
    assert params.cpu_threads == "auto" and params.share == 1


# -- a repository served on "the other" ISA, on the real tritonserver --------------------------------------


def _copy_model(repo: Path, src: Path, name: str, **params) -> Path:
    dst = repo / name
    shutil.copytree(src, dst)
    cfg = read_config(dst / "config.pbtxt")
    cfg.name = name
    set_params(cfg, replace(read_params(cfg, CpuBackboneParams), **params))
    write_config(dst, cfg)
    return dst


def _tamper_probe(model_dir: Path, *flavours: str) -> None:
    """Make the probe expect other numbers for `flavours`: what a host whose kernels do not compute the
    verified arithmetic looks like to the model (the other flavour's embeddings of other probe images:
    the two flavours alone agree within 1 - cos = 3e-4, inside the probe gate)."""
    original = dict(np.load(model_dir / "1" / PROBE_NAME))
    probe = dict(original)
    for f in flavours:
        other = "avx2" if f == "vnni" else "vnni"
        probe[f"embeddings_{f}"] = np.roll(original[f"embeddings_{other}"], 1, axis=0)
    (model_dir / "1" / PROBE_NAME).unlink()
    with open(model_dir / "1" / PROBE_NAME, "wb") as fh:
        np.savez(fh, **probe)


def test_the_probe_cli_refuses_a_flavour_whose_engine_fails(vitb32_build, tmp_path):
    """`onnx_cpu --probe` scores flavours as the server picks them: a flavour whose file its engine cannot
    open is refused with the error (not a crash of the whole report), and the next one serves."""
    from vitserve.exporter.triton_models.onnx_cpu import probe_flavours, probe_passed

    src = vitb32_build["repository"] / "vitb32_cpu-int8_cpu"
    if not src.exists():
        pytest.skip("cpu-int8 failed its gate in this build (not published)")
    d = _copy_model(tmp_path, src, "broken_vnni", isa="vnni")
    params = read_params(read_config(d / "config.pbtxt"), CpuBackboneParams)
    vnni = d / "1" / params.flavours["vnni"]
    vnni.write_bytes(b"not an onnx file")  # (copytree copied it: the build's file is untouched)
    r = probe_flavours(str(d), "vnni", images=1, only=["vnni", "avx2"])
    assert "error" in r["flavours"]["vnni"] and not probe_passed(r, "vnni"), r
    assert probe_passed(r, "avx2") and r["serves"] == "avx2", r


@pytest.mark.triton
def test_served_on_either_isa_within_the_gate(vitb32_build, tmp_path):
    """The build's cpu-int8 model, served as if on a VNNI host and as if on an AVX2-only host (the `isa`
    parameter), gives embeddings within the gate of FP32; a flavour whose probe does not match is refused
    and the next one serves; with none left it serves its FP32 file, saying so (never a dead model)."""
    import tritonclient.http as httpclient

    from vitserve.exporter.backbones import get_backbone
    from vitserve.exporter.precision import eval_pixels
    from vitserve.server import TritonServer

    src = vitb32_build["repository"] / "vitb32_cpu-int8_cpu"
    if not src.exists():
        pytest.skip("cpu-int8 failed its gate in this build (not published); the gate logic is tested above")
    repo = tmp_path / "repo"
    repo.mkdir()
    _copy_model(repo, src, "as_vnni", isa="vnni")
    _copy_model(repo, src, "as_avx2", isa="avx2")
    _tamper_probe(_copy_model(repo, src, "probe_vnni_off", isa="vnni"), "vnni")
    _tamper_probe(_copy_model(repo, src, "probe_all_off", isa="vnni"), "vnni", "avx2")
    _, pixels = eval_pixels(get_backbone("ViT-B-32"), get_backbone("ViT-B-32").preprocess, 8)
    ref = onnxrt.run(onnxrt.cpu_session(vitb32_build["artifacts"] / "vitb32" / "fp32" / "model.onnx"), pixels)
    log = tmp_path / "server.log"
    args = [
        "--model-control-mode=explicit",
        "--load-model=as_vnni",
        "--load-model=as_avx2",
        "--load-model=probe_vnni_off",
        "--load-model=probe_all_off",
    ]
    with TritonServer(repo, log_path=log, extra_args=args) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            for model in ("as_vnni", "as_avx2", "probe_vnni_off", "probe_all_off"):
                inp = httpclient.InferInput("pixel_values", list(pixels.shape), "FP32")
                inp.set_data_from_numpy(pixels)
                emb = client.infer(model, [inp]).as_numpy("embeddings")
                cos = (emb * ref["embeddings"]).sum(1) / (
                    np.linalg.norm(emb, axis=1) * np.linalg.norm(ref["embeddings"], axis=1)
                )
                assert cos.mean() >= Gates().cpu_int8_mean_cosine, (model, cos)
        finally:
            client.close()
    text = log.read_text()
    picked = dict(re.findall(r"(\w+): cpu-int8 flavour '(\w+)' for host int8 ISA", text))
    assert picked["as_avx2"] == "avx2"
    assert picked["probe_vnni_off"] == "avx2"
    assert "probe_vnni_off: cpu-int8 flavour 'vnni' does not compute its verified embeddings" in text
    assert "probe_all_off: cpu-int8 flavour 'avx2' does not compute its verified embeddings" in text
    assert "probe_all_off: SERVING FP32: no quantized flavour of this model (vnni, avx2)" in text
    # as_vnni: 'vnni' where this host's kernels compute it exactly, else refused by its probe -> 'avx2'
    refused = "as_vnni: cpu-int8 flavour 'vnni' does not compute its verified embeddings" in text
    assert picked["as_vnni"] == ("avx2" if refused else "vnni")
