"""Triton python-backend model: encoded image bytes -> normalized pixel_values, batched.

Self-contained (numpy + Pillow only) so the repository runs in any Triton container. It reproduces the
backbone's own eval transform (open_clip / timm on PIL images): EXIF orientation, RGB, resize of the
shortest edge with the same interpolation, center crop, /255, normalize. A bad image fails only its own
request with TritonError(INVALID_ARG); `execute()` never raises, since that would fail the whole batch.

Parameters (config.pbtxt `parameters`, JSON in `preprocess`): size, resize_size, interpolation, mean,
std, resize_mode, max_pixels.
"""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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


class ImageError(ValueError):
    """The bytes are not an image this service accepts; the message says why."""


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes -> upright RGB PIL image, refusing non-images and images above `max_pixels` (checked from
    the header, before any pixel is decoded)."""
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
            im.load()
            im = ImageOps.exif_transpose(im)
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"not a decodable image ({type(e).__name__}: {e})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"corrupt or truncated image ({type(e).__name__}: {e})") from e
    return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB as the training pipelines make it (`.convert("RGB")`), scaling 16/32-bit greyscale to 8 bits
    first (Pillow's own conversion would clip it)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return im if im.mode == "RGB" else im.convert("RGB")


def transform(im: Image.Image, cfg: dict) -> np.ndarray:
    """RGB PIL image -> float32 (3, size, size), as torchvision's Resize/CenterCrop/ToTensor/Normalize."""
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
    x = np.asarray(im, dtype=np.float32) / np.float32(255.0)
    mean = np.asarray(cfg["mean"], dtype=np.float32)
    std = np.asarray(cfg["std"], dtype=np.float32)
    return np.ascontiguousarray(((x - mean) / std).transpose(2, 0, 1))


def preprocess_bytes(data: bytes, cfg: dict) -> np.ndarray:
    return transform(decode(data, int(cfg.get("max_pixels", 40_000_000))), cfg)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.cfg = json.loads(config["parameters"]["preprocess"]["string_value"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.logger = pb_utils.Logger

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                items = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy().reshape(-1)
                pixels = []
                for i, item in enumerate(items):
                    try:
                        pixels.append(preprocess_bytes(bytes(item), self.cfg))
                    except ImageError as e:
                        msg = f"{self.input_name}[{i}]: {e}" if len(items) > 1 else f"{self.input_name}: {e}"
                        raise ImageError(msg) from None
                out = pb_utils.Tensor(self.output_name, np.stack(pixels))
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
