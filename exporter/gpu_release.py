"""The one place that names the NGC Triton release vitserve serves from; the image itself says which
TensorRT it carries.

Everything GPU-side derives from here: the serving image (docker/Dockerfile's `TRITON_IMAGE` build arg,
filled by `make image` through `vitserve.perf.gpu_check`), the check that plans match the server
(`vitserve check-engines`) and the hints in error messages. A plan only loads in the TensorRT release
that built it, so the image builds the plans it serves (`make engines-gpu`).

The TensorRT inside the plain `-py3` image is not pinned here: Triton's compatibility table gives
TensorRT only for the `-trtllm-python-py3` images, whose TensorRT follows TensorRT-LLM's pin (in 25.10
the two images already differed), and the Frameworks Support Matrix that covers the plain image could
not be read here. So while the image is built, `image_tensorrt()` reads the image's own libnvinfer
(dpkg's record of the libnvinfer package, else the libnvinfer.so.X.Y.Z file name), installs the
TensorRT Python package of exactly that version for the image's CUDA, and records both in
`IMAGE_TENSORRT_RECORD`. Changing the release means changing TRITON_RELEASE; IMAGE_PYTHON and the
TensorRT note below are documentation (the image build's self-check says when the note is stale).

Runs without vitserve installed (`python3 exporter/gpu_release.py image`), so make can read it on a
host that has only Docker and a Python 3, and the image build can run it before vitserve is installed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

TRITON_RELEASE = "25.11"  # NGC <yy.mm>
TRITON_IMAGE = f"nvcr.io/nvidia/tritonserver:{TRITON_RELEASE}-py3"
IMAGE_PYTHON = "3.12"  # the image's system Python, which the python backend's stub runs

# Inside the serving image: which TensorRT it carries and which Python package was installed for it,
# written while the image is built (`image-tensorrt` below, then `vitserve.perf.gpu_check self-check`).
IMAGE_TENSORRT_RECORD = "/opt/vitserve/tensorrt.json"

# DOCUMENTATION ONLY, UNVERIFIED: the TensorRT that Triton's compatibility table lists for the
# 25.11 `-trtllm-python-py3` image (10.13.3.9, CUDA 13). The plain `-py3` image may carry another one;
# the image build never uses this (it reads its own libnvinfer). It is what hints name as "expected",
# and what the host-side `gpu` extra of pyproject.toml pins (a test keeps them equal); plans that serve
# are built inside the image, with the image's TensorRT.
TENSORRT_VERSION = "10.13.3.9"
CUDA_MAJOR = 13
TENSORRT_PIP = f"tensorrt-cu{CUDA_MAJOR}=={'.'.join(TENSORRT_VERSION.split('.')[:3])}.*"


def version_tuple(version: str, parts: int = 3) -> tuple[int, ...]:
    """ "10.13.3.9" -> (10, 13, 3): the components that decide whether a plan loads (build numbers do not
    appear in libnvinfer's own version number, getInferLibVersion())."""
    match = re.match(r"^\s*(\d+(?:\.\d+)*)", str(version))
    numbers = tuple(int(x) for x in match.group(1).split(".")) if match else ()
    if len(numbers) < parts:
        raise ValueError(f"TensorRT version {version!r}: expected numbers like 10.13.3")
    return numbers[:parts]


# ----------------------------------------------------------------------------------------- inside the image

# NVIDIA's TensorRT packages: `libnvinfer10  10.13.3.9-1+cuda13.0` (package, Debian version: upstream
# version, package revision, the CUDA it was built for).
_DPKG_PACKAGE = re.compile(r"^libnvinfer(\d+)$")
_DPKG_VERSION = re.compile(r"^(?:\d+:)?(\d+\.\d+\.\d+(?:\.\d+)?)-[^+]*\+cuda(\d+)\.(\d+)")
# The runtime library's real file: libnvinfer.so.10.13.3 (libnvinfer.so.10 is the soname link).
_LIB_FILE = re.compile(r"^libnvinfer\.so\.(\d+)\.(\d+)\.(\d+)$")
_CUDART_FILE = re.compile(r"^libcudart\.so\.(\d+)(?:\.\d+)*$")
DPKG_QUERY = ["dpkg-query", "-W", "-f=${Package}\\t${Version}\\t${db:Status-Abbrev}\\n", "libnvinfer*"]
LIB_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib/sbsa-linux-gnu",
    "/usr/local/tensorrt/lib",
    "/opt/tensorrt/lib",
    "/usr/local/cuda/lib64",
)


class ImageTensorRTError(RuntimeError):
    """The image's TensorRT could not be read, or its sources disagree."""


def parse_dpkg_libnvinfer(text: str) -> tuple[str, int] | None:
    """`dpkg-query -W -f='${Package}\\t${Version}\\t${db:Status-Abbrev}\\n' 'libnvinfer*'` -> (TensorRT
    version, CUDA major) of the installed libnvinfer runtime package (libnvinfer10, libnvinfer11), or
    None when none is installed. Packages that are known but not installed (status not `ii`) and the
    other libnvinfer packages (-dev, -bin, -plugin10, -lean10, ...) are ignored."""
    found: set[tuple[str, int]] = set()
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) < 2 or not _DPKG_PACKAGE.match(fields[0].strip()):
            continue
        if len(fields) >= 3 and not fields[2].strip().startswith("ii"):
            continue
        m = _DPKG_VERSION.match(fields[1].strip())
        if m:
            found.add((m.group(1), int(m.group(2))))
    if len(found) > 1:
        raise ImageTensorRTError(f"more than one libnvinfer package is installed: {sorted(found)}")
    return found.pop() if found else None


