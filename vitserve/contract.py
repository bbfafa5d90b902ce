"""The served-model contract: every name and parameter that crosses from the build to a served model.

What is defined here and nowhere else: the tensor names, the Triton model names of a configured model
(`NAME`, `NAME_preprocess`, `NAME_{precision}_{kind}`, heads), the config.pbtxt parameter keys, the pixel
recipe the weights imply (`Preprocess`), and one typed parameter object per served python model
(`PreprocessParams`, `CpuBackboneParams`), serialised to the JSON string that config.pbtxt carries and read
back by the same code. Writers (exporter/repository.py, exporter/multihead.py, the tuner) and readers (the
served `model.py` files, perf, the tuner's read-back) all go through these classes; a malformed parameter is
refused at load with a message naming the key.

Self-contained (standard library only): the repository copies this file next to each served `model.py` as
`vitserve_contract.py`, which the served model imports from there, so a repository serves in any Triton
container, with or without vitserve installed; inside the package the same code imports `vitserve.contract`.
One knob has one name from models.yaml to the served model (`cpu_threads`, `cpu_spinning`, `cpu_lanes`,
`preprocess_threads`, `max_image_pixels`, ...).
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar


class ContractError(ValueError):
    """A served-model name or parameter is malformed; the message names the key and what is expected."""


class Precision(enum.StrEnum):
    """Numeric precision of a backbone variant.

    FP16 and INT8 are made for TensorRT (AutoCast FP16, explicit symmetric Q/DQ INT8); the CPU kind serves
    the same Q/DQ INT8 file with OpenVINO where the host's int8 kernels fit it. BF16 is the FP32 model run
    in bfloat16 by OpenVINO on hosts with BF16 instructions (AMX, AVX512-BF16), gated like FP16 on an
    emulation. CPU_INT8 is onnxruntime's dynamic quantization (per-call activation scales: an image's
    embedding depends on its batch-mates), served only when models.yaml asks for it.
    """

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    CPU_INT8 = "cpu-int8"


class Kind(enum.StrEnum):
    """How a backbone variant is served by Triton."""

    TENSORRT = "tensorrt"  # tensorrt_plan, GPU (FP16/INT8 engines; FP32 too)
    ONNXRUNTIME = "onnxruntime"  # onnxruntime_onnx backend (GPU hosts / NGC container)
    CPU = "cpu"  # python backend running onnxruntime on the CPU (pip tritonserver)


# ------------------------------------------------------------------------------------ tensor names
IMAGE_INPUT = "image"  # encoded image bytes (the ensemble's and NAME_preprocess's input)
PIXELS = "pixel_values"  # float32 [N, 3, H, W]: the backbone's input, NAME_preprocess's output
EMBEDDINGS = "embeddings"  # L2-normalised image embedding
FEATURES = "features"  # pooled features of a backbone shared by several heads
LOGITS = "logits"
PROBS = "probs"
LABELS_FILE = "labels.txt"  # the classification extension's label file of `probs`
TEXT_INPUT = "text"  # UTF-8 strings, BYTES [N, 1]: the NAME_text ensemble's and its tokenizer's input
TOKENS = "tokens"  # int64 [N, context_length]: open_clip's tokens, the text backbone's input

# ------------------------------------------------------------------------- config.pbtxt parameters
PREPROCESS_PARAM = "preprocess"  # PreprocessParams of NAME_preprocess (python backend)
CPU_BACKBONE_PARAM = "onnx_cpu"  # CpuBackboneParams of every onnx_cpu.py model (backbones, heads)
TUNED_PARAM = "vitserve_tuned"  # where and for what `vitserve tune` chose a model's settings
TEXT_PARAM = "text"  # TextParams of NAME_text_tokenize (its load-time settings; what clients read)

ONNX_FILE = "model.onnx"  # a served ONNX model's file in its version folder
PROBE_FILE = "probe.npz"  # the cpu-int8 load-time probe (onnx_cpu.py)
# the served python models' source files: copied (never linked) into each model's version folder
PREPROCESS_SOURCE = "preprocess.py"
CPU_BACKBONE_SOURCE = "onnx_cpu.py"
TOKENIZER_SOURCE = "tokenize.py"  # NAME_text_tokenize
SERVED_CONTRACT = "vitserve_contract.py"  # this file, as the served models import it beside their model.py

# --------------------------------------------------------------------------------- model names
_BACKBONE_NAME = re.compile(
    r"^(?P<model>.+)_(?P<precision>"
    + "|".join(re.escape(p.value) for p in Precision)
    + r")_(?P<kind>"
    + "|".join(re.escape(k.value) for k in Kind)
    + r")$"
)


def backbone_model_name(model: str, precision: Precision | str, kind: Kind | str) -> str:
    """`NAME_{precision}_{kind}`: one backbone variant of model NAME."""
    return f"{model}_{Precision(precision).value}_{Kind(kind).value}"


def parse_backbone_model_name(name: str) -> tuple[str, Precision, Kind] | None:
    """(model, precision, kind) of a backbone model name, None for any other name."""
    m = _BACKBONE_NAME.match(name)
    return (m["model"], Precision(m["precision"]), Kind(m["kind"])) if m else None


def preprocess_model_name(model: str) -> str:
    """`NAME_preprocess`: encoded images -> pixel_values for model NAME."""
    return f"{model}_preprocess"


def text_model_name(model: str) -> str:
    """`NAME_text`: the text side of CLIP model NAME, named like an image model of its own: the ensemble
    `NAME_text` (strings -> L2-normalised embeddings in the image embeddings' space), its backbone variants
    `NAME_text_{precision}_{kind}` (tokens -> embeddings) and its tokenizer `NAME_text_tokenize`."""
    return f"{model}_text"


def tokenizer_model_name(model: str) -> str:
    """`NAME_text_tokenize`: UTF-8 strings -> open_clip's tokens for CLIP model NAME."""
    return f"{text_model_name(model)}_tokenize"


def head_ensemble_name(model: str, head: str) -> str:
    """`NAME_HEAD`: the ensemble of one named head of a many-heads model (images -> its logits/probs)."""
    return f"{model}_{head}"


def head_model_name(model: str, head: str) -> str:
    """`NAME_HEAD_head`: one named head on its own (features -> logits, probs)."""
    return f"{model}_{head}_head"


# The prompt templates a zero-shot head averages over (the standard short CLIP ensemble, a subset of the 80
# ImageNet templates of the CLIP paper): the exported head (exporter/heads.py) and request-time labels
# (client classify(labels=)) both use these, so the two give the same classifier.
ZEROSHOT_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a photo of a nice {}.",
)

