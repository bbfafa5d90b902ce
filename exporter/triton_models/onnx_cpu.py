"""Triton python-backend model: an ONNX backbone run by onnxruntime on the CPU.

The pip-installed tritonserver has only the python backend; this model lets the same repository serve on
CPU-only hosts. All requests of a dynamic batch run as one onnxruntime call, then are split back.
Self-contained (numpy + onnxruntime): the repository may be built on one machine and served on another,
so everything that depends on the serving host is decided here, when the model loads:

- threads: the cores this process may use (CPU affinity, cgroup quota) divided among the model's instances
  and the repository's CPU backbones that serve at once (`share`), unless `cpu_threads` is a number;
- flavour: an engine and a file (contract.CPU_FLAVOURS). The host's CPU class (contract.CPU_ISAS, from its
  flags; `VITSERVE_CPU_ISA` or the `isa` parameter override it) orders the model's flavours best first
  (FLAVOUR_ORDER), and the first one that reproduces, on a held-out probe batch, the embeddings its
  arithmetic gave at build time (where the fidelity gate was applied: cosine >= `probe_min_cosine`) serves;
  otherwise the next. OpenVINO runs the explicit Q/DQ INT8 ONNX (TensorRT's INT8 model) on hosts with VNNI
  or AMX and the FP32 ONNX in bf16 on hosts with AMX; onnxruntime's cpu-int8 flavours (`vnni`: full-range
  weights, `avx2`: 7-bit weights, exact on every x86-64 host; per token by default, exporter/token_int8.py)
  serve the cpu-int8 model, and the int8 model where OpenVINO's int8 does not fit the host (AVX2). Every quantized model carries the FP32 file (FP32_FALLBACK_FILE): a host where no quantized
  flavour passes serves FP32, logged as an error, and the ensemble stays up. OpenVINO missing from the
  serving environment: its flavours are skipped, with a log line;
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
on), flavours, probe, probe_min_cosine, isa (amx | bf16 | vnni | avx2: pin the host's CPU class).

Run as a program (`python -m vitserve.exporter.triton_models.onnx_cpu --probe MODEL_DIR --isa avx2`) it
scores every flavour of a built CPU model on its probe and prints JSON: how tests and perf measure the
probe under another CPU (qemu-user) without a server.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
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
AMX_FLAGS = ("amx_bf16", "amx_int8", "amx_tile")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_O = contract
# Flavours a host of each CPU class tries, best first (a model tries those it has). Measured (ViT-B-32,
# perf/results/cpu_engines.md): on AMX, OpenVINO on the Q/DQ INT8 ONNX runs 1.25-1.44x today's dynamic
# cpu-int8 and its BF16 beats it at batch 8; OpenVINO FP32 runs 1.05x (AMX) to 0.9-1.8x (AVX2, between runs) onnxruntime
# FP32. Without VNNI, OpenVINO's int8 kernels add u8 x s8 pairs in int16 and saturate on full-range weights
# (cosine 0.969 to FP32 on the AVX2 host): an AVX2 host never tries `openvino-int8`, as it never tries `vnni`;
# the int8 model serves its per-token `avx2` flavour there (0.90-0.98x the img/s of per-call dynamic int8).
# With AVX512-BF16 but no AMX (a Xeon with AVX-512 VNNI + BF16), OpenVINO's BF16 ran 0.57-0.77x onnxruntime
# FP32 and its Q/DQ INT8 1.0-1.17x the per-token `vnni` flavour: such a host tries no BF16 (the bf16 model
# serves FP32 there, logged) and the int8 order of a VNNI host.
FLAVOUR_ORDER = {
    "amx": (_O.OPENVINO_INT8, _O.OPENVINO_BF16, "vnni", "avx2", *_O.FP32_FLAVOURS),
    "bf16": (_O.OPENVINO_INT8, "vnni", "avx2", *_O.FP32_FLAVOURS),
    "vnni": (_O.OPENVINO_INT8, "vnni", "avx2", *_O.FP32_FLAVOURS),
    "avx2": ("avx2", *_O.FP32_FLAVOURS),
}
# The probe file's reference each flavour must reproduce (`embeddings_<reference>`, precision.write_probe)
PROBE_REFERENCE = {
    _O.OPENVINO_INT8: "int8",
    _O.OPENVINO_BF16: "bf16",
    "vnni": "vnni",
    "avx2": "avx2",
    _O.OPENVINO_FP32: "fp32",
    _O.ONNXRUNTIME_FP32: "fp32",
}
# OpenVINO's inference precision per flavour (None: its default, bf16 for the non-int8 parts on AMX and
# AVX512-BF16 hosts: as fast as f32 there for the Q/DQ model, 2.9e-4 from its probe reference against 1.7e-4)
OPENVINO_PRECISION = {_O.OPENVINO_INT8: None, _O.OPENVINO_BF16: "bf16", _O.OPENVINO_FP32: "f32"}
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


def host_isa(flags: set[str], env: dict[str, str] | None = None, forced: str | None = None) -> str:
    """The host's CPU class (contract.CPU_ISAS): 'amx' (AMX), 'bf16' (AVX512-BF16), 'vnni' (int8 products
    summed exactly in int32: AVX512-VNNI, AVX-VNNI), else 'avx2'. `forced` (the model's `isa` parameter),
    then `VITSERVE_CPU_ISA`, override the detection, e.g. to rehearse serving on another host, or under
    qemu-user, where /proc/cpuinfo shows the real host's flags."""
    env = os.environ if env is None else env
    for source, value in (("isa parameter", forced), (ISA_ENV, env.get(ISA_ENV))):
        value = (value or "").strip().lower()
        if value:
            if value not in contract.CPU_ISAS:
                raise ValueError(f"{source}={value!r}: expected one of {', '.join(contract.CPU_ISAS)}")
            return value
    if any(f in flags for f in AMX_FLAGS):
        return "amx"
    if any(f in flags for f in BF16_FLAGS):
        return "bf16"
    return "vnni" if any(f in flags for f in VNNI_FLAGS) else "avx2"


def int8_isa(flags: set[str], env: dict[str, str] | None = None, forced: str | None = None) -> str:
    """'vnni' when the host sums int8 products exactly in int32 (AVX512-VNNI, AVX-VNNI or AMX), else
    'avx2' (see `host_isa` for the overrides)."""
    return "avx2" if host_isa(flags, env, forced) == "avx2" else "vnni"


def flavour_order(isa: str, available: list[str], pinned: str | None = None) -> list[str]:
    """Flavours to try on a host of CPU class `isa` (or int8 ISA), best first (FLAVOUR_ORDER), of those
    `available`; a `pinned` one (the `flavour` parameter) first, on any host: its probe still decides."""
    first = [pinned] if pinned in available else []
    return first + [f for f in FLAVOUR_ORDER[isa] if f in available and f not in first]


def have_openvino() -> str | None:
    """None when OpenVINO imports, else why not."""
    try:
        import openvino  # noqa: F401
    except ImportError as e:
        return f"openvino is not installed in the serving environment ({e}); pip install 'vitserve[cpu]'"
    return None


class OpenVinoSession:
    """An OpenVINO CPU compiled model with onnxruntime's `run(output_names, feed)`. `precision`: OpenVINO's
    INFERENCE_PRECISION_HINT (None: its default). `streams` > 1 (lanes): that many streams sharing `threads`,
    and one infer request per calling thread, so slices run at once. Outputs are copied out of the
    request's buffers, which its next call overwrites."""

    def __init__(self, path: str, threads: int, precision: str | None = None, streams: int = 1):
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": streams}
        if streams == 1:
            config["PERFORMANCE_HINT"] = "LATENCY"
        if precision:
            config["INFERENCE_PRECISION_HINT"] = precision
        self.compiled = core.compile_model(core.read_model(path), "CPU", config)
        self._local = threading.local()

    def run(self, names, feed):
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        result = request.infer(feed)
        return [np.array(result[self.compiled.output(n)], copy=True) for n in names]


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


def served_threads(config: dict, params: contract.CpuBackboneParams) -> tuple[int, int, int]:
    """(instances, usable cores, intra-op threads per instance) of a CPU backbone model served with
    `config` (its config as JSON, as Triton hands it to `initialize`) on this host."""
    instances = sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or 1
    cores = usable_cores()
    return instances, cores, choose_threads(params.cpu_threads, cores, instances, params.share)


def choose_threads(setting, cores: int, instances: int, share: int) -> int:
    """onnxruntime intra-op threads for one instance: `setting` when it is a number, else the cores
    divided among every instance of the CPU backbones that serve at once (at least 1)."""
    if setting not in (None, "", "auto"):
        return max(1, int(setting))
    return max(1, cores // max(1, instances * share))


def choose_lanes(setting, threads: int, model_bytes: int, engine: str = "onnxruntime") -> tuple[int, str]:
    """How many slices a batch is cut into (1: no narrow session), and why. "auto": one lane per intra-op
    thread when there are two or more and the weights are at most LANES_AUTO_MAX_BYTES (the narrow session
    holds a second copy), on onnxruntime only: OpenVINO spreads a batch over its threads itself, and 2
    streams served slower than one (4 concurrent single images 0.72x in-process batch 4 with lanes, 0.84x
    without; perf/results/cpu_engines.md); a number is taken as it is, capped by the threads."""
    if setting in (None, "", "auto"):
        if threads < 2:
            return 1, "one thread"
        if engine == "openvino":
            return 1, "auto: OpenVINO runs a batch on every thread itself"
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


def _engine_name(flavour: str) -> str:
    return "openvino" if flavour.startswith("openvino") else "onnxruntime"


def _label(flavour: str) -> str:
    return "cpu-int8" if flavour in contract.INT8_ISAS else "CPU"


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
        instances, cores, threads = served_threads(config, params)
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
        isa = host_isa(cpu_flags(), forced=params.isa)
        probe = np.load(os.path.join(folder, params.probe))
        min_cos = float(params.probe_min_cosine)
        missing_openvino = have_openvino()
        order = flavour_order(isa, list(flavours), params.flavour)
        if params.flavour is not None:
            _log(
                f"{name}: flavour '{params.flavour}' pinned (the `flavour` parameter): tried first, then {order[1:]}"
            )
        quantized = [f for f in FLAVOUR_ORDER["amx"] if f in flavours and f not in contract.FP32_FLAVOURS]
        passed_over = [f for f in flavours if f not in order]
        if passed_over:
            _log(
                f"{name}: flavour(s) {passed_over} not tried on CPU class '{isa}' (FLAVOUR_ORDER of onnx_cpu.py)"
            )
        where = f"{threads} thread(s) ({cores} usable core(s), {instances} instance(s))"
        spun = f"spinning {'default' if spinning is None else spinning}"
        tried = []
        for flavour in order:
            if flavour.startswith("openvino") and missing_openvino:
                _log(f"{name}: flavour '{flavour}' skipped: {missing_openvino}", error=True)
                tried.append(f"{flavour}: skipped (no openvino)")
                continue
            path = os.path.join(folder, flavours[flavour])
            try:
                wide = self._engine(flavour, path, threads, session)
                cos = self._probe(wide, probe, flavour)
            except Exception as e:  # an engine that cannot open or run the file is refused like a bad probe
                _log(
                    f"{name}: flavour '{flavour}' failed: {type(e).__name__}: {e}; trying the next",
                    error=True,
                )
                tried.append(f"{flavour}: failed ({type(e).__name__})")
                continue
            tried.append(f"{flavour}: probe cosine {cos:.6f}")
            if cos >= min_cos:
                self._serve(name, flavour, wide, path, params, threads, session, (probe, flavour, min_cos))
                _log(f"{name}: {_engine_name(flavour)} CPU, {where}, {spun}, {self.lanes_note}")
                _log(
                    f"{name}: {_label(flavour)} flavour '{flavour}' for host int8 ISA '{int8_isa(set(), {}, isa)}', "
                    f"CPU class '{isa}' (probe: cosine {cos:.6f}{self.narrow_note} >= {min_cos} to its verified "
                    "arithmetic)"
                )
                if len(tried) > 1:
                    _log(
                        f"{name}: flavours refused on this host before it: {'; '.join(tried[:-1])}",
                        error=True,
                    )
                if flavour in contract.FP32_FLAVOURS and quantized:
                    _log(
                        f"{name}: SERVING FP32: no quantized flavour of this model ({', '.join(quantized)}) "
                        f"computes its verified embeddings on this host (CPU class '{isa}')",
                        error=True,
                    )
                return
            _log(
                f"{name}: {_label(flavour)} flavour '{flavour}' does not compute its verified embeddings on this "
                f"host (probe cosine {cos:.6f} < {min_cos}): "
                + (
                    "its int8 kernels saturate"
                    if flavour not in contract.FP32_FLAVOURS
                    else "broken float kernels"
                )
                + "; trying the next flavour",
                error=True,
            )
        last = contract.ONNXRUNTIME_FP32
        if last in flavours:  # never a dead model: the FP32 file serves, whatever its probe said
            path = os.path.join(folder, flavours[last])
            self._serve(name, last, session(path, threads), path, params, threads, session, None)
            _log(
                f"{name}: SERVING FP32 (onnxruntime) ALTHOUGH NO FLAVOUR PASSED ITS PROBE on this host "
                f"(CPU class '{isa}', probe cosine must be >= {min_cos}): {'; '.join(tried)}; {where}, "
                f"{self.lanes_note}",
                error=True,
            )
            return
        raise RuntimeError(
            f"{name}: no cpu-int8 flavour computes its verified embeddings on this host (CPU class '{isa}', "
            f"probe cosine must be >= {min_cos}): {'; '.join(tried) or 'no flavour for this ISA'}. "
            f"Serve the fp32 model instead, or rebuild with `make engines` (it builds every flavour)."
        )

    @staticmethod
    def _engine(flavour: str, path: str, threads: int, session):
        """The wide session of `flavour`: OpenVINO or onnxruntime, both with `run(names, feed)`."""
        if flavour.startswith("openvino"):
            return OpenVinoSession(path, threads, OPENVINO_PRECISION[flavour])
        return session(path, threads)

    def _serve(self, name, flavour, wide, path, params, threads, session, probe) -> None:
        """Serve `flavour` on `wide`, with lanes (OpenVINO: one stream per lane, sharing the threads)."""
        self.session, self.flavour = wide, flavour
        if flavour.startswith("openvino"):

            def session(p, _):  # the narrow OpenVINO model: `lanes` streams sharing every thread
                return OpenVinoSession(p, threads, OPENVINO_PRECISION[flavour], streams=self.lanes)

        # the narrow session runs other kernels' thread partitioning: it proves itself on the probe too
        self.narrow_note = self._start_lanes(name, params.cpu_lanes, threads, path, session, probe)

    def _probe(self, session, probe, flavour: str) -> float:
        got = session.run([contract.EMBEDDINGS], {self.input_name: probe[contract.PIXELS]})[0]
        return min_cosine(probe[f"{contract.EMBEDDINGS}_{PROBE_REFERENCE[flavour]}"], got)

    def _start_lanes(self, name, setting, threads, path, session, probe) -> str:
        """Open the narrow session and the threads that run a batch's slices at once (see the module
        docstring). With a probe (cpu-int8), the narrow session must pass it too, else lanes stay off.
        Returns the narrow session's probe cosine for the log ('' without one)."""
        engine = _engine_name(getattr(self, "flavour", None) or "")
        self.lanes, why = choose_lanes(setting, threads, model_bytes(path), engine)
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


def probe_passed(result: dict, flavour: str) -> bool:
    """Whether `flavour` passed its probe in a probe_flavours `result` (one that failed to run did not)."""
    r = result["flavours"][flavour]
    return "cosine" in r and r["cosine"] >= result["min_cosine"]


def probe_flavours(
    model_dir: str,
    isa: str | None = None,
    threads: int = 1,
    images: int | None = None,
    every: bool = False,
    only: list[str] | None = None,
) -> dict:
    """Score the flavours of a built CPU model (`model_dir`: its folder, with config.pbtxt) on its probe,
    as `initialize` would on this host (CPU class `isa`, else detected): the flavours in the host's order
    (`every`: all of them), each with its cosine and max abs difference to its reference (or the `error`
    of an engine that fails here: refused), the gate, and which one would serve. `images`: the first N
    probe images only (qemu-user is slow; not for the dynamic cpu-int8 flavours, whose activation scales,
    so their references, are those of the whole probe batch). `only`: these flavours only."""
    from vitserve.exporter.repository import read_config, read_params

    params = read_params(read_config(os.path.join(model_dir, "config.pbtxt")), contract.CpuBackboneParams)
    version = os.path.join(model_dir, "1")
    probe = dict(np.load(os.path.join(version, params.probe)))
    probe = {k: v[:images] for k, v in probe.items()} if images else probe
    isa = host_isa(cpu_flags(), forced=isa)
    names = list(params.flavours) if every else flavour_order(isa, list(params.flavours))
    names = [f for f in names if not only or f in only]
    model = TritonPythonModel()
    model.input_name = contract.PIXELS
    level = graph_optimization_level(params.optimization)

    def session(path, n):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level, so.intra_op_num_threads, so.log_severity_level = level, n, 3
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    out: dict = {"isa": isa, "min_cosine": params.probe_min_cosine, "flavours": {}, "serves": None}
    for f in names:
        ref = probe[f"{contract.EMBEDDINGS}_{PROBE_REFERENCE[f]}"]
        try:
            engine = model._engine(f, os.path.join(version, params.flavours[f]), threads, session)
            got = engine.run([contract.EMBEDDINGS], {contract.PIXELS: probe[contract.PIXELS]})[0]
        except Exception as e:  # refused, as `initialize` refuses an engine that cannot open or run the file
            out["flavours"][f] = {"error": f"{type(e).__name__}: {e}"}
            continue
        cos = min_cosine(ref, got)
        out["flavours"][f] = {"cosine": cos, "max_abs": float(np.abs(ref - got).max())}
    passed = [f for f in flavour_order(isa, names) if probe_passed(out, f)]
    out["serves"] = passed[0] if passed else None
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Score a built CPU model's flavours on its probe (JSON out).")
    ap.add_argument("--probe", required=True, metavar="MODEL_DIR", help="a CPU backbone model's folder")
    ap.add_argument("--isa", choices=contract.CPU_ISAS, help="the CPU class (default: detected)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=int, help="the first N probe images only")
    ap.add_argument("--every", action="store_true", help="every flavour, not only the host's order")
    ap.add_argument("--only", nargs="+", choices=contract.CPU_FLAVOURS, help="these flavours only")
    a = ap.parse_args()
    print(json.dumps(probe_flavours(a.probe, a.isa, a.threads, a.images, a.every, a.only), indent=1))
