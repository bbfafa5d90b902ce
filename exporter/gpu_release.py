"""The one place that names the NGC Triton release vitserve serves from, and the TensorRT inside it.

Everything GPU-side derives from here: the serving image (docker/Dockerfile's `TRITON_IMAGE` and
`TENSORRT_PIP` build args, filled by `make image` through `vitserve.perf.gpu_check`), the `gpu` extra of
pyproject.toml (a test checks it equals `TENSORRT_PIP`), the check that plans match the server
(`vitserve check-engines`) and the hints in error messages. A plan only loads in the TensorRT release
that built it, so the image builds the plans it serves (`make engines-gpu`).

Why 25.11: triton-inference-server/server `docs/introduction/compatibility.md` lists TensorRT 10.13.3.9
and CUDA 13.0.2 for 25.11 (its `-trtllm-python-py3` table; 25.11-26.02 all ship 10.13.3.9, 26.03-26.07
ship 10.14.1.48 on CUDA 13.1), and the 25.11 `-vllm-python-py3` image is on the same CUDA 13.0.2 base,
Python 3.12.3. For the plain `-py3` image the table points to NVIDIA's Frameworks Support Matrix, which
we could not read here: `docker/Dockerfile` therefore checks, while the image is built, that the
image's own libnvinfer is TENSORRT_VERSION and stops with both versions otherwise. Changing the
release means changing the four constants below together (and nothing else).

Runs without vitserve installed (`python3 exporter/gpu_release.py image`), so make can read it on a
host that has only Docker and a Python 3.
"""

from __future__ import annotations

import sys

TRITON_RELEASE = "25.11"  # NGC <yy.mm>
TRITON_IMAGE = f"nvcr.io/nvidia/tritonserver:{TRITON_RELEASE}-py3"
TENSORRT_VERSION = "10.13.3.9"  # the TensorRT (libnvinfer) inside TRITON_IMAGE
CUDA_MAJOR = 13  # the image's CUDA 13.0.2: TensorRT's Python wheel for it is tensorrt-cu13
IMAGE_PYTHON = "3.12"  # the image's system Python, which the python backend's stub runs

# pip requirement of the TensorRT Python API matching the image (same major.minor.patch; any build/post).
TENSORRT_PIP = f"tensorrt-cu{CUDA_MAJOR}=={'.'.join(TENSORRT_VERSION.split('.')[:3])}.*"


def version_tuple(version: str, parts: int = 3) -> tuple[int, ...]:
    """ "10.13.3.9" -> (10, 13, 3): the components that decide whether a plan loads (build numbers do not
    appear in libnvinfer's own version number, getInferLibVersion())."""
    import re

    match = re.match(r"^\s*(\d+(?:\.\d+)*)", str(version))
    numbers = tuple(int(x) for x in match.group(1).split(".")) if match else ()
    if len(numbers) < parts:
        raise ValueError(f"TensorRT version {version!r}: expected numbers like 10.13.3")
    return numbers[:parts]


FIELDS = {
    "release": TRITON_RELEASE,
    "image": TRITON_IMAGE,
    "tensorrt": TENSORRT_VERSION,
    "tensorrt-pip": TENSORRT_PIP,
    "python": IMAGE_PYTHON,
}


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in FIELDS:
        print(f"usage: {sys.argv[0]} {{{'|'.join(FIELDS)}}}", file=sys.stderr)
        sys.exit(2)
    print(FIELDS[sys.argv[1]])
