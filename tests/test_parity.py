"""Preprocessing against the libraries themselves: the registry's numbers against open_clip/timm's resolved
configs (every entry, no weights), and the served numpy preprocessing against the libraries' own transform
objects for every input mode, per backbone family (and on the real tritonserver for the small model)."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from vitserve.exporter.backbones import (
    IMAGENET_MEAN,
    REGISTRY,
    get_backbone,
    library_preprocess,
    library_transform,
    prepare_image,
)
from vitserve.perf.bench_parity import FAMILIES, MIN_COSINE, MODES, compare, decoded_modes, encode_modes

FIELDS = ("size", "resize_size", "interpolation", "mean", "std", "resize_mode", "rgb")


def _mismatches(entry) -> list[str]:
    lib = library_preprocess(entry)
    return [
        f"{entry.name}.{f}: registry {getattr(entry.preprocess, f)!r} vs library {getattr(lib, f)!r}"
        for f in FIELDS
        if getattr(entry.preprocess, f) != getattr(lib, f)
    ]


def test_every_registry_entry_matches_the_library_preprocessing():
    """open_clip's pretrained cfg + model config and timm's resolve_model_data_config (meta device, no
    weights) agree with the registry's numbers, for every entry."""
    problems = [m for entry in REGISTRY.values() for m in _mismatches(entry)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", ["DINOv2-S", "NV-DINOv2"])
def test_timm_data_config_is_what_resolve_model_data_config_gives(name):
    from vitserve.exporter.backbones import _timm_data_model, library_data_config, timm_model_data_config

    entry = get_backbone(name)
    assert library_data_config(entry) == timm_model_data_config(_timm_data_model(entry, None))


def test_a_wrong_registry_entry_is_caught():
    for name, wrong in [
        ("ViT-B-32", {"mean": IMAGENET_MEAN}),
        ("EVA02-L-14-336", {"size": 224, "resize_size": 224}),
        ("DINOv2-L", {"interpolation": "bilinear"}),
        ("NV-DINOv2", {"resize_size": 592}),
        ("ViT-B-32", {"rgb": "on_decode"}),
    ]:
        entry = get_backbone(name)
        bad = dataclasses.replace(entry, preprocess=dataclasses.replace(entry.preprocess, **wrong))
        assert _mismatches(bad), (name, wrong)


def test_library_preprocess_follows_the_tag():
    vitl = get_backbone("ViT-L-14")
    assert library_preprocess(vitl, "laion2b_s32b_b82k").mean == (0.5, 0.5, 0.5)
    assert library_preprocess(vitl, "openai").mean == vitl.preprocess.mean
    assert library_preprocess(get_backbone("ViT-H-14"), "dfn5b").resize_mode == "squash"


def test_library_transforms_are_the_libraries_own():
    """open_clip converts to RGB after the crop; timm's transform has no conversion (its loader does it
    first, which the reference adds in front)."""
    clip = repr(library_transform(get_backbone("EVA02-L-14-336")))
    assert clip.index("CenterCrop(size=(336, 336))") < clip.index("MaybeConvertMode")
    dino = repr(library_transform(get_backbone("NV-DINOv2")))
    assert dino.index("ConvertRGB") < dino.index("Resize(size=518")


def test_encoded_modes_decode_as_claimed():
    from vitserve.exporter.samples import eval_photos

    modes = decoded_modes(encode_modes(eval_photos()[1][1]))
    assert modes == {
        "rgb": "RGB",
        "palette": "P",
        "palette_transparent": "P",
        "rgba": "RGBA",
        "la": "LA",
        "cmyk": "CMYK",
        "16bit": "I;16",
        "exif_rotated": "RGB",
        "animated": "P",
    }


@pytest.fixture(scope="module")
def two_photos():
    """Two real photographs, landscape and portrait (crop offsets on both axes)."""
    from vitserve.exporter.samples import eval_photos

    photos = dict(eval_photos())
    return [("chelsea", photos["chelsea"]), ("grace_hopper", photos["grace_hopper"])]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("setting", ["exact", "default"])
def test_served_preprocessing_matches_the_library_for_every_mode(family, setting, two_photos):
    """`preprocess_bytes` (what Triton runs) vs the library transform: palette (resized NEAREST by
    Pillow), RGBA/LA (premultiplied resize), CMYK, 16-bit, EXIF-rotated and animated inputs included.
    (perf/results/parity.md runs all 8 held-out photos.)"""
    photo = two_photos[0] if setting == "exact" else two_photos[1]
    rows = compare(FAMILIES[family], [photo], setting)
    assert {r["mode"] for r in rows} == set(MODES)
    bad = [r for r in rows if r["cosine"] < MIN_COSINE]
    assert not bad, bad


def test_converting_to_rgb_first_would_differ_from_open_clip(two_photos):
    """The old order (RGB before resize) is measurably wrong for RGBA/LA/palette: the check can fail."""
    rows = compare("ViT-B-32", two_photos[:1], "exact")
    worst = {r["mode"]: r["rgb_first"] for r in rows}
    assert worst["rgba"] < 0.99 and worst["la"] < 0.99 and worst["palette"] < 0.9999
    assert worst["rgb"] == pytest.approx(1.0)


def test_deliberate_differences_are_switchable(two_photos):
    """EXIF orientation and 16-bit scaling: on by default (upright, full 16-bit range), off gives the
    library's own result on the raw image."""
    from vitserve.exporter.triton_models.preprocess import preprocess_bytes

    entry = get_backbone("ViT-B-32")
    data = encode_modes(two_photos[0][1])
    tf = library_transform(entry)
    cfg = entry.preprocess.as_dict()
    for mode in ("exif_rotated", "16bit"):
        raw = Image.open(io.BytesIO(data[mode]))
        default = preprocess_bytes(data[mode], cfg)
        exact = preprocess_bytes(data[mode], cfg | {"exif_transpose": False, "scale_16bit": False})
        np.testing.assert_allclose(default, tf(prepare_image(raw, entry.preprocess)).numpy(), atol=1e-5)
        np.testing.assert_allclose(exact, tf(raw).numpy(), atol=1e-5)
        assert np.abs(default - exact).max() > 0.5, mode  # the switch changes something


@pytest.mark.triton
def test_served_preprocess_model_matches_the_library(vitb32_build, vitb32_server, two_photos):
    """The real tritonserver's preprocess model (default settings) vs open_clip's transform, every mode."""
    import tritonclient.grpc as grpcclient

    from vitserve.perf.bench_parity import cosine

    entry = get_backbone("ViT-B-32")
    tf = library_transform(entry)
    client = grpcclient.InferenceServerClient(vitb32_server.grpc_url)
    worst = {}
    for _, photo in two_photos:
        for mode, data in encode_modes(photo).items():
            inp = grpcclient.InferInput("image", [1, 1], "BYTES")
            inp.set_data_from_numpy(np.array([data], dtype=object).reshape(1, 1))
            served = client.infer("vitb32_preprocess", [inp]).as_numpy("pixel_values")[0]
            ref = tf(prepare_image(Image.open(io.BytesIO(data)), entry.preprocess)).numpy()
            worst[mode] = min(worst.get(mode, 1.0), cosine(served, ref))
    assert set(worst) == set(MODES)
    assert min(worst.values()) >= MIN_COSINE, worst


def test_recipe_transform_is_the_library_default_for_every_entry(two_photos):
    """The transform built from a recipe (`library_transform_for`, what every build-time pixel goes
    through) is, for each registry entry's default recipe, the library's own default-tag transform: the
    same tensor on real photographs (landscape and portrait)."""
    from vitserve.exporter.backbones import library_transform_for

    for entry in REGISTRY.values():
        ours, theirs = library_transform_for(entry, library_preprocess(entry)), library_transform(entry)
        for name, photo in two_photos:
            a, b = ours(photo).numpy(), theirs(photo).numpy()
            assert a.shape == b.shape and np.array_equal(a, b), (entry.name, name, np.abs(a - b).max())


def test_recipe_transform_follows_a_tag_that_normalizes_otherwise(two_photos):
    """ViT-L-14 `pretrained:laion2b_s32b_b82k` normalizes with 0.5/0.5 (open_clip's pretrained cfg): its
    recipe's transform is open_clip's own for that tag, and not CLIP's 0.481/0.269 default."""
    import open_clip

    from vitserve.exporter.backbones import library_transform_for

    vitl, tag = get_backbone("ViT-L-14"), "laion2b_s32b_b82k"
    assert open_clip.get_pretrained_cfg("ViT-L-14", tag)["mean"] == (0.5, 0.5, 0.5)
    recipe = library_preprocess(vitl, tag)
    photo = two_photos[1][1]
    got = library_transform_for(vitl, recipe)(photo).numpy()
    np.testing.assert_array_equal(got, library_transform(vitl, tag)(photo).numpy())
    assert np.abs(got - library_transform(vitl)(photo).numpy()).max() > 0.5
