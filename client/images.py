"""User images -> what the deployed models take: encoded bytes for the ensemble, CHW float32 for a backbone.

Everything that can be refused without the server is refused here, before any request is sent: a path
that does not exist or is not an image, an array of the wrong dtype or rank, a mix of encoded images and
preprocessed tensors. Bytes are sent as they are; the server decodes them and reports a bad one by index.

Orientation is the same whatever the input type: files and bytes keep their EXIF orientation, and a PIL
image re-encoded as PNG carries its EXIF orientation along, so the server turns all of them upright the same
way (or, with `exif_transpose` off in the model, none of them). An array has no orientation: its pixels are
taken as they are meant to be seen (apply `PIL.ImageOps.exif_transpose` before `np.asarray` when it comes
from a photo with an EXIF orientation).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from vitserve.errors import ClientError

ImageLike = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray
Images = ImageLike | Sequence[ImageLike]

_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}
ORIENTATION = 0x0112  # the EXIF tag


def orientation(im: Image.Image) -> int:
    """The EXIF orientation of a PIL image (1, upright, when it has none or it cannot be read)."""
    try:
        value = int(im.getexif().get(ORIENTATION, 1))
    except Exception:  # a malformed EXIF block: the server could not read it either
        return 1
    return value if 1 <= value <= 8 else 1


@dataclass(frozen=True)
class Item:
    """One input image: its position in the call, a short description for messages, and its value."""

    index: int
    source: str
    value: Any  # Path, bytes, PIL image, HWC uint8 array, or a CHW float32 array (tensor items)


@dataclass(frozen=True)
class Batch:
    """A call's images after checking: `tensor` is True when they are preprocessed CHW float32 arrays."""

    items: list[Item]
    tensor: bool

    def __len__(self) -> int:
        return len(self.items)


def _is_single(images: Any) -> bool:
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
        return True
    return isinstance(images, np.ndarray) and images.ndim in (2, 3)


def prepare(images: Images) -> Batch:
    """Check the images of one call and say whether they go to the ensemble or a backbone.

    A single image (path, bytes, PIL image, HWC/HW uint8 array, CHW float32 array) counts as a list of
    one; a 4-D float32 array is a preprocessed NCHW batch and a 4-D uint8 array a stack of HWC images.
    Raises ClientError naming every bad path or item, before anything is sent."""
    if _is_single(images):
        images = [images]
    elif isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ClientError(
                f"an array of images must be 4-D (NCHW float32 or NHWC uint8), got shape {images.shape}"
            )
        images = list(images)
    items: list[Item] = []
    problems: list[str] = []
    kinds: set[bool] = set()
    for i, image in enumerate(images):
        try:
            item, tensor = _check(i, image)
        except ClientError as e:
            problems.append(str(e))
            continue
        items.append(item)
        kinds.add(tensor)
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ClientError(f"{len(problems)} input(s) refused before sending:\n  {shown}{more}")
    if len(kinds) > 1:
        raise ClientError(
            "a call mixes encoded images with preprocessed CHW float32 tensors; send them in separate calls "
            "(encoded images go to the ensemble, tensors to a backbone model)"
        )
    return Batch(items, tensor=kinds == {True})


def _check(i: int, image: Any) -> tuple[Item, bool]:
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise ClientError(f"image {i}: {path} {what}")
        try:
            with Image.open(path) as im:  # reads the header only; the server decodes the pixels
                im.size  # noqa: B018
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ClientError(
                f"image {i}: {path} is not an image Pillow can read ({type(e).__name__}: {e})"
            ) from e
        return Item(i, str(path), path), False
    if isinstance(image, (bytes, bytearray, memoryview)):
        return Item(i, f"{len(image)} bytes", bytes(image)), False
    if isinstance(image, Image.Image):
        return Item(i, f"PIL {image.mode} {image.width}x{image.height}", image), False
    if isinstance(image, np.ndarray):
        return _check_array(i, image)
    raise ClientError(
        f"image {i}: unsupported type {type(image).__name__}; pass a path, bytes, a PIL image, an HWC uint8 "
        "array or a preprocessed CHW float32 array"
    )


def _check_array(i: int, a: np.ndarray) -> tuple[Item, bool]:
    if a.dtype == np.uint8:
        if a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4)):
            return Item(i, f"uint8 array {a.shape}", a), False
        raise ClientError(
            f"image {i}: a uint8 array must be HW or HWC with 1, 3 or 4 channels, got shape {a.shape}"
        )
    if a.dtype == np.float32 and a.ndim == 3 and a.shape[0] == 3:
        if not np.isfinite(a).all():
            raise ClientError(f"image {i}: the CHW float32 array holds NaN or infinity")
        return Item(i, f"float32 array {a.shape}", a), True
    raise ClientError(
        f"image {i}: an array of dtype {a.dtype} and shape {a.shape} is neither an HWC uint8 image nor a "
        "preprocessed CHW float32 tensor (3, H, W)"
    )


def encoded(item: Item) -> bytes:
    """The bytes sent to the ensemble for `item`: the file's bytes, or a PNG of an in-memory image (with
    the PIL image's EXIF orientation, so that the server treats it as it treats the photo's own bytes)."""
    value = item.value
    if isinstance(value, Path):
        try:
            return value.read_bytes()
        except OSError as e:
            raise ClientError(f"image {item.index}: cannot read {value}: {e.strerror}") from e
    if isinstance(value, bytes):
        return value
    im = (
        value
        if isinstance(value, Image.Image)
        else Image.fromarray(value[..., 0] if value.ndim == 3 and value.shape[2] == 1 else value)
    )
    exif = None
    if isinstance(value, Image.Image) and (turn := orientation(value)) != 1:
        exif = Image.Exif()
        exif[ORIENTATION] = turn
    if im.mode not in _PNG_MODES:  # CMYK, YCbCr, F, ...: the server would convert to RGB anyway
        im = im.convert("RGB")
    buf = io.BytesIO()
    try:
        # lossless, and fast enough to keep up with the server
        im.save(buf, format="PNG", compress_level=1, **({"exif": exif} if exif else {}))
    except (OSError, ValueError) as e:
        raise ClientError(f"image {item.index} ({item.source}) could not be encoded as PNG: {e}") from e
    return buf.getvalue()


def check_shape(items: Sequence[Item], shape: tuple[int, ...]) -> None:
    """Refuse, before sending, tensors of a size the backbone does not take (every bad index named)."""
    bad = [
        f"{item.index} {tuple(item.value.shape)}" for item in items if tuple(item.value.shape) != tuple(shape)
    ]
    if bad:
        listed = ", ".join(bad[:10]) + (", ..." if len(bad) > 10 else "")
        raise ClientError(
            f"{len(bad)} tensor(s) do not match the backbone's input {tuple(shape)}: image {listed}; "
            "preprocess to that size"
        )


def pixels(items: Sequence[Item]) -> np.ndarray:
    """Stack tensor items into one contiguous (N, 3, H, W) float32 array."""
    return np.ascontiguousarray(np.stack([item.value for item in items]), dtype=np.float32)
