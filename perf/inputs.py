"""A served model's inputs, read from its metadata, and the request payloads both load generators send.

Everything here is driven by Triton's model metadata and config, so the same code feeds the tiny test model
(`add_one`, FP32 [-1, 4]), a backbone (`pixel_values` FP32 [3, H, W]) and an ensemble that takes encoded
images (`image` BYTES [1]).
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vitserve.errors import ClientError, ConfigError, ServerError, missing_extra

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")

# Triton datatype -> numpy dtype for the inputs we can make up; BYTES needs real data (images).
_NUMPY = {
    "FP32": np.float32,
    "FP16": np.float16,
    "FP64": np.float64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, Triton datatype and shape without the batch dimension (-1 = any)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelSpec:
    """What the load generators need to know about a served model."""

    name: str
    url: str
    platform: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    config: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0

    def check_batch_size(self, batch_size: int) -> None:
        """Refuse a batch size the model's config cannot take, naming the limit."""
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        if not self.batched and batch_size != 1:
            raise ConfigError(f"model {self.name!r} does not batch (max_batch_size 0): use batch size 1")
        if self.batched and batch_size > self.max_batch_size:
            raise ConfigError(
                f"batch size {batch_size} exceeds model {self.name!r}'s max_batch_size {self.max_batch_size}"
            )


def _grpc():
    try:
        import tritonclient.grpc as grpcclient
    except ImportError as e:
        raise missing_extra("tritonclient[grpc]", "client") from e
    return grpcclient


def connect(url: str, timeout_s: float = 5.0):
    """A gRPC client for `url` whose server answered `is_server_live`; else ServerError naming the URL."""
    grpcclient = _grpc()
    from tritonclient.utils import InferenceServerException

    try:
        client = grpcclient.InferenceServerClient(url)
        live = client.is_server_live(client_timeout=timeout_s)
    except InferenceServerException as e:
        raise ServerError(
            f"Triton server at {url} (gRPC) is unreachable: {e.message()}; start it (`make serve`) "
            "or pass the right --url host:grpc_port"
        ) from e
    if not live:
        raise ServerError(f"Triton server at {url} (gRPC) answered but is not live")
    return client


def describe_model(url: str, model: str) -> ModelSpec:
    """Read `model`'s inputs, outputs and batching from the server at `url` (gRPC).

    A model that is not in the repository is refused with the list of models that are; one that is there
    but not READY is refused with the server's reason.
    """
    client = connect(url)
    try:
        return _describe(client, url, model)
    finally:
        client.close()


def _describe(client, url: str, model: str) -> ModelSpec:
    from tritonclient.utils import InferenceServerException

    try:
        index = client.get_model_repository_index(as_json=True).get("models", [])
    except InferenceServerException as e:
        raise ServerError(f"Triton server at {url} refused the repository index: {e.message()}") from e
    entries = [m for m in index if m.get("name") == model]
    if not entries:
        names = sorted({m.get("name", "") for m in index})
        raise ConfigError(
            f"model {model!r} is not in the repository served at {url}; models there: "
            + (", ".join(names) if names else "(none)")
        )
    if not any(m.get("state") == "READY" for m in entries):
        reasons = "; ".join(
            f"version {m.get('version', '?')}: {m.get('state', '?')} {m.get('reason', '')}" for m in entries
        )
        raise ServerError(f"model {model!r} at {url} is not ready ({reasons}); see the server log")
    try:
        meta = client.get_model_metadata(model, as_json=True)
        config = client.get_model_config(model, as_json=True).get("config", {})
    except InferenceServerException as e:
        raise ClientError(f"could not read metadata of model {model!r} at {url}: {e.message()}") from e
    max_batch = int(config.get("max_batch_size", 0) or 0)

    def specs(items: list[dict]) -> tuple[TensorSpec, ...]:
        out = []
        for t in items:
            shape = tuple(int(d) for d in t.get("shape", []))
            if max_batch > 0:
                shape = shape[1:]  # metadata carries the batch dimension as -1
            out.append(TensorSpec(t["name"], t["datatype"], shape))
        return tuple(out)

    return ModelSpec(
        name=model,
        url=url,
        platform=meta.get("platform", "") or config.get("backend", ""),
        max_batch_size=max_batch,
        inputs=specs(meta.get("inputs", [])),
        outputs=specs(meta.get("outputs", [])),
        config=config,
    )


