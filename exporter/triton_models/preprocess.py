"""Triton python-backend model: encoded image bytes -> normalized pixel_values, batched.

Self-contained (numpy + Pillow only) so the repository runs in any Triton container. It makes the same
Pillow calls, in the same order, as the backbone's own eval transform: resize of the shortest edge with the
same interpolation, center crop, RGB, /255, normalize. A bad image fails only its own request with
TritonError(INVALID_ARG); `execute()` never raises, since that would fail the whole batch.

Where RGB conversion happens matters for palette ("P" is resized NEAREST by Pillow), RGBA/LA (resized
with premultiplied alpha) and CMYK images, so it follows the library (`rgb`):
- "after_crop": open_clip's eval transform (Resize, CenterCrop, then `convert("RGB")`);
- "on_decode": timm, whose loader (`ImageDataset`) converts to RGB before its transform.
Two deliberate differences from the libraries, on by default, each switchable off for exact parity:
- `exif_transpose`: turn the image upright from its EXIF orientation (the libraries use stored pixels);
- `scale_16bit`: scale 16/32-bit greyscale to 8 bits (Pillow's `convert("RGB")` clips it at 255).

Parameters: `PreprocessParams` of contract.py (JSON in config.pbtxt `preprocess`), validated when the model
loads: the recipe (size, resize_size, interpolation, mean, std, resize_mode, rgb, exif_transpose,
scale_16bit), max_image_pixels, preprocess (`pillow`: Pillow's numerics; `fast`: large JPEGs decoded at a
reduced DCT scale, see `decode`), preprocess_threads (images of one request preprocessed at once, default 1:
Pillow's decode and resize release the GIL, so a request of several images is done sooner while the
backbone waits for it; every image's result is the same as on one thread).
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:  # in the package (the exporter, perf, tests)
    from .contract import PreprocessParams
except ImportError:  # served by Triton: contract.py is copied next to this model.py
    from contract import PreprocessParams

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (tests, calibration): only the pure functions are used
    pb_utils = None

_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}

# Modes resized as decoded when RGB conversion comes after the crop; any other mode (rare TIFF/PSD ones)
# is converted on decode.
_RESIZABLE_MODES = frozenset(
    ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I", "I;16", "I;16B", "I;16L", "F")
)


class ImageError(ValueError):
    """The bytes are not an image this service accepts; the message says why."""


def decode(
    data: bytes, max_pixels: int, exif_transpose: bool = True, draft: int | None = None
) -> Image.Image:
    """Bytes -> PIL image in its decoded mode (upright with `exif_transpose`), refusing non-images and
    images above `max_pixels` (checked from the header, before any pixel is decoded). `draft` (the
    `preprocess: fast` mode only) lets a JPEG decode at 1/2, 1/4 or 1/8 scale in the DCT while both sides
    stay >= `draft` pixels: faster, and no longer Pillow's exact full-size result."""
    if not data:
        raise ImageError("empty input: 0 bytes received, expected an encoded JPEG/PNG/WebP image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(
                    f"image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels} "
                    "(decompression bomb guard; resize it before sending)"
                )
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)  # animated GIF/WebP/APNG: the first frame
            if draft and im.format == "JPEG":
                im.draft(None, (draft, draft))
            im.load()
            if exif_transpose:
                ImageOps.exif_transpose(im, in_place=True)  # no copy of an image that is already upright
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"not a decodable image ({type(e).__name__}: {e})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"corrupt or truncated image ({type(e).__name__}: {e})") from e
    return im


