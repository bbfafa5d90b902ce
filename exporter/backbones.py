"""The backbone registry: one table says what each backbone is, and `create_backbone` builds it by name.

Sources: open_clip (CLIP ViTs and the timm EVA02 towers inside open_clip), timm (Meta's DINOv2) and TAO
(NVIDIA's NV-DINOv2: a timm VisionTransformer with a SwiGLU MLP, built here from its published shape).
Each entry knows its input size and eval preprocessing as open_clip / timm resolve it for the default
weights; `library_preprocess` asks the library itself (for any pretrained tag) and a test checks every
entry against it. The architecture follows the weights actually loaded (`clip_architecture`): QuickGELU and
the preprocessing come from the chosen pretrained tag, or from the checkpoint's `open_clip_config.json`.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitserve.contract import OPENAI_MEAN, Preprocess
from vitserve.errors import ConfigError, ExportError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_INIT_SEED = 0


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
    # TAO entries: the timm model whose pretrained data config defines the eval preprocessing.
    data_config_model: str | None = None

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
    pre = Preprocess(518, 518, mean=IMAGENET_MEAN, std=IMAGENET_STD, rgb="on_decode")
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


_NV_PRE = Preprocess(518, 518, mean=IMAGENET_MEAN, std=IMAGENET_STD, rgb="on_decode")

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
            data_config_model="vit_large_patch14_dinov2.lvd142m",
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
            data_config_model="vit_giant_patch14_reg4_dinov2.lvd142m",
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
    # The preprocessing and architecture choices of the weights actually loaded (see clip_architecture).
    preprocess: Preprocess | None = None
    architecture: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.preprocess is None:
            self.preprocess = self.entry.preprocess


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


def check_tag(entry: BackboneEntry, tag: str) -> None:
    """Refuse a pretrained tag the library does not know (before any download), listing the known ones."""
    if entry.source == "open_clip":
        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(entry.model_id)
    elif entry.source == "timm":
        import timm

        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{entry.model_id}.*")]
    else:
        tags = []
    if tag not in tags:
        raise ConfigError(
            f"pretrained tag {tag!r} is not a tag of {entry.name} ({entry.model_id}); "
            f"known tags: {', '.join(tags) or '(none: pass --weights FILE)'}"
        )


def create_backbone(name: str, weights: str | Weights | None = None, device: str = "cpu") -> LoadedBackbone:
    """Build backbone `name` with `weights` ("pretrained[:TAG]", a checkpoint path, or "random"); the
    architecture and preprocessing follow those weights (see `clip_architecture`)."""
    entry = get_backbone(name)
    w = weights if isinstance(weights, Weights) else Weights.parse(weights, entry)
    if w.kind == "pretrained":
        check_tag(entry, w.value)
    if w.kind == "random":
        log.warning(
            "%s: RANDOM-INIT WEIGHTS - the exported model is untrained (outputs are meaningless)", name
        )
        import torch

        torch.manual_seed(RANDOM_INIT_SEED)  # the same untrained model every time, so it can be checked
    if entry.source == "open_clip":
        return _create_open_clip(entry, w, device)
    report: dict[str, Any] = {}
    if w.kind == "file":
        _check_timm_checkpoint_config(entry, w.value)
    try:
        model = _timm_module(entry, w.value if w.kind == "pretrained" else None)
    except Exception as e:
        if w.kind == "pretrained":
            raise _download_error(entry, w.value, e) from e
        raise
    if w.kind == "file":
        report = load_timm_checkpoint(model, w.value)
    model = model.eval().to(device)
    tag = w.value if w.kind == "pretrained" else None
    return LoadedBackbone(
        entry,
        model,
        w,
        checkpoint_report=report,
        preprocess=library_preprocess(entry, tag),
        architecture={"source": f"timm {entry.model_id}" + (f".{tag}" if tag else "")},
    )


OPEN_CLIP_CONFIG = "open_clip_config.json"  # what open_clip writes next to HF-hub weights
TIMM_CONFIG = "config.json"  # what timm writes next to HF-hub weights


def weights_identity(weights: str) -> dict[str, Any]:
    """What identifies loaded weights, for every cache key built on them (the image and the text export):
    the `weights` setting, a checkpoint's bytes and the config files beside it (they choose its
    architecture and pixel recipe), random init's seed."""
    from vitserve.exporter.identity import file_digest

    parts: dict[str, Any] = {"weights": weights, "weights_sha": file_digest(weights)}
    if Path(weights).is_file():
        folder = Path(weights).parent
        parts["weights_config"] = {
            name: file_digest(folder / name) for name in (OPEN_CLIP_CONFIG, TIMM_CONFIG)
        }
    if weights == "random":
        parts["random_init_seed"] = RANDOM_INIT_SEED
    return parts


