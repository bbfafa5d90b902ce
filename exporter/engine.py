"""Engine stage: ONNX -> TensorRT plan (`model.plan` for Triton's tensorrt_plan backend).

The network is strongly typed: precision comes from the ONNX itself (ModelOpt AutoCast for FP16,
explicit Q/DQ nodes for INT8), never from builder flags. TensorRT 11 removed BuilderFlag.FP16/INT8 and
the INT8 calibrator, makes every network strongly typed and keeps the STRONGLY_TYPED creation flag and
trtexec's `--stronglyTyped` only as no-ops (TensorRT 11.1 source: python/src/infer/pyCore.cpp,
samples/common/sampleOptions.cpp; "Migrating from TensorRT 10.x to 11.x" in the TensorRT docs). We still
pass both, because on TensorRT 10.x they are what makes the build strongly typed.

A plan is tied to the TensorRT version that built it and to the GPU architecture it was built on.
`hardware_compatibility="ampere+"` lifts the second tie (Ampere and newer, some speed lost) and
`version_compatible=True` lifts the first for later TensorRT releases of the same major version;
Triton then needs `--backend-config=tensorrt,version-compatible=true` (tensorrt_backend README).
Otherwise build inside the very NGC container that will serve the plan: Triton's TensorRT backend uses
the TensorRT shipped in its image. `write_build_script` writes that recipe as a `build.sh`.

Which TensorRT each Triton image carries (checked 2026-11-27): triton-inference-server/server
`docs/introduction/compatibility.md` (commit e1db8a6, 2026-08-19) lists, for the
`nvcr.io/nvidia/tritonserver:<yy.mm>-trtllm-python-py3` images, TensorRT 10.11.0.33 in 25.08-25.10,
10.13.3.9 in 25.11-26.02 and 10.14.1.48 in 26.03-26.07. For the plain `<yy.mm>-py3` image it points to
NVIDIA's Frameworks Support Matrix, which we could not read; no Triton release we could read names
TensorRT 11. So check inside the image (trtexec prints its version first, `[TensorRT v110100]`) and
compare it with the `tensorrt_version` recorded by `build_engine`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from vitserve.errors import ConfigError, ExportError
from vitserve.exporter.config import BatchProfile

log = logging.getLogger(__name__)

MAX_BUILDER_OPTIMIZATION_LEVEL = 5  # trtexec --help: "integers from 0 to ... currently 5"

# Our spelling -> (trt.HardwareCompatibilityLevel member, trtexec --hardwareCompatibilityLevel value).
HARDWARE_COMPATIBILITY = {
    "ampere+": ("AMPERE_PLUS", "ampere+"),
    "same-compute-capability": ("SAME_COMPUTE_CAPABILITY", "sameComputeCapability"),
}

CONTAINER_HINT = (
    "run the build.sh next to it inside the NGC Triton container (nvcr.io/nvidia/tritonserver) that "
    "will serve the engine, on the GPU model it will serve on"
)


def check_profile(profile: BatchProfile, max_batch_size: int) -> None:
    """Refuse a batch profile the model cannot take, naming the numbers, before anything is built.

    BatchProfile refuses min > opt > max when it is made; this adds the model's own limit (its max batch
    size), so a bad profile fails here and not minutes into a TensorRT build.
    """
    if not profile.min <= profile.opt <= profile.max:
        raise ConfigError(
            f"batch profile must have min <= opt <= max, got min={profile.min} opt={profile.opt} max={profile.max}"
        )
    profile.check_within(max_batch_size)


@dataclass(frozen=True)
class EngineSettings:
    """How to build one plan: batch profile, builder effort, timing cache and portability options."""

    profile: BatchProfile
    builder_optimization_level: int = 3
    timing_cache: Path | None = None
    hardware_compatibility: str | None = None  # None | "ampere+" | "same-compute-capability"
    version_compatible: bool = False
    workspace_mb: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "profile", BatchProfile.parse(self.profile))
        level = self.builder_optimization_level
        if (
            not isinstance(level, int)
            or isinstance(level, bool)
            or not 0 <= level <= MAX_BUILDER_OPTIMIZATION_LEVEL
        ):
            raise ConfigError(
                f"builder_optimization_level={level!r}: must be an integer from 0 to "
                f"{MAX_BUILDER_OPTIMIZATION_LEVEL}"
            )
        if self.timing_cache is not None:
            object.__setattr__(self, "timing_cache", Path(self.timing_cache))
        if (
            self.hardware_compatibility is not None
            and self.hardware_compatibility not in HARDWARE_COMPATIBILITY
        ):
            choices = ", ".join(repr(c) for c in HARDWARE_COMPATIBILITY)
            raise ConfigError(
                f"hardware_compatibility={self.hardware_compatibility!r}: expected None or one of {choices}"
            )
        if not isinstance(self.version_compatible, bool):
            raise ConfigError(f"version_compatible={self.version_compatible!r}: must be true or false")
        mb = self.workspace_mb
        if mb is not None and (not isinstance(mb, int) or isinstance(mb, bool) or mb < 1):
            raise ConfigError(f"workspace_mb={mb!r}: must be a positive integer (MiB) or None")


def _check_io(input_name: str, chw: tuple[int, int, int]) -> None:
    # trtexec's shape spec is "name:1x3x224x224[,name2:...]", so these characters cannot be passed.
    if not input_name or not input_name.isprintable() or any(c in input_name for c in ":,'\" "):
        raise ConfigError(f"input name {input_name!r}: must be non-empty, without ':', ',', quotes or spaces")
    if len(chw) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in chw):
        raise ConfigError(f"input shape {chw!r}: expected three positive integers (channels, height, width)")


def trtexec_command(
    onnx_path: str | Path,
    plan_path: str | Path,
    input_name: str,
    chw: tuple[int, int, int],
    settings: EngineSettings,
) -> list[str]:
    """The trtexec argv that builds the same plan as `build_engine` (flag spellings from TensorRT 11.1).

    Paths are used as given, so the caller decides whether they are relative (build.sh) or absolute.
    """
    _check_io(input_name, chw)
    c, h, w = chw
    p = settings.profile

    def shape(batch: int) -> str:
        return f"{input_name}:{batch}x{c}x{h}x{w}"

    cmd = [
        "trtexec",
        f"--onnx={onnx_path}",
        f"--minShapes={shape(p.min)}",
        f"--optShapes={shape(p.opt)}",
        f"--maxShapes={shape(p.max)}",
        "--stronglyTyped",
    ]
    if settings.timing_cache is not None:
        cmd.append(f"--timingCacheFile={settings.timing_cache}")
    cmd += [f"--saveEngine={plan_path}", f"--builderOptimizationLevel={settings.builder_optimization_level}"]
    if settings.workspace_mb is not None:
        cmd.append(f"--memPoolSize=workspace:{settings.workspace_mb}M")
    if settings.hardware_compatibility is not None:
        cmd.append(
            f"--hardwareCompatibilityLevel={HARDWARE_COMPATIBILITY[settings.hardware_compatibility][1]}"
        )
    if settings.version_compatible:
        cmd.append("--versionCompatible")
    cmd.append("--skipInference")  # build only; run_engine and the parity checks verify numbers
    return cmd


def _atomic_write(path: Path, data: bytes | memoryview, mode: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _relative_to(path: Path, directory: Path) -> str:
    """`path` as seen from `directory`: relative when they share a top folder, else absolute."""
    path, directory = Path(os.path.abspath(path)), Path(os.path.abspath(directory))
    if os.path.commonpath([path, directory]) == path.anchor:
        return str(path)
    return os.path.relpath(path, directory)


def _flag_value(cmd: list[str], prefix: str) -> str:
    """The value of the `prefix` flag (e.g. "--saveEngine=") in a trtexec argv."""
    return next(a[len(prefix) :] for a in cmd if a.startswith(prefix))


def write_build_script(
    directory: str | Path,
    onnx_path: str | Path,
    plan_path: str | Path,
    input_name: str,
    chw: tuple[int, int, int],
    settings: EngineSettings,
) -> Path:
    """Write `directory/build.sh`: the trtexec command that builds the plan, to run in the serving container.

    Paths inside are relative to the script's own folder (it cd's there first), so the tree can be moved
    or mounted elsewhere as a whole. Written to a temporary name and renamed when whole.
    """
    directory = Path(directory)
    for path in (directory, onnx_path, plan_path, settings.timing_cache):
        if path is not None and not str(path).isprintable():
            raise ConfigError(f"path {str(path)!r}: line breaks and control characters cannot go in build.sh")
    timing_cache = settings.timing_cache
    if timing_cache is not None:
        timing_cache = Path(_relative_to(timing_cache, directory))
    cmd = trtexec_command(
        _relative_to(Path(onnx_path), directory),
        _relative_to(Path(plan_path), directory),
        input_name,
        chw,
        replace(settings, timing_cache=timing_cache),
    )
    p = settings.profile
    outputs = [_flag_value(cmd, "--saveEngine=")] + ([str(timing_cache)] if timing_cache is not None else [])
    args = " \\\n    ".join(shlex.quote(a) for a in cmd[1:])
    script = f"""#!/usr/bin/env bash