def list_images(folder: str | Path) -> list[Path]:
    """The image files in `folder` (sorted, by suffix); ConfigError when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"image folder {str(folder)!r} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"image folder {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def resolve_shapes(spec: ModelSpec, shapes: dict[str, list[int]] | None = None) -> dict[str, tuple[int, ...]]:
    """Per-input shape without the batch dimension: the metadata's, with `shapes` filling variable dims."""
    shapes = shapes or {}
    unknown = set(shapes) - {t.name for t in spec.inputs}
    if unknown:
        raise ConfigError(
            f"--shape names {sorted(unknown)} are not inputs of {spec.name!r} "
            f"(inputs: {', '.join(t.name for t in spec.inputs)})"
        )
    out = {}
    for t in spec.inputs:
        shape = tuple(int(d) for d in shapes.get(t.name, t.shape))
        if t.datatype == "BYTES" and t.name not in shapes:
            shape = tuple(1 if d < 0 else d for d in shape)
        if any(d < 0 for d in shape):
            raise ConfigError(
                f"input {t.name!r} of {spec.name!r} has a variable shape {list(t.shape)}; "
                f"give it with --shape {t.name}:{','.join('N' if d < 0 else str(d) for d in t.shape)}"
            )
        out[t.name] = shape
    return out


def make_payloads(
    spec: ModelSpec,
    batch_size: int,
    *,
    shapes: dict[str, list[int]] | None = None,
    images: list[Path] | None = None,
    count: int = 4,
    seed: int = 0,
) -> list[dict[str, np.ndarray]]:
    """`count` distinct request payloads (input name -> array with the batch dimension when batched).

    Numeric inputs are uniform random in [0, 1) from a fixed seed; BYTES inputs carry the raw bytes of the
    `images`, one image per batch element, cycling through the folder.
    """
    spec.check_batch_size(batch_size)
    resolved = resolve_shapes(spec, shapes)
    rng = np.random.default_rng(seed)
    blobs = [p.read_bytes() for p in images] if images else []
    payloads = []
    k = 0
    for _ in range(count if not blobs else max(1, min(count, len(blobs)))):
        payload = {}
        for t in spec.inputs:
            shape = ((batch_size,) if spec.batched else ()) + resolved[t.name]
            if t.datatype == "BYTES":
                if not blobs:
                    raise ConfigError(
                        f"input {t.name!r} of {spec.name!r} is BYTES (encoded images): give --images DIR"
                    )
                n = int(np.prod(shape))
                arr = np.empty(n, dtype=np.object_)
                for i in range(n):
                    arr[i] = blobs[(k + i) % len(blobs)]
                payload[t.name] = arr.reshape(shape)
            elif t.datatype in _NUMPY:
                payload[t.name] = rng.random(shape, dtype=np.float64).astype(_NUMPY[t.datatype])
            else:
                raise ConfigError(
                    f"input {t.name!r} of {spec.name!r} has datatype {t.datatype}, not supported"
                )
        k += batch_size
        payloads.append(payload)
    return payloads


def _serialize_bytes_element(blob: bytes) -> bytes:
    # perf_analyzer reads a "b64" BYTES tensor as Triton's wire form: each element is a 4-byte
    # little-endian length followed by the bytes (raw bytes alone fail with "Failed to maintain
    # requested inference load"; seen with perf_analyzer 2.51).
    return struct.pack("<I", len(blob)) + blob


def write_input_data(spec: ModelSpec, images: list[Path], path: str | Path) -> Path:
    """Write a perf_analyzer `--input-data` JSON file carrying `images` for every BYTES input.

    One data step per image, each a batch-1 tensor; perf_analyzer builds each request's batch from the
    steps and cycles through them.
    """
    byte_inputs = [t for t in spec.inputs if t.datatype == "BYTES"]
    if not byte_inputs:
        raise ConfigError(f"model {spec.name!r} has no BYTES input; perf_analyzer needs no image data for it")
    if len(byte_inputs) != len(spec.inputs):
        raise ConfigError(
            f"model {spec.name!r} mixes BYTES and numeric inputs; the image input-data file covers BYTES only"
        )
    resolved = resolve_shapes(spec)
    steps = []
    for img in images:
        blob = Path(img).read_bytes()
        step = {}
        for t in byte_inputs:
            n = int(np.prod(resolved[t.name]))
            raw = b"".join(_serialize_bytes_element(blob) for _ in range(n))
            step[t.name] = {"b64": base64.b64encode(raw).decode("ascii"), "shape": list(resolved[t.name])}
        steps.append(step)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"data": steps}))
    tmp.replace(path)
    return path
