"""Fine-tuned heads on a backbone's features, and the serving module (backbone + head) that is exported.

Head kinds: `linear` (TAO's TAOLinearClsHead: in_channels -> num_classes), `mlp` (Linear-GELU-Linear),
`zeroshot` (CLIP text tower over class names x prompt templates) and `none` (embeddings only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vitserve import contract
from vitserve.errors import ConfigError, ExportError

HEAD_KINDS = ("none", "linear", "mlp", "zeroshot")

DEFAULT_TEMPLATES = contract.ZEROSHOT_TEMPLATES  # one owner: vitserve/contract.py


@dataclass(frozen=True)
class HeadSpec:
    kind: str = "none"
    file: str | None = None

    @classmethod
    def parse(cls, text: str | None) -> HeadSpec:
        """From `none`, `zeroshot`, `linear:FILE` or `mlp:FILE`."""
        text = text or "none"
        kind, _, file = text.partition(":")
        if kind not in HEAD_KINDS:
            raise ConfigError(
                f"head {text!r}: kind must be one of {', '.join(HEAD_KINDS)} (e.g. linear:head.pt)"
            )
        if kind in ("linear", "mlp") and not file:
            raise ConfigError(f"head {text!r}: a {kind} head needs its weights, e.g. {kind}:head.pt")
        if kind in ("none", "zeroshot") and file:
            raise ConfigError(f"head {text!r}: a {kind} head takes no file")
        return cls(kind, file or None)

    def __str__(self) -> str:
        return f"{self.kind}:{self.file}" if self.file else self.kind


def read_labels(path: str | Path) -> list[str]:
    """Class names, one per line (blank lines ignored)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"labels file {path} does not exist")
    labels = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not labels:
        raise ConfigError(f"labels file {path} is empty; write one class name per line")
    return labels


def _head_state_dict(path: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise ExportError(f"head checkpoint {path} does not exist")
    try:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ExportError(f"head checkpoint {path} could not be read ({type(e).__name__}: {e})") from e
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ExportError(f"head checkpoint {path} holds no state dict")
    # TAO classification checkpoints: model.head.fc.weight / head.fc.weight; plain: weight / fc.weight
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        for prefix in ("model.head.", "head.", "model.", ""):
            if k.startswith(prefix):
                out[k[len(prefix) :]] = v
                break
    return out


class LinearHead(nn.Module):
    """TAO's TAOLinearClsHead: a single Linear(in_channels, num_classes) on the backbone features."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class MLPHead(nn.Module):
    """Linear(in, hidden) - GELU - Linear(hidden, num_classes)."""

    def __init__(self, in_channels: int, hidden: int, num_classes: int):
        super().__init__()
        self.fc1 = nn.Linear(in_channels, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ZeroShotHead(nn.Module):
    """logits = scale * normalize(features) @ normalize(text_embeddings).T (CLIP's zero-shot classifier)."""

    def __init__(self, weights: torch.Tensor, scale: float):
        super().__init__()
        self.register_buffer("weights", weights)
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(x, dim=-1) @ self.weights.t()


def _take(sd: dict[str, torch.Tensor], names: tuple[str, ...], path: str) -> list[torch.Tensor]:
    for candidates in (names, tuple(f"fc.{n}" for n in names)):
        if all(n in sd for n in candidates):
            return [sd[n] for n in candidates]
    raise ExportError(f"head checkpoint {path}: expected keys {names} (or fc.*), found {sorted(sd)[:8]}")


def _check_in(in_channels: int, feature_dim: int, path: str, backbone: str) -> None:
    if in_channels != feature_dim:
        raise ExportError(
            f"head {path} has in_channels={in_channels} but backbone {backbone} outputs "
            f"feature_dim={feature_dim}; train the head on this backbone's features"
        )


def build_head(spec: HeadSpec, backbone, labels: list[str] | None) -> nn.Module | None:
    """The head module for `spec` on a LoadedBackbone, checked against its feature dim and the labels."""
    entry = backbone.entry
    if spec.kind == "none":
        return None
    if spec.kind == "zeroshot":
        if backbone.clip_model is None:
            raise ConfigError(
                f"a zeroshot head needs a CLIP backbone (with a text tower); {entry.name} has none"
            )
        if not labels:
            raise ConfigError("a zeroshot head needs --labels FILE (the class names)")
        return zeroshot_head(backbone, labels)
    sd = _head_state_dict(spec.file)
    if spec.kind == "linear":
        w, b = _take(sd, ("weight", "bias"), spec.file)
        _check_in(w.shape[1], entry.feature_dim, spec.file, entry.name)
        head = LinearHead(w.shape[1], w.shape[0])
        head.fc.load_state_dict({"weight": w, "bias": b})
    else:
        w1, b1, w2, b2 = _take(sd, ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"), spec.file)
        _check_in(w1.shape[1], entry.feature_dim, spec.file, entry.name)
        head = MLPHead(w1.shape[1], w1.shape[0], w2.shape[0])
        head.load_state_dict({"fc1.weight": w1, "fc1.bias": b1, "fc2.weight": w2, "fc2.bias": b2})
    num_classes = head.fc.out_features if spec.kind == "linear" else head.fc2.out_features
    if labels is not None and len(labels) != num_classes:
        raise ExportError(
            f"labels file has {len(labels)} names but head {spec.file} has {num_classes} classes"
        )
    return head.eval()


@torch.no_grad()
def zeroshot_head(
    backbone, labels: list[str], templates: tuple[str, ...] = DEFAULT_TEMPLATES
) -> ZeroShotHead:
    """Class names x templates through the CLIP text tower; mean of normalized prompts per class."""
    model, tokenizer = backbone.clip_model, backbone.tokenizer
    weights = []
    for name in labels:
        tokens = tokenizer([t.format(name) for t in templates])
        emb = F.normalize(model.encode_text(tokens), dim=-1).mean(0)
        weights.append(F.normalize(emb, dim=-1))
    scale = float(model.logit_scale.exp()) if hasattr(model, "logit_scale") else 100.0
    return ZeroShotHead(torch.stack(weights), scale).eval()


class ServingModel(nn.Module):
    """What is exported: pixel_values -> embeddings (L2-normalized) [+ logits, probs (softmax)].

    `features=True` (a backbone shared by several heads, exporter/multihead.py): embeddings and the pooled
    `features` the heads consume, no head."""

    def __init__(self, encoder: nn.Module, head: nn.Module | None, features: bool = False):
        super().__init__()
        if features and head is not None:
            raise ExportError("a backbone that outputs features for separate heads has no head of its own")
        self.encoder = encoder
        self.head = head
        self.features = features

    @property
    def output_names(self) -> list[str]:
        if self.features:
            return ["embeddings", "features"]
        return ["embeddings"] if self.head is None else ["embeddings", "logits", "probs"]

    def forward(self, pixel_values: torch.Tensor):
        features = self.encoder(pixel_values)
        embeddings = F.normalize(features, dim=-1)
        if self.features:
            return embeddings, features
        if self.head is None:
            return embeddings
        logits = self.head(features)
        return embeddings, logits, logits.softmax(dim=-1)