# ---------------------------------------------------------------------------- parameter checks


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_int(what: str, v: Any) -> int:
    if not _is_int(v) or v < 1:
        raise ContractError(f"{what}={v!r}: expected an integer >= 1")
    return v


def _auto_or_positive_int(what: str, v: Any) -> str | int:
    if v == "auto":
        return v
    if not _is_int(v) or v < 1:
        raise ContractError(f"{what}={v!r}: expected 'auto' or an integer >= 1")
    return v


def _bool(what: str, v: Any, optional: bool = False) -> bool | None:
    if v is None and optional:
        return v
    if not isinstance(v, bool):
        raise ContractError(f"{what}={v!r}: expected true or false" + (" (or absent)" if optional else ""))
    return v


def _one_of(what: str, v: Any, choices: tuple[str, ...]) -> str:
    if v not in choices:
        raise ContractError(f"{what}={v!r}: expected one of {', '.join(repr(c) for c in choices)}")
    return v


def _three_floats(what: str, v: Any) -> tuple[float, float, float]:
    if not isinstance(v, list | tuple) or len(v) != 3 or not all(isinstance(x, int | float) for x in v):
        raise ContractError(f"{what}={v!r}: expected three numbers (R, G, B)")
    return tuple(float(x) for x in v)  # type: ignore[return-value]


