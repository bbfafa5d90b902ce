"""Typed build configuration (models.yaml), checked at the door.

Every value is validated in `__post_init__` and a refusal names the value, the field and the model.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from vitserve.errors import ConfigError


class Precision(enum.StrEnum):
    """Numeric precision of a backbone variant.

    FP16 and INT8 are made for TensorRT (AutoCast FP16, explicit symmetric Q/DQ INT8); CPU_INT8 is
    onnxruntime's own quantization for the CPU serving kind (VNNI).
    """

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    CPU_INT8 = "cpu-int8"


class Kind(enum.StrEnum):
    """How a backbone variant is served by Triton."""

    TENSORRT = "tensorrt"  # tensorrt_plan, GPU (FP16/INT8 engines; FP32 too)
    ONNXRUNTIME = "onnxruntime"  # onnxruntime_onnx backend (GPU hosts / NGC container)
    CPU = "cpu"  # python backend running onnxruntime on the CPU (pip tritonserver)


# Which precisions each serving kind can run.
KIND_PRECISIONS: dict[Kind, tuple[Precision, ...]] = {
    Kind.TENSORRT: (Precision.FP32, Precision.FP16, Precision.INT8),
    Kind.ONNXRUNTIME: (Precision.FP32, Precision.FP16, Precision.INT8),
    Kind.CPU: (Precision.FP32, Precision.FP16, Precision.INT8, Precision.CPU_INT8),
}


def check_kind_serves(kind: Kind, precision: Precision) -> None:
    """Refuse a (kind, precision) pair that the kind cannot run, naming the kinds that can."""
    if precision not in KIND_PRECISIONS[kind]:
        serving = ", ".join(k.value for k, ps in KIND_PRECISIONS.items() if precision in ps)
        raise ConfigError(
            f"precision {precision.value!r} cannot be served by kind {kind.value!r}; it is served by: {serving}"
        )


def _enum(cls: type[enum.Enum], value: Any, what: str):
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in cls)
        raise ConfigError(f"{what}: {value!r} is not one of {choices}") from None


@dataclass(frozen=True)
class BatchProfile:
    """TensorRT optimization profile over the batch axis; `max` is also Triton's max_batch_size."""

    min: int = 1
    opt: int = 8
    max: int = 16

    def __post_init__(self) -> None:
        for f in ("min", "opt", "max"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"batch profile {f}={v!r}: must be a positive integer")
        if not self.min <= self.opt <= self.max:
            raise ConfigError(
                f"batch profile must have min <= opt <= max, got min={self.min} opt={self.opt} max={self.max}"
            )

    def check_within(self, max_batch_size: int) -> None:
        """Refuse a profile whose max exceeds what the model accepts."""
        if self.max > max_batch_size:
            raise ConfigError(
                f"batch profile max={self.max} is above the model's max batch size {max_batch_size}"
            )

    @classmethod
    def parse(cls, value: Any) -> BatchProfile:
        """From {min, opt, max}, [min, opt, max] or "min,opt,max"."""
        if isinstance(value, BatchProfile):
            return value
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")]
        if isinstance(value, list | tuple) and len(value) == 3:
            try:
                return cls(*(int(v) for v in value))
            except (TypeError, ValueError):
                raise ConfigError(f"batch profile {value!r}: expected three integers min,opt,max") from None
        if isinstance(value, dict):
            unknown = set(value) - {"min", "opt", "max"}
            if unknown:
                raise ConfigError(f"batch profile: unknown keys {sorted(unknown)} (expected min, opt, max)")
            return cls(**value)
        raise ConfigError(f"batch profile {value!r}: expected min,opt,max")


@dataclass(frozen=True)
class DynamicBatching:
    preferred_batch_sizes: tuple[int, ...] = (4, 8)
    max_queue_delay_us: int = 2000

    def __post_init__(self) -> None:
        if self.max_queue_delay_us < 0:
            raise ConfigError(f"dynamic batching max_queue_delay_us={self.max_queue_delay_us}: must be >= 0")
        if any(b < 1 for b in self.preferred_batch_sizes):
            raise ConfigError(
                f"dynamic batching preferred_batch_sizes={self.preferred_batch_sizes}: must be >= 1"
            )


@dataclass(frozen=True)
class Gates:
    """Fidelity gates a variant must pass (against FP32 on held-out images) to be published."""

    fp16_mean_cosine: float = 0.999
    int8_mean_cosine: float = 0.98
    int8_top1_agreement: float = 0.95
    cpu_int8_mean_cosine: float = 0.995


@dataclass(frozen=True)
class Calibration:
    """INT8 calibration: images from `images` (a folder, recursive) or the bundled sample photos."""

    images: str | None = None
    num_images: int = 32
    method: str = "max"  # max | entropy
    seed: int = 0
    # INT8 only: also quantize the attention matmuls (Q.K^T, softmax.V). Off by default: on ViTs it
    # collapses fidelity (cosine ~0.77 on ViT-B-16); kept as a switch to measure exactly that.
    quantize_attention: bool = False

    def __post_init__(self) -> None:
        if self.method not in ("max", "entropy"):
            raise ConfigError(f"calibration method {self.method!r}: expected 'max' or 'entropy'")
        if self.num_images < 1:
            raise ConfigError(f"calibration num_images={self.num_images}: must be >= 1")


