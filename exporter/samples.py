"""Real photographs that ship inside installed packages (scikit-image, matplotlib), for offline checks.

Parity and fidelity are measured on real photographs, never only on noise. The photos are split into a
held-out evaluation set and a calibration pool, so an INT8 variant is never scored on its own calibration
images. Both sets can be written to folders (`write_eval_images`, `write_calibration_images`) and read back
like any user folder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")

# (package, file) of colour/greyscale photographs. The first list is held out for evaluation.
EVAL_PHOTOS = [
    ("skimage", "astronaut.png"),
    ("skimage", "chelsea.png"),
    ("skimage", "coffee.png"),
    ("skimage", "rocket.jpg"),
    ("matplotlib", "grace_hopper.jpg"),
    ("skimage", "motorcycle_left.png"),
    ("skimage", "camera.png"),
    ("skimage", "immunohistochemistry"),
]
CALIBRATION_PHOTOS = [
    ("skimage", "motorcycle_right.png"),
    ("skimage", "hubble_deep_field.jpg"),
    ("skimage", "retina.jpg"),
    ("matplotlib", "Minduka_Present_Blue_Pack.png"),
    ("skimage", "coins.png"),
    ("skimage", "brick.png"),
    ("skimage", "grass.png"),
    ("skimage", "gravel.png"),
    ("skimage", "moon.png"),
    ("skimage", "page.png"),
    ("skimage", "clock_motion.png"),
    ("skimage", "color.png"),
]


def _photo_path(package: str, name: str) -> Path:
    if package == "skimage":
        import skimage

        if name == "immunohistochemistry":
            name = "ihc.png"
        return Path(skimage.__file__).parent / "data" / name
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / name


def load_photo(package: str, name: str) -> Image.Image:
    """One bundled photograph as an RGB PIL image."""
    with Image.open(_photo_path(package, name)) as im:
        return im.convert("RGB")


def eval_photos() -> list[tuple[str, Image.Image]]:
    """The held-out photographs, as (name, RGB image)."""
    return [(Path(n).stem, load_photo(p, n)) for p, n in EVAL_PHOTOS]


def _views(pool: list[tuple[str, Image.Image]], count: int, seed: int) -> list[tuple[str, Image.Image]]:
    """`count` deterministic views of `pool`: each photo whole, then random crops/flips of them."""
    out = list(pool[:count])
    rng = np.random.default_rng(seed)
    i = 0
    while len(out) < count:
        name, im = pool[i % len(pool)]
        w, h = im.size
        scale = rng.uniform(0.4, 0.9)
        cw, ch = max(32, int(w * scale)), max(32, int(h * scale))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        view = im.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append((f"{name}_crop{len(out)}", view))
        i += 1
    return out


def calibration_photos(count: int, seed: int = 0) -> list[tuple[str, Image.Image]]:
    """`count` deterministic views of the calibration pool (never the evaluation photos)."""
    return _views([(Path(n).stem, load_photo(p, n)) for p, n in CALIBRATION_PHOTOS], count, seed)


def eval_views(count: int = 32, seed: int = 1) -> list[tuple[str, Image.Image]]:
    """`count` deterministic views of the held-out photos: the photos, then crops/flips of them."""
    return _views(eval_photos(), count, seed)


def _write(images: list[tuple[str, Image.Image]], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, im in images:
        path = folder / f"{name}.jpg"
        if not path.exists():
            tmp = path.with_suffix(".tmp.jpg")
            im.save(tmp, quality=95)
            tmp.replace(path)
        paths.append(path)
    return paths


def write_eval_images(folder: str | Path) -> list[Path]:
    """Write the held-out photographs to `folder` as JPEG (idempotent)."""
    return _write(eval_photos(), Path(folder))


def write_calibration_images(folder: str | Path, count: int = 64, seed: int = 0) -> list[Path]:
    """Write `count` calibration views to `folder` as JPEG (idempotent)."""
    return _write(calibration_photos(count, seed), Path(folder))


def list_images(folder: str | Path) -> list[Path]:
    """Image files under `folder`, recursively, sorted (so sampling is deterministic)."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def files_digest(paths: list[Path]) -> str:
    """sha256 over the names and bytes of `paths` (cache keys)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()