# Builds the TensorRT plan {shlex.quote(_flag_value(cmd, "--saveEngine="))} (written by vitserve.exporter.engine).
#
# Run it INSIDE the NGC Triton container (nvcr.io/nvidia/tritonserver:<yy.mm>-py3) whose TensorRT matches
# the server that will load the plan, on the GPU model it will run on: a plan only loads in the TensorRT
# version that built it and, unless built with a hardware compatibility level, on the same GPU
# architecture. trtexec prints its TensorRT version on its first line.
#
# Input {input_name}: batch min={p.min} opt={p.opt} max={p.max}, {chw[0]}x{chw[1]}x{chw[2]}. The network is
# strongly typed: FP16/INT8 come from the ONNX (AutoCast / Q/DQ), not from trtexec flags.
# Set TRTEXEC=/path/to/trtexec when it is not on PATH.
set -euo pipefail
cd "$(dirname "${{BASH_SOURCE[0]}}")"

TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
if ! command -v "$TRTEXEC" >/dev/null; then
    echo "trtexec not found (looked on PATH and at $TRTEXEC); run this inside the Triton container" >&2
    exit 127
fi
mkdir -p {" ".join(shlex.quote(os.path.dirname(o) or ".") for o in outputs)}

"$TRTEXEC" \\
    {args}
