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

if __package__:  # part of the vitserve package (the exporter, perf, tests)
    from vitserve.contract import PreprocessParams
else:  # served by Triton: the repository copies vitserve/contract.py next to this model.py
    from vitserve_contract import PreprocessParams

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


# Past this aspect ratio the shortest-edge resize is computed only under the center crop (`_resize_window`):
# in full, a 1 x 100000 image would become 224 x 22,400,000 pixels (20 GB) to keep 224 x 224 of them.
WINDOW_ASPECT = 4
# The most pixels a resize may pass through otherwise (squash: Pillow's horizontal pass makes size x height).
MAX_RESIZE_PIXELS = 8_000_000
# Modes whose windowed resize is Pillow's to the bit (tested); others (16-bit) are resized in full.
_WINDOW_MODES = frozenset(("1", "P", "L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I", "F"))


def _nearest_index(n_in: int, n_out: int, start: int, stop: int) -> np.ndarray:
    """Source index of output pixels start..stop-1 of Pillow's NEAREST resize of n_in -> n_out pixels.

    Pillow walks the output adding the scale to a float64 coordinate pixel by pixel (an affine transform),
    and the sum's rounding decides ties: the same running sum, in chunks, gives the same indices."""
    step = n_in / n_out
    out = np.empty(stop - start, dtype=np.int64)
    x, i, chunk = step * 0.5, 0, 1 << 20
    while i < stop:
        n = min(chunk, stop - i)
        run = np.add.accumulate(np.concatenate(([x], np.full(n - 1, step))))
        lo, hi = max(start, i), min(stop, i + n)
        if lo < hi:
            out[lo - start : hi - start] = np.minimum(run[lo - i : hi - i].astype(np.int64), n_in - 1)
        x, i = run[-1] + step, i + n
    return out


# Pillow's resampling filters (libImaging/Resample.c): support in source pixels at scale 1, and the function.
def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _sinc(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(x == 0.0, 1.0, np.sin(x * np.pi) / (x * np.pi))


def _lanczos(x: np.ndarray) -> np.ndarray:
    return np.where((x >= -3.0) & (x < 3.0), _sinc(x) * _sinc(x / 3), 0.0)


_FILTERS = {
    Image.Resampling.BICUBIC: (2.0, _bicubic),
    Image.Resampling.BILINEAR: (1.0, _bilinear),
    Image.Resampling.LANCZOS: (3.0, _lanczos),
}
_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images


def _coefficients(n_in: int, n_out: int, start: int, stop: int, interp) -> tuple[np.ndarray, np.ndarray]:
    """(first source pixel, normalized weights) of output pixels start..stop-1 of Pillow's resize of n_in
    -> n_out pixels: `precompute_coeffs` of libImaging/Resample.c, operation for operation in float64."""
    support, kernel = _FILTERS[interp]
    scale = (n_in - 0.0) / n_out
    filterscale = max(scale, 1.0)
    support = support * filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    center = 0.0 + (np.arange(start, stop, dtype=np.float64) + 0.5) * scale
    ss = 1.0 / filterscale
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), n_in) - xmin
    x = np.arange(ksize)
    k = kernel(((x[None, :] + xmin[:, None]) - center[:, None] + 0.5) * ss)
    k = np.where(x[None, :] < xmax[:, None], k, 0.0)
    ww = np.add.accumulate(k, axis=1)[:, -1]  # summed in order, as the C loop does
    k = np.where(ww[:, None] != 0.0, k / np.where(ww == 0.0, 1.0, ww)[:, None], k)
    return xmin, k