def parse_libnvinfer_files(names: list[str]) -> str | None:
    """File names (as in a library directory) -> the TensorRT version of libnvinfer.so.X.Y.Z, or None.
    Only the real file counts (libnvinfer.so.10 is the soname link; plugin/lean/dispatch libraries are
    other files)."""
    found = {".".join(m.groups()) for m in map(_LIB_FILE.match, names) if m}
    if len(found) > 1:
        raise ImageTensorRTError(f"more than one libnvinfer is in the image: {sorted(found)}")
    return found.pop() if found else None


def cuda_major(cuda_version_env: str | None, names: list[str]) -> int | None:
    """The image's CUDA major version: NGC images set CUDA_VERSION (e.g. 13.0.2.006); else the
    libcudart.so.N files present."""
    if cuda_version_env and re.match(r"^\d+\.", cuda_version_env):
        return int(cuda_version_env.split(".")[0])
    majors = {int(m.group(1)) for m in map(_CUDART_FILE.match, names) if m}
    return max(majors) if majors else None


def pip_requirement(version: str, cuda: int) -> str:
    """TensorRT's Python package for that libnvinfer: `tensorrt-cu13==10.13.3.9.*` (any post release of
    that build: PyPI has e.g. 10.13.3.9.post1), or `==10.13.3.*` when only the file name's three numbers
    are known."""
    numbers = re.match(r"^\d+(?:\.\d+){2,3}", version)
    if not numbers:
        raise ImageTensorRTError(f"TensorRT version {version!r} is not like 10.13.3.9")
    return f"tensorrt-cu{cuda}=={numbers.group(0)}.*"


def image_tensorrt(
    dpkg_output: str | None, lib_files: list[str], cuda_version_env: str | None
) -> dict[str, object]:
    """What the image carries, from dpkg's record of the libnvinfer package and the libnvinfer.so.X.Y.Z
    file: {"tensorrt", "cuda_major", "requirement", "source"}. The two must agree when both are there;
    neither there is an error naming what was looked at."""
    from_dpkg = parse_dpkg_libnvinfer(dpkg_output or "")
    from_file = parse_libnvinfer_files(lib_files)
    if from_dpkg and from_file and version_tuple(from_dpkg[0]) != version_tuple(from_file):
        raise ImageTensorRTError(
            f"dpkg says libnvinfer {from_dpkg[0]} but the library file is libnvinfer.so.{from_file}"
        )
    if from_dpkg:
        version, cuda, source = (
            from_dpkg[0],
            from_dpkg[1],
            f"dpkg libnvinfer {from_dpkg[0]}+cuda{from_dpkg[1]}",
        )
    elif from_file:
        version, cuda, source = (
            from_file,
            cuda_major(cuda_version_env, lib_files),
            f"libnvinfer.so.{from_file}",
        )
        if cuda is None:
            raise ImageTensorRTError(
                f"libnvinfer.so.{from_file} found, but not the image's CUDA (no CUDA_VERSION, no libcudart.so.N)"
            )
    else:
        raise ImageTensorRTError(
            "no libnvinfer in this image: no installed libnvinfer package (dpkg-query) and no "
            f"libnvinfer.so.X.Y.Z in {', '.join(LIB_DIRS)} or LD_LIBRARY_PATH; is the base a Triton GPU image?"
        )
    return {
        "tensorrt": version,
        "cuda_major": cuda,
        "requirement": pip_requirement(version, cuda),
        "source": source,
    }


def read_image_tensorrt() -> dict[str, object]:
    """`image_tensorrt` on this machine (run inside the image while it is built)."""
    try:
        dpkg = subprocess.run(DPKG_QUERY, capture_output=True, text=True, check=False).stdout
    except OSError:
        dpkg = None
    dirs = [*LIB_DIRS, *filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(":"))]
    files = sorted({p.name for d in dirs if Path(d).is_dir() for p in Path(d).iterdir()})
    return image_tensorrt(dpkg, files, os.environ.get("CUDA_VERSION"))


FIELDS = {
    "release": TRITON_RELEASE,
    "image": TRITON_IMAGE,
    "python": IMAGE_PYTHON,
    "record": IMAGE_TENSORRT_RECORD,
    "tensorrt-pip": TENSORRT_PIP,  # the host-side `gpu` extra (documentation pin, unverified; not the image's)
}


def main(argv: list[str]) -> int:
    """`FIELD` prints one of FIELDS; `image-tensorrt RECORD` (inside the image) reads its TensorRT,
    writes RECORD and prints the pip requirement to install."""
    if len(argv) == 2 and argv[0] == "image-tensorrt":
        try:
            record = read_image_tensorrt()
        except ImageTensorRTError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        Path(argv[1]).parent.mkdir(parents=True, exist_ok=True)
        Path(argv[1]).write_text(json.dumps(record, indent=1) + "\n")
        print(f"this image's TensorRT: {record['source']} -> {record['requirement']}", file=sys.stderr)
        print(record["requirement"])
        return 0
    if len(argv) != 1 or argv[0] not in FIELDS:
        print(f"usage: gpu_release.py {{{'|'.join(FIELDS)}}} | image-tensorrt RECORD", file=sys.stderr)
        return 2
    print(FIELDS[argv[0]])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
