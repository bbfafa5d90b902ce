"""Exporter: registry, heads, ONNX export with parity, manifest, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vitserve.errors import ConfigError, ExportError
from vitserve.exporter.backbones import REGISTRY, get_backbone, load_timm_checkpoint, meta_feature_dim
from vitserve.exporter.export import export_model

# The seed table of the project brief (open_clip name -> feature dim), plus NV-DINOv2 and DINOv2.
EXPECTED_DIMS = {
    "ViT-B-32": 512,
    "ViT-B-16": 512,
    "ViT-L-14": 768,
    "ViT-H-14": 1024,
    "ViT-g-14": 1024,
    "EVA02-L-14": 768,
    "EVA02-L-14-336": 768,
    "EVA02-E-14": 1024,
    "EVA02-E-14-plus": 1024,
    "NV-DINOv2": 1024,
    "DINOv2-S": 384,
    "DINOv2-B": 768,
    "DINOv2-L": 1024,
    "DINOv2-g": 1536,
}


def test_registry_feature_dims_match_the_table():
    for name, dim in EXPECTED_DIMS.items():
        assert REGISTRY[name].feature_dim == dim, name


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_architecture_builds_on_meta_with_its_feature_dim(name):
    dim, params = meta_feature_dim(name)
    assert dim == REGISTRY[name].feature_dim
    assert params > 10_000_000


def test_nv_dinov2_is_tao_swiglu_vit_large():
    from timm.layers import GluMlp

    from vitserve.exporter.backbones import _timm_module

    with torch.device("meta"):
        model = _timm_module(get_backbone("NV-DINOv2"), None)
    assert len(model.blocks) == 24 and model.embed_dim == 1024
    mlp = model.blocks[0].mlp
    assert isinstance(mlp, GluMlp) and isinstance(mlp.act, torch.nn.SiLU)  # timm's SwiGLUPacked
    assert (mlp.fc1.out_features, mlp.fc2.in_features) == (
        5472,
        2736,
    )  # mlp_ratio=5472/1024, packed gate+value
    assert model.patch_embed.patch_size == (14, 14) and model.patch_embed.img_size == (518, 518)


def test_unknown_backbone_lists_close_names():
    with pytest.raises(ConfigError, match="ViT-B-32"):
        get_backbone("ViT-B-23")


def _check_manifest(out: Path, outputs: list[str]) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["random_init"] is True and "RANDOM INIT" in manifest["weights"]
    assert manifest["outputs"] == outputs
    assert manifest["parity"]["passed"] is True
    assert manifest["opset"] >= 17
    import hashlib

    for name, meta in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == meta["sha256"]
    return manifest


def test_vitb32_linear_head_export(vitb32_build):
    """The pipeline's export: parity passed on real photos and random inputs, batch 1 and > 1."""
    import onnx

    out = vitb32_build["artifacts"] / "vitb32" / "fp32"
    manifest = _check_manifest(out, ["embeddings", "logits", "probs"])
    cases = manifest["parity"]["cases"]
    assert any("photo (batch 1)" in c for c in cases) and any("random" in c for c in cases)
    for metrics in cases.values():
        for m in metrics.values():
            assert m["cosine_min"] >= 0.99999
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert model.graph.input[0].name == "pixel_values"
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert manifest["head"] == {"kind": "linear", "file": manifest["head"]["file"], "num_classes": 10}
    assert (out / "labels.txt").read_text().splitlines()[0] == "astronaut"