def _resample_axis0(a: np.ndarray, offset: int, xmin: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Pillow's one-axis resample of `a` (rows = the resized axis; its row 0 is source pixel `offset`) with
    the coefficients of `_coefficients`: uint8 in Pillow's 22-bit fixed point (ImagingResample*_8bpc),
    int32/float32 ("I"/"F") in float64 (ImagingResample*_32bpc), so every value is the one Pillow computes."""
    xmin = xmin - offset
    last = a.shape[0] - 1
    shape = (len(xmin),) + (1,) * (a.ndim - 1)
    if a.dtype == np.uint8:
        kint = np.where(
            k < 0, np.trunc(-0.5 + k * (1 << _PRECISION_BITS)), np.trunc(0.5 + k * (1 << _PRECISION_BITS))
        )
        acc = np.full((len(xmin), *a.shape[1:]), 1 << (_PRECISION_BITS - 1), dtype=np.int64)
        for i in range(k.shape[1]):
            acc += a[np.clip(xmin + i, 0, last)].astype(np.int64) * kint[:, i].astype(np.int64).reshape(shape)
        return np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)
    acc = np.zeros((len(xmin), *a.shape[1:]), dtype=np.float64)
    for i in range(k.shape[1]):
        acc = acc + a[np.clip(xmin + i, 0, last)].astype(np.float64) * k[:, i].reshape(shape)
    if a.dtype == np.int32:
        return np.where(acc >= 0.0, np.floor(acc + 0.5), -np.floor(np.abs(acc) + 0.5)).astype(np.int32)
    return acc.astype(a.dtype)


def _from_array(a: np.ndarray, mode: str) -> Image.Image:
    a = np.ascontiguousarray(a)
    return Image.frombytes(mode, (a.shape[1], a.shape[0]), a.tobytes())


def _resize_window(
    im: Image.Image, new_size: tuple[int, int], crop: tuple[int, int, int, int], interp
) -> Image.Image:
    """`im.resize(new_size, interp).crop(crop)` with the memory of the crop, not of the resize, and the same
    pixels. Pillow resizes in two separable passes, horizontal then vertical; the short side's pass is
    Pillow's own (on the rows or columns the crop needs), the long side's is computed only for the pixels
    the crop keeps, with Pillow's coefficients and arithmetic (`_resample_axis0`). NEAREST (forced for "1"
    and "P") picks source pixels by Pillow's own running coordinate (`_nearest_index`)."""
    (w, h), (new_w, new_h) = im.size, new_size
    left, top, right, bottom = crop
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(right, new_w), min(bottom, new_h)
    if im.mode in ("1", "P") or interp == Image.Resampling.NEAREST:
        cols = _nearest_index(w, new_w, x0, x1)
        rows = _nearest_index(h, new_h, y0, y1)
        band = im.crop((int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1))
        if band.mode == "1":  # as 0/255 "L", which becomes the same RGB
            band = band.convert("L")
        a = np.ascontiguousarray(np.asarray(band)[(rows - rows.min())[:, None], cols - cols.min()])
        out = Image.frombytes(band.mode, (a.shape[1], a.shape[0]), a.tobytes())
        if band.mode == "P":
            out.putpalette(band.getpalette())
            if "transparency" in band.info:
                out.info["transparency"] = band.info["transparency"]
        return out.crop((left - x0, top - y0, right - x0, bottom - y0))
    premultiplied = {"LA": "La", "RGBA": "RGBa"}.get(im.mode)  # as Image.resize does for these
    mode = premultiplied or im.mode
    if new_h > new_w:  # tall: Pillow's horizontal pass on the rows the vertical pass reads, then ours
        xmin, k = _coefficients(h, new_h, y0, y1, interp)
        r0, r1 = int(xmin.min()), min(h, int(xmin.max()) + k.shape[1])
        band = im.crop((0, r0, w, r1))
        band = band.convert(mode) if premultiplied else band
        band = band.resize((new_w, band.height), interp) if new_w != w else band
        out_im = _from_array(_resample_axis0(np.asarray(band), r0, xmin, k), mode).crop((x0, 0, x1, y1 - y0))
    else:  # wide: our horizontal pass on the columns it reads, then Pillow's vertical pass
        xmin, k = _coefficients(w, new_w, x0, x1, interp)
        c0, c1 = int(xmin.min()), min(w, int(xmin.max()) + k.shape[1])
        band = im.crop((c0, 0, c1, h))
        band = band.convert(mode) if premultiplied else band
        cols = _resample_axis0(np.swapaxes(np.asarray(band), 0, 1), c0, xmin, k)
        out_im = _from_array(np.swapaxes(cols, 0, 1), mode)
        out_im = out_im.resize((out_im.width, new_h), interp) if new_h != h else out_im
        out_im = out_im.crop((0, y0, x1 - x0, y1))
    out_im = out_im.convert(im.mode) if premultiplied else out_im
    # a crop reaching past the resized image (resize_size < size) is filled as Image.crop fills it
    return out_im.crop((left - x0, top - y0, right - x0, bottom - y0))


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
        # Pillow resizes horizontally first: a tall image passes through size x h pixels
        if max(size * h, w * size) > MAX_RESIZE_PIXELS:
            raise ImageError(
                f"image is {w}x{h}: an aspect ratio this extreme cannot be squashed to {size}x{size} within "
                f"{MAX_RESIZE_PIXELS} intermediate pixels; crop it before sending"
            )
        im = im.resize((size, size), interp)
    else:
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = resize_size, int(resize_size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)
        if new_long > WINDOW_ASPECT * new_short and im.mode in _WINDOW_MODES:
            im = _resize_window(im, (new_w, new_h), (left, top, left + size, top + size), interp)
        elif new_w * new_h > MAX_RESIZE_PIXELS:  # never for an aspect ratio up to WINDOW_ASPECT
            raise ImageError(
                f"image is {w}x{h} in mode {im.mode}: resizing it to {new_w}x{new_h} exceeds "
                f"{MAX_RESIZE_PIXELS} pixels; crop it, or send it as 8-bit (scale_16bit on)"
            )
        else:
            if (new_w, new_h) != (w, h):
                im = im.resize((new_w, new_h), interp)
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
