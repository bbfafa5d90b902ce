"""What identifies a build artifact: the one function every cache key of the build comes from.

    files and models it is made from + the pixel recipe its inputs were made with + settings -> key

A key is a function of everything that changes the artifact. A model's content is ALL its files: the ONNX
graph and every external-data file it references (past 2 GB the weights live in model.onnx.data, so two
checkpoints have the same graph file). Keyed this way: the FP32 export (pipeline.export_key), the
precision variants (precision.variant_key), the TensorRT verify set, train-head's feature cache, the
heads' evaluation features and head models (multihead), and the TensorRT plans (engine.plan_cache_key).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from vitserve.contract import Preprocess


def sha256_file(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tensors(graph) -> Iterator[Any]:
    """Every TensorProto of `graph`: initializers, sparse initializers, and node attributes, subgraphs
    included (where an external-data reference can sit)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for g in attr.graphs:
                yield from _tensors(g)


def model_files(onnx_path: str | Path) -> list[Path]:
    """The files that make the ONNX model at `onnx_path`: the graph file, then every external-data file its
    tensors reference (sorted), then any `<name>.data*` file next to it that onnx's savers write. A file
    that does not parse as ONNX is taken as its bytes alone (whoever loads it reports the error)."""
    import onnx
    from google.protobuf.message import DecodeError

    onnx_path = Path(onnx_path)
    extra: set[Path] = set(onnx_path.parent.glob(onnx_path.name + ".data*"))
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except DecodeError:
        model = None
    if model is not None:
        for t in _tensors(model.graph):
            if t.data_location == onnx.TensorProto.EXTERNAL:
                location = next((e.value for e in t.external_data if e.key == "location"), None)
                if location:
                    extra.add(onnx_path.parent / location)
    return [onnx_path, *sorted(extra)]


def model_digest(onnx_path: str | Path) -> str:
    """sha256 over the names (relative to the graph's folder) and bytes of every file of the model
    (`model_files`): two checkpoints past 2 GB differ here even though their graph files are the same."""
    onnx_path = Path(onnx_path)
    h = hashlib.sha256()
    for f in model_files(onnx_path):
        if f == onnx_path:
            name = "<graph>"  # the graph's own name does not change what it computes
        else:
            name = str(f.relative_to(onnx_path.parent)) if f.is_relative_to(onnx_path.parent) else str(f)
        h.update(f"{name}:{sha256_file(f) if f.is_file() else 'MISSING'}\n".encode())
    return h.hexdigest()


def file_digest(path: str | Path | None) -> str | None:
    """sha256 of a file's bytes; None for no path or no such file (a key still differs once it exists)."""
    if not path or not Path(path).is_file():
        return None
    return sha256_file(path)


def files_digest(paths: Iterable[Path]) -> str:
    """sha256 over the names and bytes of `paths`, in order (an image set)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode())
        h.update(bytes.fromhex(sha256_file(p)))
    return h.hexdigest()


def artifact_key(
    kind: str,
    *,
    models: dict[str, str | Path] | None = None,
    recipe: Preprocess | None = None,
    length: int = 16,
    **parts: Any,
) -> str:
    """THE cache key of an artifact of `kind`: sha256 over the content of its `models` (name -> ONNX path,
    all files: `model_digest`), the pixel `recipe` its inputs were made with, and `parts` (settings,
    file digests, versions: JSON values), truncated to `length` hex digits."""
    doc = {
        "kind": kind,
        "models": {name: model_digest(path) for name, path in sorted((models or {}).items())},
        "recipe": recipe.as_dict() if recipe is not None else None,
        "parts": parts,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:length]