def _sidecar_config(path: str, name: str) -> tuple[dict[str, Any] | None, Path]:
    cfg_path = Path(path).parent / name
    if not cfg_path.is_file():
        return None, cfg_path
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(
            f"{cfg_path} (next to checkpoint {path}) is not readable JSON ({e}); fix or remove it"
        ) from e
    if not isinstance(cfg, dict):
        raise ExportError(f"{cfg_path} (next to checkpoint {path}) is not a JSON object")
    return cfg, cfg_path


def _check_timm_checkpoint_config(entry: BackboneEntry, path: str) -> None:
    """A timm HF-hub `config.json` next to the checkpoint must name this architecture."""
    if entry.source != "timm":
        return
    cfg, cfg_path = _sidecar_config(path, TIMM_CONFIG)
    arch = (cfg or {}).get("architecture")
    if arch and arch.partition(".")[0] != entry.model_id:
        raise ExportError(
            f"checkpoint {path}: its {cfg_path.name} says architecture {arch!r}, but --backbone "
            f"{entry.name} is {entry.model_id!r}; choose the backbone the checkpoint was trained as "
            "(`vitserve backbones`)"
        )


def _differences(ours: dict[str, Any], theirs: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys both configs set to different values (nested), as 'key: checkpoint X vs backbone Y'."""

    def norm(v):
        return [norm(x) for x in v] if isinstance(v, list | tuple) else v

    out = []
    for key in sorted(set(ours) & set(theirs)):
        a, b = ours[key], theirs[key]
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif norm(a) != norm(b):
            out.append(f"{prefix}{key}: checkpoint {b!r} vs backbone {a!r}")
    return out


def clip_architecture(entry: BackboneEntry, w: Weights) -> dict[str, Any]:
    """QuickGELU and preprocessing for open_clip backbone `entry` loaded with weights `w`.

    - `pretrained:TAG`: open_clip's pretrained cfg of TAG (ViT-B-32 `openai` and `laion400m_e31` are
      QuickGELU, `laion2b_s34b_b79k` is not; ViT-L-14 `laion2b_s32b_b82k` normalizes with 0.5/0.5).
    - a checkpoint FILE: its checkpoint config, which is the `open_clip_config.json` open_clip writes next
      to HF-hub weights (`model_cfg` incl. `quick_gelu`, and `preprocess_cfg`). A config describing
      another architecture (embed_dim, vision_cfg, text_cfg) is an ExportError naming both. A bare state
      dict carries no config, and QuickGELU cannot be told from the weights (the tensors are the same):
      then the registry's default tag decides, with a warning, and the manifest says so.
    - random init: the registry's default tag.

    Returns {"quick_gelu", "source", "preprocess" (a Preprocess)}.
    """
    import open_clip

    if w.kind == "pretrained":
        pcfg = open_clip.get_pretrained_cfg(entry.model_id, w.value)
        return {
            "quick_gelu": bool(pcfg.get("quick_gelu", False)),
            "source": f"open_clip pretrained cfg of tag {w.value}",
            "preprocess": library_preprocess(entry, w.value),
        }
    if w.kind == "file":
        cfg, cfg_path = _sidecar_config(w.value, OPEN_CLIP_CONFIG)
        if cfg is not None:
            model_cfg = cfg.get("model_cfg")
            if not isinstance(model_cfg, dict):
                raise ExportError(
                    f"{cfg_path} (next to checkpoint {w.value}) has no 'model_cfg' object; "
                    "is it open_clip's config? Fix or remove it"
                )
            ours = open_clip.get_model_config(entry.model_id)
            diffs = _differences({k: ours[k] for k in ("embed_dim", "vision_cfg", "text_cfg")}, model_cfg)
            if diffs:
                raise ExportError(
                    f"checkpoint {w.value}: its {cfg_path.name} describes another architecture than "
                    f"--backbone {entry.name} ({'; '.join(diffs)}); choose the backbone the checkpoint "
                    "was trained as (`vitserve backbones`)"
                )
            return {
                "quick_gelu": bool(model_cfg.get("quick_gelu", False)),
                "source": str(cfg_path),
                "preprocess": _open_clip_preprocess(entry, cfg.get("preprocess_cfg") or {}),
            }
        arch = clip_architecture(entry, Weights("random"))
        log.warning(
            "checkpoint %s carries no %s: QuickGELU cannot be told from weights, using %s's default "
            "tag %s (quick_gelu=%s). Put open_clip's %s next to the checkpoint if it was trained otherwise",
            w.value,
            OPEN_CLIP_CONFIG,
            entry.name,
            entry.pretrained,
            arch["quick_gelu"],
            OPEN_CLIP_CONFIG,
        )
        arch["source"] = f"{arch['source']} (checkpoint has no {OPEN_CLIP_CONFIG}: not detectable)"
        return arch
    pcfg = open_clip.get_pretrained_cfg(entry.model_id, entry.pretrained) if entry.pretrained else {}
    return {
        "quick_gelu": bool(pcfg.get("quick_gelu", False)),
        "source": f"registry default tag {entry.pretrained}",
        "preprocess": library_preprocess(entry, entry.pretrained),
    }


def _quick_gelu_in(module) -> bool | None:
    """Whether open_clip's own transformer blocks use QuickGELU (None: timm tower, no such choice)."""
    from open_clip.transformer import QuickGELU, ResidualAttentionBlock

    blocks = [m for m in module.modules() if isinstance(m, ResidualAttentionBlock)]
    if not blocks:
        return None
    return isinstance(blocks[0].mlp.gelu, QuickGELU)


