"""Triton python-backend model: an ONNX backbone run by onnxruntime on the CPU.

The pip-installed tritonserver has only the python backend; this model lets the same repository serve on
CPU-only hosts. All requests of a dynamic batch run as one onnxruntime call, then are split back.
Self-contained (numpy + onnxruntime): the repository may be built on one machine and served on another,
so everything that depends on the serving host is decided here, when the model loads:

- threads: the cores this process may use (CPU affinity, cgroup quota) divided among the model's instances
  and the repository's CPU backbones that serve at once (`share`), unless `intra_op_threads` is a number;
- cpu-int8 flavour: onnxruntime's u8s8 int8 kernels saturate on x86 hosts without VNNI, so the build ships
  a `vnni` flavour (full-range weights, exact with VNNI) and an `avx2` one (7-bit weights, exact on every
  x86-64 host). The host's CPU flags pick one (`VITSERVE_CPU_ISA=vnni|avx2` overrides the detection), and
  the pick must reproduce, on a held-out probe batch, the embeddings its exact arithmetic gave at build
  time (where the fidelity gate was applied) before it serves; otherwise the next flavour is tried, and
  with none left the model refuses to load. The log says which flavour serves and why.
Parameters (JSON in `onnx_cpu`): intra_op_threads ("auto" or N), share, optimization, flavours, probe,
probe_min_cosine, isa (vnni | avx2: pin the int8 ISA instead of detecting it), allow_spinning (true | false:
onnxruntime's `session.intra_op.allow_spinning`; absent: onnxruntime's default, on).
"""

from __future__ import annotations

import json
import os

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:
    pb_utils = None

ISA_ENV = "VITSERVE_CPU_ISA"
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# Same names as vitserve.exporter.onnxrt.OPTIMIZATION_LEVELS (self-contained copy: no vitserve import here).
OPTIMIZATION_LEVELS = ("all", "extended", "basic", "disabled")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU flags of this host (the `flags` line of /proc/cpuinfo)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def int8_isa(flags: set[str], env: dict[str, str] | None = None, forced: str | None = None) -> str:
    """'vnni' when the host sums int8 products exactly in int32 (AVX512-VNNI, AVX-VNNI or AMX), else
    'avx2'. `forced` (the model's `isa` parameter), then `VITSERVE_CPU_ISA`, override the detection, e.g. to
    rehearse serving on another host."""
    env = os.environ if env is None else env
    for source, value in (("isa parameter", forced), (ISA_ENV, env.get(ISA_ENV))):
        value = (value or "").strip().lower()
        if value:
            if value not in ("vnni", "avx2"):
                raise ValueError(f"{source}={value!r}: expected 'vnni' or 'avx2'")
            return value
    return "vnni" if any(f in flags for f in VNNI_FLAGS) else "avx2"


def flavour_order(isa: str, available: list[str]) -> list[str]:
    """Flavours to try on a host of `isa`, best first: its own, then the portable `avx2` one."""
    order = [isa] + [f for f in ("avx2",) if f != isa]
    return [f for f in order if f in available]


