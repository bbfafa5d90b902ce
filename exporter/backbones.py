"""The backbone registry: one table says what each backbone is, and `create_backbone` builds it by name.

Sources: open_clip (CLIP ViTs and the timm EVA02 towers inside open_clip), timm (Meta's DINOv2) and TAO
(NVIDIA's NV-DINOv2: a timm VisionTransformer with a SwiGLU MLP, built here from its published shape).
Each entry knows its input size and eval preprocessing exactly as open_clip / timm define it.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vitserve.errors import ConfigError, ExportError

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_INIT_SEED = 0


@dataclass(frozen=True)
class Preprocess:
    """Eval preprocessing: resize (shortest edge to `resize_size`, or squash), center crop, normalize."""

    size: int
    resize_size: int
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    resize_mode: str = "shortest"  # shortest | squash

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BackboneEntry:
    name: str
    source: str  # open_clip | timm | tao
    model_id: str  # open_clip model name or timm architecture
    pretrained: str | None  # default pretrained tag; None: weights come from a local checkpoint only
    feature_dim: int
    preprocess: Preprocess
    family: str  # clip | eva02-clip | dinov2 | nv-dinov2
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    fast: bool = False  # small enough for the fast test tier

    @property
    def image_size(self) -> int:
        return self.preprocess.size

    @property
    def is_clip(self) -> bool:
        return self.source == "open_clip"


def _clip(
    name: str, tag: str, dim: int, size: int = 224, family: str = "clip", fast: bool = False
) -> BackboneEntry:
    return BackboneEntry(name, "open_clip", name, tag, dim, Preprocess(size, size), family, fast=fast)


def _dinov2(name: str, arch: str, dim: int, fast: bool = False) -> BackboneEntry:
    pre = Preprocess(518, 518, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return BackboneEntry(name, "timm", arch, "lvd142m", dim, pre, "dinov2", fast=fast)


def _nv_dinov2_kwargs(
    embed_dim: int, depth: int, heads: int, hidden: int, reg_tokens: int = 0
) -> dict[str, Any]:
    # TAO nvidia_tao_pytorch/cv/backbone_v2/dino_v2.py: a timm VisionTransformer with SwiGLUPacked MLP.
    return dict(
        patch_size=14,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=heads,
        init_values=1e-5,
        img_size=518,
        mlp_ratio=hidden / embed_dim,
        reg_tokens=reg_tokens,
        no_embed_class=reg_tokens > 0,
        global_pool="token",
        num_classes=0,
    )


_NV_PRE = Preprocess(518, 518, mean=IMAGENET_MEAN, std=IMAGENET_STD)

REGISTRY: dict[str, BackboneEntry] = {
    e.name: e
    for e in [
        _clip("ViT-B-32", "laion400m_e31", 512, fast=True),
        _clip("ViT-B-16", "laion400m_e31", 512),
        _clip("ViT-L-14", "laion400m_e31", 768),
        _clip("ViT-H-14", "laion2b_s32b_b79k", 1024),
        _clip("ViT-g-14", "laion2b_s12b_b42k", 1024),
        _clip("EVA02-B-16", "merged2b_s8b_b131k", 512, family="eva02-clip", fast=True),
        _clip("EVA02-L-14", "merged2b_s4b_b131k", 768, family="eva02-clip"),
        _clip("EVA02-L-14-336", "merged2b_s6b_b61k", 768, size=336, family="eva02-clip"),
        _clip("EVA02-E-14", "laion2b_s4b_b115k", 1024, family="eva02-clip"),
        _clip("EVA02-E-14-plus", "laion2b_s9b_b144k", 1024, family="eva02-clip"),
        BackboneEntry(
            "NV-DINOv2",
            "tao",
            "vit_large_patch14_dinov2_swiglu",
            None,
            1024,
            _NV_PRE,
            "nv-dinov2",
            _nv_dinov2_kwargs(1024, 24, 16, 5472),
        ),
        BackboneEntry(
            "NV-DINOv2-g",
            "tao",
            "vit_giant_patch14_reg4_dinov2_swiglu",
            None,
            1536,
            _NV_PRE,
            "nv-dinov2",
            _nv_dinov2_kwargs(1536, 40, 24, 8192, reg_tokens=4),
        ),
        _dinov2("DINOv2-S", "vit_small_patch14_dinov2", 384, fast=True),
        _dinov2("DINOv2-B", "vit_base_patch14_dinov2", 768),
        _dinov2("DINOv2-L", "vit_large_patch14_dinov2", 1024),
        _dinov2("DINOv2-g", "vit_giant_patch14_dinov2", 1536),
        _dinov2("DINOv2-S-reg4", "vit_small_patch14_reg4_dinov2", 384),
        _dinov2("DINOv2-B-reg4", "vit_base_patch14_reg4_dinov2", 768),
        _dinov2("DINOv2-L-reg4", "vit_large_patch14_reg4_dinov2", 1024),
        _dinov2("DINOv2-g-reg4", "vit_giant_patch14_reg4_dinov2", 1536),
    ]
}


def get_backbone(name: str) -> BackboneEntry:
    """The registry entry for `name`; an unknown name is refused with the closest names."""
    try:
        return REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, REGISTRY, n=4, cutoff=0.4) or sorted(REGISTRY)
        raise ConfigError(
            f"unknown backbone {name!r}; did you mean: {', '.join(close)}? (`vitserve backbones` lists all)"
        ) from None


@dataclass(frozen=True)
class Weights:
    """Where the backbone weights come from: a pretrained tag, a local checkpoint, or random init."""

    kind: str  # pretrained | file | random
    value: str | None = None

    @classmethod
    def parse(cls, text: str | None, entry: BackboneEntry) -> Weights:
        text = text or "pretrained"
        if text == "random":
            return cls("random")
        if text == "pretrained" or text.startswith("pretrained:"):
            tag = text.partition(":")[2] or entry.pretrained
            if tag is None:
                raise ConfigError(
                    f"backbone {entry.name} has no downloadable weights: pass a checkpoint with "
                    "--weights FILE (e.g. a TAO/NGC classification checkpoint) or use --random-init"
                )
            return cls("pretrained", tag)
        return cls("file", text)

    def describe(self) -> str:
        if self.kind == "random":
            return "RANDOM INIT (untrained weights: outputs are meaningless)"
        return f"{self.kind}:{self.value}"


@dataclass
class LoadedBackbone:
    """A built backbone: `encode(pixel_values) -> features`, plus the CLIP model for zero-shot heads."""

    entry: BackboneEntry
    encoder: Any  # torch.nn.Module mapping (N,3,H,W) -> (N, feature_dim)
    weights: Weights
    clip_model: Any = None
    tokenizer: Callable | None = None
    checkpoint_report: dict[str, Any] = field(default_factory=dict)


def _download_error(entry: BackboneEntry, tag: str, err: Exception) -> ExportError:
    return ExportError(
        f"could not get pretrained weights {entry.name}:{tag} ({type(err).__name__}: {err}). Offline? "
        f"Pass a local checkpoint with --weights FILE, or --random-init for an untrained model "
        f"(make engines RANDOM_INIT=1)"
    )


def _read_state_dict(path: str) -> dict[str, Any]:
    import torch

    p = Path(path)
    if not p.is_file():
        raise ExportError(f"checkpoint {path} does not exist; pass an existing file to --weights")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt file
        raise ExportError(
            f"checkpoint {path} could not be read ({type(e).__name__}: {e}); is it a PyTorch file?"
        ) from e
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd:
        raise ExportError(f"checkpoint {path} holds no state dict")
    return sd


def load_timm_checkpoint(
    model, path: str, prefixes=("model.backbone.", "backbone.", "model.", "module.")
) -> dict:
    """Load a (TAO/timm) checkpoint into a timm model, mapping prefixed keys; report what did not map.

    TAO classification checkpoints hold `model.backbone.*` and `model.head.*` keys; the head keys are
    returned for the head loader rather than forced into the backbone.
    """
    sd = _read_state_dict(path)
    target = model.state_dict()
    mapped, unmapped = {}, []
    for key, value in sd.items():
        name = key
        for prefix in prefixes:
            if name.startswith(prefix) and name[len(prefix) :] in target:
                name = name[len(prefix) :]
                break
        if name in target and tuple(target[name].shape) == tuple(value.shape):
            mapped[name] = value
        else:
            unmapped.append(key)
    if not mapped:
        raise ExportError(
            f"checkpoint {path}: none of its {len(sd)} keys map onto {type(model).__name__} "
            f"(first keys: {list(sd)[:5]}); is it a checkpoint of this backbone?"
        )
    missing = sorted(set(target) - set(mapped))
    model.load_state_dict(mapped, strict=False)
    report = {"file": str(path), "loaded": len(mapped), "unmapped_keys": unmapped, "missing_keys": missing}
    if unmapped or missing:
        log.warning(
            "checkpoint %s: %d keys loaded, %d did not map (%s), %d model keys missing (%s)",
            path,
            len(mapped),
            len(unmapped),
            ", ".join(unmapped[:8]),
            len(missing),
            ", ".join(missing[:8]),
        )
    return report


def _timm_module(entry: BackboneEntry, pretrained_tag: str | None):
    import timm

    if entry.source == "tao":
        from timm.layers import SwiGLUPacked
        from timm.models.vision_transformer import VisionTransformer
        from torch import nn

        return VisionTransformer(**entry.timm_kwargs, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
    name = f"{entry.model_id}.{pretrained_tag}" if pretrained_tag else entry.model_id
    return timm.create_model(name, pretrained=pretrained_tag is not None, num_classes=0)


def create_backbone(name: str, weights: str | Weights | None = None, device: str = "cpu") -> LoadedBackbone:
    """Build backbone `name` with `weights` ("pretrained[:TAG]", a checkpoint path, or "random")."""
    entry = get_backbone(name)
    w = weights if isinstance(weights, Weights) else Weights.parse(weights, entry)
    if w.kind == "random":
        log.warning(
            "%s: RANDOM-INIT WEIGHTS - the exported model is untrained (outputs are meaningless)", name
        )
        import torch

        torch.manual_seed(RANDOM_INIT_SEED)  # the same untrained model every time, so it can be checked
    if entry.source == "open_clip":
        return _create_open_clip(entry, w, device)
    report: dict[str, Any] = {}
    try:
        model = _timm_module(entry, w.value if w.kind == "pretrained" else None)
    except Exception as e:
        if w.kind == "pretrained":
            raise _download_error(entry, w.value, e) from e
        raise
    if w.kind == "file":
        report = load_timm_checkpoint(model, w.value)
    model = model.eval().to(device)
    return LoadedBackbone(entry, model, w, checkpoint_report=report)


def _create_open_clip(entry: BackboneEntry, w: Weights, device: str) -> LoadedBackbone:
    import open_clip
    from torch import nn

    tag = entry.pretrained
    quick_gelu = (
        bool(open_clip.get_pretrained_cfg(entry.model_id, tag).get("quick_gelu", False)) if tag else False
    )
    kwargs = dict(force_quick_gelu=quick_gelu, device=device)
    try:
        if w.kind == "pretrained":
            model = open_clip.create_model(
                entry.model_id, pretrained=w.value, require_pretrained=True, **kwargs
            )
        elif w.kind == "file":
            if not Path(w.value).is_file():
                raise ExportError(f"checkpoint {w.value} does not exist; pass an existing file to --weights")
            model = open_clip.create_model(
                entry.model_id, pretrained=w.value, require_pretrained=True, **kwargs
            )
        else:
            model = open_clip.create_model(entry.model_id, pretrained=None, **kwargs)
    except ExportError:
        raise
    except Exception as e:
        if w.kind == "pretrained":
            raise _download_error(entry, w.value, e) from e
        raise ExportError(
            f"checkpoint {w.value} could not be loaded into {entry.name}: {type(e).__name__}: {e}"
        ) from e

    class ClipImageEncoder(nn.Module):
        def __init__(self, visual):
            super().__init__()
            self.visual = visual

        def forward(self, pixel_values):
            return self.visual(pixel_values)

    model.eval()
    tokenizer = open_clip.get_tokenizer(entry.model_id)
    return LoadedBackbone(
        entry, ClipImageEncoder(model.visual).eval(), w, clip_model=model, tokenizer=tokenizer
    )


def meta_feature_dim(name: str) -> tuple[int, int]:
    """Build `name` on the meta device (no memory for weights); return (feature dim from a forward, params).

    This proves the architecture of backbones too big to materialize here (EVA02-E-14 family).
    """
    import torch

    entry = get_backbone(name)
    with torch.device("meta"):
        if entry.source == "open_clip":
            import open_clip
            from open_clip.model import _build_vision_tower

            cfg = open_clip.get_model_config(entry.model_id)
            visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"])
        else:
            visual = _timm_module(entry, None)
        out = visual(torch.empty(1, 3, entry.image_size, entry.image_size))
        params = sum(p.numel() for p in visual.parameters())
    return int(out.shape[-1]), int(params)


def backbone_table() -> list[dict[str, Any]]:
    """Rows for `vitserve backbones`."""
    return [
        {
            "name": e.name,
            "source": e.source,
            "model": e.model_id,
            "pretrained": e.pretrained or "(local checkpoint)",
            "feature_dim": e.feature_dim,
            "input": f"{e.image_size}px",
            "mean/std": "openai" if e.preprocess.mean == OPENAI_MEAN else "imagenet",
        }
        for e in REGISTRY.values()
    ]


def torch_transform(entry: BackboneEntry):
    """The backbone's own eval transform (PIL image -> normalized tensor), as open_clip / timm build it."""
    p = entry.preprocess
    if entry.source == "open_clip":
        import open_clip

        return open_clip.image_transform(
            p.size,
            is_train=False,
            mean=p.mean,
            std=p.std,
            interpolation=p.interpolation,
            resize_mode=p.resize_mode,
        )
    import timm.data

    return timm.data.create_transform(
        input_size=(3, p.size, p.size),
        interpolation=p.interpolation,
        mean=p.mean,
        std=p.std,
        crop_pct=p.size / p.resize_size,
        crop_mode="center" if p.resize_mode == "shortest" else "squash",
    )