@pytest.mark.slow  # ~40 s; EVA02's export parity is also in the slow tier's test_slow_exports.py
def test_eva02_zeroshot_export(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nrocket\n")
    m = export_model("EVA02-B-16", tmp_path / "eva", weights="random", head="zeroshot", labels=labels)
    _check_manifest(tmp_path / "eva", ["embeddings", "logits", "probs"])
    assert m["family"] == "eva02-clip" and m["head"]["num_classes"] == 3


def test_dinov2_mlp_head_export(tmp_path):
    g = torch.Generator().manual_seed(0)
    head = tmp_path / "mlp.pt"
    torch.save(
        {
            "fc1.weight": torch.randn(64, 384, generator=g) * 0.05,
            "fc1.bias": torch.zeros(64),
            "fc2.weight": torch.randn(4, 64, generator=g) * 0.05,
            "fc2.bias": torch.zeros(4),
        },
        head,
    )
    m = export_model("DINOv2-S", tmp_path / "dino", weights="random", head=f"mlp:{head}")
    _check_manifest(tmp_path / "dino", ["embeddings", "logits", "probs"])
    assert m["input"]["shape"] == [-1, 3, 518, 518]


def test_no_head_exports_normalized_embeddings(vitb32_build, tmp_path):
    from vitserve.exporter import onnxrt
    from vitserve.exporter.export import photo_batch

    export_model("ViT-B-32", tmp_path / "emb", weights="random", head="none")
    _check_manifest(tmp_path / "emb", ["embeddings"])
    _, x = photo_batch(get_backbone("ViT-B-32"), get_backbone("ViT-B-32").preprocess, 3)
    emb = onnxrt.run(onnxrt.cpu_session(tmp_path / "emb" / "model.onnx"), x)["embeddings"]
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vitserve.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_head_in_channels_mismatch_names_both_numbers(tmp_path):
    head = tmp_path / "head.pt"
    torch.save({"weight": torch.zeros(3, 768), "bias": torch.zeros(3)}, head)
    out = tmp_path / "out"
    r = _cli(
        "export", "--backbone", "ViT-B-32", "--random-init", "--head", f"linear:{head}", "--out", str(out)
    )
    assert r.returncode != 0
    assert "in_channels=768" in r.stderr and "feature_dim=512" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_cli_unknown_backbone(tmp_path):
    r = _cli("export", "--backbone", "EVA02-L14", "--random-init", "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and "EVA02-L-14" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content", [None, b"this is not a checkpoint"])
def test_missing_or_corrupt_checkpoint(tmp_path, content):
    ckpt = tmp_path / "ckpt.pt"
    if content is not None:
        ckpt.write_bytes(content)
    with pytest.raises(ExportError, match=str(ckpt)):
        export_model("DINOv2-S", tmp_path / "o", weights=str(ckpt))
    assert not (tmp_path / "o").exists()


def test_labels_count_must_match_head(tmp_path, linear_head):
    head, _ = linear_head
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    with pytest.raises(ExportError, match=r"3 names but head .* 10 classes"):
        export_model("ViT-B-32", tmp_path / "o", weights="random", head=f"linear:{head}", labels=labels)
    assert not (tmp_path / "o").exists()


def test_pretrained_download_failure_suggests_alternatives(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    # huggingface_hub reads HF_HUB_OFFLINE when it is imported: an earlier test may have imported it, so the
    # constant is set too (else the download is tried for real and times out, offline, after ~45 s)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    with pytest.raises(ExportError, match=r"--weights FILE.*--random-init"):
        export_model("DINOv2-S", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_tao_checkpoint_keys_are_mapped_and_reported(tmp_path):
    import timm

    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)
    sd = {f"model.backbone.{k}": v.clone() + 1 for k, v in model.state_dict().items()}
    sd["model.head.fc.weight"] = torch.zeros(3, 384)
    del sd["model.backbone.norm.bias"]
    ckpt = tmp_path / "tao.pth"
    torch.save({"state_dict": sd}, ckpt)
    target = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)
    report = load_timm_checkpoint(target, str(ckpt))
    assert report["unmapped_keys"] == ["model.head.fc.weight"]
    assert report["missing_keys"] == ["norm.bias"]
    assert torch.equal(target.cls_token, model.cls_token + 1)


# ------------------------------------------------------------- the architecture follows the weights


def test_quick_gelu_comes_from_the_chosen_tag():
    from vitserve.exporter.backbones import Weights, clip_architecture

    vitb32 = get_backbone("ViT-B-32")
    arch = {t: clip_architecture(vitb32, Weights("pretrained", t)) for t in ("openai", "laion400m_e31")}
    arch["laion2b_s34b_b79k"] = clip_architecture(vitb32, Weights("pretrained", "laion2b_s34b_b79k"))
    assert arch["openai"]["quick_gelu"] and arch["laion400m_e31"]["quick_gelu"]
    assert arch["laion2b_s34b_b79k"]["quick_gelu"] is False
    assert clip_architecture(get_backbone("ViT-B-16"), Weights("pretrained", "openai"))["quick_gelu"]
    assert not clip_architecture(get_backbone("ViT-B-16"), Weights("random"))["quick_gelu"]


def test_unknown_tag_is_refused_with_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"'laion5b'.*laion2b_s34b_b79k"):
        export_model("ViT-B-32", tmp_path / "o", weights="pretrained:laion5b")
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def vitb32_weights(tmp_path_factory) -> Path:
    """A ViT-B-32 state dict (random init) saved as open_clip saves HF-hub weights."""
    import open_clip

    path = tmp_path_factory.mktemp("vitb32_weights") / "open_clip_pytorch_model.bin"
    torch.manual_seed(1)
    torch.save(open_clip.create_model("ViT-B-32", pretrained=None).state_dict(), path)
    return path