def scale_to_8bit(im: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8-bit "L" by its range (Pillow's own conversion to RGB
    clips at 255, which turns most 16-bit photos white); other modes unchanged."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        return Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """`.convert("RGB")`, after scaling 16/32-bit greyscale to 8 bits."""
    im = scale_to_8bit(im)
    return im if im.mode == "RGB" else im.convert("RGB")


def transform(im: Image.Image, cfg: dict) -> np.ndarray:
    """Decoded PIL image -> float32 (3, size, size), as torchvision's Resize/CenterCrop/ToTensor/Normalize,
    converting to RGB where the library does (`rgb`: after_crop | on_decode)."""
    if cfg.get("scale_16bit", True):
        im = scale_to_8bit(im)
    on_decode = cfg.get("rgb", "on_decode") == "on_decode" or im.mode not in _RESIZABLE_MODES
    if on_decode and im.mode != "RGB":
        im = im.convert("RGB")
    size, resize_size = int(cfg["size"]), int(cfg["resize_size"])
    interp = _INTERPOLATION[cfg.get("interpolation", "bicubic")]
    w, h = im.size
    if cfg.get("resize_mode", "shortest") == "squash":
        im = im.resize((size, size), interp)
    else:
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = resize_size, int(resize_size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            im = im.resize((new_w, new_h), interp)
        w, h = im.size
        top, left = round((h - size) / 2.0), round((w - size) / 2.0)
        im = im.crop((left, top, left + size, top + size))
    if im.mode != "RGB":
        im = im.convert("RGB")
    return normalize(np.asarray(im), cfg)


@functools.lru_cache(maxsize=16)
def _lut(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    # (3, 256): every value ((v / 255) - mean) / std can take, computed with the same float32 operations
    # as the elementwise form, so a lookup gives bit-identical results.
    v = np.arange(256, dtype=np.float32)[:, None] / np.float32(255.0)
    lut = (v - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(lut.T)


def normalize(rgb: np.ndarray, cfg: dict, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, H, W): ((x / 255) - mean) / std by table lookup, bit-identical to
    that arithmetic in float32 (ToTensor + Normalize) and about 3x faster at 224 px (perf/results).
    Writes into `out` when given (a slice of a batch buffer)."""
    lut = _lut(tuple(cfg["mean"]), tuple(cfg["std"]))
    h, w, _ = rgb.shape
    if out is None:
        out = np.empty((3, h, w), dtype=np.float32)
    for c in range(3):
        np.take(lut[c], rgb[:, :, c], out=out[c])
    return out


def checked_params(cfg: dict | PreprocessParams) -> dict:
    """`cfg` as PreprocessParams' dict, validated (an unknown or malformed key raises ContractError)."""
    if not isinstance(cfg, PreprocessParams):
        cfg = PreprocessParams.from_dict(cfg)
    return cfg.as_dict()


def preprocess_bytes(data: bytes, cfg: dict | PreprocessParams) -> np.ndarray:
    """One encoded image -> float32 (3, size, size) with the parameters `cfg` (PreprocessParams or its dict)."""
    return _preprocess_one(data, checked_params(cfg))


def _preprocess_one(data: bytes, cfg: dict) -> np.ndarray:
    draft = None
    if cfg["preprocess"] == "fast":
        # DCT downscale only while the decoded image keeps twice the pixels the resize needs
        draft = 2 * int(cfg["resize_size"] if cfg["resize_mode"] == "shortest" else cfg["size"])
    im = decode(data, cfg["max_image_pixels"], cfg["exif_transpose"], draft)
    return transform(im, cfg)


def preprocess_items(
    items, cfg: dict, input_name: str, pool: ThreadPoolExecutor | None = None, threads: int = 1
) -> np.ndarray:
    """A request's encoded images -> float32 (N, 3, size, size). With `pool` (`threads` - 1 workers), the
    images are cut into `threads` contiguous runs done at once (this thread does the first). A bad image
    raises ImageError naming its index (the first bad one when several are)."""
    cfg = checked_params(cfg)
    n = len(items)
    out = np.empty((n, 3, int(cfg["size"]), int(cfg["size"])), dtype=np.float32)

    def run(start: int, stop: int) -> tuple[int, ImageError] | None:
        for i in range(start, stop):
            try:
                out[i] = _preprocess_one(bytes(items[i]), cfg)
            except ImageError as e:
                return i, e
        return None

    workers = 1 if pool is None else max(1, min(n, threads))
    runs = list(itertools.pairwise(n * k // workers for k in range(workers + 1)))
    rest = [pool.submit(run, a, b) for a, b in runs[1:]]
    failures = [run(*runs[0])] + [f.result() for f in rest]
    failed = next((f for f in failures if f is not None), None)
    if failed is not None:
        i, e = failed
        raise ImageError(f"{input_name}[{i}]: {e}" if n > 1 else f"{input_name}: {e}") from None
    return out


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = PreprocessParams.from_model_config(config)  # a malformed parameter fails the load, by name
        self.cfg = params.as_dict()
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.logger = pb_utils.Logger
        self.threads = params.preprocess_threads
        self.pool = None
        if self.threads > 1:
            self.pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="preprocess")

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                items = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy().reshape(-1)
                pixels = preprocess_items(items, self.cfg, self.input_name, self.pool, self.threads)
                out = pb_utils.Tensor(self.output_name, pixels)
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            except ImageError as e:
                responses.append(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)
                    )
                )
            except Exception as e:  # a bug here must still fail only this request
                self.logger.log_error(f"preprocess: unexpected {type(e).__name__}: {e}")
                responses.append(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"preprocess failed: {type(e).__name__}: {e}")
                    )
                )
        return responses

    def finalize(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True)
