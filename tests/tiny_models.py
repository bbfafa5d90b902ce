"""A small real backbone ONNX for fast pipeline tests: what the exporter writes, at a size that quantizes and
runs in a second.

`tiny_backbone` writes `fp32/model.onnx` with its weights in `model.onnx.data` (the layout of every export
past 2 GB) and a manifest as `export_model` writes it, for the registry's ViT-B-32 input
(pixel_values [N, 3, 224, 224] -> embeddings, features): a 32x32 patch convolution and two weight matmuls
(which the CPU int8 quantizer quantizes), so every stage after the export (variants, verify sets, train-head,
heads) runs on it unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FEATURE_DIM = 16


def _graph(rng: np.random.Generator) -> onnx.ModelProto:
    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(
            (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name
        )

    inits = [
        weight("patch", 8, 3, 32, 32),
        weight("w1", 392, 64),
        weight("w2", 64, FEATURE_DIM),
        numpy_helper.from_array(np.array([-1, 392], np.int64), "flat"),
    ]
    nodes = [
        helper.make_node("Conv", ["pixel_values", "patch"], ["p"], strides=[32, 32], name="patch_embed"),
        helper.make_node("Reshape", ["p", "flat"], ["x"], name="flatten"),
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["a"], name="act"),
        helper.make_node("MatMul", ["a", "w2"], ["features"], name="fc2"),
        helper.make_node("LpNormalization", ["features"], ["embeddings"], axis=1, p=2, name="l2"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_backbone",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [
            helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", FEATURE_DIM]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", FEATURE_DIM]),
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def tiny_backbone(fp32_dir: Path, seed: int = 0, preprocess: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the tiny backbone (weights drawn with `seed`) to `fp32_dir` with its manifest; returns it.
    Two seeds give the same graph file and different `model.onnx.data`."""
    from vitserve.exporter.backbones import get_backbone
    from vitserve.exporter.export import EXTERNAL_DATA_NAME, write_manifest
    from vitserve.exporter.identity import sha256_file

    fp32_dir.mkdir(parents=True, exist_ok=True)
    path = fp32_dir / "model.onnx"
    for old in fp32_dir.glob("model.onnx*"):
        old.unlink()
    onnx.save_model(
        _graph(np.random.default_rng(seed)),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=EXTERNAL_DATA_NAME,
        size_threshold=1024,
    )
    entry = get_backbone("ViT-B-32")
    files = [path, fp32_dir / EXTERNAL_DATA_NAME]
    manifest = {
        "vitserve_manifest": 1,
        "backbone": entry.name,
        "weights": f"tiny test backbone, seed {seed}",
        "random_init": True,
        "input": {"name": "pixel_values", "shape": [-1, 3, 224, 224], "dtype": "float32"},
        "outputs": ["embeddings", "features"],
        "feature_dim": FEATURE_DIM,
        "preprocess": preprocess or entry.preprocess.as_dict(),
        "external_data": True,
        "files": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files},
        "variants": {},
        "build_key": f"tiny-{seed}",
    }
    write_manifest(fp32_dir, manifest)
    return manifest


def tiny_head(folder: Path, seed: int = 0, classes: int = 3) -> Path:
    """A head model (features -> logits, probs) as multihead.export_head writes it, in `folder`."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((FEATURE_DIM, classes)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "tiny_head",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", FEATURE_DIM])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes]),
        ],
        [w],
    )
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
        str(folder / "model.onnx"),
    )
    return folder / "model.onnx"