class _Params:
    """JSON (config.pbtxt string parameter) <-> a frozen dataclass, strictly: unknown or malformed keys are
    refused naming the key."""

    KEY: ClassVar[str]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any, what: str | None = None):
        what = what or f"parameter {cls.KEY!r}"
        if not isinstance(data, dict):
            raise ContractError(f"{what}: expected a JSON object, got {data!r}")
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ContractError(f"{what}: unknown key(s) {unknown}; known: {sorted(names)}")
        try:
            return cls(**data)
        except TypeError as e:  # a missing required key
            raise ContractError(f"{what}: {e}") from None
        except ContractError as e:
            raise ContractError(f"{what}: {e}") from None

    @classmethod
    def from_json(cls, text: str, what: str | None = None):
        what = what or f"parameter {cls.KEY!r}"
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as e:
            raise ContractError(f"{what}: not JSON ({e}): {text!r}") from None
        return cls.from_dict(data, what)

    @classmethod
    def from_model_config(cls, config: dict[str, Any]):
        """From Triton's JSON model config (what a python model's `initialize` gets in `model_config`, and
        what the server's model-config API returns as JSON)."""
        name = config.get("name", "?")
        entry = (config.get("parameters") or {}).get(cls.KEY)
        if not isinstance(entry, dict) or "string_value" not in entry:
            raise ContractError(
                f"model {name}: config.pbtxt has no parameter {cls.KEY!r}; rebuild the repository"
            )
        return cls.from_json(entry["string_value"], f"model {name} parameter {cls.KEY!r}")


OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation (open_clip's default)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("shortest", "squash")
RGB_MODES = ("after_crop", "on_decode")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos")


@dataclass(frozen=True)
class Preprocess(_Params):
    """The pixel recipe: resize (shortest edge to `resize_size`, or squash), center crop, normalize.

    What the weights imply (a pretrained tag's or a checkpoint's preprocess config, resolved by the exporter
    and written to the export's manifest), plus vitserve's two deliberate differences from the libraries,
    both on by default: `exif_transpose` (upright by EXIF orientation) and `scale_16bit` (16-bit greyscale
    scaled to 8 bits, where Pillow clips it). `rgb` is where the library converts to RGB: "after_crop"
    (open_clip's eval transform) or "on_decode" (timm, whose loader converts before its transform); it
    changes palette, RGBA, LA and CMYK results. Every producer of pixels (served or at build time) follows it.
    """

    KEY: ClassVar[str] = "preprocess recipe"

    size: int
    resize_size: int
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    resize_mode: str = "shortest"
    rgb: str = "after_crop"
    exif_transpose: bool = True
    scale_16bit: bool = True

    def __post_init__(self) -> None:
        _positive_int("size", self.size)
        _positive_int("resize_size", self.resize_size)
        _one_of("interpolation", self.interpolation, INTERPOLATIONS)
        object.__setattr__(self, "mean", _three_floats("mean", self.mean))
        object.__setattr__(self, "std", _three_floats("std", self.std))
        if any(s <= 0 for s in self.std):
            raise ContractError(f"std={self.std!r}: expected three numbers > 0")
        _one_of("resize_mode", self.resize_mode, RESIZE_MODES)
        _one_of("rgb", self.rgb, RGB_MODES)
        _bool("exif_transpose", self.exif_transpose)
        _bool("scale_16bit", self.scale_16bit)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(Preprocess)}


# How NAME_preprocess is served (models.yaml `preprocess`); the python model serves the first two.
PREPROCESS_MODES = ("dali", "pillow", "fast")
PYTHON_PREPROCESS_MODES = ("pillow", "fast")
MAX_IMAGE_PIXELS = 40_000_000  # default decompression-bomb guard (models.yaml max_image_pixels)


