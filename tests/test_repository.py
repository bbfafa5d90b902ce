"""The generated Triton repository, served by the real tritonserver: configs, preprocessing fidelity,
tensor inputs, and bad input that fails only its own request."""

from __future__ import annotations

import asyncio
import io
import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from vitserve.exporter.repository import read_config

pytestmark = pytest.mark.triton


def _jpeg(im: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, format="JPEG", quality=95, **kw)
    return b.getvalue()


def _png(im: Image.Image) -> bytes:
    b = io.BytesIO()
    im.save(b, format="PNG")
    return b.getvalue()


def _exif_rotated(im: Image.Image) -> bytes:
    """JPEG whose pixels are stored rotated, with EXIF orientation 6 saying how to turn them upright."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _jpeg(im.transpose(Image.Transpose.ROTATE_90), exif=exif)


def _reference_model(build):
    """The served model, rebuilt in PyTorch (same seeded random init, same head file)."""
    from vitserve.exporter.backbones import create_backbone
    from vitserve.exporter.config import load_models
    from vitserve.exporter.heads import HeadSpec, ServingModel, build_head

    spec = load_models(build["config"])[0]
    loaded = create_backbone(spec.backbone, "random")
    return ServingModel(
        loaded.encoder, build_head(HeadSpec.parse(spec.head), loaded, None)
    ).eval(), loaded.entry


def _infer_ensemble(client, mod, images: list[bytes], model="vitb32", **kw):
    arr = np.array(images, dtype=object).reshape(-1, 1)
    inp = mod.InferInput("image", list(arr.shape), "BYTES")
    inp.set_data_from_numpy(arr)
    return client.infer(model, [inp], **kw)


def test_every_model_ready_and_configs_parse_back(vitb32_build, vitb32_server):
    import tritonclient.http as httpclient

    repo = vitb32_build["repository"]
    names = sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))
    published = vitb32_build["summary"]["models"]["vitb32"]["triton_models"]
    assert names == sorted(published) and {"vitb32", "vitb32_fp32_cpu", "vitb32_preprocess"} <= set(names)
    for name in names:
        cfg = read_config(repo / name / "config.pbtxt")
        assert cfg.name == name and cfg.max_batch_size == 8
    backbone = read_config(repo / "vitb32_fp32_cpu" / "config.pbtxt")
    assert list(backbone.dynamic_batching.preferred_batch_size) == [4, 8]
    assert backbone.instance_group[0].kind == backbone.instance_group[0].KIND_CPU
    assert backbone.model_warmup[0].inputs["pixel_values"].zero_data
    assert read_config(repo / "vitb32" / "config.pbtxt").platform == "ensemble"
    client = httpclient.InferenceServerClient(vitb32_server.http_url)
    index = {m["name"]: m.get("state") for m in client.get_model_repository_index()}
    assert set(index) == set(names) and set(index.values()) == {"READY"}
    manifest = json.loads((repo / "vitserve-manifest.json").read_text())
    assert manifest["models"]["vitb32"]["export"]["random_init"] is True


def test_preprocess_matches_open_clip_transform(vitb32_build):
    from vitserve.exporter.backbones import get_backbone, torch_transform
    from vitserve.exporter.samples import eval_photos
    from vitserve.exporter.triton_models.preprocess import preprocess_bytes

    entry = get_backbone("ViT-B-32")
    cfg = entry.preprocess.as_dict()
    tf = torch_transform(entry)
    for _, im in eval_photos():
        ours = preprocess_bytes(_png(im), cfg)
        ref = tf(im).numpy()
        assert np.abs(ours - ref).max() < 1e-4


def test_served_ensemble_matches_pytorch_on_real_photos(vitb32_build, vitb32_server):
    """JPEG and PNG, several sizes, EXIF orientation 6: served embeddings vs PyTorch + open_clip's own
    preprocessing of the upright image."""
    import tritonclient.grpc as grpcclient

    from vitserve.exporter.backbones import torch_transform
    from vitserve.exporter.samples import eval_photos

    model, entry = _reference_model(vitb32_build)
    tf = torch_transform(entry)
    photos = eval_photos()
    cases = []
    for i, (_, im) in enumerate(photos):
        small = im.resize((max(32, im.width // (i + 1)), max(32, im.height // (i + 1))))
        cases += [(im, _jpeg(im)), (small, _png(small))]
    cases.append((photos[0][1], _exif_rotated(photos[0][1])))
    client = grpcclient.InferenceServerClient(vitb32_server.grpc_url)
    served = np.concatenate(
        [
            _infer_ensemble(client, grpcclient, [b for _, b in cases[i : i + 8]]).as_numpy("embeddings")
            for i in range(0, len(cases), 8)
        ]
    )
    decoded = [Image.open(io.BytesIO(b)).convert("RGB") if k % 2 else im for k, (im, b) in enumerate(cases)]
    decoded[-1] = photos[0][1]  # the upright image
    with torch.inference_mode():
        ref = model(torch.stack([tf(im) for im in decoded]))[0].numpy()
    cos = (served * ref).sum(1) / np.linalg.norm(served, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.999, cos


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_backbone_takes_preprocessed_tensors(vitb32_build, vitb32_server, protocol):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from vitserve.exporter import onnxrt

    mod = httpclient if protocol == "http" else grpcclient
    url = vitb32_server.http_url if protocol == "http" else vitb32_server.grpc_url
    client = mod.InferenceServerClient(url)
    onnx_path = vitb32_build["artifacts"] / "vitb32" / "fp32" / "model.onnx"
    session = onnxrt.cpu_session(onnx_path)
    rng = np.random.default_rng(0)
    for batch in (1, 5):
        x = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)
        inp = mod.InferInput("pixel_values", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        got = client.infer("vitb32_fp32_cpu", [inp]).as_numpy("embeddings")
        np.testing.assert_allclose(got, onnxrt.run(session, x)["embeddings"], atol=1e-5)


def _png16() -> bytes:
    a = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    im = Image.fromarray(a)
    assert im.mode == "I;16"
    return _png(im)


def _animated_gif() -> bytes:
    frames = [Image.new("P", (40, 30), i * 40) for i in range(3)]
    b = io.BytesIO()
    frames[0].save(b, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return b.getvalue()


def _palette_transparent() -> bytes:
    im = Image.new("P", (50, 40), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    b = io.BytesIO()
    im.save(b, format="PNG", transparency=0)
    return b.getvalue()


def _bomb_png(width: int = 6000, height: int = 6000) -> bytes:
    """A tiny file whose header promises 36 Mpx: rejected before decoding."""
    im = Image.new("1", (width, height))
    b = io.BytesIO()
    im.save(b, format="PNG", optimize=True)
    return b.getvalue()


def test_bad_images_fail_alone_in_a_dynamic_batch(vitb32_server):
    """Good and bad images sent concurrently (batched together by the dynamic batcher): each bad one
    gets its own clear error, every good one its result, and the server stays up."""
    import tritonclient.grpc.aio as aioclient
    from tritonclient.utils import InferenceServerException

    photo = Image.open(io.BytesIO(_jpeg(Image.new("RGB", (320, 240), (90, 140, 200))))).convert("RGB")
    good = {
        "jpeg": _jpeg(photo),
        "png": _png(photo),
        "cmyk": _jpeg(photo.convert("CMYK")),
        "16-bit": _png16(),
        "animated gif": _animated_gif(),
        "palette+transparency": _palette_transparent(),
    }
    truncated = _jpeg(photo)[:400]
    bad = {
        "truncated jpeg": (truncated, "truncated"),
        "not an image": (b"GIF89a" + b"\x00" * 3 + struct.pack("<I", 7) * 8, "image"),
        "text": (b"hello, I am not an image", "not a decodable image"),
        "zero bytes": (b"", "0 bytes"),
        "bomb": (_bomb_png(), "above the limit"),
    }

    async def run():
        client = aioclient.InferenceServerClient(vitb32_server.grpc_url)

        async def one(data: bytes):
            arr = np.array([data], dtype=object).reshape(1, 1)
            inp = aioclient.InferInput("image", [1, 1], "BYTES")
            inp.set_data_from_numpy(arr)
            try:
                r = await client.infer("vitb32", [inp])
                return r.as_numpy("embeddings")
            except InferenceServerException as e:
                return e

        items = list(good.values()) + [b for b, _ in bad.values()]
        results = await asyncio.gather(*(one(b) for b in items * 2))
        await client.close()
        return results

    results = asyncio.run(run())
    n_good = len(good)
    for rep in range(2):
        chunk = results[rep * len(results) // 2 : (rep + 1) * len(results) // 2]
        for name, r in zip(good, chunk[:n_good], strict=True):
            assert isinstance(r, np.ndarray) and r.shape == (1, 512), (name, r)
        for (name, (_, needle)), r in zip(bad.items(), chunk[n_good:], strict=True):
            assert isinstance(r, Exception), name
            assert needle in str(r), (name, str(r))
            assert r.status() == "StatusCode.INVALID_ARGUMENT", (name, r.status())
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(vitb32_server.http_url)
    assert client.is_server_live() and client.is_model_ready("vitb32")


def test_tensor_model_rejects_wrong_dtype_and_shape(vitb32_server):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(vitb32_server.http_url)
    for data, dtype, needle in [
        (np.zeros((1, 3, 224, 224), np.float64), "FP64", "data-type"),
        (np.zeros((1, 3, 200, 224), np.float32), "FP32", "shape"),
        (np.zeros((9, 3, 224, 224), np.float32), "FP32", "batch"),
    ]:
        inp = httpclient.InferInput("pixel_values", list(data.shape), dtype)
        inp.set_data_from_numpy(data)
        with pytest.raises(InferenceServerException, match=needle) as e:
            client.infer("vitb32_fp32_cpu", [inp])
        assert e.value.status() == "400"
    ok = httpclient.InferInput("pixel_values", [1, 3, 224, 224], "FP32")
    ok.set_data_from_numpy(np.zeros((1, 3, 224, 224), np.float32))
    assert client.infer("vitb32_fp32_cpu", [ok]).as_numpy("embeddings").shape == (1, 512)


def test_classification_extension_returns_labels(vitb32_server):
    import tritonclient.http as httpclient

    from vitserve.exporter.samples import eval_photos

    client = httpclient.InferenceServerClient(vitb32_server.http_url)
    images = [_jpeg(im) for _, im in eval_photos()[:2]]
    out = httpclient.InferRequestedOutput("probs", class_count=3)
    r = _infer_ensemble(client, httpclient, images, outputs=[out]).as_numpy("probs")
    assert r.shape == (2, 3)
    score, index, label = r[0, 0].decode().split(":")
    from conftest import LABELS

    assert LABELS[int(index)] == label and 0 < float(score) <= 1


def test_tensorrt_unavailable_path_still_builds_everything_else(vitb32_build, tmp_path, capsys):
    """kinds [cpu, tensorrt] without TensorRT: CPU models as before, TensorRT model dirs with their
    config, ONNX and build.sh, and one clear note saying engines were not built and how to build them."""
    import yaml

    from vitserve.exporter.pipeline import build_all

    doc = yaml.safe_load(vitb32_build["config"].read_text())
    doc["models"][0]["kinds"] = ["cpu", "tensorrt"]
    config = tmp_path / "models.yaml"
    config.write_text(yaml.safe_dump(doc))
    repo = tmp_path / "repo"
    build_all(config, repo, vitb32_build["artifacts"], random_init=True)
    out = capsys.readouterr().out
    assert out.count("TensorRT engines were NOT built") == 1
    for precision in ("fp32", "fp16"):
        mdir = repo / f"vitb32_{precision}_tensorrt"
        assert read_config(mdir / "config.pbtxt").platform == "tensorrt_plan"
        script = (mdir / "1" / "build.sh").read_text()
        assert "--stronglyTyped" in script and "--saveEngine=model.plan" in script
        assert (
            "--minShapes=pixel_values:1x3x224x224" in script
            and "--maxShapes=pixel_values:8x3x224x224" in script
        )
        assert (mdir / "onnx" / "model.onnx").exists() and not (mdir / "1" / "model.plan").exists()
        assert str(mdir / "1" / "build.sh") in out
    assert (repo / "vitb32_fp32_cpu" / "1" / "model.onnx").exists()
    assert (
        read_config(repo / "vitb32" / "config.pbtxt").ensemble_scheduling.step[1].model_name.endswith("_cpu")
    )
    manifest = json.loads((repo / "vitserve-manifest.json").read_text())
    assert manifest["models"]["vitb32"]["engines"]["vitb32_fp16_tensorrt"]["built"] is False
