"""Real photographs that ship inside installed packages (scikit-image, matplotlib), for offline checks.

Parity and fidelity are measured on real photographs, never only on noise. The photos are split by
*source* into a held-out evaluation set and a calibration pool, so an INT8 variant is never scored on its
own calibration images or on a near-duplicate of one: the motorcycle_left/right stereo pair is one source
(only the left one is used, on the evaluation side), and crops/flips of a photo stay on its photo's side.
`near_duplicates` checks this with a perceptual hash (pHash, also over crops and mirror images), and a
test runs it over both sides. Every distinct real photograph the installed packages ship is used (20);
synthetic images (colour wheel, clip-art, logos, phantoms, chessboards) and thumbnails (LFW 25x25 faces,
a 14x25 GIF) are left out; scipy's datasets need a download.

Both sets can be written to folders (`write_eval_images`, `write_calibration_images`) and read back like
any user folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")

# (package, file) of colour/greyscale photographs, one per distinct source. The first list is held out
# for evaluation (its order is relied on by tests: 8 photos, astronaut first).
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
    ("skimage", "hubble_deep_field.jpg"),
    ("skimage", "retina.jpg"),
    ("skimage", "microaneurysms.png"),  # a retina detail from another dataset (DIARETDB1): same side
    ("skimage", "coins.png"),
    ("skimage", "brick.png"),
    ("skimage", "grass.png"),
    ("skimage", "gravel.png"),
    ("skimage", "moon.png"),
    ("skimage", "page.png"),
    ("skimage", "clock_motion.png"),
    ("skimage", "cell.png"),
    ("skimage", "text.png"),
]
# Shipped next to those, left out on purpose: motorcycle_right.png (stereo partner of motorcycle_left),
# color.png (synthetic colour wheel), Minduka_Present_Blue_Pack.png (clip-art).


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


def distinct_sources(names: list[str]) -> int:
    """How many distinct source photographs a list of view names (`NAME` or `NAME_cropN`) comes from."""
    return len({n.split("_crop")[0] for n in names})


# ----------------------------------------------------------------------------- perceptual hashing

HASH_SIZE = 8  # 64-bit hashes
NEAR_DUPLICATE_BITS = 10  # pHash Hamming distance at or below which two images are the same picture


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)
    m = np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT32 = _dct_matrix(32)


def phash(im: Image.Image) -> np.ndarray:
    """64-bit perceptual hash (as bools): the signs of the 8x8 lowest DCT frequencies of the 32x32
    greyscale image against their median (Zauner's pHash). Robust to resizing, re-encoding and mild
    crops."""
    g = np.asarray(im.convert("L").resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float64)
    c = (_DCT32 @ g @ _DCT32.T)[:HASH_SIZE, :HASH_SIZE].reshape(-1)
    return c > np.median(c[1:])


def dhash(im: Image.Image) -> np.ndarray:
    """64-bit difference hash (as bools): is each pixel of the 9x8 greyscale image brighter than its
    right-hand neighbour."""
    g = np.asarray(
        im.convert("L").resize((HASH_SIZE + 1, HASH_SIZE), Image.Resampling.BILINEAR), dtype=np.float32
    )
    return (g[:, 1:] > g[:, :-1]).reshape(-1)


def _windows(im: Image.Image) -> list[Image.Image]:
    """The image, its mirror, and crops at 0.8/0.6/0.4 of its size on a 5x5 grid (and their mirrors):
    a crop of this photo matches one of them closely."""
    out = []
    im = im.copy()
    im.thumbnail((256, 256))  # the hash looks at 32x32: smaller windows hash as well, and faster
    w, h = im.size
    for scale in (1.0, 0.8, 0.6, 0.4):
        cw, ch = max(8, int(w * scale)), max(8, int(h * scale))
        steps = 1 if scale == 1.0 else 5
        for i in range(steps):
            for j in range(steps):
                x = (w - cw) * i // max(1, steps - 1)
                y = (h - ch) * j // max(1, steps - 1)
                crop = im.crop((x, y, x + cw, y + ch))
                out += [crop, crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return out


def near_duplicates(
    side_a: list[tuple[str, Image.Image]],
    side_b: list[tuple[str, Image.Image]],
    max_bits: int = NEAR_DUPLICATE_BITS,
) -> list[tuple[str, str, int]]:
    """(name_a, name_b, bits) for every image of `side_a` whose pHash is within `max_bits` of the image,
    the mirror image or a crop (0.4-1.0 of its size) of an image of `side_b`: the same picture, a
    near-duplicate (stereo partner, re-encoding) or a crop/flip of it."""
    hashes_a = [(n, phash(im)) for n, im in side_a]
    found = []
    for name_b, im_b in side_b:
        windows = np.stack([phash(w) for w in _windows(im_b)])
        for name_a, h in hashes_a:
            bits = int((windows != h).sum(axis=1).min())
            if bits <= max_bits:
                found.append((name_a, name_b, bits))
    return found


def _write(images: list[tuple[str, Image.Image]], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, im in images:
        path = folder / f"{name}.jpg"
        if not path.exists():
            tmp = path.with_suffix(f".{os.getpid()}.tmp.jpg")  # processes may write the same folder
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