def _build(cls, data: dict[str, Any] | None, what: str):
    data = dict(data or {})
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{what}: unknown keys {sorted(unknown)}; known: {sorted(names)}")
    if cls is DynamicBatching and "preferred_batch_sizes" in data:
        data["preferred_batch_sizes"] = tuple(data["preferred_batch_sizes"])
    return cls(**data)


@dataclass(frozen=True)
class ModelSpec:
    """One model of models.yaml: a backbone, its weights, its head, and how to serve it."""

    name: str
    backbone: str
    weights: str = "pretrained"  # "pretrained" | "pretrained:TAG" | a checkpoint path | "random"
    head: str = "none"  # none | zeroshot | linear:FILE | mlp:FILE
    labels: str | tuple[str, ...] | None = None  # a file, or the class names inline
    precisions: tuple[Precision, ...] = (Precision.FP32,)
    kinds: tuple[Kind, ...] = (Kind.CPU,)
    profile: BatchProfile = field(default_factory=BatchProfile)
    instances: int = 1
    dynamic_batching: DynamicBatching = field(default_factory=DynamicBatching)
    calibration: Calibration = field(default_factory=Calibration)
    gates: Gates = field(default_factory=Gates)
    force: bool = False  # publish variants that fail their gate
    max_image_pixels: int = 40_000_000  # preprocess refuses larger images (decompression bombs)
    cpu_int8_mode: str = "dynamic"  # dynamic | static (QDQ, calibrated on the calibration images)

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "_-" for c in self.name):
            raise ConfigError(f"model name {self.name!r}: use letters, digits, '_' and '-' only")
        if self.instances < 1:
            raise ConfigError(f"model {self.name}: instances={self.instances} must be >= 1")
        if Precision.FP32 not in self.precisions:
            raise ConfigError(f"model {self.name}: precisions must include 'fp32' (the reference)")
        if self.cpu_int8_mode not in ("dynamic", "static"):
            raise ConfigError(
                f"model {self.name}: cpu_int8_mode {self.cpu_int8_mode!r}: expected 'dynamic' or 'static'"
            )
        if Precision.CPU_INT8 in self.precisions and Kind.CPU not in self.kinds:
            # cpu-int8 is only ever published to the kinds that serve it; with none configured, refuse.
            check_kind_serves(self.kinds[0], Precision.CPU_INT8)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        data = dict(data)
        name = data.get("name", "?")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"model {name}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        for key in ("name", "backbone"):
            if key not in data:
                raise ConfigError(f"model {name}: missing required key {key!r}")
        if "precisions" in data:
            data["precisions"] = tuple(
                _enum(Precision, p, f"model {name} precision") for p in data["precisions"]
            )
        if "kinds" in data:
            data["kinds"] = tuple(_enum(Kind, k, f"model {name} kind") for k in data["kinds"])
        if "profile" in data:
            data["profile"] = BatchProfile.parse(data["profile"])
        data["dynamic_batching"] = _build(
            DynamicBatching, data.get("dynamic_batching"), f"model {name} dynamic_batching"
        )
        data["calibration"] = _build(Calibration, data.get("calibration"), f"model {name} calibration")
        data["gates"] = _build(Gates, data.get("gates"), f"model {name} gates")
        return cls(**data)


def load_models(path: str | Path) -> list[ModelSpec]:
    """Read models.yaml (a `models:` list), resolving relative file paths against its folder."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model config {path} does not exist")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"model config {path} is not valid YAML: {e}") from e
    models = doc.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError(f"model config {path}: expected a non-empty `models:` list")
    specs = []
    for entry in models:
        entry = dict(entry)
        if isinstance(entry.get("labels"), list):
            entry["labels"] = tuple(str(x) for x in entry["labels"])
        elif entry.get("labels"):
            entry["labels"] = str((path.parent / entry["labels"]).resolve())
        head = entry.get("head", "none")
        if ":" in head:
            kind, file = head.split(":", 1)
            entry["head"] = f"{kind}:{(path.parent / file).resolve()}"
        weights = entry.get("weights", "pretrained")
        if weights not in ("pretrained", "random") and not weights.startswith("pretrained:"):
            entry["weights"] = str((path.parent / weights).resolve())
        if entry.get("calibration", {}).get("images"):
            entry["calibration"] = {
                **entry["calibration"],
                "images": str((path.parent / entry["calibration"]["images"]).resolve()),
            }
        specs.append(ModelSpec.from_dict(entry))
    names = [s.name for s in specs]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"model config {path}: duplicate model names {sorted(dupes)}")
    return specs
