"""Triton python-backend model: an ONNX backbone run by onnxruntime on the CPU.

The pip-installed tritonserver has only the python backend; this model lets the same repository serve on
CPU-only hosts. All requests of a dynamic batch run as one onnxruntime call, then are split back.
Self-contained (numpy + onnxruntime): the repository may be built on one machine and served on another,
so everything that depends on the serving host is decided here, when the model loads:

- threads: the cores this process may use (CPU affinity, cgroup quota) divided among the model's instances
  and the repository's CPU backbones that serve at once (`share`), unless `cpu_threads` is a number;
- cpu-int8 flavour: onnxruntime's u8s8 int8 kernels saturate on x86 hosts without VNNI, so the build ships
  a `vnni` flavour (full-range weights, exact with VNNI) and an `avx2` one (7-bit weights, exact on every
  x86-64 host). The host's CPU flags pick one (`VITSERVE_CPU_ISA=vnni|avx2` overrides the detection), and
  the pick must reproduce, on a held-out probe batch, the embeddings its exact arithmetic gave at build
  time (where the fidelity gate was applied) before it serves; otherwise the next flavour is tried, and
  with none left the model refuses to load. The log says which flavour serves and why;
- lanes: a batch of at least `lanes` images is split into `lanes` slices that run at once, each on its own
  core(s) through a second, narrow session (threads // lanes intra-op threads; one thread has no thread
  pool, so no barrier waits on a core that Triton, the preprocess model or the client took); a smaller
  batch, a lone request above all, runs on the wide session with every thread. On the 2-core ViT-B-32
  host, in-process (perf/results/lanes.md): 2 x 1-thread slices of batch 8-16 run 1.2x (cpu-int8) and
  1.07x (fp32) the images/s of one 2-thread session, while a lone image on 2 threads takes about half the
  time it takes on 1. The narrow session holds a second copy of the weights: `lanes` 1 turns it off, and
  "auto" does so above LANES_AUTO_MAX_BYTES of weights.
Parameters: `CpuBackboneParams` of contract.py (JSON in config.pbtxt `onnx_cpu`), validated when the model
loads: cpu_threads ("auto" or N), share, cpu_lanes ("auto" or N; 1: off), optimization, cpu_spinning (true |
false: onnxruntime's `session.intra_op.allow_spinning` of the wide session; absent: onnxruntime's default,
on), flavours, probe, probe_min_cosine, isa (vnni | avx2: pin the int8 ISA instead of detecting it).
"""

from __future__ import annotations

import itertools
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

if __package__:  # part of the vitserve package (the exporter, perf, tests)
    from vitserve import contract
else:  # served by Triton: the repository copies vitserve/contract.py next to this model.py
    import vitserve_contract as contract

try:
    import triton_python_backend_utils as pb_utils
except ImportError:
    pb_utils = None

ISA_ENV = "VITSERVE_CPU_ISA"
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# `lanes: auto` keeps one session (no second copy of the weights) for models larger than this
LANES_AUTO_MAX_BYTES = 2 * 1024**3