def _create_open_clip(entry: BackboneEntry, w: Weights, device: str) -> LoadedBackbone:
    import open_clip
    from torch import nn

    if w.kind == "file" and not Path(w.value).is_file():
        raise ExportError(f"checkpoint {w.value} does not exist; pass an existing file to --weights")
    arch = clip_architecture(entry, w)
    kwargs = dict(force_quick_gelu=arch["quick_gelu"], device=device)
    try:
        if w.kind in ("pretrained", "file"):
            model = open_clip.create_model(
                entry.model_id, pretrained=w.value, require_pretrained=True, **kwargs
            )
        else:
            model = open_clip.create_model(entry.model_id, pretrained=None, **kwargs)
    except Exception as e:
        if w.kind == "pretrained":
            raise _download_error(entry, w.value, e) from e
        raise ExportError(
            f"checkpoint {w.value} could not be loaded into {entry.name}: {type(e).__name__}: {e}"
        ) from e
    built = _quick_gelu_in(model.visual)
    if built is not None and built != arch["quick_gelu"]:
        raise ExportError(
            f"{entry.name}: built with quick_gelu={built} but the weights ({arch['source']}) need "
            f"quick_gelu={arch['quick_gelu']}; this is a vitserve bug, please report it"
        )

    class ClipImageEncoder(nn.Module):
        def __init__(self, visual):
            super().__init__()
            self.visual = visual

        def forward(self, pixel_values):
            return self.visual(pixel_values)

    model.eval()
    tokenizer = open_clip.get_tokenizer(entry.model_id)
    return LoadedBackbone(
        entry,
        ClipImageEncoder(model.visual).eval(),
        w,
        clip_model=model,
        tokenizer=tokenizer,
        preprocess=arch["preprocess"],
        architecture={"quick_gelu": built, "source": arch["source"]},
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


# ------------------------------------------------------------------------ the libraries' own preprocessing


def _open_clip_preprocess(entry: BackboneEntry, overlay: dict[str, Any]) -> Preprocess:
    """open_clip's PreprocessCfg defaults, merged with `overlay` (a tag's pretrained cfg or a checkpoint's
    preprocess_cfg), with the size of the model's vision tower, as open_clip's factory resolves it."""
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = merge_preprocess_dict(PreprocessCfg(), overlay)
    size = open_clip.get_model_config(entry.model_id)["vision_cfg"]["image_size"]
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise ConfigError(f"{entry.name}: non-square input {size} is not supported")
        size = size[0]
    return Preprocess(
        int(size),
        int(size),
        cfg["interpolation"],
        tuple(float(v) for v in cfg["mean"]),
        tuple(float(v) for v in cfg["std"]),
        cfg["resize_mode"],
        rgb="after_crop",
    )


def _timm_data_model(entry: BackboneEntry, tag: str | None) -> str:
    if entry.data_config_model:
        return entry.data_config_model
    tag = tag or entry.pretrained
    return f"{entry.model_id}.{tag}" if tag else entry.model_id


@functools.cache
def _timm_data_config(model_name: str) -> tuple[tuple[str, Any], ...]:
    import timm.data
    import timm.models

    pcfg = timm.models.get_pretrained_cfg(model_name)
    if pcfg is None:
        raise ConfigError(f"timm has no pretrained config for {model_name!r}")
    return tuple(timm.data.resolve_data_config(pretrained_cfg=pcfg.to_dict()).items())


def timm_model_data_config(model_name: str) -> dict[str, Any]:
    """`timm.data.resolve_model_data_config` of `model_name` built on the meta device (no weights)."""
    import timm
    import timm.data
    import torch

    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False, num_classes=0)
    return timm.data.resolve_model_data_config(model)