"""
    path = directory / "build.sh"
    _atomic_write(path, script.encode(), mode=0o755)
    return path


def _gpu() -> tuple[str | None, str | None]:
    """(GPU name, compute capability "9.0") of device 0, or (None, None) when no GPU is visible."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return torch.cuda.get_device_name(0), f"{major}.{minor}"
        return None, None
    except ImportError:
        pass
    try:
        from cuda.bindings import runtime as cudart

        err, prop = cudart.cudaGetDeviceProperties(0)
        if err == cudart.cudaError_t.cudaSuccess:
            name = prop.name.split(b"\0", 1)[0].decode() if isinstance(prop.name, bytes) else str(prop.name)
            return name, f"{prop.major}.{prop.minor}"
    except ImportError:
        pass
    return None, None


def tensorrt_unavailable_reason() -> str | None:
    """None when `import tensorrt` works and a CUDA GPU is visible, else why not (for messages and skips)."""
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError, RuntimeError) as e:  # a wheel without its libraries fails with these
        return f"the tensorrt Python package cannot be imported ({e})"
    if _gpu()[0] is None:
        return "no CUDA GPU is visible"
    return None


def _tensorrt():
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise ExportError(f"TensorRT not available: {reason}")
    import tensorrt as trt

    return trt


def engine_metadata(settings: EngineSettings) -> dict[str, Any]:
    """What a plan built now with `settings` is tied to: TensorRT version, GPU, profile and build options.

    Unknown fields (no TensorRT, no GPU) are None. `build_engine` adds build time and the plan's sha256.
    """
    try:
        import tensorrt as trt

        trt_version = trt.__version__
    except ImportError:
        trt_version = None
    gpu_name, capability = _gpu()
    p = settings.profile
    return {
        "tensorrt_version": trt_version,
        "gpu_name": gpu_name,
        "compute_capability": capability,
        "profile": {"min": p.min, "opt": p.opt, "max": p.max},
        "builder_optimization_level": settings.builder_optimization_level,
        "hardware_compatibility": settings.hardware_compatibility,
        "version_compatible": settings.version_compatible,
        "workspace_mb": settings.workspace_mb,
    }