def graph_optimization_level(name: str):
    """onnxruntime's GraphOptimizationLevel for one of contract.OPTIMIZATION_LEVELS."""
    import onnxruntime as ort

    if name not in contract.OPTIMIZATION_LEVELS:
        raise ValueError(f"optimization {name!r}: expected one of {contract.OPTIMIZATION_LEVELS}")
    return {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[name]


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
            if value not in contract.INT8_ISAS:
                raise ValueError(f"{source}={value!r}: expected one of {', '.join(contract.INT8_ISAS)}")
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


def choose_lanes(setting, threads: int, model_bytes: int) -> tuple[int, str]:
    """How many slices a batch is cut into (1: no narrow session), and why. "auto": one lane per intra-op
    thread when there are two or more and the weights are at most LANES_AUTO_MAX_BYTES (the narrow session
    holds a second copy); a number is taken as it is, capped by the threads."""
    if setting in (None, "", "auto"):
        if threads < 2:
            return 1, "one thread"
        if model_bytes > LANES_AUTO_MAX_BYTES:
            return 1, f"weights {model_bytes / 1024**3:.1f} GiB > {LANES_AUTO_MAX_BYTES / 1024**3:.0f} GiB"
        return threads, "auto: one lane per thread"
    lanes = int(setting)
    if lanes < 1:
        raise ValueError(f"lanes={setting!r}: expected 'auto' or an integer >= 1")
    return min(lanes, threads), "set"


def split_rows(n: int, lanes: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of the slices a batch of `n` runs as: `lanes` near-equal slices when there
    are at least `lanes` rows, else the whole batch at once."""
    if lanes < 2 or n < lanes:
        return [(0, n)]
    bounds = [n * i // lanes for i in range(lanes + 1)]
    return list(itertools.pairwise(bounds))


def model_bytes(path: str) -> int:
    """The bytes of an ONNX file's weights: the file and the external-data files (`*.data`) beside it."""
    folder = os.path.dirname(path) or "."
    extra = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".data"))
    return os.path.getsize(path) + extra


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
        params = contract.CpuBackboneParams.from_model_config(
            config
        )  # a malformed parameter fails the load, by name
        name = config["name"]
        folder = os.path.join(args["model_repository"], args["model_version"])
        instances = sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or 1
        cores = usable_cores()
        threads = choose_threads(params.cpu_threads, cores, instances, params.share)
        level = graph_optimization_level(params.optimization)
        spinning = params.cpu_spinning

        def session(path: str, n_threads: int):
            so = ort.SessionOptions()
            so.graph_optimization_level = level
            so.intra_op_num_threads = n_threads
            if spinning is not None and n_threads > 1:
                # onnxruntime's idle intra-op threads spin by default: they take cores from the other
                # instances and the preprocess model; `vitserve tune` measures whether that pays on this host
                so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
            so.log_severity_level = 3
            return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

        self.input_name = config["input"][0]["name"]
        self.outputs = [o["name"] for o in config["output"]]
        self.pool = None
        flavours = params.flavours
        if not flavours:
            path = os.path.join(folder, contract.ONNX_FILE)
            self.session = session(path, threads)
            self._start_lanes(name, params.cpu_lanes, threads, path, session, None)
            _log(
                f"{name}: onnxruntime CPU, {threads} thread(s) ({cores} usable core(s), {instances} instance(s)), "
                f"spinning {'default' if spinning is None else spinning}, {self.lanes_note}"
            )
            return
        isa = int8_isa(cpu_flags(), forced=params.isa)
        probe = np.load(os.path.join(folder, params.probe))
        min_cos = float(params.probe_min_cosine)
        tried = []
        for flavour in flavour_order(isa, list(flavours)):
            path = os.path.join(folder, flavours[flavour])
            wide = session(path, threads)
            cos = self._probe(wide, probe, flavour)
            tried.append(f"{flavour}: probe cosine {cos:.6f}")
            if cos >= min_cos:
                self.session = wide
                # the narrow session runs other kernels' thread partitioning: it proves itself on the probe too
                narrow_cos = self._start_lanes(
                    name, params.cpu_lanes, threads, path, session, (probe, flavour, min_cos)
                )
                _log(
                    f"{name}: cpu-int8 flavour '{flavour}' for host int8 ISA '{isa}' "
                    f"(probe: cosine {cos:.6f}{narrow_cos} >= {min_cos} to its verified arithmetic), "
                    f"{threads} thread(s) ({cores} usable core(s)), {self.lanes_note}"
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

    def _probe(self, session, probe, flavour: str) -> float:
        got = session.run([contract.EMBEDDINGS], {self.input_name: probe[contract.PIXELS]})[0]
        return min_cosine(probe[f"{contract.EMBEDDINGS}_{flavour}"], got)

    def _start_lanes(self, name, setting, threads, path, session, probe) -> str:
        """Open the narrow session and the threads that run a batch's slices at once (see the module
        docstring). With a probe (cpu-int8), the narrow session must pass it too, else lanes stay off.
        Returns the narrow session's probe cosine for the log ('' without one)."""
        self.lanes, why = choose_lanes(setting, threads, model_bytes(path))
        self.lanes_note = f"lanes 1 ({why})"
        if self.lanes < 2:
            return ""
        narrow = session(path, max(1, threads // self.lanes))
        note = ""
        if probe is not None:
            batch, flavour, min_cos = probe
            cos = self._probe(narrow, batch, flavour)
            note = f", narrow {cos:.6f}"
            if cos < min_cos:
                _log(f"{name}: the narrow session misses the probe (cosine {cos:.6f}); lanes off", error=True)
                self.lanes, self.lanes_note = 1, "lanes 1 (narrow session failed the probe)"
                return note
        self.narrow = narrow
        self.pool = ThreadPoolExecutor(self.lanes - 1, thread_name_prefix=f"{name}-lane")
        self.lanes_note = (
            f"lanes {self.lanes} ({why}): a batch of >= {self.lanes} runs as {self.lanes} slices of "
            f"{max(1, threads // self.lanes)} thread(s) each"
        )
        return note

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        """The outputs for `batch`: on the wide session, or as slices on the narrow one, run at once (the
        calling thread runs the first); results are joined back in row order."""
        slices = split_rows(len(batch), self.lanes)
        if len(slices) == 1:
            return self.session.run(self.outputs, {self.input_name: batch})

        def run(rows):
            return self.narrow.run(self.outputs, {self.input_name: batch[rows[0] : rows[1]]})

        rest = [self.pool.submit(run, r) for r in slices[1:]]
        parts = [run(slices[0])] + [f.result() for f in rest]
        return [np.concatenate([p[i] for p in parts]) for i in range(len(self.outputs))]

    def execute(self, requests):
        try:
            arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
            batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            results = self._run(np.ascontiguousarray(batch))  # config.pbtxt's dtype (text: int64 tokens)
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

    def finalize(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True)