@dataclass(frozen=True)
class PreprocessParams(Preprocess):
    """NAME_preprocess (python backend, triton_models/preprocess.py): the recipe plus how it is served.

    `preprocess`: pillow (Pillow's exact numerics) | fast (large JPEGs decoded at a reduced DCT scale);
    `max_image_pixels`: larger images are refused from their header; `preprocess_threads`: the images of
    one request done at once (each image's result is the same as on one thread)."""

    KEY: ClassVar[str] = PREPROCESS_PARAM

    max_image_pixels: int = MAX_IMAGE_PIXELS
    preprocess: str = "pillow"
    preprocess_threads: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int("max_image_pixels", self.max_image_pixels)
        _one_of("preprocess", self.preprocess, PYTHON_PREPROCESS_MODES)
        _positive_int("preprocess_threads", self.preprocess_threads)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def recipe(self) -> Preprocess:
        return Preprocess(**{f.name: getattr(self, f.name) for f in fields(Preprocess)})


# onnxruntime graph optimization levels, by name (exporter/onnxrt.py and onnx_cpu.py map them)
OPTIMIZATION_LEVELS = ("all", "extended", "basic", "disabled")
INT8_ISAS = ("vnni", "avx2")  # cpu-int8 flavours, by the int8 ISA they are exact on (onnx_cpu.py)
# The serving host's CPU class, best first (each has what the ones after it have): the `isa` parameter and
# VITSERVE_CPU_ISA take one of these; onnx_cpu.py orders a model's flavours by it.
CPU_ISAS = ("amx", "bf16", "vnni", "avx2")
# A CPU model's flavours (engine + file, tried in the host's order, each proven by the probe): the cpu-int8
# ISAs above (onnxruntime, dynamic int8) and these engines; the FP32 ones are every model's fallback.
OPENVINO_INT8 = "openvino-int8"  # OpenVINO on the explicit Q/DQ INT8 ONNX (TensorRT's INT8 model)
OPENVINO_BF16 = "openvino-bf16"  # OpenVINO on the FP32 ONNX, inference precision bf16
OPENVINO_FP32 = "openvino-fp32"  # OpenVINO on the FP32 ONNX, inference precision f32
ONNXRUNTIME_FP32 = "onnxruntime-fp32"  # onnxruntime on the FP32 ONNX: the last resort of every CPU model
FP32_FLAVOURS = (OPENVINO_FP32, ONNXRUNTIME_FP32)
CPU_FLAVOURS = (OPENVINO_INT8, OPENVINO_BF16, *INT8_ISAS, *FP32_FLAVOURS)
FP32_FALLBACK_FILE = "model.fp32.onnx"  # a quantized CPU model's FP32 file, served when no flavour passes