def library_data_config(entry: BackboneEntry, tag: str | None = None) -> dict[str, Any]:
    """timm's resolved data config for a timm/TAO entry (TAO: the timm DINOv2 of its shape), from the
    model's pretrained cfg: what `resolve_model_data_config` returns for the model (a test checks that),
    without building it."""
    return dict(_timm_data_config(_timm_data_model(entry, tag)))


def library_preprocess(entry: BackboneEntry, tag: str | None = None) -> Preprocess:
    """The eval preprocessing open_clip / timm resolve for `entry` with pretrained `tag` (default: the
    registry's), read from the libraries' own configs (no weights, no download)."""
    if entry.source == "open_clip":
        import open_clip

        tag = tag or entry.pretrained
        return _open_clip_preprocess(entry, open_clip.get_pretrained_cfg(entry.model_id, tag) if tag else {})
    dc = library_data_config(entry, tag)
    _, h, w = dc["input_size"]
    crop_mode = dc.get("crop_mode") or "center"
    if h != w or crop_mode not in ("center", "squash") or (crop_mode == "squash" and dc["crop_pct"] != 1):
        raise ConfigError(
            f"{entry.name}: timm data config {dc} (non-square input, border crop, or squash with "
            "crop_pct != 1) is not served by vitserve's preprocess model"
        )
    return Preprocess(
        int(h),
        math.floor(h / dc["crop_pct"]),
        dc["interpolation"],
        tuple(float(v) for v in dc["mean"]),
        tuple(float(v) for v in dc["std"]),
        "shortest" if crop_mode == "center" else "squash",
        rgb="on_decode",
    )


