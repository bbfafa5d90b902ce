"""The python preprocess model's modes (exact = Pillow's numerics, fast = JPEG DCT draft), the settings of
models.yaml that choose them (`preprocess`, `preprocess_instances`) and the configs written for them.

Hostile inputs (bombs, truncated files, EXIF, animated images) must behave the same in both modes; served
behaviour is tested against the real tritonserver in tests/test_reliability.py.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vitserve.errors import ConfigError
from vitserve.exporter.backbones import REGISTRY, get_backbone
from vitserve.exporter.config import Kind, ModelSpec
from vitserve.exporter.triton_models import preprocess as P


def _encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}) | kw)
    return b.getvalue()


def _photo(i: int = 0, size: tuple[int, int] | None = None) -> Image.Image:
    from vitserve.exporter.samples import eval_photos

    im = eval_photos()[i][1]
    return im.resize(size, Image.Resampling.BICUBIC) if size else im


def _cfg(backbone: str = "ViT-B-32", **kw) -> dict:
    return get_backbone(backbone).preprocess.as_dict() | {"max_image_pixels": 40_000_000} | kw


def test_lookup_normalize_is_bit_identical_to_the_float_arithmetic():
    """The table lookup gives exactly ((x / 255) - mean) / std in float32 for every backbone's mean/std."""
    x = np.random.default_rng(0).integers(0, 256, (61, 47, 3), dtype=np.uint8)
    for entry in REGISTRY.values():
        cfg = entry.preprocess.as_dict()
        mean, std = np.asarray(cfg["mean"], np.float32), np.asarray(cfg["std"], np.float32)
        expected = ((x.astype(np.float32) / np.float32(255.0) - mean) / std).transpose(2, 0, 1)
        got = P.normalize(x, cfg)
        assert got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, expected, err_msg=entry.name)


def test_exact_mode_is_the_reference_transform():
    """Exact mode against open_clip's transform object on a photo: max abs error of float rounding only."""
    import torch  # noqa: F401  (the reference transform returns tensors)

    from vitserve.exporter.backbones import torch_transform

    data = _encode(_photo(0), "PNG")
    ours = P.preprocess_bytes(data, _cfg())
    ref = torch_transform(get_backbone("ViT-B-32"))(Image.open(io.BytesIO(data)).convert("RGB")).numpy()
    assert np.abs(ours - ref).max() < 1e-5


@pytest.mark.parametrize("backbone, big_size", [("ViT-B-32", (2400, 1800)), ("DINOv2-L", (4200, 3150))])
def test_fast_mode_is_exact_below_twice_the_resize_and_close_above(backbone, big_size):
    """`fast` decodes a JPEG at a reduced DCT scale only while both sides keep >= 2x the resize size: a
    640x480 photo is untouched (224 and 518 px), a 2400x1800 one decodes at 1/2 or 1/4 and stays close.
    PNGs are never drafted."""
    exact, fast = _cfg(backbone), _cfg(backbone, preprocess="fast")
    small = _encode(_photo(0, (640, 480)))
    np.testing.assert_array_equal(P.preprocess_bytes(small, fast), P.preprocess_bytes(small, exact))
    big_im = _photo(0, big_size)
    big = _encode(big_im)
    draft = 2 * exact["resize_size"]
    assert P.decode(big, 40_000_000, draft=draft).size[1] <= big_size[1] // 2  # drafted
    a, b = P.preprocess_bytes(big, fast), P.preprocess_bytes(big, exact)
    cos = float(a.ravel() @ b.ravel() / np.linalg.norm(a) / np.linalg.norm(b))
    assert 0.999 < cos < 1.0, cos
    png = _encode(big_im, "PNG")
    np.testing.assert_array_equal(P.preprocess_bytes(png, fast), P.preprocess_bytes(png, exact))