@dataclass(frozen=True)
class CpuBackboneParams(_Params):
    """Every onnx_cpu.py model (a CPU backbone variant, a head): onnxruntime on the CPU.

    `cpu_threads`: intra-op threads ("auto": the usable cores divided among the instances and the `share`
    CPU backbones of the repository that serve at once); `cpu_spinning`: onnxruntime's
    `session.intra_op.allow_spinning` (None: onnxruntime's default, on); `cpu_lanes`: slices a batch runs as
    at once ("auto": one per thread; 1: off); `optimization`: the graph optimization level. `flavours`
    (CPU_FLAVOURS name -> file), the `probe` file and the cosine `probe_min_cosine` a flavour must reach on
    it; `isa` (CPU_ISAS) pins the host's CPU class instead of detecting it; `flavour` (one of `flavours`,
    `vitserve tune`'s engine knob) is tried first, then the host's order (it must pass its probe too)."""

    KEY: ClassVar[str] = CPU_BACKBONE_PARAM

    cpu_threads: str | int = "auto"
    share: int = 1
    optimization: str = "all"
    cpu_spinning: bool | None = None
    cpu_lanes: str | int = "auto"
    flavours: dict[str, str] = field(default_factory=dict)
    probe: str | None = None
    probe_min_cosine: float | None = None
    isa: str | None = None
    flavour: str | None = None

    def __post_init__(self) -> None:
        _auto_or_positive_int("cpu_threads", self.cpu_threads)
        _positive_int("share", self.share)
        _one_of("optimization", self.optimization, OPTIMIZATION_LEVELS)
        _bool("cpu_spinning", self.cpu_spinning, optional=True)
        _auto_or_positive_int("cpu_lanes", self.cpu_lanes)
        if not isinstance(self.flavours, dict) or not all(
            k in CPU_FLAVOURS and isinstance(v, str) and v for k, v in self.flavours.items()
        ):
            raise ContractError(
                f"flavours={self.flavours!r}: expected {{flavour: file}} with flavour in {', '.join(CPU_FLAVOURS)}"
            )
        if self.flavours:
            if not isinstance(self.probe, str) or not self.probe:
                raise ContractError(f"probe={self.probe!r}: flavours need their probe file")
            c = self.probe_min_cosine
            if not isinstance(c, int | float) or isinstance(c, bool) or not 0 < c <= 1:
                raise ContractError(f"probe_min_cosine={c!r}: expected a number in (0, 1]")
        if self.isa is not None:
            _one_of("isa", self.isa, CPU_ISAS)
        if self.flavour is not None:
            _one_of("flavour", self.flavour, CPU_FLAVOURS)
            if self.flavour not in self.flavours:
                raise ContractError(
                    f"flavour={self.flavour!r}: this model has no such flavour (its flavours: "
                    f"{', '.join(self.flavours) or 'none'}); pin one of them or leave `flavour` out"
                )


MAX_TEXT_BYTES = 4096  # default longest string NAME_text_tokenize takes (UTF-8 bytes); longer is refused
MAX_TEXTS = 256  # default most strings in one request to NAME_text


@dataclass(frozen=True)
class TextParams(_Params):
    """NAME_text_tokenize (python backend, triton_models/tokenize.py) and what a client needs to use the
    text side: `tokenizer` (the open_clip model name whose tokenizer it is), `context_length` (tokens per
    string; longer text is truncated ending with the end token, as open_clip does), the request limits
    `max_text_bytes` and `max_texts` (refused per request, naming the limit), and the zero-shot classifier's
    `logit_scale` and `templates` (request-time labels give the exported zero-shot head's logits)."""

    KEY: ClassVar[str] = TEXT_PARAM

    tokenizer: str
    context_length: int
    logit_scale: float
    templates: tuple[str, ...] = ZEROSHOT_TEMPLATES
    max_text_bytes: int = MAX_TEXT_BYTES
    max_texts: int = MAX_TEXTS

    def __post_init__(self) -> None:
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ContractError(f"tokenizer={self.tokenizer!r}: expected an open_clip model name")
        _positive_int("context_length", self.context_length)
        v = self.logit_scale
        if not isinstance(v, int | float) or isinstance(v, bool) or not v > 0:
            raise ContractError(f"logit_scale={v!r}: expected a number > 0")
        t = self.templates
        if not isinstance(t, list | tuple) or not t or not all(isinstance(x, str) and "{}" in x for x in t):
            raise ContractError(f"templates={t!r}: expected a non-empty list of strings with '{{}}'")
        object.__setattr__(self, "templates", tuple(t))
        _positive_int("max_text_bytes", self.max_text_bytes)
        _positive_int("max_texts", self.max_texts)


@dataclass(frozen=True)
class TunedMark(_Params):
    """Where and for what `vitserve tune` chose a served model's settings (config.pbtxt `vitserve_tuned`)."""

    KEY: ClassVar[str] = TUNED_PARAM

    host: str | None = None
    p99_budget_ms: float | None = None
    report: str | None = None
    tuned_at: str | None = None
