"""Typed build configuration (models.yaml), checked at the door.

Every value is validated in `__post_init__` and a refusal names the value, the field and the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from vitserve.contract import (
    CPU_FLAVOURS,
    MAX_IMAGE_PIXELS,
    PREPROCESS_MODES,
    ContractError,
    Kind,
    Precision,
    Preprocess,
    head_ensemble_name,
)
from vitserve.errors import ConfigError, enum_value

# Which precisions each serving kind can run.
KIND_PRECISIONS: dict[Kind, tuple[Precision, ...]] = {
    Kind.TENSORRT: (Precision.FP32, Precision.FP16, Precision.INT8),
    Kind.ONNXRUNTIME: (Precision.FP32, Precision.FP16, Precision.INT8),
    Kind.CPU: (Precision.FP32, Precision.FP16, Precision.BF16, Precision.INT8, Precision.CPU_INT8),
}


# How the cpu-int8 flavours quantize activations (models.yaml `cpu_int8_mode`; the first is the default):
CPU_INT8_MODES = {
    # per token, from that token alone (exporter/token_int8.py): an image's embedding is the same alone or in
    # any batch; 0.97-0.98x (ViT-B-32) and 0.90x (ViT-B-16) the img/s of `dynamic` on the AVX2 host
    # (perf/results/cpu_engines.md)
    "token": "activations quantized per token at run time: the same embedding alone or in any batch",
    # onnxruntime's quantize_dynamic: one scale per call, so an image's embedding changes with its
    # batch-mates (max abs 2.7e-3 to 3.4e-3 on ViT-B-32's normalised embedding); only when asked for
    "dynamic": "activations quantized per call at run time: an image's embedding depends on its batch-mates",
    # QDQ calibrated on the calibration images: fixed scales, slower than FP32 on the hosts measured
    "static": "activations quantized with fixed scales calibrated on the calibration images (QDQ)",
}
CPU_INT8_DEFAULT_MODE = next(iter(CPU_INT8_MODES))  # token: what the INT8 variant's CPU flavours use too


# What the CPU kind serves by default, of the precisions built (ModelSpec.cpu_precisions)
CPU_DEFAULT_PRECISIONS = (Precision.FP32, Precision.INT8, Precision.BF16)


def check_kind_serves(kind: Kind, precision: Precision) -> None:
    """Refuse a (kind, precision) pair that the kind cannot run, naming the kinds that can."""
    if precision not in KIND_PRECISIONS[kind]:
        serving = ", ".join(k.value for k, ps in KIND_PRECISIONS.items() if precision in ps)
        raise ConfigError(
            f"precision {precision.value!r} cannot be served by kind {kind.value!r}; it is served by: {serving}"
        )


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
    # No delay by default: requests that arrive while an instance is busy are batched anyway, and a delay only
    # makes a lone request wait it out (perf/results/cpu_engines.md, "Per-request overhead")
    max_queue_delay_us: int = 0

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
    bf16_mean_cosine: float = 0.999  # on the emulation (precision.make_bf16): gated like FP16
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


HEAD_NAME_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-"
RESERVED_HEAD_NAMES = ("preprocess", "heads")


@dataclass(frozen=True)
class NamedHead:
    """One head of a model whose heads share one backbone (models.yaml `heads:`): Triton serves it as the
    ensemble `MODEL_NAME` (its logits/probs) and as `NAME_logits`/`NAME_probs` of the ensemble `MODEL`."""

    name: str
    head: str  # linear:FILE | mlp:FILE | zeroshot
    labels: str | tuple[str, ...] | None = None  # a file, or the class names inline

    def check(self, model: str) -> None:
        """Refuse a bad head name or head, naming the model and the head."""
        what = f"model {model} head {self.name!r}"
        if (
            not self.name
            or self.name[0] not in HEAD_NAME_CHARS[:26]
            or any(c not in HEAD_NAME_CHARS for c in self.name)
        ):
            raise ConfigError(
                f"{what}: a head name starts with a lowercase letter and has only a-z, 0-9 and '-' "
                "(it becomes the Triton model MODEL_NAME and the outputs NAME_logits, NAME_probs)"
            )
        if self.name in RESERVED_HEAD_NAMES:
            raise ConfigError(f"{what}: {self.name!r} is reserved (MODEL_{self.name} is another model)")
        kind, _, file = str(self.head).partition(":")
        if kind not in ("linear", "mlp", "zeroshot"):
            raise ConfigError(f"{what}: {self.head!r} must be linear:FILE, mlp:FILE or zeroshot")
        if kind != "zeroshot" and not file:
            raise ConfigError(f"{what}: a {kind} head needs its weights, e.g. {kind}:{self.name}.pt")
        if kind == "zeroshot" and (file or not self.labels):
            raise ConfigError(
                f"{what}: a zeroshot head takes no file and needs labels, e.g. "
                f"{self.name}: {{head: zeroshot, labels: [cat, dog]}}"
            )

    @classmethod
    def parse(cls, model: str, heads: Any) -> tuple[NamedHead, ...]:
        """From {name: "linear:FILE" | {head: ..., labels: FILE | [names]}} (models.yaml), or a list of
        {name, head, labels} (the repository manifest)."""
        if isinstance(heads, dict):
            items = []
            for name, value in heads.items():
                if isinstance(value, str):
                    value = {"head": value}
                if not isinstance(value, dict):
                    raise ConfigError(
                        f"model {model} head {name!r}: expected linear:FILE | mlp:FILE | zeroshot, or "
                        f"{{head: ..., labels: ...}}, got {value!r}"
                    )
                items.append({"name": str(name), **value})
        elif isinstance(heads, list | tuple):
            items = [
                h if isinstance(h, dict) else {"name": h.name, "head": h.head, "labels": h.labels}
                for h in heads
            ]
        else:
            raise ConfigError(f"model {model} heads: expected a mapping name -> head, got {heads!r}")
        out = []
        for item in items:
            unknown = set(item) - {"name", "head", "labels"}
            if unknown:
                raise ConfigError(
                    f"model {model} head {item.get('name')!r}: unknown keys {sorted(unknown)} (known: head, labels)"
                )
            if "head" not in item:
                raise ConfigError(f"model {model} head {item.get('name')!r}: missing `head:`")
            labels = item.get("labels")
            if isinstance(labels, list | tuple):
                labels = tuple(str(x) for x in labels)
            out.append(cls(str(item["name"]), str(item["head"]), labels))
        return tuple(out)


@dataclass(frozen=True)
class Tuned:
    """Serving settings chosen by `vitserve tune` for one host and latency budget (models.yaml `tuned:`).

    Each key it sets wins over the model's own field when the repository is written (`ModelSpec.serving`);
    `host`, `p99_budget_ms`, `report` and `tuned_at` say where and for what the choice was measured.
    """

    precision: Precision | None = None  # the CPU backbone variant the ensemble routes to
    instances: int | None = None
    cpu_threads: int | None = None
    cpu_spinning: bool | None = None
    cpu_lanes: int | None = None
    # the engine + file (contract.CPU_FLAVOURS) the `precision` CPU backbone (every CPU backbone without a
    # precision) is pinned to where it has that flavour; it must still pass its probe where it serves
    flavour: str | None = None
    dynamic_batching: DynamicBatching | None = None
    preprocess_instances: int | None = None
    preprocess_threads: int | None = None
    host: str | None = None
    p99_budget_ms: float | None = None
    report: str | None = None
    tuned_at: str | None = None

    def __post_init__(self) -> None:
        for f in ("instances", "cpu_threads", "cpu_lanes", "preprocess_instances", "preprocess_threads"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"tuned {f}={v!r}: must be an integer >= 1")
        if self.cpu_spinning is not None and not isinstance(self.cpu_spinning, bool):
            raise ConfigError(f"tuned cpu_spinning={self.cpu_spinning!r}: must be true or false")
        if self.flavour is not None and self.flavour not in CPU_FLAVOURS:
            raise ConfigError(f"tuned flavour={self.flavour!r}: expected one of {', '.join(CPU_FLAVOURS)}")
        if self.precision is not None:
            check_kind_serves(Kind.CPU, self.precision)

    @classmethod
    def parse(cls, data: Any, what: str) -> Tuned:
        if isinstance(data, Tuned):
            return data
        if not isinstance(data, dict):
            raise ConfigError(f"{what}: expected a mapping, got {data!r}")
        data = dict(data)
        if data.get("precision") is not None:
            data["precision"] = enum_value(Precision, data["precision"], f"{what} precision")
        if data.get("dynamic_batching") is not None:
            data["dynamic_batching"] = _build(
                DynamicBatching, data["dynamic_batching"], f"{what} dynamic_batching"
            )
        return _build(cls, data, what)

    def overrides(self) -> dict[str, Any]:
        """The ModelSpec fields this section sets (None values left out)."""
        keys = (
            "instances",
            "cpu_threads",
            "cpu_spinning",
            "cpu_lanes",
            "dynamic_batching",
            "preprocess_instances",
            "preprocess_threads",
        )
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


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
    # Several heads on one backbone (exporter/multihead.py), instead of `head`/`labels`.
    heads: tuple[NamedHead, ...] = ()
    precisions: tuple[Precision, ...] = (Precision.FP32,)
    kinds: tuple[Kind, ...] = (Kind.CPU,)
    profile: BatchProfile = field(default_factory=BatchProfile)
    instances: int = 1
    dynamic_batching: DynamicBatching = field(default_factory=DynamicBatching)
    calibration: Calibration = field(default_factory=Calibration)
    gates: Gates = field(default_factory=Gates)
    force: bool = False  # publish variants that fail their gate
    max_image_pixels: int = MAX_IMAGE_PIXELS  # preprocess refuses larger images (decompression bombs)
    # vitserve's two deliberate differences from the libraries' eval transforms (python preprocess model):
    # turn images upright from their EXIF orientation; scale 16/32-bit greyscale to 8 bits (Pillow clips it).
    exif_transpose: bool = True
    scale_16bit: bool = True
    cpu_int8_mode: str = CPU_INT8_DEFAULT_MODE  # CPU_INT8_MODES: token (batch-invariant) | dynamic | static
    # What the CPU kind serves of the precisions built. None: fp32, int8 (TensorRT's Q/DQ INT8 ONNX, run by
    # OpenVINO where the host's int8 kernels fit it, else FP32) and bf16 (OpenVINO where the host has BF16,
    # else FP32), of those built: each gives an image the same embedding alone or in any batch. cpu-int8
    # (onnxruntime dynamic int8: activation scales per call, so an image's embedding changes with its
    # batch-mates, max abs 2-3e-3) and fp16 (~0.15x FP32 on onnxruntime's CPU) serve only when listed here.
    # A list given must name built precisions only.
    cpu_precisions: tuple[Precision, ...] | None = None
    # onnxruntime intra-op threads of each CPU backbone instance; None: decided when the model loads, from the
    # cores the server may use (affinity, cgroup quota) divided among its instances and the repository's
    # served CPU backbones.
    cpu_threads: int | None = None
    # onnxruntime's `session.intra_op.allow_spinning` for CPU backbones: None keeps onnxruntime's default (on:
    # idle intra-op threads spin, which steals cores from other instances and the preprocess model).
    cpu_spinning: bool | None = None
    # slices a CPU backbone instance cuts a batch into, run at once on 1-thread sessions (onnx_cpu.py `lanes`):
    # None: one per intra-op thread (weights up to 2 GiB; the slices' session holds a second copy); 1: off.
    cpu_lanes: int | None = None
    # settings measured by `vitserve tune` on a serving host; they win over the fields above (`serving()`)
    tuned: Tuned | None = None
    # GPU kinds (tensorrt, onnxruntime): instances of each backbone model (default: `instances`).
    backbone_instances: int | None = None
    # onnxruntime kind: run it through onnxruntime's TensorRT execution accelerator in FP16 (opt-in: the
    # accelerator builds its engines when the model loads, minutes for a ViT-L).
    onnxruntime_trt_fp16: bool = False
    # NAME_preprocess: dali (Triton's DALI backend: nvJPEG + GPU resize; GPU kinds) | pillow (python backend,
    # Pillow's exact numerics) | fast (pillow, large JPEGs decoded at reduced DCT scale: faster, not exact).
    # None: dali when the first kind is a GPU kind, pillow for the CPU kind.
    preprocess: str | None = None
    # instances of NAME_preprocess; None: the cores the backbone leaves (at least 1), see repository.py
    preprocess_instances: int | None = None
    # threads of one NAME_preprocess instance (pillow / fast): the images of one request done at once
    preprocess_threads: int = 1
    # CLIP backbones: also serve the text tower (NAME_text: strings -> embeddings in the image embeddings'
    # space, with NAME_text_tokenize and NAME_text_{precision}_{kind}; exporter/text.py)
    text: bool = False

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "_-" for c in self.name):
            raise ConfigError(f"model name {self.name!r}: use letters, digits, '_' and '-' only")
        if self.instances < 1:
            raise ConfigError(f"model {self.name}: instances={self.instances} must be >= 1")
        bi = self.backbone_instances
        if bi is not None and (not isinstance(bi, int) or isinstance(bi, bool) or bi < 1):
            raise ConfigError(f"model {self.name}: backbone_instances={bi!r} must be an integer >= 1")
        if not isinstance(self.onnxruntime_trt_fp16, bool):
            raise ConfigError(
                f"model {self.name}: onnxruntime_trt_fp16={self.onnxruntime_trt_fp16!r} must be true or false"
            )
        if not isinstance(self.text, bool):
            raise ConfigError(f"model {self.name}: text={self.text!r} must be true or false")
        if self.text and not any(k in (Kind.CPU, Kind.ONNXRUNTIME) for k in self.kinds):
            raise ConfigError(
                f"model {self.name}: text: true needs a cpu or onnxruntime kind (TensorRT text plans are not "
                "built yet); add one to `kinds`"
            )
        if self.cpu_threads is not None and (
            not isinstance(self.cpu_threads, int)
            or isinstance(self.cpu_threads, bool)
            or self.cpu_threads < 1
        ):
            raise ConfigError(f"model {self.name}: cpu_threads={self.cpu_threads!r} must be an integer >= 1")
        lanes = self.cpu_lanes
        if lanes is not None and (not isinstance(lanes, int) or isinstance(lanes, bool) or lanes < 1):
            raise ConfigError(f"model {self.name}: cpu_lanes={lanes!r} must be an integer >= 1 (1: off)")
        if self.cpu_spinning is not None and not isinstance(self.cpu_spinning, bool):
            raise ConfigError(f"model {self.name}: cpu_spinning={self.cpu_spinning!r} must be true or false")
        for flag in ("exif_transpose", "scale_16bit"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"model {self.name}: {flag}={getattr(self, flag)!r} must be true or false")
        if Precision.FP32 not in self.precisions:
            raise ConfigError(f"model {self.name}: precisions must include 'fp32' (the reference)")
        self._check_cpu_precisions()
        self._check_preprocess()
        self._check_heads()
        if self.cpu_int8_mode not in CPU_INT8_MODES:
            raise ConfigError(
                f"model {self.name}: cpu_int8_mode {self.cpu_int8_mode!r}: expected one of {', '.join(CPU_INT8_MODES)}"
            )
        for cpu_only in (Precision.CPU_INT8, Precision.BF16):
            if cpu_only in self.precisions and Kind.CPU not in self.kinds:
                # published only to the kinds that serve it; with none configured, refuse.
                check_kind_serves(self.kinds[0], cpu_only)

    def _check_cpu_precisions(self) -> None:
        if self.cpu_precisions is None:  # frozen: the default is resolved once, here
            default = tuple(p for p in CPU_DEFAULT_PRECISIONS if p in self.precisions)
            object.__setattr__(self, "cpu_precisions", default)
            return
        outside = [p.value for p in self.cpu_precisions if p not in self.precisions]
        if outside:
            raise ConfigError(
                f"model {self.name}: cpu_precisions {outside} are not built (precisions: "
                f"{[p.value for p in self.precisions]}); add them to `precisions` or remove them"
            )
        if Kind.CPU in self.kinds and not self.cpu_precisions:
            raise ConfigError(
                f"model {self.name}: cpu_precisions is empty, so the cpu kind would serve nothing; "
                "name at least one of `precisions` (e.g. [fp32])"
            )

    def served_preprocess(self, manifest: dict[str, Any]) -> Preprocess:
        """The one pixel recipe of this model: what its weights imply (the export manifest's `preprocess`,
        from the pretrained tag or the checkpoint's config) with this spec's `exif_transpose` and
        `scale_16bit`. Everything that makes pixels for it (the served preprocess models, export parity,
        calibration, fidelity, verify sets, train-head) follows this."""
        try:
            recipe = Preprocess.from_dict(
                manifest["preprocess"], f"model {self.name} export manifest preprocess"
            )
        except ContractError as e:
            raise ConfigError(f"{e}; re-export the model (make engines)") from None
        return replace(recipe, exif_transpose=self.exif_transpose, scale_16bit=self.scale_16bit)

    def _check_heads(self) -> None:
        if not self.heads:
            return
        if self.head != "none" or self.labels is not None:
            raise ConfigError(
                f"model {self.name}: `head`/`labels` and `heads` are exclusive; with several heads, give each "
                "its labels under `heads:`"
            )
        names = [h.name for h in self.heads]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"model {self.name}: duplicate head names {dupes}")
        for h in self.heads:
            h.check(self.name)

    def serving(self) -> ModelSpec:
        """This spec with its `tuned:` settings applied (itself when it has none): what the repository
        writes into config.pbtxt."""
        if self.tuned is None:
            return self
        return replace(self, **self.tuned.overrides())

    def _check_preprocess(self) -> None:
        if self.preprocess is None:  # frozen: the default is resolved once, here
            gpu_first = bool(self.kinds) and self.kinds[0] != Kind.CPU
            object.__setattr__(self, "preprocess", "dali" if gpu_first else "pillow")
        if self.preprocess not in PREPROCESS_MODES:
            raise ConfigError(
                f"model {self.name}: preprocess {self.preprocess!r}: expected one of {', '.join(PREPROCESS_MODES)}"
            )
        if self.preprocess == "dali" and (not self.kinds or self.kinds[0] == Kind.CPU):
            raise ConfigError(
                f"model {self.name}: preprocess 'dali' needs Triton's DALI backend and a GPU, but the first "
                "kind is 'cpu' (the pip tritonserver has the python backend only); use 'pillow' or 'fast'"
            )
        pi = self.preprocess_instances
        if pi is not None and (not isinstance(pi, int) or isinstance(pi, bool) or pi < 1):
            raise ConfigError(f"model {self.name}: preprocess_instances={pi!r} must be an integer >= 1")
        pt = self.preprocess_threads
        if not isinstance(pt, int) or isinstance(pt, bool) or pt < 1:
            raise ConfigError(f"model {self.name}: preprocess_threads={pt!r} must be an integer >= 1")
        if pt != 1 and self.preprocess == "dali":
            raise ConfigError(
                f"model {self.name}: preprocess_threads={pt} is for the python preprocess model (pillow | fast); "
                "the DALI model runs its CPU work on num_threads = the cores"
            )
        # What the DALI pipeline cannot honour is refused, never ignored: its decoder always turns an image
        # upright by its EXIF orientation and converts 16-bit images to 8 bits itself.
        for flag in ("exif_transpose", "scale_16bit"):
            if self.preprocess == "dali" and getattr(self, flag) is False:
                raise ConfigError(
                    f"model {self.name}: {flag}: false is not honoured by preprocess 'dali' (DALI's decoder "
                    "cannot turn it off); use preprocess 'pillow' for {flag}: false, or drop the setting"
                )

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
                enum_value(Precision, p, f"model {name} precision") for p in data["precisions"]
            )
        if "cpu_precisions" in data:
            data["cpu_precisions"] = tuple(
                enum_value(Precision, p, f"model {name} cpu_precisions") for p in data["cpu_precisions"]
            )
        if "kinds" in data:
            data["kinds"] = tuple(enum_value(Kind, k, f"model {name} kind") for k in data["kinds"])
        if "profile" in data:
            data["profile"] = BatchProfile.parse(data["profile"])
        if data.get("heads"):
            data["heads"] = NamedHead.parse(name, data["heads"])
        else:
            data.pop("heads", None)
        data["dynamic_batching"] = _build(
            DynamicBatching, data.get("dynamic_batching"), f"model {name} dynamic_batching"
        )
        data["calibration"] = _build(Calibration, data.get("calibration"), f"model {name} calibration")
        data["gates"] = _build(Gates, data.get("gates"), f"model {name} gates")
        if data.get("tuned") is not None:
            data["tuned"] = Tuned.parse(data["tuned"], f"model {name} tuned")
        return cls(**data)


def _resolve_head(folder: Path, value: Any) -> Any:
    """A `heads:` entry with its weights and labels files resolved against models.yaml's folder."""
    value = {"head": value} if isinstance(value, str) else value
    if not isinstance(value, dict):
        return value  # refused by NamedHead.parse, with the model's name
    value = dict(value)
    kind, sep, file = str(value.get("head", "")).partition(":")
    if sep and file:
        value["head"] = f"{kind}:{(folder / file).resolve()}"
    if isinstance(value.get("labels"), str):
        value["labels"] = str((folder / value["labels"]).resolve())
    return value


def _resolve_paths(entry: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A models.yaml entry with its files (labels, head, weights, heads, calibration images) resolved
    against models.yaml's folder."""
    entry = dict(entry)
    if isinstance(entry.get("labels"), list):
        entry["labels"] = tuple(str(x) for x in entry["labels"])
    elif entry.get("labels"):
        entry["labels"] = str((folder / str(entry["labels"])).resolve())
    head = str(entry.get("head", "none"))
    if ":" in head:
        kind, file = head.split(":", 1)
        entry["head"] = f"{kind}:{(folder / file).resolve()}"
    weights = str(entry.get("weights", "pretrained"))
    if weights not in ("pretrained", "random") and not weights.startswith("pretrained:"):
        entry["weights"] = str((folder / weights).resolve())
    if isinstance(entry.get("heads"), dict):
        entry["heads"] = {n: _resolve_head(folder, h) for n, h in entry["heads"].items()}
    cal = entry.get("calibration")
    if isinstance(cal, dict) and cal.get("images"):
        entry["calibration"] = {**cal, "images": str((folder / str(cal["images"])).resolve())}
    return entry


def check_sources(spec: ModelSpec) -> None:
    """What a model needs before any work starts: a known backbone, existing weights / head / labels /
    calibration files, and heads its backbone can have (zero-shot needs CLIP's text tower). Each refusal
    names the model and the field. Fast (no torch): models.yaml is checked whole in well under a second."""
    from vitserve.exporter.backbones import Weights, get_backbone

    what = f"model {spec.name}"
    try:
        entry = get_backbone(spec.backbone)
    except ConfigError as e:
        raise ConfigError(f"{what} backbone: {e}") from None
    if spec.weights != "random":
        try:
            w = Weights.parse(spec.weights, entry)
        except ConfigError as e:
            raise ConfigError(f"{what} weights: {e}") from None
        if w.kind == "file" and not Path(w.value).is_file():
            raise ConfigError(
                f"{what} weights: checkpoint {w.value} does not exist; give an existing file (relative to "
                "models.yaml), `pretrained[:TAG]`, or `random`"
            )
    heads = [("head", spec.head, spec.labels)] + [(f"heads.{h.name}", h.head, h.labels) for h in spec.heads]
    for field_name, head, labels in heads:
        kind, _, file = head.partition(":")
        if file and not Path(file).is_file():
            raise ConfigError(f"{what} {field_name}: head weights {file} do not exist")
        if kind == "zeroshot" and not entry.is_clip:
            raise ConfigError(
                f"{what} {field_name}: a zeroshot head needs a CLIP text tower; {entry.name} ({entry.family}) "
                "has none: train a linear head instead (vitserve train-head)"
            )
        if isinstance(labels, str) and not Path(labels).is_file():
            raise ConfigError(f"{what} {field_name} labels: file {labels} does not exist")
    if spec.text:
        from vitserve.exporter.text import require_text_tower

        try:
            require_text_tower(entry)
        except ConfigError as e:
            raise ConfigError(f"{what} text: {e}") from None
    if spec.calibration.images and not Path(spec.calibration.images).is_dir():
        raise ConfigError(
            f"{what} calibration.images: folder {spec.calibration.images} does not exist; give a folder of "
            "jpg/png/webp images, or leave it out for the bundled photos"
        )


def check_pretrained_tags(specs: list[ModelSpec]) -> None:
    """Every explicit `pretrained:TAG` of `specs` is a tag its library knows, checked before any export (it
    imports open_clip / timm, so it runs only where a tag is named); all the refusals at once."""
    from vitserve.exporter.backbones import Weights, check_tag, get_backbone

    errors = []
    for spec in specs:
        if spec.weights.startswith("pretrained:"):
            entry = get_backbone(spec.backbone)
            try:
                check_tag(entry, Weights.parse(spec.weights, entry).value)
            except ConfigError as e:
                errors.append(f"model {spec.name} weights: {e}")
    if errors:
        raise ConfigError("\n".join(errors))


def load_models(path: str | Path) -> list[ModelSpec]:
    """Read models.yaml (a `models:` list), resolving relative file paths against its folder, and check it
    whole before any work starts: every model's fields, its files (`check_sources`) and the rules across
    models. All the models' errors are reported at once, each naming its model and field."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model config {path} does not exist")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"model config {path} is not valid YAML: {e}") from e
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(models, list) or not models:
        raise ConfigError(f"model config {path}: expected a non-empty `models:` list")
    specs, errors = [], []
    for i, entry in enumerate(models):
        if not isinstance(entry, dict):
            errors.append(f"models[{i}]: expected a mapping with name, backbone, ..., got {entry!r}")
            continue
        try:
            spec = ModelSpec.from_dict(_resolve_paths(entry, path.parent))
            check_sources(spec)
        except ConfigError as e:
            errors.append(str(e))
            continue
        specs.append(spec)
    names = [str(m.get("name")) for m in models if isinstance(m, dict)]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        errors.append(f"duplicate model names {dupes}")
    # a head's ensemble MODEL_HEAD must not be another model of the repository
    clash = sorted({head_ensemble_name(s.name, h.name) for s in specs for h in s.heads} & set(names))
    if clash:
        errors.append(f"{clash} is both a model and a head's ensemble; rename one")
    if errors:
        raise ConfigError(
            f"model config {path}: " + ("\n  ".join(["", *errors]) if len(errors) > 1 else errors[0])
        )
    return specs
