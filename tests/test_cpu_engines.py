"""CPU engines (issue 26): OpenVINO beside onnxruntime, picked per host by flags and proven by a probe; one
INT8 model for TensorRT and CPU; answers that do not depend on batch-mates; never a dead model.

Nothing here asserts which flavour this host picks: the decisions are tested on fixed flags, the served
models against what they logged, and every published variant against the property it promises.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vitserve import contract
from vitserve.contract import CpuBackboneParams, Precision, parse_backbone_model_name
from vitserve.exporter.config import CPU_DEFAULT_PRECISIONS, Kind
from vitserve.exporter.precision import PROBE_MIN_COSINE, PROBE_NAME
from vitserve.exporter.repository import read_config, read_params
from vitserve.exporter.triton_models.onnx_cpu import FLAVOUR_ORDER, PROBE_REFERENCE, flavour_order, host_isa

AVX2 = {"sse4_2", "avx", "avx2", "fma"}
BATCH_INVARIANCE_MAX_ABS = 1e-4  # on the L2-normalised embedding (issue 26)


def test_cpu_class_from_flags_and_the_order_it_tries():
    assert host_isa(AVX2, env={}) == "avx2"
    assert host_isa(AVX2 | {"avx512f", "avx512_vnni"}, env={}) == "vnni"
    assert host_isa(AVX2 | {"avx512_vnni", "avx512_bf16"}, env={}) == "bf16"
    assert host_isa(AVX2 | {"avx512_vnni", "amx_bf16", "amx_int8", "amx_tile"}, env={}) == "amx"
    assert host_isa(AVX2 | {"amx_int8"}, env={"VITSERVE_CPU_ISA": "avx2"}) == "avx2"  # qemu, rehearsals
    every = list(contract.CPU_FLAVOURS)
    for isa, order in FLAVOUR_ORDER.items():
        assert set(order) <= set(every) and set(order) <= set(PROBE_REFERENCE)
        assert order[-2:] == contract.FP32_FLAVOURS, isa  # every host ends on FP32: never a dead model
    # without VNNI, int8 kernels saturate on full-range weights: neither OpenVINO's nor the vnni flavour
    assert flavour_order("avx2", every) == ["avx2", *contract.FP32_FLAVOURS]
    # bf16 only on AMX: AVX512-BF16 alone ran OpenVINO BF16 slower than FP32
    assert contract.OPENVINO_BF16 not in flavour_order("vnni", every)
    assert flavour_order("bf16", every) == flavour_order("vnni", every)
    assert flavour_order("amx", every)[:2] == [contract.OPENVINO_INT8, contract.OPENVINO_BF16]
    assert (
        flavour_order("vnni", [contract.OPENVINO_INT8, *contract.FP32_FLAVOURS])[0] == contract.OPENVINO_INT8
    )


def _cpu_backbones(repository: Path) -> dict[str, Path]:
    return {
        d.name: d
        for d in sorted(repository.iterdir())
        if (p := parse_backbone_model_name(d.name)) and p[2] is contract.Kind.CPU
    }


def _check_cpu_models(*repositories: Path) -> set:
    """Each published CPU backbone names its flavours (files present), a probe holding each flavour's
    reference, the gate, and an FP32 flavour to fall back to; the int8 one serves TensorRT's Q/DQ file
    and carries the FP32 export as its fallback. Returns the precisions seen."""
    seen = set()
    for repository in repositories:
        for name, d in _cpu_backbones(repository).items():
            params = read_params(read_config(d / "config.pbtxt"), CpuBackboneParams)
            assert params.probe == PROBE_NAME and params.probe_min_cosine == PROBE_MIN_COSINE, name
            assert contract.ONNXRUNTIME_FP32 in params.flavours, name
            probe = np.load(d / "1" / params.probe)
            for flavour, file in params.flavours.items():
                assert (d / "1" / file).is_file(), (name, file)
                assert f"embeddings_{PROBE_REFERENCE[flavour]}" in probe, (name, flavour)
            precision = parse_backbone_model_name(name)[1]
            seen.add(precision)
            if precision is Precision.INT8:  # TensorRT's Q/DQ file, served on CPU
                assert params.flavours[contract.OPENVINO_INT8] == contract.ONNX_FILE
                assert params.flavours[contract.ONNXRUNTIME_FP32] == contract.FP32_FALLBACK_FILE
                art = repository.parent / "artifacts"
                art = art if art.is_dir() else Path(os.environ.get("VITSERVE_TEST_ARTIFACTS", art))
                qdq, fp32 = (art / "vitb32" / p / contract.ONNX_FILE for p in ("int8", "fp32"))
                assert (d / "1" / contract.ONNX_FILE).read_bytes() == qdq.read_bytes()
                assert (d / "1" / contract.FP32_FALLBACK_FILE).read_bytes() == fp32.read_bytes()
                token = [f for f in contract.INT8_ISAS if f in params.flavours]  # per-token int8 flavours
                assert token and all(params.flavours[f] == f"model.{f}.onnx" for f in token), params.flavours
    return seen


def test_every_cpu_model_carries_its_flavours_probe_and_fp32_fallback(vitb32_build):
    seen = _check_cpu_models(vitb32_build["repository"])
    assert {Precision.FP32, Precision.BF16, Precision.CPU_INT8} <= seen  # what this build publishes


def test_the_int8_variant_carries_per_token_cpu_flavours_for_hosts_openvino_int8_does_not_fit(vitb32_build):
    """The INT8 variant (TensorRT's Q/DQ file) also carries the per-token cpu-int8 flavours, scored
    hardware-independently and gated like cpu-int8; its CPU model tries OpenVINO on the Q/DQ file first, then
    the published per-token flavours (named model.<flavour>.onnx beside the Q/DQ model.onnx), then FP32, and
    its probe holds every one's reference."""
    from vitserve.exporter.config import load_models
    from vitserve.exporter.pipeline import cpu_flavours
    from vitserve.exporter.precision import CPU_INT8_FLAVOURS, CPU_INT8_SUBDIR, VARIANT_REPORT
    from vitserve.exporter.repository import Variant

    spec = load_models(vitb32_build["config"])[0]
    art = vitb32_build["artifacts"] / "vitb32"
    report = json.loads((art / "int8" / VARIANT_REPORT).read_text())
    token = report["cpu_int8"]
    assert token["mode"] == "token" and set(token["flavours"]) == set(CPU_INT8_FLAVOURS)
    for f in token["flavours"].values():
        assert f["fidelity"]["hardware_independent"] and f["gate"].startswith(("PASS", "FAIL"))
    published = token["published_flavours"]
    assert published == [k for k, f in token["flavours"].items() if f["passed"]]
    fp32 = art / "fp32" / contract.ONNX_FILE
    flavours = cpu_flavours(Precision.INT8, art, {"int8": report}, fp32, (), spec)
    names = [k for k, _ in flavours]
    assert names == [contract.OPENVINO_INT8, *published, *contract.FP32_FLAVOURS, "probe"]
    served = Variant(
        Precision.INT8, Kind.CPU, art / "int8" / contract.ONNX_FILE, None, flavours
    ).served_files()
    assert served[contract.OPENVINO_INT8][0] == contract.ONNX_FILE
    for k in published:
        assert served[k] == (f"model.{k}.onnx", art / "int8" / CPU_INT8_SUBDIR / CPU_INT8_FLAVOURS[k]["file"])
    probe = np.load(served["probe"][1])
    assert {f"embeddings_{PROBE_REFERENCE[k]}" for k in names if k != "probe"} <= set(probe.files)


def test_fp16_parts_made_fp32_compute_in_fp32():
    """onnxrt.float16_as_float32 (the arithmetic of OpenVINO on a graph with FP16 parts): an FP16 matmul
    between casts computes x @ w in float32, with the weights as stored, and no FP16 is left."""
    from onnx import TensorProto, helper, numpy_helper

    from vitserve.exporter import onnxrt

    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 64)).astype(np.float32), rng.standard_normal((64, 5)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
            helper.make_node("MatMul", ["x16", "w"], ["y16"]),
            helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])],
        [numpy_helper.from_array(w.astype(np.float16), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = onnxrt._options(1, "disabled")

    def run(m):
        return onnxrt._session_of(m, so).run(["y"], {"x": x})[0]

    exact = x.astype(np.float64) @ w.astype(np.float16).astype(np.float64)  # the weights as stored
    after = run(onnxrt.float16_as_float32(model))
    np.testing.assert_allclose(after, exact, atol=1e-5)
    assert all(t.data_type == TensorProto.FLOAT for t in model.graph.initializer)
    assert all(a.i == TensorProto.FLOAT for n in model.graph.node for a in n.attribute if a.name == "to")


def test_the_int8_probe_reference_is_the_qdq_file_as_openvino_computes_it(vitb32_build):
    """The probe's `int8` reference (what the `openvino-int8` flavour must reproduce) is the Q/DQ file with
    its FP16 parts in FP32, not TensorRT's FP16 arithmetic (the fidelity report's): OpenVINO runs FP16 parts
    at its own precision, and against the FP16 arithmetic it was refused on hosts where it is exact."""
    from vitserve.exporter import onnxrt

    art = vitb32_build["artifacts"] / "vitb32" / "int8"
    probe = np.load(art / PROBE_NAME)
    x = probe[contract.PIXELS]
    ref = probe[f"{contract.EMBEDDINGS}_{PROBE_REFERENCE[contract.OPENVINO_INT8]}"]
    session, what = onnxrt.exact_session(art / contract.ONNX_FILE, optimization="extended", float32=True)
    assert what.endswith("its FP16 parts in FP32")
    np.testing.assert_allclose(ref, onnxrt.run(session, x, batch_size=len(x))[contract.EMBEDDINGS], atol=1e-5)


def test_without_openvino_its_flavours_are_skipped_with_a_log_line(vitb32_build, monkeypatch, capsys):
    """A serving environment without OpenVINO (its import fails): the model says so and serves the next
    flavour, onnxruntime FP32, on the real files."""
    from vitserve.perf.bench_lanes import load

    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    model = load(vitb32_build["repository"] / "vitb32_fp32_cpu", cpu_threads=1, cpu_lanes=1)
    try:
        assert model.flavour == contract.ONNXRUNTIME_FP32
        pixels = _photos(2)
        assert model._run(pixels)[0].shape == (2, 512)
    finally:
        model.finalize()
    out = capsys.readouterr().out
    assert f"flavour '{contract.OPENVINO_FP32}' skipped: openvino is not installed" in out
    assert f"CPU flavour '{contract.ONNXRUNTIME_FP32}' for host" in out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _batch_invariance(url: str, models: list[str], pixels: np.ndarray, max_batch: int) -> dict:
    """Worst max abs difference of each model's normalised embeddings, per way of batching, vs each image
    sent alone: requests of 2 and of `max_batch` images, and all images at once as single-image requests
    (the dynamic batcher chooses their batch-mates)."""
    import tritonclient.http as httpclient

    n = len(pixels)
    worst = {}
    client = httpclient.InferenceServerClient(url, concurrency=n)

    def request(x):
        inp = httpclient.InferInput(contract.PIXELS, list(x.shape), "FP32")
        inp.set_data_from_numpy(np.ascontiguousarray(x))
        return [inp]

    try:
        for model in models:

            def infer(x, m=model):
                return client.infer(m, request(x)).as_numpy(contract.EMBEDDINGS)

            alone = _unit(np.concatenate([infer(pixels[i : i + 1]) for i in range(n)]))
            runs = {
                f"b{b}": np.concatenate([infer(pixels[i : i + b]) for i in range(0, n, b)])
                for b in (2, max_batch)
            }
            pending = [client.async_infer(model, request(pixels[i : i + 1])) for i in range(n)]
            runs[f"c{n}"] = np.concatenate([p.get_result().as_numpy(contract.EMBEDDINGS) for p in pending])
            for how, got in runs.items():
                worst[f"{model} {how}"] = float(np.abs(_unit(got) - alone).max())
    finally:
        client.close()
    print("batch invariance, max abs:", json.dumps(worst))
    return worst


def _photos(count: int) -> np.ndarray:
    from vitserve.exporter.backbones import get_backbone
    from vitserve.exporter.precision import eval_pixels

    entry = get_backbone("ViT-B-32")
    return np.ascontiguousarray(eval_pixels(entry, entry.preprocess, count)[1])


@pytest.mark.triton
def test_published_cpu_models_answer_the_same_in_any_batch(vitb32_build, vitb32_server):
    """Every CPU variant published by default (of vitb32_build: fp32, bf16; int8 in the test below) and
    cpu-int8 in its default per-token mode, through the real tritonserver: the same photos alone, in
    requests of 2 and of the model's max batch (8 here), and as 16 concurrent single-image requests: max
    abs <= 1e-4 on the normalised embeddings."""
    repository = vitb32_build["repository"]
    invariant = (*CPU_DEFAULT_PRECISIONS, Precision.CPU_INT8)
    models = [n for n in _cpu_backbones(repository) if parse_backbone_model_name(n)[1] in invariant]
    assert Precision.CPU_INT8 in {parse_backbone_model_name(n)[1] for n in models}
    max_batch = read_config(repository / "vitb32" / "config.pbtxt").max_batch_size
    worst = _batch_invariance(vitb32_server.http_url, models, _photos(16), max_batch)
    print("batch invariance, max abs by model:", worst)
    assert max(worst.values()) <= BATCH_INVARIANCE_MAX_ABS, worst


def _tampered_copy(repo: Path, src: Path, name: str) -> None:
    """A copy of `src` whose probe expects other numbers from every quantized flavour: what a host whose
    int8 kernels do not compute the verified model looks like (the references are scaled noise)."""
    from dataclasses import replace

    from vitserve.exporter.repository import set_params, write_config

    dst = repo / name
    shutil.copytree(src, dst)
    cfg = read_config(dst / "config.pbtxt")
    cfg.name = name
    set_params(cfg, replace(read_params(cfg, CpuBackboneParams), isa="amx"))  # every flavour is tried
    write_config(dst, cfg)
    probe = dict(np.load(dst / "1" / PROBE_NAME))
    rng = np.random.default_rng(0)
    for key in list(probe):
        if key.startswith("embeddings_") and key != "embeddings_fp32":
            probe[key] = rng.standard_normal(probe[key].shape).astype(np.float32)
    (dst / "1" / PROBE_NAME).unlink()
    with open(dst / "1" / PROBE_NAME, "wb") as fh:
        np.savez(fh, **probe)


@pytest.mark.slow
@pytest.mark.triton
def test_int8_serves_batch_invariant_and_a_host_where_nothing_quantized_passes_serves_fp32(
    vitb32_build, vitb32_cpu_repository, tmp_path
):
    """The CPU int8 model (TensorRT's Q/DQ file; published here with `force`, the random head fails its
    top-1 gate) is laid out as the others and answers the same in any batch (on whichever flavour this host
    picks); copies of the int8 and bf16 models whose probes no quantized flavour can pass (CPU class forced
    to the one that tries them all) load, serve FP32 embeddings, and log it as an error. (The fast tier
    forces the same refusal on the cpu-int8 model: test_cpu_isa.py.)"""
    assert {Precision.INT8, Precision.BF16} <= _check_cpu_models(vitb32_cpu_repository)
    from vitserve.exporter import onnxrt
    from vitserve.server import TritonServer

    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(vitb32_cpu_repository / "vitb32_int8_cpu", repo / "vitb32_int8_cpu")
    tampered = {"int8_refused": "vitb32_int8_cpu", "bf16_refused": "vitb32_bf16_cpu"}
    for name, src in tampered.items():
        _tampered_copy(repo, vitb32_cpu_repository / src, name)
    pixels = _photos(8)
    ref = onnxrt.run(
        onnxrt.cpu_session(vitb32_build["artifacts"] / "vitb32" / "fp32" / contract.ONNX_FILE), pixels
    )
    log = tmp_path / "server.log"
    with TritonServer(repo, log_path=log) as server:
        max_batch = read_config(repo / "vitb32_int8_cpu" / "config.pbtxt").max_batch_size
        worst = _batch_invariance(server.http_url, ["vitb32_int8_cpu"], pixels, max_batch)
        print("batch invariance, max abs by model:", worst)
        assert max(worst.values()) <= BATCH_INVARIANCE_MAX_ABS, worst
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(server.http_url)
        try:
            for n in tampered:
                inp = httpclient.InferInput(contract.PIXELS, list(pixels.shape), "FP32")
                inp.set_data_from_numpy(pixels)
                got = client.infer(n, [inp]).as_numpy(contract.EMBEDDINGS)
                assert np.abs(_unit(got) - _unit(ref["embeddings"])).max() <= 1e-4, n
        finally:
            client.close()
    text = log.read_text()
    for n in tampered:
        assert f"{n}: SERVING FP32: no quantized flavour of this model" in text, n
        served = re.findall(rf"{n}: CPU flavour '([\w-]+)' for host", text)
        assert served and served[0] in contract.FP32_FLAVOURS, (n, served)


QEMU = shutil.which("qemu-x86_64")


@pytest.mark.slow
@pytest.mark.skipif(QEMU is None, reason="qemu-user is not installed (apt-get install qemu-user)")
def test_probe_under_real_avx2_kernels_passes_with_margin_or_refuses(vitb32_cpu_repository):
    """Each default CPU model's probe run under `qemu-x86_64 -cpu Haswell` (real AVX2/FMA kernels, no
    AVX-512/VNNI), its CPU class given explicitly (qemu shows the host's /proc/cpuinfo): every flavour an
    AVX2 host tries either passes with a margin >= 5x its distance to the reference, or is refused, and a
    flavour serves. One probe image (emulation runs ViT-B-32 FP32 at ~2 min per image)."""
    for name, d in _cpu_backbones(vitb32_cpu_repository).items():
        if parse_backbone_model_name(name)[1] not in CPU_DEFAULT_PRECISIONS:
            continue
        cmd = [QEMU, "-cpu", "Haswell", sys.executable, "-m", "vitserve.exporter.triton_models.onnx_cpu"]
        cmd += ["--probe", str(d), "--isa", "avx2", "--images", "1"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=3000, check=True)
        result = json.loads(out.stdout)
        assert result["serves"] is not None, (name, result)
        gate = result["min_cosine"]
        for flavour, r in result["flavours"].items():
            spread = 1 - r["cosine"]
            assert r["cosine"] < gate or r["cosine"] - gate >= 5 * spread, (name, flavour, r)
        print(name, json.dumps(result))


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA, which OpenVINO's CPU plugin honours): a cap above the host's ISA
# changes nothing, AVX2 has no VNNI on any x86-64 host
ONEDNN_CAPS = ("AVX2", "AVX512_CORE", "AVX512_CORE_VNNI", "AVX512_CORE_BF16", "AVX512_CORE_AMX")


@pytest.mark.slow
def test_openvino_int8_probe_under_lower_isas_passes_with_margin_or_refuses(vitb32_cpu_repository):
    """The int8 model's `openvino-int8` probe with OpenVINO's kernels capped at each lower ISA of this host
    (its cross-ISA spread, measured on one host): it either passes with a margin >= 5x its distance to the
    reference, or is refused; and capped at AVX2 (u8 x s8 pairs summed in int16: saturation) it is refused
    on every host."""
    from vitserve.contract import OPENVINO_INT8
    from vitserve.exporter.triton_models.onnx_cpu import have_openvino, probe_passed

    if have_openvino() is not None:
        pytest.skip(have_openvino())
    d = vitb32_cpu_repository / "vitb32_int8_cpu"
    seen = {}
    for cap in ONEDNN_CAPS:
        cmd = [sys.executable, "-m", "vitserve.exporter.triton_models.onnx_cpu", "--probe", str(d)]
        cmd += ["--only", OPENVINO_INT8, "--threads", "2"]
        env = {**os.environ, "ONEDNN_MAX_CPU_ISA": cap}
        result = json.loads(subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout)
        r, gate = result["flavours"][OPENVINO_INT8], result["min_cosine"]
        seen[cap] = r
        if "error" in r:  # OpenVINO could not compile it under this cap: refused, as the server refuses it
            continue
        spread = 1 - r["cosine"]
        assert r["cosine"] < gate or r["cosine"] - gate >= 5 * spread, (cap, r)
    print(json.dumps(seen))
    assert not probe_passed({"flavours": seen, "min_cosine": gate}, "AVX2"), seen


@pytest.mark.slow
@pytest.mark.triton
def test_static_cpu_int8_loads_and_answers_the_same_in_any_batch(vitb32_build, linear_head, tmp_path):
    """`cpu_int8_mode: static` (calibrated QDQ, fixed scales): its probe reference is what onnxruntime's
    QLinear kernels compute, so it loads (a flavour passes its probe, or FP32 serves, saying so) and gives
    an image the same embedding alone or in a batch; within the cpu-int8 gate of FP32."""
    from conftest import write_models_yaml

    from vitserve.exporter import onnxrt
    from vitserve.exporter.config import Gates
    from vitserve.exporter.pipeline import build_all
    from vitserve.server import TritonServer

    art = tmp_path / "artifacts"
    shutil.copytree(vitb32_build["artifacts"] / "vitb32" / "fp32", art / "vitb32" / "fp32")  # export: cached
    config = write_models_yaml(
        tmp_path / "models.yaml",
        *linear_head,
        precisions=["fp32", "cpu-int8"],
        cpu_precisions=["fp32", "cpu-int8"],
        cpu_int8_mode="static",
    )
    build_all(config, tmp_path / "repo", art, random_init=True)
    name = "vitb32_cpu-int8_cpu"
    assert (tmp_path / "repo" / name).is_dir()
    pixels = _photos(8)
    ref = onnxrt.run(onnxrt.cpu_session(art / "vitb32" / "fp32" / contract.ONNX_FILE), pixels)[
        contract.EMBEDDINGS
    ]
    with TritonServer(tmp_path / "repo", log_path=tmp_path / "server.log") as server:
        worst = _batch_invariance(server.http_url, [name], pixels, 8)
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(server.http_url)
        try:
            inp = httpclient.InferInput(contract.PIXELS, list(pixels.shape), "FP32")
            inp.set_data_from_numpy(pixels)
            got = client.infer(name, [inp]).as_numpy(contract.EMBEDDINGS)
        finally:
            client.close()
    assert max(worst.values()) <= BATCH_INVARIANCE_MAX_ABS, worst
    cos = (_unit(got) * _unit(ref)).sum(1)
    assert cos.mean() >= Gates().cpu_int8_mean_cosine, cos
    text = (tmp_path / "server.log").read_text()
    assert re.search(rf"{name}: cpu-int8 flavour '(vnni|avx2)' for host", text) or "SERVING FP32" in text


def test_the_serving_bench_builds_the_default_beside_todays_cpu_int8(tmp_path):
    """`bench_pipeline serving` measures what models.yaml publishes against the per-call dynamic cpu-int8:
    its config is models.yaml's first model (so it follows the committed defaults) and it loads."""
    import yaml

    from vitserve.exporter.config import Precision, load_models
    from vitserve.perf.bench_pipeline import MODELS_YAML, serving_config

    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(serving_config(["ViT-B-32", "ViT-B-16"])))
    specs = {s.name: s for s in load_models(path)}
    assert list(specs) == ["vitb32", "vitb32dyn", "vitb16", "vitb16dyn"]
    default = next(s for s in load_models(MODELS_YAML))
    for name in ("vitb32", "vitb16"):
        assert (
            specs[name].precisions == default.precisions
            and specs[name].cpu_precisions == default.cpu_precisions
        )
        assert specs[name].dynamic_batching == default.dynamic_batching and specs[name].force
        assert specs[name].weights == "random" and not specs[name].text
        assert specs[f"{name}dyn"].cpu_precisions == (Precision.CPU_INT8,)
        assert specs[f"{name}dyn"].cpu_int8_mode == "dynamic"
