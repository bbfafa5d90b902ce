"""Precision variants: Q/DQ placement, fidelity reports that measure something, calibration input."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import numpy as np
import onnx
import pytest
from PIL import Image

from vitserve.errors import CalibrationError
from vitserve.exporter.config import Calibration, Precision, load_models
from vitserve.exporter.precision import attention_matmuls, calibration_files, make_variant


def _report(build, precision: str) -> dict:
    return json.loads((build["artifacts"] / "vitb32" / precision / "variant.json").read_text())


def _spec(build):
    return load_models(build["config"])[0]


def test_int8_has_qdq_on_weight_matmuls_and_not_on_attention(vitb32_build):
    art = vitb32_build["artifacts"] / "vitb32"
    model = onnx.load(str(art / "int8" / "model.onnx"))
    produced_by = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    attention = set(attention_matmuls(art / "fp32" / "model.onnx"))
    assert len(attention) == 2 * 12  # Q.K^T and softmax.V in each of the 12 blocks
    quantized_weights = 0
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        feeders = [produced_by.get(i) for i in node.input[:2]]
        dq = [f for f in feeders if f is not None and f.op_type == "DequantizeLinear"]
        if node.name in attention:
            assert not dq, f"attention matmul {node.name} was quantized"
        elif any(
            f.input[0] in inits or produced_by.get(f.input[0], f).op_type == "QuantizeLinear" for f in dq
        ):
            quantized_weights += 1
    assert quantized_weights >= 12 * 4  # qkv, out-proj, fc1, fc2 per block
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert q and all(_zero_point_is_zero(model, n) for n in q)  # symmetric


def _zero_point_is_zero(model, node) -> bool:
    if len(node.input) < 3:
        return True
    from onnx import numpy_helper

    for i in model.graph.initializer:
        if i.name == node.input[2]:
            return not numpy_helper.to_array(i).any()
    return True


def test_fidelity_reports_and_gates(vitb32_build):
    """Every report measures something and its verdict follows from its numbers and the gates; what is
    published follows from the verdicts. (Which variant passes is not asserted: that is the model's.)"""
    from vitserve.exporter.config import Gates
    from vitserve.exporter.precision import check_gate

    for precision in ("fp16", "int8", "cpu-int8"):
        r = _report(vitb32_build, precision)
        emb = r["fidelity"]["outputs"]["embeddings"]
        assert 0 < emb["cosine_min"] <= emb["cosine_mean"] <= 1.0
        assert r["fidelity"]["outputs"]["logits"]["top1_agreement"] >= 0
        assert "onnxruntime" in r["fidelity"]["evaluator"]
        assert r["fidelity"]["images"] >= 16
        assert not set(r["fidelity"]["eval_images"]) & {
            p.split("/")[-1].rsplit(".", 1)[0] for p in r["calibration_images"]
        }
        if precision != "cpu-int8":
            assert (r["passed"], r["gate"]) == check_gate(Precision(precision), r["fidelity"], Gates())
    fp16 = _report(vitb32_build, "fp16")
    assert "EXTENDED" in fp16["fidelity"]["evaluator"]
    assert fp16["details"]["kept_fp32"]  # LayerNorm / Softmax at least
    assert any("LayerNormalization" in n for n in fp16["details"]["kept_fp32"])
    summary = vitb32_build["summary"]["models"]["vitb32"]
    published = {m["precision"] for m in summary["triton_models"].values() if m["role"] == "backbone"}
    # the CPU kind loads fp32 and cpu-int8 (cpu_precisions); fp16/int8 are built for the GPU kinds
    assert "fp16" not in published and "int8" not in published
    assert ("cpu-int8" in published) == _report(vitb32_build, "cpu-int8")["passed"]


def test_unchanged_rebuild_is_cached(vitb32_build):
    spec = _spec(vitb32_build)
    art = vitb32_build["artifacts"] / "vitb32"
    t0 = time.perf_counter()
    report = make_variant(Precision.INT8, art / "fp32", art / "int8", spec)
    assert report["cached"] is True and time.perf_counter() - t0 < 10


@pytest.mark.slow  # a third INT8 calibration of ViT-B-32: ~3 min on an AVX2 host
def test_broken_calibration_scores_visibly_worse(vitb32_build, tmp_path):
    """The fidelity numbers are computed from the model: calibrating on flat mean-grey images (which
    normalize to ~0, so the input scale is tiny and real photos saturate) gives a visibly worse INT8.

    (All-black images are not broken enough: they normalize to -mean/std, about the range of a photo,
    and with random-init weights LayerNorm makes every later range image-independent.)"""
    grey = tmp_path / "grey"
    grey.mkdir()
    for i in range(8):
        Image.new("RGB", (256, 256), (123, 117, 104)).save(grey / f"{i}.png")
    spec = _spec(vitb32_build)
    spec = replace(spec, calibration=Calibration(images=str(grey), num_images=8, method="max"))
    art = vitb32_build["artifacts"] / "vitb32"
    bad = make_variant(Precision.INT8, art / "fp32", tmp_path / "int8_grey", spec)
    good = _report(vitb32_build, "int8")
    bad_cos = bad["fidelity"]["outputs"]["embeddings"]["cosine_mean"]
    good_cos = good["fidelity"]["outputs"]["embeddings"]["cosine_mean"]
    assert bad_cos < 0.95 < 0.99 < good_cos, (bad_cos, good_cos)
    assert not bad["passed"] and "FAIL" in bad["gate"]


def test_calibration_folder_errors(tmp_path):
    with pytest.raises(CalibrationError, match=str(tmp_path / "missing")):
        calibration_files(Calibration(images=str(tmp_path / "missing")), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no jpg/png/webp"):
        calibration_files(Calibration(images=str(tmp_path / "empty")), tmp_path)


def test_unreadable_calibration_files_are_named_and_skipped(tmp_path, capsys):
    from vitserve.exporter.backbones import get_backbone
    from vitserve.exporter.precision import load_pixels

    folder = tmp_path / "cal" / "nested"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((64, 80, 3), 128, np.uint8)).save(folder / "ok.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG garbage")
    files = calibration_files(Calibration(images=str(tmp_path / "cal"), num_images=8), tmp_path)
    assert [f.name for f in files] == ["broken.png", "ok.jpg"]
    used, pixels = load_pixels(files, get_backbone("ViT-B-32"), get_backbone("ViT-B-32").preprocess)
    assert [f.name for f in used] == ["ok.jpg"] and pixels.shape == (1, 3, 224, 224)
    assert "broken.png" in capsys.readouterr().out
    (folder / "ok.jpg").unlink()
    with pytest.raises(CalibrationError, match=r"broken\.png"):
        load_pixels(
            calibration_files(Calibration(images=str(tmp_path / "cal")), tmp_path),
            get_backbone("ViT-B-32"),
            get_backbone("ViT-B-32").preprocess,
        )


def test_calibration_sampling_is_deterministic(tmp_path):
    for i in range(20):
        Image.new("RGB", (32, 32), (i, i, i)).save(tmp_path / f"{i:02d}.webp")
    cal = Calibration(images=str(tmp_path), num_images=5, seed=3)
    first = calibration_files(cal, tmp_path)
    assert first == calibration_files(cal, tmp_path) and len(first) == 5
    assert first != calibration_files(replace(cal, seed=4), tmp_path)


def test_model_config_refusals_name_the_value():
    from vitserve.errors import ConfigError
    from vitserve.exporter.config import ModelSpec

    base = {"name": "m", "backbone": "ViT-B-32"}
    with pytest.raises(ConfigError, match="'fast'"):
        ModelSpec.from_dict(base | {"precisions": ["fp32", "cpu-int8"], "cpu_int8_mode": "fast"})
    with pytest.raises(ConfigError, match="served by: cpu"):
        ModelSpec.from_dict(base | {"precisions": ["fp32", "cpu-int8"], "kinds": ["tensorrt"]})
    with pytest.raises(ConfigError, match="min=4 opt=2 max=8"):
        ModelSpec.from_dict(base | {"profile": {"min": 4, "opt": 2, "max": 8}})
    spec = ModelSpec.from_dict(
        base | {"precisions": ["fp32", "cpu-int8"], "kinds": ["cpu", "tensorrt"], "cpu_int8_mode": "static"}
    )
    assert spec.cpu_int8_mode == "static"


def test_build_pixels_follow_a_tag_that_normalizes_otherwise(tmp_path):
    """ViT-L-14 `pretrained:laion2b_s32b_b82k` (mean/std 0.5/0.5 in open_clip's pretrained cfg, no
    download needed): calibration (`load_pixels`), fidelity and the verify set (`eval_pixels`) and
    train-head (`to_pixels`) make its pixels with that recipe, equal to open_clip's own transform for the
    tag, not with CLIP's 0.481/0.269."""
    import open_clip

    from vitserve.exporter.backbones import get_backbone, library_preprocess, library_transform, prepare_image
    from vitserve.exporter.export import to_pixels
    from vitserve.exporter.precision import eval_pixels, load_pixels
    from vitserve.exporter.samples import eval_views

    vitl, tag = get_backbone("ViT-L-14"), "laion2b_s32b_b82k"
    assert open_clip.get_pretrained_cfg("ViT-L-14", tag)["std"] == (0.5, 0.5, 0.5)
    recipe = library_preprocess(vitl, tag)
    views = eval_views(3)
    tags_own = np.stack([library_transform(vitl, tag)(prepare_image(im, recipe)).numpy() for _, im in views])
    clip = np.stack([library_transform(vitl)(prepare_image(im, recipe)).numpy() for _, im in views])
    assert np.abs(tags_own - clip).max() > 1.0  # what the registry's default tag would have made
    files = []
    for name, im in views:
        im.save(tmp_path / f"{name}.png")
        files.append(tmp_path / f"{name}.png")
    np.testing.assert_array_equal(load_pixels(files, vitl, recipe)[1], tags_own)
    np.testing.assert_array_equal(eval_pixels(vitl, recipe, 3)[1], tags_own)
    np.testing.assert_array_equal(to_pixels(vitl, views, recipe)[1], tags_own)


def test_modelopt_dead_node_cleanup_removes_what_modelopts_own_removes():
    """running_modelopt swaps ModelOpt's quadratic AutoCast cleanup for `_cleanup_no_consumers`: on a
    random graph with dead ends, multi-output nodes and network outputs, both leave the same nodes."""
    from types import SimpleNamespace

    from modelopt.onnx.autocast.precisionconverter import PrecisionConverter
    from onnx import TensorProto, helper

    from vitserve.exporter import precision

    rng = np.random.default_rng(0)
    tensors, nodes = ["x"], []
    for i in range(400):
        inputs = list(rng.choice(tensors, size=int(rng.integers(1, 3))))
        outputs = [f"t{i}_{k}" for k in range(int(rng.integers(1, 3)))]
        nodes.append(helper.make_node("Custom", inputs, outputs, name=f"n{i}"))
        tensors += outputs
    outputs = [helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in rng.choice(tensors, 20)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)], outputs
    )
    theirs, ours = (SimpleNamespace(model=helper.make_model(graph)) for _ in range(2))
    with precision.running_modelopt():
        patched = PrecisionConverter._cleanup_no_consumer_nodes
    assert patched is precision._cleanup_no_consumers or precision._modelopt_version() != (
        precision.MODELOPT_CLEANUP_READ
    )
    assert PrecisionConverter._cleanup_no_consumer_nodes is not precision._cleanup_no_consumers  # restored
    PrecisionConverter._cleanup_no_consumer_nodes(theirs)
    precision._cleanup_no_consumers(ours)
    left = [n.name for n in ours.model.graph.node]
    assert [n.name for n in theirs.model.graph.node] == left
    assert 0 < len(left) < len(nodes)  # something was removed, something kept