@pytest.mark.parametrize("mode", ["pillow", "fast"])
def test_hostile_inputs_behave_the_same_in_every_mode(mode):
    """Empty, non-image, truncated and bomb inputs are refused with the same messages; EXIF orientation
    and animated first frames are handled (a large image, so that `fast` drafts it)."""
    cfg = _cfg(preprocess=mode, max_image_pixels=3_000_000)
    big = _photo(1, (1600, 1200))
    jpeg = _encode(big)
    cases = {
        b"": "empty input",
        b"definitely not an image": "not a decodable image",
        jpeg[: len(jpeg) // 2]: "corrupt or truncated image",
        _encode(Image.new("RGB", (2000, 2000))): "above the limit of 3000000",
    }
    for data, needle in cases.items():
        with pytest.raises(P.ImageError, match=needle):
            P.preprocess_bytes(data, cfg)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = _encode(big.transpose(Image.Transpose.ROTATE_90), exif=exif)
    upright = P.preprocess_bytes(jpeg, cfg)
    turned = P.preprocess_bytes(rotated, cfg)
    a, b = upright.ravel(), turned.ravel()  # JPEG re-encoding of rotated pixels: close, not equal
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.99
    frames = [_photo(i, (160, 120)) for i in range(3)]
    gif = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80)
    shown = Image.open(io.BytesIO(gif))
    out = P.preprocess_bytes(gif, cfg)
    np.testing.assert_array_equal(out, P.preprocess_bytes(gif, _cfg(preprocess="pillow")))
    np.testing.assert_array_equal(out, P.transform(shown, cfg))  # frame 0
    shown.seek(1)
    assert np.abs(out - P.transform(shown.convert("RGB"), cfg)).max() > 0.1


