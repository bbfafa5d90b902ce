"""Served preprocessing vs the libraries' own eval transforms, per backbone family and input mode.

    python -m vitserve.perf.bench_parity            # -> perf/results/parity.md and parity.json

Served: `preprocess_bytes` of exporter/triton_models/preprocess.py (the code the Triton preprocess model
runs), configured with the registry's numbers. Reference: the library's own transform object
(`backbones.library_transform`: open_clip's `image_transform_v2` with the preprocess cfg open_clip resolves
for the registry tag; timm's `create_transform(**resolve_model_data_config(model))` after timm's loader's
RGB conversion; NV-DINOv2: the timm DINOv2 of its shape). Two settings:
- exact: `exif_transpose` and `scale_16bit` off, reference on the image exactly as Pillow decodes it;
- default: vitserve's deliberate differences on (EXIF upright, 16-bit scaled to 8 bits), reference fed
  the same upright / scaled image (`backbones.prepare_image`).
`rgb_first` is the cosine the old order (RGB conversion before the resize) would get for open_clip models.
No weights are needed: this is pixels only.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vitserve.contract import PreprocessParams
from vitserve.exporter.compare import format_table

RESULTS = Path(__file__).parent / "results"
COMMAND = "python -m vitserve.perf.bench_parity"
# One backbone per family (and EVA02 at both input sizes); preprocessing is shared within a family.
FAMILIES = {
    "clip": "ViT-B-32",
    "eva02-clip": "EVA02-B-16",
    "eva02-clip 336": "EVA02-L-14-336",
    "dinov2": "DINOv2-L",
    "nv-dinov2": "NV-DINOv2",
}
MODES = (
    "rgb",
    "palette",
    "palette_transparent",
    "rgba",
    "la",
    "cmyk",
    "16bit",
    "exif_rotated",
    "animated",
)
MIN_COSINE = 0.9999


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, format=fmt, **kw)
    return b.getvalue()


def _alpha(size: tuple[int, int]) -> Image.Image:
    """A horizontal 0..255 ramp with a fully transparent band: the colour under alpha 0 is kept in the
    file, so premultiplied (Pillow's RGBA resize) and straight resizes differ there."""
    w, h = size
    a = np.tile(np.linspace(0, 255, w), (h, 1))
    a[:, : w // 5] = 0
    return Image.fromarray(a.astype(np.uint8), "L")


def encode_modes(im: Image.Image) -> dict[str, bytes]:
    """One RGB photograph encoded in every input mode the service accepts (bytes as a client sends)."""
    im = im.convert("RGB")
    pal = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    rgba = im.copy()
    rgba.putalpha(_alpha(im.size))
    la = im.convert("L")
    la.putalpha(_alpha(im.size))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: turn 90 degrees clockwise to view
    grey16 = Image.fromarray((np.asarray(im.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    frames = [pal, im.rotate(90).convert("P", palette=Image.Palette.ADAPTIVE), im.transpose(0).convert("P")]
    out = {
        "rgb": _save(im, "PNG"),
        "palette": _save(pal, "PNG"),
        "palette_transparent": _save(pal, "PNG", transparency=0),
        "rgba": _save(rgba, "PNG"),
        "la": _save(la, "PNG"),
        "cmyk": _save(im.convert("CMYK"), "JPEG", quality=95),
        "16bit": _save(grey16, "PNG"),
        "exif_rotated": _save(im.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif),
        "animated": _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0),
    }
    return {m: out[m] for m in MODES}


def decoded_modes(data: dict[str, bytes]) -> dict[str, str]:
    """The Pillow mode each encoding decodes to (checks that the modes are what they claim)."""
    return {m: Image.open(io.BytesIO(b)).mode for m, b in data.items()}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def compare(backbone: str, photos: list[tuple[str, Image.Image]], setting: str = "exact") -> list[dict]:
    """One row per (photo, mode): cosine and max abs error of served vs library pixels."""
    from vitserve.exporter.backbones import get_backbone, library_transform, prepare_image
    from vitserve.exporter.triton_models.preprocess import preprocess_bytes

    entry = get_backbone(backbone)
    cfg = PreprocessParams(**entry.preprocess.as_dict())
    pre = entry.preprocess
    if setting == "exact":
        cfg = replace(cfg, exif_transpose=False, scale_16bit=False)
    tf = library_transform(entry)
    rows = []
    for name, photo in photos:
        for mode, data in encode_modes(photo).items():
            served = preprocess_bytes(data, cfg)
            decoded = Image.open(io.BytesIO(data))
            ref = tf(decoded if setting == "exact" else prepare_image(decoded, pre)).numpy()
            row = {
                "backbone": backbone,
                "setting": setting,
                "photo": name,
                "mode": mode,
                "decoded_as": decoded.mode,
                "cosine": cosine(served, ref),
                "max_abs_err": float(np.abs(served - ref).max()),
            }
            if entry.preprocess.rgb == "after_crop":
                row["rgb_first"] = cosine(preprocess_bytes(data, replace(cfg, rgb="on_decode")), ref)
            rows.append(row)
    return rows


def _host() -> dict[str, Any]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if "Model name" in ln), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in lscpu.splitlines() if ln.startswith("Flags")), [])
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return {"cpu": model, "flags": [f for f in wanted if f in flags], "python": platform.python_version()}


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("open_clip_torch", "timm", "torchvision", "pillow")}


