"""Preprocess parameters -> a serialized DALI pipeline (`model.dali`) for Triton's DALI backend.

encoded image (UINT8 bytes, one image per sample) -> decode (nvJPEG on the GPU: `device="mixed"`; EXIF
orientation applied) -> resize the shortest edge -> center crop -> normalize -> float32 (3, size, size)

The graph reproduces the backbone's own eval transform (open_clip / timm, i.e. torchvision on PIL), not
DALI's defaults, which differ in two places: DALI rounds the long side of a shortest-edge resize where
torchvision truncates (`int(resize_size * long / short)`), and a center crop's offset rounds half up where
Python's `round()` rounds half to even. Both are computed in the graph in integers from the encoded image's
shape, and the resize runs with `subpixel_scale=False` so that it lands on exactly that size.

The same graph built with CPU operators (`gpu=False`, `device_id=None`) runs on GPU-less machines; it is
the parity test against the reference transform (tests/test_dali.py). The GPU operators (nvJPEG decode,
GPU resize) are not the CPU ones: their numerics are checked on a GPU host (`make gpu-check`).

DALI (`nvidia-dali-cuda120`, the `dali` extra) is imported here only, when a pipeline is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vitserve.contract import IMAGE_INPUT as INPUT  # the external source (Triton
from vitserve.contract import PIXELS as OUTPUT  # feeds the input of that name)
from vitserve.errors import ConfigError

INSTALL_HINT = "pip install 'nvidia-dali-cuda120==2.4.0' (or: pip install -e '.[dali]')"


def _dali():
    try:
        import nvidia.dali as dali
    except ImportError as e:
        raise ConfigError(
            f"preprocess: dali needs NVIDIA DALI to write the DALI model ({e}); install it with "
            f"{INSTALL_HINT}, or set `preprocess: pillow` in models.yaml"
        ) from None
    return dali


def _interp(types, name: str):
    table = {
        "bicubic": types.INTERP_CUBIC,
        "bilinear": types.INTERP_LINEAR,
        "nearest": types.INTERP_NN,
        "lanczos": types.INTERP_LANCZOS3,
    }
    if name not in table:
        raise ConfigError(f"preprocess interpolation {name!r}: DALI supports {', '.join(table)}")
    return table[name]


def _half_to_even_center(d):
    """round(d / 2) with Python's rounding (half to even) for a non-negative integer DataNode `d`."""
    k = d // 2
    return k + (d - 2 * k) * (k - 2 * (k // 2))


def build_pipeline(
    pre: dict[str, Any],
    batch_size: int,
    *,
    gpu: bool,
    num_threads: int = 2,
    device_id: int | None = None,
    **pipeline_kwargs,
):
    """The DALI pipeline for preprocess parameters `pre` (Preprocess.as_dict(): size, resize_size,
    interpolation, mean, std, resize_mode). `gpu=True` decodes with nvJPEG (`device="mixed"`) and resizes on
    the GPU; `gpu=False` uses CPU operators only and runs with `device_id=None` on any machine. A GPU
    pipeline with `device_id=None` can be serialized (not run) without a GPU. `pipeline_kwargs` go to DALI's
    Pipeline (e.g. `prefetch_queue_depth=1` to run it batch by batch)."""
    dali = _dali()
    fn, types = dali.fn, dali.types
    size, resize_size = int(pre["size"]), int(pre["resize_size"])
    mode = pre.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise ConfigError(f"preprocess resize_mode {mode!r}: DALI pipeline supports 'shortest' or 'squash'")
    if mode == "shortest" and resize_size < size:
        raise ConfigError(
            f"preprocess resize_size={resize_size} < size={size}: a center crop larger than the resized "
            "image pads in torchvision; the DALI pipeline does not reproduce that"
        )
    interp = _interp(types, pre.get("interpolation", "bicubic"))
    mean = [float(m) * 255.0 for m in pre["mean"]]
    std = [float(s) * 255.0 for s in pre["std"]]

    @dali.pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id)
    def preprocess():
        raw = fn.external_source(name=INPUT, dtype=types.UINT8, device="cpu")
        images = fn.decoders.image(raw, device="mixed" if gpu else "cpu", output_type=types.RGB)
        if mode == "squash":
            resized = fn.resize(
                images,
                resize_x=float(size),
                resize_y=float(size),
                interp_type=interp,
                antialias=True,
                subpixel_scale=False,
            )
            cropped = resized
        else:
            # integer geometry from the encoded header (EXIF orientation applied), as torchvision does it
            shape = fn.peek_image_shape(raw, dtype=types.INT64)
            h, w = shape[0], shape[1]
            w_short = fn.cast(w <= h, dtype=types.INT64)
            short = w_short * w + (1 - w_short) * h
            long = w_short * h + (1 - w_short) * w
            new_long = (resize_size * long) // short  # == int(resize_size * long / short) for these sizes
            new_w = w_short * resize_size + (1 - w_short) * new_long
            new_h = w_short * new_long + (1 - w_short) * resize_size
            resized = fn.resize(
                images,
                resize_x=fn.cast(new_w, dtype=types.FLOAT),
                resize_y=fn.cast(new_h, dtype=types.FLOAT),
                interp_type=interp,
                antialias=True,
                subpixel_scale=False,
            )
            left = _half_to_even_center(new_w - size)
            top = _half_to_even_center(new_h - size)
            cropped = fn.slice(
                resized,
                start=fn.cast(fn.stack(left, top), dtype=types.INT32),
                shape=[size, size],
                axis_names="WH",
            )
        return fn.crop_mirror_normalize(
            cropped, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std, name=OUTPUT
        )

    return preprocess(**pipeline_kwargs)


def write_model_file(pre: dict[str, Any], path: str | Path, batch_size: int, num_threads: int = 2) -> Path:
    """Serialize the GPU pipeline (nvJPEG decode, GPU resize) for `pre` to `path` (Triton's `model.dali`).
    Serializing needs DALI but no GPU (`device_id=None`); Triton's DALI backend sets each instance's device."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pipe = build_pipeline(pre, batch_size, gpu=True, num_threads=num_threads)
    tmp = path.with_name(path.name + ".tmp")
    pipe.serialize(filename=str(tmp))
    tmp.replace(path)
    return path


def run_cpu(pre: dict[str, Any], images: list[bytes], num_threads: int = 2):
    """Encoded images -> float32 (N, 3, size, size) through the pipeline built with CPU operators
    (`device_id=None`): what the DALI model computes, on a machine without a GPU."""
    import numpy as np

    if not images:
        raise ValueError("run_cpu: no images given")
    pipe = build_pipeline(pre, len(images), gpu=False, num_threads=num_threads)
    pipe.build()
    pipe.feed_input(INPUT, [np.frombuffer(b, dtype=np.uint8) for b in images])
    (out,) = pipe.run()
    return np.stack([np.asarray(out[i]) for i in range(len(images))])


# -- parity against the backbone's reference transform (tests, `make gpu-check`, perf/results) ------------

PARITY_MIN_COSINE = 0.9999


def parity_images() -> list[tuple[str, bytes]]:
    """The bundled photos as JPEG (q95) and PNG, plus a portrait crop of each (JPEG): landscape, square,
    portrait, colour and greyscale."""
    import io

    from vitserve.exporter.samples import eval_photos

    def encode(im, fmt: str) -> bytes:
        b = io.BytesIO()
        im.save(b, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        return b.getvalue()

    out = []
    for name, im in eval_photos():
        out += [(f"{name}.jpg", encode(im, "JPEG")), (f"{name}.png", encode(im, "PNG"))]
        w, h = im.size
        out.append((f"{name}_portrait.jpg", encode(im.crop((w // 4, 0, w // 4 + int(h * 0.6), h)), "JPEG")))
    return out


def reference_pixels(backbone: str, images: list[bytes]):
    """float32 (N, 3, size, size): the backbone's own transform object (open_clip / timm) on the images."""
    import io

    import torch
    from PIL import Image

    from vitserve.exporter.backbones import get_backbone, torch_transform

    tf = torch_transform(get_backbone(backbone))
    return torch.stack([tf(Image.open(io.BytesIO(d)).convert("RGB")) for d in images]).numpy()


def parity(backbone: str, gpu: bool = False, device_id: int = 0) -> dict[str, Any]:
    """The DALI pipeline (CPU operators, or with `gpu` nvJPEG + GPU resize) against the reference transform
    on `parity_images()`: per-image cosine, worst image, max abs difference (normalized units)."""
    import numpy as np

    from vitserve.exporter.backbones import get_backbone

    images = parity_images()
    data = [d for _, d in images]
    pre = get_backbone(backbone).preprocess.as_dict()
    if gpu:
        pipe = build_pipeline(pre, len(data), gpu=True, device_id=device_id)
        pipe.build()
        pipe.feed_input(INPUT, [np.frombuffer(b, dtype=np.uint8) for b in data])
        (out,) = pipe.run()
        out = out.as_cpu()
        ours = np.stack([np.asarray(out[i]) for i in range(len(data))])
    else:
        ours = run_cpu(pre, data)
    ref = reference_pixels(backbone, data)
    a, r = ours.reshape(len(data), -1).astype(np.float64), ref.reshape(len(data), -1).astype(np.float64)
    cos = (a * r).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(r, axis=1)
    return {
        "backbone": backbone,
        "operators": "gpu (nvJPEG, GPU resize)" if gpu else "cpu",
        "images": len(data),
        "size": pre["size"],
        "shape_ok": ours.shape == ref.shape,
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "worst_image": images[int(np.argmin(cos))][0],
        "max_abs": float(np.abs(a - r).max()),
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m vitserve.exporter.dali check [--gpu] [--backbones ...]`: the parity table; exit 1 below
    cosine 0.9999. On a GPU host, `--gpu` checks the operators the served model runs (`make gpu-check`)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m vitserve.exporter.dali")
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("check", help="DALI pipeline vs the reference transform on the bundled photos")
    c.add_argument("--gpu", action="store_true", help="nvJPEG decode + GPU resize (needs a CUDA GPU)")
    c.add_argument("--backbones", nargs="+", default=["ViT-B-32", "EVA02-L-14-336", "DINOv2-L"])
    args = p.parse_args(argv)
    failed = []
    for name in args.backbones:
        r = parity(name, gpu=args.gpu)
        ok = r["shape_ok"] and r["cosine_min"] >= PARITY_MIN_COSINE
        print(
            f"{'PASS' if ok else 'FAIL'} {name:16s} {r['operators']}: {r['images']} images, cosine min "
            f"{r['cosine_min']:.6f} (worst {r['worst_image']}), max abs {r['max_abs']:.4f}"
        )
        if not ok:
            failed.append(name)
    if failed:
        print(f"below cosine {PARITY_MIN_COSINE}: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