def _logger(trt):
    class Logger(trt.ILogger):
        """Forwards TensorRT messages to logging and keeps the errors for the exception message."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg) -> None:
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return Logger()


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    input_name: str,
    chw: tuple[int, int, int],
    settings: EngineSettings,
    *,
    max_batch_size: int | None = None,
) -> dict[str, Any]:
    """Build a strongly typed TensorRT plan from `onnx_path` and write it to `plan_path`; return its metadata.

    Writes `build.sh` (the equivalent trtexec command) next to the plan first, then, when TensorRT and a GPU
    are present, parses the ONNX (every parser error is reported), builds with one optimization profile
    over the batch axis and writes the plan atomically. The timing cache, when set, is loaded if present
    and saved after the build. Without TensorRT it raises ExportError naming the build.sh to run instead.
    """
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    _check_io(input_name, chw)
    if max_batch_size is not None:
        check_profile(settings.profile, max_batch_size)
    if not onnx_path.is_file():
        raise ExportError(f"ONNX model {onnx_path} does not exist; run the export stage first")
    script = write_build_script(plan_path.parent, onnx_path, plan_path, input_name, chw, settings)

    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise ExportError(
            f"TensorRT not available: {reason}. To build {plan_path.name}, {CONTAINER_HINT}: {script}"
        )
    import tensorrt as trt

    logger = _logger(trt)
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors
        raise ExportError(
            f"TensorRT could not parse {onnx_path} ({len(errors)} error(s)):\n  " + "\n  ".join(errors)
        )
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    if input_name not in inputs:
        raise ExportError(f"{onnx_path} has no input {input_name!r}; its inputs are {sorted(inputs)}")
    batch, *dims = inputs[input_name]
    if len(dims) != 3 or any(d not in (-1, want) for d, want in zip(dims, chw, strict=True)):
        raise ExportError(
            f"{onnx_path} input {input_name!r} has shape {inputs[input_name]}, expected [batch, "
            f"{chw[0]}, {chw[1]}, {chw[2]}]"
        )
    p = settings.profile
    if batch != -1 and not p.min == p.max == batch:
        raise ExportError(
            f"{onnx_path} input {input_name!r} has a fixed batch of {batch}, so profile "
            f"min={p.min} opt={p.opt} max={p.max} cannot be built; export it with a dynamic batch axis"
        )

    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (p.min, *chw), (p.opt, *chw), (p.max, *chw))
    config.add_optimization_profile(profile)
    config.builder_optimization_level = settings.builder_optimization_level
    if settings.workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    if settings.hardware_compatibility is not None:
        member = HARDWARE_COMPATIBILITY[settings.hardware_compatibility][0]
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, member)
    if settings.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    cache_path = settings.timing_cache
    if cache_path is not None:
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            raise ExportError(
                f"timing cache {cache_path} cannot be used here (corrupt, or made on another GPU or "
                "TensorRT version); delete it or give each GPU/TensorRT pair its own file"
            )

    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if plan is None:
        detail = "\n  ".join(logger.errors) or "no error message from TensorRT"
        raise ExportError(f"TensorRT could not build an engine from {onnx_path}:\n  {detail}")
    data = memoryview(plan)
    _atomic_write(plan_path, data)
    if cache_path is not None:
        _atomic_write(cache_path, memoryview(config.get_timing_cache().serialize()))
    meta = engine_metadata(settings)
    meta.update(
        build_seconds=round(seconds, 3),
        plan_sha256=hashlib.sha256(data).hexdigest(),
        plan_bytes=data.nbytes,
        input_name=input_name,
        chw=list(chw),
    )
    return meta


def run_engine(
    plan_path: str | Path, pixel_values: np.ndarray, *, version_compatible: bool = False
) -> dict[str, np.ndarray]:
    """Run a plan once on the GPU (for verification): `pixel_values` [N, C, H, W] -> {output name: array}.

    Uses TensorRT's name-based I/O (set_input_shape, set_tensor_address, execute_async_v3) with torch CUDA
    tensors as buffers. `version_compatible=True` lets TensorRT run the lean runtime embedded in such plans.
    """
    trt = _tensorrt()
    import torch

    plan_path = Path(plan_path)
    logger = _logger(trt)
    runtime = trt.Runtime(logger)
    if version_compatible:
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        detail = "; ".join(logger.errors)
        raise ExportError(
            f"TensorRT could not load {plan_path} ({detail}); plans only load with the TensorRT version and "
            "GPU architecture that built them"
        )
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    if len(inputs) != 1:
        raise ExportError(f"{plan_path} has inputs {inputs}; run_engine feeds exactly one")

    def torch_dtype(name: str) -> torch.dtype:
        return torch.from_numpy(np.empty(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype

    name = inputs[0]
    x = torch.from_numpy(np.ascontiguousarray(pixel_values)).to(device="cuda", dtype=torch_dtype(name))
    if not context.set_input_shape(name, tuple(x.shape)):
        lo, _, hi = (tuple(s) for s in engine.get_tensor_profile_shape(name, 0))
        raise ExportError(
            f"{plan_path}: input {name} shape {tuple(x.shape)} is outside the profile {lo}..{hi}"
        )
    context.set_tensor_address(name, x.data_ptr())
    outputs = {}
    for n in names:
        if n != name:
            outputs[n] = torch.empty(tuple(context.get_tensor_shape(n)), dtype=torch_dtype(n), device="cuda")
            context.set_tensor_address(n, outputs[n].data_ptr())
    # Its own stream (TensorRT warns about extra syncs on the default one), ordered after the copy of x.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    if not context.execute_async_v3(stream.cuda_stream):
        raise ExportError(f"TensorRT failed to run {plan_path}: {'; '.join(logger.errors)}")
    stream.synchronize()
    return {n: t.cpu().numpy() for n, t in outputs.items()}
