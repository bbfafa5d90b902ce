"""What a deployed model takes and returns, read from the server and checked before the first request.

The server's model metadata (names, datatypes, shapes) and config (max_batch_size, label files, ensemble
steps) arrive as JSON over HTTP and as protobuf-JSON over gRPC (int64 as strings); both are normalized
here into a ModelInfo, and every mismatch is reported with what the server has instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vitserve.contract import EMBEDDINGS, IMAGE_INPUT, PIXELS, PROBS, TEXT_INPUT  # noqa: F401
from vitserve.errors import ClientError

# (datatype, shape without the batch dimension) of the encoded-image input: the python preprocess takes one
# BYTES element per image; Triton's DALI backend takes no BYTES, so a DALI ensemble takes each image's raw
# bytes as a uint8 vector, one image per request (lengths differ), batched by the server (ragged batching)
BYTES_IMAGES = ("BYTES", (1,))
UINT8_IMAGES = ("UINT8", (-1,))
IMAGE_FORMS = (BYTES_IMAGES, UINT8_IMAGES)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # without the batch dimension

    def __str__(self) -> str:
        return f"{self.name} {self.datatype} {list(self.shape)}"


@dataclass(frozen=True)
class ModelInfo:
    """A model as the server describes it."""

    name: str
    platform: str
    max_batch_size: int
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    labelled: frozenset[str]  # outputs with a label file (classification extension)
    steps: tuple[str, ...]  # ensemble step models, in order; empty for other models
    pixel_step: str | None  # the ensemble step that takes `pixel_values` (the backbone)

    @property
    def takes_images(self) -> bool:
        return IMAGE_INPUT in self.inputs

    @property
    def takes_pixels(self) -> bool:
        return PIXELS in self.inputs

    def describe_inputs(self) -> str:
        return ", ".join(str(s) for s in self.inputs.values()) or "no inputs"

    def check_images(self) -> str:
        """The model must take encoded images, batched: `image` BYTES [1] (the python preprocess: one
        encoded image per row) or UINT8 [-1] (Triton's DALI backend: one image's raw bytes per request, of
        any length). Returns the datatype, "BYTES" or "UINT8"."""
        spec = self.inputs.get(IMAGE_INPUT)
        if spec is None or len(self.inputs) != 1 or (spec.datatype, spec.shape) not in IMAGE_FORMS:
            hint = (
                "; it is a backbone: send preprocessed CHW float32 arrays, or use the ensemble model"
                if self.takes_pixels
                else ""
            )
            raise ClientError(
                f"model {self.name!r} does not take encoded images: expected input `{IMAGE_INPUT}` BYTES [-1, 1] "
                f"or UINT8 [-1, -1] (DALI), the server has {self.describe_inputs()}{hint}"
            )
        self._check_batching()
        return spec.datatype

    def check_text(self) -> None:
        """The model must take UTF-8 strings, batched: `text` BYTES [1] (the NAME_text ensemble)."""
        spec = self.inputs.get(TEXT_INPUT)
        if spec is None or len(self.inputs) != 1 or (spec.datatype, spec.shape) != BYTES_IMAGES:
            raise ClientError(
                f"model {self.name!r} does not take text: expected input `{TEXT_INPUT}` BYTES [-1, 1], the "
                f"server has {self.describe_inputs()}"
            )
        self._check_batching()

    def check_pixels(self) -> tuple[int, ...]:
        """The model must take `pixel_values` FP32 [3, H, W] (batched); returns (3, H, W)."""
        spec = self.inputs.get(PIXELS)
        if (
            spec is None
            or len(self.inputs) != 1
            or spec.datatype != "FP32"
            or len(spec.shape) != 3
            or spec.shape[0] != 3
        ):
            raise ClientError(
                f"model {self.name!r} does not take preprocessed tensors: expected input `{PIXELS}` FP32 "
                f"[-1, 3, H, W], the server has {self.describe_inputs()}"
            )
        if any(d < 1 for d in spec.shape):
            raise ClientError(
                f"model {self.name!r} has a variable input size {spec}; vitserve backbones fix H and W"
            )
        self._check_batching()
        return spec.shape

    def output_dim(self, name: str) -> int:
        """The size of a vector output `name` (FP32 [D]), or a ClientError naming the outputs there are."""
        spec = self.outputs.get(name)
        if spec is None or spec.datatype != "FP32" or len(spec.shape) != 1 or spec.shape[0] < 1:
            have = ", ".join(str(s) for s in self.outputs.values()) or "no outputs"
            raise ClientError(
                f"model {self.name!r} has no output `{name}` FP32 [-1, D]; the server has {have}"
            )
        return spec.shape[0]

    def _check_batching(self) -> None:
        if self.max_batch_size < 1:
            raise ClientError(
                f"model {self.name!r} has max_batch_size {self.max_batch_size} (no batching); vitserve models "
                "are built with a batch profile: rebuild the repository"
            )


def _ints(values: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in values or ())


def parse_model(metadata: dict[str, Any], config: dict[str, Any]) -> ModelInfo:
    """ModelInfo from the server's metadata and config (either protocol's JSON)."""
    config = config.get("config", config)  # gRPC wraps the config in ModelConfigResponse
    batched = int(config.get("max_batch_size", 0) or 0) > 0

    def specs(entries) -> dict[str, TensorSpec]:
        out = {}
        for e in entries or ():
            shape = _ints(e.get("shape"))
            out[e["name"]] = TensorSpec(e["name"], e["datatype"], shape[1:] if batched else shape)
        return out

    steps, pixel_step = [], None
    for step in (config.get("ensemble_scheduling") or {}).get("step", ()):
        steps.append(step["model_name"])
        if PIXELS in (step.get("input_map") or {}):
            pixel_step = step["model_name"]
    labelled = frozenset(o["name"] for o in config.get("output", ()) if o.get("label_filename"))
    return ModelInfo(
        name=metadata.get("name", config.get("name", "")),
        platform=metadata.get("platform", "") or config.get("platform", "") or config.get("backend", ""),
        max_batch_size=int(config.get("max_batch_size", 0) or 0),
        inputs=specs(metadata.get("inputs")),
        outputs=specs(metadata.get("outputs")),
        labelled=labelled,
        steps=tuple(steps),
        pixel_step=pixel_step,
    )


def index_entries(index: Any) -> list[dict[str, Any]]:
    """The repository index as a list of {name, version, state} (HTTP sends a list, gRPC an object)."""
    if isinstance(index, dict):
        index = index.get("models", [])
    return list(index or [])


def describe_index(index: Any) -> str:
    """'a, b, c' for the READY models, with the others and their state after them."""
    entries = index_entries(index)
    ready = sorted({e["name"] for e in entries if e.get("state") == "READY"})
    other = sorted(
        {f"{e['name']} ({e.get('state') or 'not loaded'})" for e in entries if e.get("state") != "READY"}
    )
    text = ", ".join(ready) if ready else "none"
    if other:
        text += "; not ready: " + ", ".join(other)
    return text