def _gelu_of(loaded) -> type:
    return type(loaded.clip_model.visual.transformer.resblocks[0].mlp.gelu)


def _checkpoint_with_config(tmp_path: Path, weights: Path, **model_cfg) -> Path:
    import open_clip

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / weights.name).symlink_to(weights)
    cfg = {"model_cfg": open_clip.get_model_config("ViT-B-32") | model_cfg, "preprocess_cfg": {}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    return folder / weights.name


def test_checkpoint_config_decides_quick_gelu(tmp_path, vitb32_weights):
    """ViT-B-32's default tag is QuickGELU; a checkpoint whose open_clip_config.json says otherwise is
    built with nn.GELU, and the manifest-facing record says where that came from."""
    from open_clip.transformer import QuickGELU

    from vitserve.exporter.backbones import create_backbone

    ckpt = _checkpoint_with_config(tmp_path, vitb32_weights, quick_gelu=False)
    loaded = create_backbone("ViT-B-32", str(ckpt))
    assert _gelu_of(loaded) is torch.nn.GELU
    assert loaded.architecture == {"quick_gelu": False, "source": str(ckpt.parent / "open_clip_config.json")}
    bare = create_backbone("ViT-B-32", str(vitb32_weights))  # no config: the registry's tag, said so
    assert _gelu_of(bare) is QuickGELU and "not detectable" in bare.architecture["source"]


def test_checkpoint_config_of_another_architecture_names_both(tmp_path, vitb32_weights):
    import open_clip

    vitl = open_clip.get_model_config("ViT-L-14")
    ckpt = _checkpoint_with_config(tmp_path, vitb32_weights, vision_cfg=vitl["vision_cfg"], embed_dim=768)
    with pytest.raises(ExportError, match=r"ViT-B-32.*embed_dim: checkpoint 768 vs backbone 512"):
        export_model("ViT-B-32", tmp_path / "o", weights=str(ckpt))
    assert not (tmp_path / "o").exists()


def test_timm_checkpoint_config_of_another_architecture_names_both(tmp_path):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_base_patch14_dinov2"}))
    with pytest.raises(ExportError, match=r"vit_base_patch14_dinov2.*DINOv2-S.*vit_small_patch14_dinov2"):
        export_model("DINOv2-S", tmp_path / "o", weights=str(ckpt))


@pytest.mark.slow
def test_pretrained_tag_builds_its_own_activation(tmp_path, vitb32_weights, monkeypatch):
    """`--pretrained laion2b_s34b_b79k` (no QuickGELU) on ViT-B-32 (default tag QuickGELU), end to end
    through open_clip's download path, served from a local Hugging Face cache (offline)."""
    import huggingface_hub.constants as hf
    import open_clip
    from open_clip.transformer import QuickGELU

    from vitserve.exporter.backbones import create_backbone

    for tag in ("laion2b_s34b_b79k", "openai"):
        repo = open_clip.get_pretrained_cfg("ViT-B-32", tag)["hf_hub"].strip("/")
        folder = tmp_path / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text("0" * 40)
        (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
        (folder / "snapshots" / ("0" * 40) / "open_clip_pytorch_model.bin").symlink_to(vitb32_weights)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    assert _gelu_of(create_backbone("ViT-B-32", "pretrained:laion2b_s34b_b79k")) is torch.nn.GELU
    assert _gelu_of(create_backbone("ViT-B-32", "pretrained:openai")) is QuickGELU