@pytest.mark.parametrize("threads", [2, 3])
def test_threads_give_each_image_its_one_thread_result_and_name_the_first_bad_one(threads):
    """`threads`: a request's images are cut into runs preprocessed at once; every row equals that image
    alone on one thread, bit for bit, in request order; a bad image fails the request naming its index, the
    lowest one where several runs hold a bad image."""
    from concurrent.futures import ThreadPoolExecutor

    cfg = _cfg()
    sizes = [None, (640, 427), (300, 451), (512, 512), (97, 61), (1200, 800), (224, 224)]
    items = [_encode(_photo(i % 4, size)) for i, size in enumerate(sizes)]
    items.append(_encode(_photo(2).convert("L"), "PNG"))
    alone = np.stack([P.preprocess_bytes(b, cfg) for b in items])
    with ThreadPoolExecutor(threads - 1) as pool:
        got = P.preprocess_items(np.array(items, dtype=object), cfg, "image", pool, threads)
        np.testing.assert_array_equal(got, alone)
        assert got.dtype == np.float32 and got.shape == (len(items), 3, 224, 224)
        one = P.preprocess_items(np.array(items[:1], dtype=object), cfg, "image", pool, threads)
        np.testing.assert_array_equal(one, alone[:1])
        bad = list(items)
        bad[len(bad) - 2] = b"not an image"  # in the last run
        with pytest.raises(P.ImageError, match=rf"^image\[{len(bad) - 2}\]: not a decodable image"):
            P.preprocess_items(np.array(bad, dtype=object), cfg, "image", pool, threads)
        bad[1] = bad[1][: len(bad[1]) // 3]  # and one in the first run: the lower index is reported
        with pytest.raises(P.ImageError, match=r"^image\[1\]: corrupt or truncated image"):
            P.preprocess_items(np.array(bad, dtype=object), cfg, "image", pool, threads)
        with pytest.raises(P.ImageError, match=r"^image: empty input"):
            P.preprocess_items(np.array([b""], dtype=object), cfg, "image", pool, threads)


# -- models.yaml settings and the configs written ----------------------------------------------------------


def test_preprocess_defaults_follow_the_first_kind():
    assert ModelSpec(name="m", backbone="ViT-B-32").preprocess == "pillow"
    assert ModelSpec(name="m", backbone="ViT-B-32", kinds=(Kind.TENSORRT, Kind.CPU)).preprocess == "dali"
    assert ModelSpec(name="m", backbone="ViT-B-32", kinds=(Kind.CPU, Kind.TENSORRT)).preprocess == "pillow"
    assert (
        ModelSpec.from_dict({"name": "m", "backbone": "ViT-B-32", "preprocess": "fast"}).preprocess == "fast"
    )


@pytest.mark.parametrize(
    "entry, needle",
    [
        ({"preprocess": "opencv"}, "preprocess 'opencv': expected one of dali, pillow, fast"),
        ({"preprocess": "dali"}, "preprocess 'dali' needs Triton's DALI backend and a GPU"),
        ({"preprocess_instances": 0}, "preprocess_instances=0 must be an integer >= 1"),
        ({"preprocess_instances": "2"}, "preprocess_instances='2' must be an integer >= 1"),
        ({"preprocess_threads": 0}, "preprocess_threads=0 must be an integer >= 1"),
        (
            {"preprocess": "dali", "kinds": ["tensorrt"], "preprocess_threads": 2},
            "preprocess_threads=2 is for the python preprocess model",
        ),
    ],
)
def test_bad_preprocess_settings_are_refused_naming_the_model(entry, needle):
    with pytest.raises(ConfigError, match=f"model m: {needle}"):
        ModelSpec.from_dict({"name": "m", "backbone": "ViT-B-32"} | entry)


def _manifest() -> dict:
    return {
        "input": {"shape": [-1, 3, 224, 224]},
        "preprocess": get_backbone("ViT-B-32").preprocess.as_dict(),
        "feature_dim": 512,
        "head": {"num_classes": 0},
        "outputs": ["embeddings"],
    }


@pytest.mark.parametrize("mode", ["pillow", "fast"])
def test_python_preprocess_config_has_its_own_instances_and_mode(tmp_path, mode):
    """The python model: its own instance count, the mode in its parameters, no dynamic batching (see
    repository.preprocess_config), BYTES input as the ensemble's."""
    import json

    from vitserve.exporter.repository import (
        ensemble_config,
        preprocess_config,
        preprocess_instances,
        read_config,
        write_config,
    )

    spec = ModelSpec(
        name="m",
        backbone="ViT-B-32",
        preprocess=mode,
        preprocess_instances=3,
        preprocess_threads=2,
        instances=1,
    )
    write_config(tmp_path / "m_preprocess", preprocess_config("m_preprocess", spec, _manifest()))
    cfg = read_config(tmp_path / "m_preprocess" / "config.pbtxt")
    assert cfg.backend == "python" and cfg.instance_group[0].count == 3
    assert not cfg.HasField("dynamic_batching")
    params = json.loads(cfg.parameters["preprocess"].string_value)
    assert params["preprocess"] == mode and params["size"] == 224
    assert params["preprocess_threads"] == 2
    default = preprocess_config("m_preprocess", ModelSpec(name="m", backbone="ViT-B-32"), _manifest())
    assert json.loads(default.parameters["preprocess"].string_value)["preprocess_threads"] == 1
    ens = ensemble_config("m", spec, _manifest(), "m_fp32_cpu")
    assert ens.input[0].data_type == cfg.input[0].data_type and list(ens.input[0].dims) == [1]
    # defaults: the CPU backbone's threads take every core (1 left at least); pinned threads leave the rest
    assert preprocess_instances(ModelSpec(name="m", backbone="ViT-B-32")) == 1
    import os

    pinned = ModelSpec(name="m", backbone="ViT-B-32", cpu_threads=1)
    assert preprocess_instances(pinned) == max(1, (os.cpu_count() or 1) - 1)
    gpu = ModelSpec(name="m", backbone="ViT-B-32", kinds=(Kind.TENSORRT,), preprocess="pillow")
    assert preprocess_instances(gpu) == (os.cpu_count() or 1)


def test_deliberate_differences_are_models_yaml_switches(tmp_path):
    """exif_transpose / scale_16bit (vitserve's two departures from the library transforms) are set per model
    and reach the served preprocess parameters; a non-boolean is refused naming the field."""
    import json

    from vitserve.errors import ConfigError
    from vitserve.exporter.repository import preprocess_config

    on = json.loads(
        preprocess_config("m_preprocess", ModelSpec(name="m", backbone="ViT-B-32"), _manifest())
        .parameters["preprocess"]
        .string_value
    )
    assert on["exif_transpose"] is True and on["scale_16bit"] is True
    spec = ModelSpec.from_dict(
        {"name": "m", "backbone": "ViT-B-32", "exif_transpose": False, "scale_16bit": False}
    )
    off = json.loads(
        preprocess_config("m_preprocess", spec, _manifest()).parameters["preprocess"].string_value
    )
    assert off["exif_transpose"] is False and off["scale_16bit"] is False
    with pytest.raises(ConfigError, match="exif_transpose='no'"):
        ModelSpec.from_dict({"name": "m", "backbone": "ViT-B-32", "exif_transpose": "no"})


# -- extreme aspect ratios: bounded memory (issue 25 finding 10) ---------------------------------------------

_RSS_SCRIPT = r"""
import io, json, resource, sys
import numpy as np
from PIL import Image
from vitserve.exporter.triton_models import preprocess as P

cfg, w, h = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def png(w, h):
    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(b, "PNG")
    return b.getvalue()
data = png(w, h)
P.preprocess_bytes(png(300, 200), cfg)  # everything the path uses is loaded before the baseline
def status_kb(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))
# the old full resize asks for gigabytes: fail fast (MemoryError) instead of taking the machine
resource.setrlimit(resource.RLIMIT_AS, ((status_kb("VmSize") + 1_500_000) * 1024, resource.RLIM_INFINITY))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak RSS (VmHWM) to the RSS now
base = status_kb("VmRSS")
try:
    out = P.preprocess_bytes(data, cfg)
    result = {"shape": list(out.shape), "finite": bool(np.isfinite(out).all())}
except P.ImageError as e:
    result = {"refused": str(e)}
except MemoryError:
    result = {"memory_error": True}
result["growth_mb"] = (status_kb("VmHWM") - base) / 1024
print(json.dumps(result))
"""


def _peak_rss_growth(cfg: dict, w: int, h: int) -> dict:
    import json
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, json.dumps(cfg), str(w), str(h)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("size", [(1, 100_000), (100_000, 1)])
@pytest.mark.parametrize("backbone", ["ViT-B-32", "DINOv2-L"])
def test_an_extreme_aspect_ratio_is_answered_with_bounded_memory(backbone, size):
    """A 1 x 100000 image (and 100000 x 1) passes the pixel-count check; the shortest-edge resize of the
    whole image would be 224 x 22,400,000 pixels (20 GB). Served within 100 MB of peak RSS growth."""
    got = _peak_rss_growth(_cfg(backbone), *size)
    assert got.get("shape") == [3, _cfg(backbone)["size"], _cfg(backbone)["size"]] and got["finite"], got
    assert got["growth_mb"] < 100, got


def test_an_extreme_aspect_ratio_is_refused_by_a_clear_rule_when_squashed():
    """The squash resize needs the whole image (no crop to keep): past MAX_RESIZE_PIXELS it is refused,
    naming the size and what to do, within the same memory bound."""
    got = _peak_rss_growth(_cfg(resize_mode="squash"), 1, 100_000)
    assert "1x100000" in got.get("refused", "") and "crop it before sending" in got["refused"], got
    assert got["growth_mb"] < 100, got


def _pillow_resize_crop(im: Image.Image, cfg: dict) -> Image.Image:
    """What torchvision's Resize + CenterCrop do to a PIL image: Pillow's full resize, then the crop."""
    size, rs = cfg["size"], cfg["resize_size"]
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_w, new_h = (rs, int(rs * long / short)) if w <= h else (int(rs * long / short), rs)
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)
    full = im.resize((new_w, new_h), P._INTERPOLATION[cfg["interpolation"]])
    return full.crop((left, top, left + size, top + size))


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "CMYK", "P", "1", "I", "F"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "lanczos", "nearest"])
def test_the_resize_window_gives_pillows_pixels(mode, interpolation):
    """Past WINDOW_ASPECT only the crop's part of the resize is computed, bit for bit what Pillow's full
    resize and crop give (as torchvision's Resize + CenterCrop do), for every filter and mode (RGBA and LA
    premultiplied as Pillow does; "P" and "1" always NEAREST), upscaled and downscaled, with the crop
    reaching past the resized image when resize_size < size."""
    rng = np.random.default_rng(7)
    for w, h, resize_size in [(12, 500, 224), (500, 12, 224), (40, 401, 200), (1333, 61, 224), (3, 300, 224)]:
        a = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        im = Image.fromarray(a, "RGBA").convert(mode) if mode != "RGBA" else Image.fromarray(a, "RGBA")
        cfg = _cfg() | {"interpolation": interpolation, "resize_size": resize_size, "rgb": "after_crop"}
        cfg["scale_16bit"] = False  # "I" and "F" resized as they are
        ref = _pillow_resize_crop(im, cfg)
        ref = ref.convert("RGB") if ref.mode not in ("I", "F") else ref.convert("L").convert("RGB")
        ours = P.transform(im, cfg)
        np.testing.assert_array_equal(ours, P.normalize(np.asarray(ref), cfg), err_msg=f"{w}x{h}")


def test_extreme_aspect_ratios_against_the_library_transform():
    """The served transform of a 16 x 1920 and a 1920 x 12 strip of a photo (resized in a window) and of a
    1200 x 100 one against open_clip's own transform object: float rounding only, as for any photo."""
    import torch  # noqa: F401  (the reference transform returns tensors)

    from vitserve.exporter.backbones import torch_transform

    photo = _photo(0).convert("RGB")
    ref_tf = torch_transform(get_backbone("ViT-B-32"))
    for box in [(0, 0, 16, 480), (0, 0, 640, 12), (0, 0, 400, 100)]:
        im = photo.crop(box)
        im = im.resize((im.width, im.height * 4) if im.width < im.height else (im.width * 3, im.height))
        data = _encode(im, "PNG")
        ours = P.preprocess_bytes(data, _cfg())
        ref = ref_tf(Image.open(io.BytesIO(data)).convert("RGB")).numpy()
        assert np.abs(ours - ref).max() < 1e-5, (im.size, np.abs(ours - ref).max())
