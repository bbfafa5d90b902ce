"""One identity per artifact (exporter/identity.py) and one pixel recipe per model, end to end on ViT-B-32.

Every cache key comes from the content of all the files that make the model (graph AND external data) and
the pixel recipe its inputs were made with. ViT-B-32 (random init) is sent down the external-data path
that every model past 2 GB takes, by lowering the exporter's threshold.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from vitserve.exporter import backbones, export
from vitserve.exporter.config import ModelSpec, Precision
from vitserve.exporter.identity import artifact_key, model_digest, model_files


def _tiny(folder: Path, weights: np.ndarray, location: str | None) -> Path:
    """x @ W as model.onnx, W stored in the graph or in the external-data file `location`."""
    w = numpy_helper.from_array(weights.astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [w],
    )
    model = helper.make_model(graph)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    if location:
        onnx.save_model(model, str(path), save_as_external_data=True, location=location, size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


def test_model_digest_covers_every_external_data_file_the_graph_references(tmp_path):
    a = _tiny(tmp_path / "a", np.eye(4), "weights.bin")  # not the `<name>.data` convention
    b = _tiny(tmp_path / "b", 2 * np.eye(4), "weights.bin")
    assert model_files(a) == [a, tmp_path / "a" / "weights.bin"]
    assert a.read_bytes() == b.read_bytes()  # the graphs are the same file: only the weights differ
    assert model_digest(a) != model_digest(b)
    inline = _tiny(tmp_path / "c", np.eye(4), None)
    assert model_files(inline) == [inline]
    # the key of an artifact follows the model's content, its recipe and its settings
    recipe = backbones.get_backbone("ViT-B-32").preprocess
    key = artifact_key("x", models={"m": a}, recipe=recipe, n=1)
    assert key == artifact_key("x", models={"m": a}, recipe=recipe, n=1)
    assert key != artifact_key("x", models={"m": b}, recipe=recipe, n=1)
    assert key != artifact_key("x", models={"m": a}, recipe=recipe, n=2)
    half = backbones.Preprocess(224, 224, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert key != artifact_key("x", models={"m": a}, recipe=half, n=1)


def _spec(root: Path, **kw) -> ModelSpec:
    head = root / "head.pt"
    if not head.exists():
        g = torch.Generator().manual_seed(0)
        torch.save({"fc.weight": torch.randn(3, 512, generator=g), "fc.bias": torch.zeros(3)}, head)
    base = {
        "name": "m",
        "backbone": "ViT-B-32",
        "weights": "random",
        "heads": {"x": {"head": f"linear:{head}", "labels": ["a", "b", "c"]}},
        "precisions": ["fp32", "cpu-int8"],
        "calibration": {"num_images": 4},
    }
    return ModelSpec.from_dict(base | kw)


def _class_folder(root: Path) -> list[tuple[Path, int]]:
    """Two classes of two real photographs each (train-head's DIR/class/*.jpg)."""
    from vitserve.exporter.samples import eval_photos
    from vitserve.exporter.train_head import find_images

    for i, (name, im) in enumerate(eval_photos()[:4]):
        (root / "images" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        im.save(root / "images" / f"c{i % 2}" / f"{name}.jpg", quality=90)
    return find_images(root / "images")[1]


def _stages(spec: ModelSpec, model_dir: Path, items) -> dict:
    """What `make engines` and `vitserve train-head` key on the export in `model_dir/fp32`: the cpu-int8
    variant, the TensorRT verify set, train-head's features, the heads' evaluation outputs."""
    from vitserve.exporter.export import read_manifest
    from vitserve.exporter.multihead import HEADS_DIR, _eval_outputs
    from vitserve.exporter.pipeline import write_verify_set
    from vitserve.exporter.precision import eval_pixels, make_variant
    from vitserve.exporter.train_head import _features

    fp32 = model_dir / "fp32"
    manifest = read_manifest(fp32)
    recipe = spec.served_preprocess(manifest)
    variant = make_variant(Precision.CPU_INT8, fp32, model_dir / "cpu-int8", spec, eval_count=8)
    verify = write_verify_set({"spec": spec, "manifest": manifest, "fp32_dir": fp32}, model_dir)
    with np.load(verify) as data:
        verify_set = {k: data[k] for k in data.files}
    features, features_cached, _ = _features(fp32, manifest, items, model_dir / "features", recipe)
    _, pixels = eval_pixels(backbones.get_backbone("ViT-B-32"), recipe, 8)
    evals = _eval_outputs(fp32 / "model.onnx", Precision.FP32, model_dir / HEADS_DIR, pixels, recipe)
    with np.load(model_dir / "cpu-int8" / "probe.npz") as probe:
        probe_pixels = probe["pixel_values"]
    return {
        "recipe": recipe,
        "variant": variant,
        "verify": verify_set,
        "features": features,
        "features_cached": features_cached,
        "evals": evals,
        "probe_pixels": probe_pixels,
    }


def _check_new_weights_rebuild_everything(spec, model_dir, items, new_weights) -> None:
    first = _stages(spec, model_dir, items)
    assert not first["variant"]["cached"]
    again = _stages(spec, model_dir, items)  # unchanged: everything reused
    assert again["variant"]["cached"] and again["features_cached"]
    assert str(again["verify"]["key"]) == str(first["verify"]["key"])
    graph = (model_dir / "fp32" / "model.onnx").read_bytes()
    new_weights(model_dir / "fp32")
    assert (model_dir / "fp32" / "model.onnx").read_bytes() == graph  # only model.onnx.data changed
    second = _stages(spec, model_dir, items)
    assert second["variant"]["key"] != first["variant"]["key"] and not second["variant"]["cached"]
    assert str(second["verify"]["key"]) != str(first["verify"]["key"])
    assert np.abs(second["verify"]["ref_embeddings"] - first["verify"]["ref_embeddings"]).max() > 1e-3
    assert not second["features_cached"]
    assert np.abs(second["features"] - first["features"]).max() > 1e-3
    assert np.abs(second["evals"]["features"] - first["evals"]["features"]).max() > 1e-3


def _check_pixels_follow_the_manifests_recipe(spec, model_dir, items) -> None:
    from vitserve.exporter.export import read_manifest, to_pixels, write_manifest
    from vitserve.exporter.precision import eval_pixels
    from vitserve.exporter.samples import eval_photos

    default = _stages(spec, model_dir, items)
    manifest = read_manifest(model_dir / "fp32")
    manifest["preprocess"] |= {"mean": [0.5] * 3, "std": [0.5] * 3}
    write_manifest(model_dir / "fp32", manifest)
    got = _stages(spec, model_dir, items)

    recipe, entry = got["recipe"], backbones.get_backbone("ViT-B-32")
    assert recipe.mean == (0.5,) * 3 and recipe != default["recipe"]
    # the variant: rebuilt, calibrated and scored on the recipe's pixels (its probe is a fidelity batch)
    assert backbones.Preprocess.from_dict(got["variant"]["preprocess"]) == recipe
    assert not got["variant"]["cached"] and got["variant"]["key"] != default["variant"]["key"]
    _, photos = to_pixels(entry, eval_photos()[:4], recipe)
    np.testing.assert_array_equal(got["probe_pixels"], photos)
    _, clip = to_pixels(
        entry, eval_photos()[:4], entry.preprocess
    )  # CLIP's 0.481/0.269: what the default recipe made
    np.testing.assert_array_equal(default["probe_pixels"], clip)
    assert np.abs(photos - clip).max() > 0.5  # the two recipes' pixels differ: the check can fail
    # the TensorRT verify set and train-head's features
    np.testing.assert_array_equal(got["verify"]["pixels"], eval_pixels(entry, recipe, 32)[1])
    assert not got["features_cached"]
    from PIL import Image

    from vitserve.exporter import onnxrt

    _, pixels = to_pixels(entry, [(str(f), Image.open(f)) for f, _ in items], recipe)
    ref = onnxrt.run(onnxrt.cpu_session(model_dir / "fp32" / "model.onnx"), pixels)["features"]
    np.testing.assert_allclose(got["features"], ref, rtol=1e-5, atol=1e-5)


def test_external_data_models_have_their_own_identity(tmp_path):
    """Two models whose graph files are the same, weights in model.onnx.data (every model past 2 GB):
    after the new weights replace the old, nothing keyed by the old ones is reused (the variant, the
    verify set, train-head's features, the heads' evaluation outputs); unchanged, everything is."""
    from tiny_models import tiny_backbone

    model_dir = tmp_path / "artifacts" / "m"
    tiny_backbone(model_dir / "fp32", seed=0)
    _check_new_weights_rebuild_everything(
        _spec(tmp_path), model_dir, _class_folder(tmp_path), lambda fp32: tiny_backbone(fp32, seed=1)
    )


def test_build_time_pixels_follow_the_manifests_recipe(tmp_path):
    """Weights that normalize with 0.5/0.5 (a checkpoint's open_clip_config.json preprocess_cfg, or
    ViT-L-14's laion2b_s32b_b82k tag; the manifest records it): the variant's calibration and fidelity
    pixels, its probe, the TensorRT verify set and train-head's features are made with that recipe, not
    CLIP's default, and the keys follow the recipe."""
    from tiny_models import tiny_backbone

    model_dir = tmp_path / "artifacts" / "m"
    tiny_backbone(model_dir / "fp32", seed=0)
    _check_pixels_follow_the_manifests_recipe(_spec(tmp_path), model_dir, _class_folder(tmp_path))


def test_random_init_seed_is_part_of_the_export_key(tmp_path, monkeypatch):
    from vitserve.exporter.pipeline import export_key

    spec = _spec(tmp_path)
    key = export_key(spec, "random", None)
    monkeypatch.setattr(backbones, "RANDOM_INIT_SEED", 1)
    assert export_key(spec, "random", None) != key


def _reweigh(fp32: Path) -> None:
    """What re-exporting another checkpoint leaves: the same graph file, other bytes in model.onnx.data."""
    model = onnx.load(str(fp32 / "model.onnx"))
    for t in model.graph.initializer:
        if t.data_type == TensorProto.FLOAT and len(t.dims) == 2 and t.dims[0] * t.dims[1] >= 1024:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.5, t.name))
    (fp32 / "model.onnx.data").unlink()
    onnx.save_model(  # as the exporter saves it (export._finalize_onnx)
        model,
        str(fp32 / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,
    )


@pytest.mark.slow
def test_vitb32_exported_with_external_data_has_its_own_identity_and_recipe(tmp_path, monkeypatch):
    """The same two checks on a real export: ViT-B-32 (random init) sent down the exporter's external-data
    path by lowering its threshold."""
    from vitserve.exporter.pipeline import export_stage

    spec, items = _spec(tmp_path), _class_folder(tmp_path)
    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 1 << 20)
    fp32, manifest = export_stage(spec, tmp_path / "export", random_init=True)
    assert manifest["external_data"] and (fp32 / "model.onnx.data").is_file()
    a, b = tmp_path / "a" / "m", tmp_path / "b" / "m"
    for model_dir in (a, b):
        shutil.copytree(fp32, model_dir / "fp32")
    _check_new_weights_rebuild_everything(spec, a, items, _reweigh)
    _check_pixels_follow_the_manifests_recipe(spec, b, items)