def usable_cores(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota (v2 cpu.max or v1
    cfs_quota_us / cfs_period_us) as containers and Kubernetes limits set it."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = None
    try:
        with open(os.path.join(cgroup_root, "cpu.max")) as f:
            q, p = f.read().split()[:2]
            if q != "max":
                quota = int(q) / int(p)
    except (OSError, ValueError):
        try:
            with open(os.path.join(cgroup_root, "cpu", "cpu.cfs_quota_us")) as f:
                q = int(f.read())
            with open(os.path.join(cgroup_root, "cpu", "cpu.cfs_period_us")) as f:
                p = int(f.read())
            if q > 0 and p > 0:
                quota = q / p
        except (OSError, ValueError):
            pass
    if quota is not None:
        cores = min(cores, max(1, int(quota)))
    return max(1, cores)


def choose_threads(setting, cores: int, instances: int, share: int) -> int:
    """onnxruntime intra-op threads for one instance: `setting` when it is a number, else the cores
    divided among every instance of the CPU backbones that serve at once (at least 1)."""
    if setting not in (None, "", "auto"):
        return max(1, int(setting))
    return max(1, cores // max(1, instances * share))


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The lowest row-wise cosine between `a` and `b`."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.min((a * b).sum(1) / np.maximum(den, 1e-300)))


def _log(msg: str, error: bool = False) -> None:
    logger = getattr(pb_utils, "Logger", None)
    if logger is None:
        print(msg, flush=True)
    else:
        (logger.log_error if error else logger.log_info)(msg)


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        params = json.loads(config["parameters"]["onnx_cpu"]["string_value"])
        name = config["name"]
        folder = os.path.join(args["model_repository"], args["model_version"])
        instances = sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or 1
        cores = usable_cores()
        threads = choose_threads(
            params.get("intra_op_threads"), cores, instances, int(params.get("share", 1))
        )
        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[params.get("optimization", "all")]
        so.intra_op_num_threads = threads
        spinning = params.get("allow_spinning")
        if spinning is not None:
            # onnxruntime's idle intra-op threads spin by default: they take cores from the other instances
            # and the preprocess model; `vitserve tune` measures whether that pays on this host
            so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        so.log_severity_level = 3
        self.input_name = config["input"][0]["name"]
        self.outputs = [o["name"] for o in config["output"]]

        flavours = params.get("flavours") or {}
        if not flavours:
            self.session = ort.InferenceSession(
                os.path.join(folder, "model.onnx"), so, providers=["CPUExecutionProvider"]
            )
            _log(
                f"{name}: onnxruntime CPU, {threads} thread(s) ({cores} usable core(s), {instances} instance(s)), "
                f"spinning {'default' if spinning is None else spinning}"
            )
            return
        isa = int8_isa(cpu_flags(), forced=params.get("isa"))
        probe = np.load(os.path.join(folder, params["probe"]))
        min_cos = float(params["probe_min_cosine"])
        tried = []
        for flavour in flavour_order(isa, list(flavours)):
            session = ort.InferenceSession(
                os.path.join(folder, flavours[flavour]), so, providers=["CPUExecutionProvider"]
            )
            got = session.run(["embeddings"], {self.input_name: probe["pixel_values"]})[0]
            cos = min_cosine(probe[f"embeddings_{flavour}"], got)
            tried.append(f"{flavour}: probe cosine {cos:.6f}")
            if cos >= min_cos:
                self.session = session
                _log(
                    f"{name}: cpu-int8 flavour '{flavour}' for host int8 ISA '{isa}' "
                    f"(probe: cosine {cos:.6f} >= {min_cos} to its verified arithmetic), {threads} thread(s) "
                    f"({cores} usable core(s))"
                )
                if len(tried) > 1:
                    _log(
                        f"{name}: flavours refused on this host before it: {'; '.join(tried[:-1])}",
                        error=True,
                    )
                return
            _log(
                f"{name}: cpu-int8 flavour '{flavour}' does not compute its verified embeddings on this host "
                f"(probe cosine {cos:.6f} < {min_cos}): its int8 kernels saturate; trying the next flavour",
                error=True,
            )
        raise RuntimeError(
            f"{name}: no cpu-int8 flavour computes its verified embeddings on this host (int8 ISA '{isa}', "
            f"probe cosine must be >= {min_cos}): {'; '.join(tried) or 'no flavour for this ISA'}. "
            f"Serve the fp32 model instead, or rebuild with `make engines` (it builds every flavour)."
        )

    def execute(self, requests):
        try:
            arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
            batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            results = self.session.run(
                self.outputs, {self.input_name: np.ascontiguousarray(batch, np.float32)}
            )
        except Exception as e:  # one response per request, never an exception out of execute()
            err = pb_utils.TritonError(f"onnxruntime failed: {type(e).__name__}: {e}")
            return [pb_utils.InferenceResponse(error=err) for _ in requests]
        responses, start = [], 0
        for a in arrays:
            stop = start + len(a)
            tensors = [
                pb_utils.Tensor(n, np.ascontiguousarray(r[start:stop]))
                for n, r in zip(self.outputs, results, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start = stop
        return responses