class _ConvertRGB:
    """timm's loader step (`ImageDataset`: `img.convert("RGB")`), which runs before timm's transform."""

    def __call__(self, im):
        return im.convert("RGB")

    def __repr__(self) -> str:
        return "ConvertRGB()"


def library_transform(entry: BackboneEntry, tag: str | None = None):
    """The library's own eval transform for `entry` (PIL image as decoded -> normalized tensor):
    `open_clip.transform.image_transform_v2` with the preprocess cfg open_clip resolves for `tag` (Resize,
    CenterCrop, then RGB), or `timm.data.create_transform` of `timm.data.resolve_model_data_config`
    after timm's loader's RGB conversion. The reference for parity and fidelity, never the registry."""
    if entry.source == "open_clip":
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

        tag = tag or entry.pretrained
        cfg = merge_preprocess_dict(
            PreprocessCfg(), open_clip.get_pretrained_cfg(entry.model_id, tag) if tag else {}
        )
        cfg["size"] = open_clip.get_model_config(entry.model_id)["vision_cfg"]["image_size"]
        return image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    import timm.data
    from torchvision.transforms import Compose

    return Compose([_ConvertRGB(), timm.data.create_transform(**library_data_config(entry, tag))])


def library_transform_for(entry: BackboneEntry, recipe: Preprocess):
    """The library's own eval transform built FROM `recipe` (the model's one pixel recipe: what its weights
    imply, `ModelSpec.served_preprocess`), PIL image as decoded -> normalized tensor: open_clip's
    `image_transform_v2` of a PreprocessCfg with the recipe's size, mean, std, interpolation and
    resize_mode; timm's `create_transform` with its input_size, crop_pct (size / resize_size), crop_mode,
    interpolation, mean and std, after the loader's RGB conversion where the recipe converts on decode.
    For the registry's default recipe it is `library_transform(entry)` (a test checks every entry)."""
    from torchvision.transforms import Compose

    if entry.source == "open_clip":
        from open_clip.transform import PreprocessCfg, image_transform_v2

        if recipe.resize_size != recipe.size:
            raise ConfigError(
                f"{entry.name}: recipe resize_size {recipe.resize_size} != size {recipe.size}; open_clip's "
                "eval transform resizes to the crop size (re-export the model: its manifest is not open_clip's)"
            )
        cfg = PreprocessCfg(
            size=recipe.size,
            mean=tuple(recipe.mean),
            std=tuple(recipe.std),
            interpolation=recipe.interpolation,
            resize_mode=recipe.resize_mode,
        )
        tf = image_transform_v2(cfg, is_train=False)
    else:
        import timm.data

        # timm resizes to floor(size / crop_pct): aim between two integers so that float rounding of
        # size / resize_size cannot land one pixel short
        crop_pct = recipe.size / recipe.resize_size
        if math.floor(recipe.size / crop_pct) != recipe.resize_size:
            crop_pct = recipe.size / (recipe.resize_size + 0.5)
        tf = timm.data.create_transform(
            input_size=(3, recipe.size, recipe.size),
            interpolation=recipe.interpolation,
            mean=tuple(recipe.mean),
            std=tuple(recipe.std),
            crop_pct=crop_pct,
            crop_mode="center" if recipe.resize_mode == "shortest" else "squash",
        )
    return Compose([_ConvertRGB(), tf]) if recipe.rgb == "on_decode" else tf


def prepare_image(im, pre: Preprocess):
    """`im` with vitserve's deliberate differences applied as `pre` sets them (EXIF orientation, 16-bit
    scaling), ready for `library_transform`: what the served path feeds its resize."""
    from PIL import ImageOps

    from vitserve.exporter.triton_models.preprocess import scale_to_8bit

    if pre.exif_transpose:
        im = ImageOps.exif_transpose(im)
    return scale_to_8bit(im) if pre.scale_16bit else im


def torch_transform(entry: BackboneEntry):
    """The backbone's own eval transform (PIL image -> normalized tensor): `library_transform`."""
    return library_transform(entry)