def summarize(rows: list[dict]) -> list[dict]:
    """Worst case per (family, setting, mode)."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["family"], r["backbone"], r["setting"], r["mode"])
        s = out.setdefault(
            key,
            {
                "family": r["family"],
                "backbone": r["backbone"],
                "setting": r["setting"],
                "mode": r["mode"],
                "decoded_as": r["decoded_as"],
                "images": 0,
                "cosine_min": 1.0,
                "max_abs_err": 0.0,
            },
        )
        s["images"] += 1
        s["cosine_min"] = min(s["cosine_min"], r["cosine"])
        s["max_abs_err"] = max(s["max_abs_err"], r["max_abs_err"])
        if "rgb_first" in r:
            s["rgb_first_cosine_min"] = min(s.get("rgb_first_cosine_min", 1.0), r["rgb_first"])
    for s in out.values():
        s["passed"] = s["cosine_min"] >= MIN_COSINE
    return list(out.values())


def _table(summary: list[dict]) -> str:
    cols = ["family", "backbone", "setting", "mode", "decoded_as", "images", "cosine_min", "max_abs_err",
            "rgb_first_cosine_min", "passed"]  # fmt: skip
    return format_table(summary, cols, markdown=True, float_format=".7f")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for parity.md / parity.json")
    args = parser.parse_args(argv)
    from vitserve.exporter.samples import eval_photos

    photos = eval_photos()
    rows = []
    for family, backbone in FAMILIES.items():
        for setting in ("exact", "default"):
            rows += [r | {"family": family} for r in compare(backbone, photos, setting)]
    summary = summarize(rows)
    failed = [s for s in summary if not s["passed"]]
    data = {
        "command": COMMAND,
        "host": _host(),
        "versions": _versions(),
        "threshold_cosine": MIN_COSINE,
        "photos": [n for n, _ in photos],
        "summary": summary,
        "rows": rows,
        "passed": not failed,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "parity.json").write_text(json.dumps(data, indent=2) + "\n")
    md = (
        f"# Preprocessing parity: served vs the libraries' own transforms\n\n"
        f"Command: `{COMMAND}`\n\nHost: {data['host']}\n\nVersions: {data['versions']}\n\n"
        f"Served: `preprocess_bytes` (exporter/triton_models/preprocess.py, what the Triton preprocess "
        f"model runs) with the registry's numbers. Reference: open_clip's `image_transform_v2` with the "
        f"preprocess cfg open_clip resolves for the registry tag; timm's `create_transform` of "
        f"`resolve_model_data_config` after timm's loader's `convert('RGB')` (NV-DINOv2: the timm "
        f"DINOv2-L config). Pixel cosine over the whole 3xHxW tensor, worst of {len(photos)} real "
        f"photographs ({', '.join(data['photos'])}) per row; threshold {MIN_COSINE}.\n\n"
        f"- exact: `exif_transpose` and `scale_16bit` off: the library's behaviour pixel for pixel "
        f"(16-bit greyscale clipped at 255 by Pillow, EXIF orientation ignored).\n"
        f"- default: vitserve's deliberate differences on (EXIF upright, 16-bit scaled to 8 bits); the "
        f"reference gets the same upright / scaled image.\n"
        f"- rgb_first_cosine_min: what converting to RGB before the resize (the old order) gives against "
        f"open_clip's transform, which converts after the crop.\n\n"
        f"{'All rows passed.' if not failed else f'FAILED rows: {len(failed)}'}\n\n"
        f"{_table(summary)}\n"
    )
    (args.out / "parity.md").write_text(md)
    print(md)
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
