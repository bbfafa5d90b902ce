"""A served model + a p99 budget -> the serving settings that give the most images/s on this host.

    vitserve tune --model vitb32 --p99-ms 400 --max-minutes 10

What is swept, for the model's CPU backbone (vitserve's python-backend onnxruntime model) and its ensemble:
which backbone variant the ensemble routes to (fp32 | cpu-int8), instance count x onnxruntime intra-op
threads (instances x threads <= the usable cores), lanes (a batch cut into 1-thread slices run at once),
onnxruntime spinning (`session.intra_op.allow_spinning`), dynamic batching (max queue delay, preferred batch
sizes) and the python preprocess model's instances and threads. Models that are not vitserve CPU backbones
(the tiny test model) get the knobs that apply to them: instances and dynamic batching.

How each configuration is served: the real tritonserver with `--model-control-mode=explicit` (started here
on `--repository`, or the one at `--url`, which must run in that mode), each model reloaded through
Triton's load API with a config override (`load_model(name, config=JSON)`): the repository's files are
never touched, and the served config is read back and checked before a point is measured. Each point is
the real perf_analyzer (`vitserve.perf.perf_analyzer`) with Triton's statistics around it (queue, compute
input/infer/output per model, average batch: `vitserve.perf.server_stats`).

How the space is searched, in stages (a full grid is days on a 2-core host): `compute` (variant x
instances/threads x lanes x spinning, batching as configured), then `batching` (queue delay x preferred
sizes around the best so far), then `preprocess` (instances x threads; ensemble only), then `refine` (the
compute knobs again under the batching and preprocess chosen, and the other variants). The workload is every
(concurrency, images per request) pair; a point is one configuration at one pair. The Pareto front is taken
per pair (throughput up, p99 down); the choice is the configuration with the best geometric mean of its
throughput over the best seen at each pair, p99 within the budget at every pair (`choose`). Bounded: no
configuration starts after the deadline. Resumable: every point is appended to `measurements.jsonl` in the
output folder with the settings it was measured under, and a rerun skips what is there. With a
models.yaml, the choice is written back as the model's `tuned:` section (see `vitserve.exporter.config.Tuned`),
which `make engines` writes into config.pbtxt.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import json
import logging
import math
import os
import shlex
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from vitserve.errors import ClientError, ConfigError, ServerError, VitServeError

log = logging.getLogger(__name__)

STAGES = ("compute", "batching", "preprocess", "refine")
MEASUREMENTS = "measurements.jsonl"
# points stored by a tuner with other knobs (before `lanes`, before preprocess threads) are not reused
KNOBS_VERSION = 3
TIE_TOLERANCE = 0.02  # points within 2 % of the best throughput are ties; the lowest p99 wins


@dataclass(frozen=True)
class Knobs:
    """One serving configuration. `threads`/`spinning` are None where they do not apply (not a vitserve CPU
    backbone; spinning None: onnxruntime's default), `preprocess_instances` None where there is no
    preprocess model or it is left as configured. `variant` is the precision the ensemble routes to (for a
    plain model: its name)."""

    variant: str
    instances: int
    threads: int | None
    spinning: bool | None
    queue_delay_us: int
    preferred: tuple[int, ...]
    preprocess_instances: int | None = None
    lanes: int | None = None  # slices a batch runs as at once (onnx_cpu `lanes`; 1: off); None: not set
    preprocess_threads: int | None = None  # images of one request preprocessed at once; None: not set

    def key(self) -> str:
        spin = {None: "default", True: "on", False: "off"}[self.spinning]
        pref = ",".join(map(str, self.preferred)) or "none"
        pre = f"{self.preprocess_instances or '-'}" + (
            f"x{self.preprocess_threads}" if self.preprocess_threads else ""
        )
        return (
            f"{self.variant} i{self.instances} t{self.threads or '-'} l{self.lanes or '-'} spin={spin} "
            f"delay={self.queue_delay_us}us pref={pref} pre={pre}"
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Knobs:
        return cls(**{**d, "preferred": tuple(d["preferred"])})


@dataclass
class Point:
    """One configuration at one concurrency: perf_analyzer's throughput and latency (microseconds) and,
    per model, Triton's per-request queue/compute averages over the point."""

    knobs: Knobs
    stage: str
    model: str
    concurrency: int
    batch_size: int
    images_per_s: float | None = None
    p50_us: float | None = None
    p99_us: float | None = None
    server: dict[str, dict[str, float | None]] = field(default_factory=dict)
    error: str | None = None
    signature: dict[str, Any] = field(default_factory=dict)
    duration_s: float | None = None  # measured seconds (longer than asked where requests are slow)
    shared_memory: str = "none"  # "system": the tensors went through system shared memory (the check)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.images_per_s) and self.p99_us is not None

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str)

    @classmethod
    def from_json(cls, text: str) -> Point:
        d = json.loads(text)
        return cls(**{**d, "knobs": Knobs.from_dict(d["knobs"])})


@dataclass
class Space:
    """The values each knob may take. `instance_threads` pairs instances with threads per instance;
    `lanes`: False (one session) and/or True (one 1-thread lane per thread), for instances of 2+ threads."""

    variants: list[str]
    instance_threads: list[tuple[int, int | None]]
    spinning: list[bool | None]
    queue_delays_us: list[int]
    preferred: list[tuple[int, ...]]
    preprocess_instances: list[int | None] = field(default_factory=lambda: [None])
    lanes: list[bool] = field(default_factory=lambda: [False])
    preprocess_threads: list[int | None] = field(default_factory=lambda: [None])


def default_space(
    variants: list[str],
    cores: int,
    onnx_cpu: bool,
    max_batch_size: int,
    concurrencies: list[int],
    current: Knobs,
    ensemble: bool,
) -> Space:
    """The space for a host with `cores` usable cores: instances 1, 2, 4, ... <= cores, each with the
    cores split among them, and one instance with a core left free (vitserve CPU backbones; other models
    keep their threads); spinning on/off; lanes off/on (a batch cut into 1-thread slices run at once);
    queue delays 0, 2 ms, 10 ms and the configured one; preferred sizes as configured, the largest batch the
    highest concurrency can form, and max_batch_size; preprocess instances 1 and the cores, each with 1 and
    `cores` threads (ensemble; threads for the python preprocess model only: a request's images at once)."""
    instances = sorted({1, *(2**k for k in range(1, 8) if 2**k <= cores)})
    pairs: list[tuple[int, int | None]] = [(i, max(1, cores // i) if onnx_cpu else None) for i in instances]
    if onnx_cpu and cores > 1:  # one core left to Triton, the gRPC threads and the preprocess model
        pairs.insert(1, (1, cores - 1))
    preferred = [current.preferred, (min(max(concurrencies), max_batch_size),), (max_batch_size,)]
    pre = [None] if not ensemble else sorted({1, cores})
    return Space(
        variants=variants,
        instance_threads=pairs,
        spinning=[True, False] if onnx_cpu else [None],
        queue_delays_us=sorted({0, 2000, 10000, current.queue_delay_us}),
        preferred=list(dict.fromkeys(preferred)),
        preprocess_instances=pre,
        lanes=[False, True] if onnx_cpu else [False],
        preprocess_threads=sorted({1, cores})
        if ensemble and current.preprocess_threads is not None
        else [None],
    )


def stage_plan(stage: str, space: Space, best: Knobs, current: Knobs) -> list[Knobs]:
    """The configurations of one stage: `compute` from the current batching, the others around `best`."""
    if stage == "compute":
        # one intra-op thread means no thread pool, so nothing spins and there is nothing to cut into lanes:
        # spinning is left at the default there, lanes at 1
        def lanes(t: int | None) -> list[int | None]:
            if t is None:
                return [None]
            return sorted({t if on else 1 for on in space.lanes}) if t > 1 else [1]

        plan = [
            replace(current, variant=v, instances=i, threads=t, spinning=s, lanes=n)
            for v in space.variants
            for i, t in space.instance_threads
            for n in lanes(t)
            for s in (space.spinning if t is None or t > 1 else [None])
        ]
    elif stage == "batching":
        plan = [
            replace(best, queue_delay_us=d, preferred=p)
            for d in space.queue_delays_us
            for p in space.preferred
        ]
    elif stage == "preprocess":
        plan = [
            replace(best, preprocess_instances=n, preprocess_threads=t)
            for n in space.preprocess_instances
            if n is not None
            for t in space.preprocess_threads
        ]
    elif stage == "refine":
        # the compute knobs were chosen under the batching as configured; they interact with what came after
        # (spinning pays with no queue delay and costs with one, lanes depend on the batches formed), so
        # they are tried again under the batching and preprocess settings chosen since, and the other variants
        # with the best's settings
        plan = [k for k in stage_plan("compute", space, best, best) if k.variant == best.variant]
        plan += [replace(best, variant=v) for v in space.variants if v != best.variant]
    else:
        raise ConfigError(f"unknown tuning stage {stage!r}; stages: {', '.join(STAGES)}")
    return list(dict.fromkeys(plan))


def pareto_front(points: Iterable[Point]) -> list[Point]:
    """The points no other point of the same concurrency and batch size beats on both throughput (higher)
    and p99 (lower), by throughput."""
    ok = [p for p in points if p.ok]
    front = [
        p
        for p in ok
        if not any(
            (q.concurrency, q.batch_size) == (p.concurrency, p.batch_size)
            and q.images_per_s >= p.images_per_s
            and q.p99_us <= p.p99_us
            and (q.images_per_s > p.images_per_s or q.p99_us < p.p99_us)
            for q in ok
        )
    ]
    return sorted(front, key=lambda p: (p.images_per_s, -p.p99_us))


def choose(
    points: Iterable[Point], p99_budget_us: float | None, tolerance: float = TIE_TOLERANCE
) -> Point | None:
    """The configuration that serves the whole workload best, as its point at the highest concurrency (and
    the smallest batch there).

    The workload is every (concurrency, batch size) any configuration was measured at. A configuration
    qualifies when it was measured at all of them and its p99 fits the budget at each (no budget: any). Its
    score is the geometric mean, over the workload, of its throughput over the best qualifying throughput
    there: a configuration that wins at concurrency 4 by leaving a lone request one core scores below one
    that is close to the best everywhere. Among scores within `tolerance` of the top, the lowest p99 at
    that point wins. None when none qualifies."""
    ok = [p for p in points if p.ok]
    workload = sorted({(p.concurrency, p.batch_size) for p in ok})
    by_knobs: dict[Knobs, dict[tuple[int, int], Point]] = {}
    for p in ok:
        by_knobs.setdefault(p.knobs, {})[(p.concurrency, p.batch_size)] = p
    fits = {
        k: at
        for k, at in by_knobs.items()
        if len(at) == len(workload)
        and (p99_budget_us is None or all(p.p99_us <= p99_budget_us for p in at.values()))
    }
    if not fits:
        return None
    best = {w: max(at[w].images_per_s for at in fits.values()) for w in workload}

    def score(at: dict[tuple[int, int], Point]) -> float:
        return math.exp(sum(math.log(at[w].images_per_s / best[w]) for w in workload) / len(workload))

    shown = max(workload, key=lambda w: (w[0], -w[1]))
    top = max(score(at) for at in fits.values())
    ties = [at[shown] for at in fits.values() if score(at) >= top * (1 - tolerance)]
    return min(ties, key=lambda p: (p.p99_us, -p.images_per_s))


KNOB_FIELDS = {
    "variant": ("variant",),
    "instances x threads": ("instances", "threads", "spinning"),  # 1 thread: no pool, no spinning
    "spinning": ("spinning",),
    "queue delay (us)": ("queue_delay_us",),
    "preferred batch sizes": ("preferred",),
    "preprocess instances": ("preprocess_instances",),
    "preprocess threads": ("preprocess_threads",),
}


def knob_effects(points: Iterable[Point]) -> list[dict[str, Any]]:
    """What each knob did on this host: for every pair of measured configurations that differ in that knob
    only, at the same concurrency and batch size, the ratio of throughput and of p99 (to -> from). Geometric
    means per (knob, from, to, concurrency, batch size)."""
    ok = [p for p in points if p.ok]
    groups: dict[tuple, list[float]] = {}
    for name, attrs in KNOB_FIELDS.items():
        by_rest: dict[tuple, list[Point]] = {}
        for p in ok:
            rest = tuple((k, v) for k, v in asdict(p.knobs).items() if k not in attrs)
            by_rest.setdefault((rest, p.concurrency, p.batch_size), []).append(p)
        for (_, c, bs), same in by_rest.items():
            for a in same:
                for b in same:
                    va, vb = (tuple(getattr(x.knobs, f) for f in attrs) for x in (a, b))
                    if str(va) < str(vb):  # each unordered pair once
                        key = (name, _value(va), _value(vb), c, bs)
                        groups.setdefault(key, []).append(
                            (b.images_per_s / a.images_per_s, b.p99_us / a.p99_us)
                        )
    rows = []
    for (name, va, vb, c, bs), ratios in sorted(groups.items(), key=lambda kv: [str(x) for x in kv[0]]):
        n = len(ratios)
        ips = math.exp(sum(math.log(r[0]) for r in ratios) / n)
        p99 = math.exp(sum(math.log(r[1]) for r in ratios) / n)
        rows.append({"knob": name, "from": va, "to": vb, "concurrency": c, "batch_size": bs, "pairs": n,
                     "images_per_s_x": ips, "p99_x": p99})  # fmt: skip
    return rows


def _value(v: tuple) -> str:
    if len(v) == 3:  # instances x threads, spinning
        spin = {None: "", True: ", spin on", False: ", spin off"}[v[2]]
        return f"{v[0]} x {v[1] if v[1] is not None else '-'}{spin}"
    x = v[0]
    if isinstance(x, tuple):
        return ",".join(map(str, x)) or "none"
    if x is None or isinstance(x, bool):
        return {None: "default", True: "on", False: "off"}[x]
    return str(x)


@dataclass
class SearchOutcome:
    points: list[Point]
    measured: int  # configurations measured by this run (the rest came from earlier runs)
    reused: int
    truncated: bool = False
    note: str | None = None


def search(
    space: Space,
    current: Knobs,
    measure: Callable[[Knobs, str], list[Point]],
    *,
    p99_budget_us: float | None,
    out_of_time: Callable[[], bool],
    earlier: list[Point] | None = None,
    on_points: Callable[[list[Point]], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> SearchOutcome:
    """Run the stages. `measure(knobs, stage)` serves one configuration and returns its points;
    configurations already in `earlier` (a previous run, same settings) are not measured again, so a rerun
    resumes where the last one stopped. Every stage plans around the best of all points known, those of
    later stages of the earlier run included: a rerun of a finished run searches again around its best (the
    refine stage may have moved it) and stops when no stage plans anything new. No configuration starts once
    `out_of_time()`; what was measured is kept."""
    points = [p for p in earlier or [] if p.ok]  # a configuration that failed (a server hiccup) is retried
    done = {p.knobs for p in points}
    out = SearchOutcome(points=points, measured=0, reused=len(done))
    for stage in STAGES:
        chosen = choose(points, p99_budget_us)
        best = chosen.knobs if chosen is not None else current
        plan = stage_plan(stage, space, best, current)
        for i, knobs in enumerate(plan):
            if knobs in done:
                continue
            if out_of_time():
                out.truncated = True
                out.note = (
                    f"the time bound was reached in stage {stage!r} ({i} of {len(plan)} configurations); "
                    "the choice is the best of what was measured; run the same command again to resume"
                )
                return out
            if progress is not None:
                progress(f"{stage} {knobs.key()}", i, len(plan))
            new = measure(knobs, stage)
            done.add(knobs)
            points.extend(new)
            out.measured += 1
            if on_points is not None:
                on_points(new)
    return out


# --- the served model -----------------------------------------------------------------------------------


@dataclass
class Target:
    """What is tuned on the server: `backbones` (variant -> backbone model), the ensemble that routes to
    one of them and its preprocess model (None for a plain model), and the model perf_analyzer sends to."""

    name: str
    backbones: dict[str, str]
    ensemble: str | None
    preprocess: str | None
    onnx_cpu: bool
    configs: dict[str, dict] = field(default_factory=dict)  # as served when the tuner started

    def measured(self, knobs: Knobs, tensor: bool) -> str:
        return self.backbones[knobs.variant] if (tensor or self.ensemble is None) else self.ensemble


def _is_onnx_cpu(config: dict) -> bool:
    return config.get("backend") == "python" and "onnx_cpu" in (config.get("parameters") or {})


def discover(client, name: str) -> Target:
    """Read `name` from the server: an ensemble (its preprocess step and the backbone variants
    `NAME_{precision}_cpu` the repository serves) or a plain model."""
    from tritonclient.utils import InferenceServerException

    from vitserve.perf.harness import variant_of

    index = client.get_model_repository_index(as_json=True).get("models", [])
    names = sorted({m["name"] for m in index})
    if name not in names:
        raise ConfigError(f"model {name!r} is not in the served repository; models there: {', '.join(names)}")

    def config(model: str) -> dict:
        try:
            return client.get_model_config(model, as_json=True)["config"]
        except InferenceServerException as e:
            raise ServerError(f"could not read the config of {model!r}: {e.message()} (is it loaded?)") from e

    cfg = config(name)
    if cfg.get("platform") != "ensemble":
        return Target(name, {name: name}, None, None, _is_onnx_cpu(cfg), {name: cfg})
    steps = [s["model_name"] for s in cfg["ensemble_scheduling"]["step"]]
    backbones = {}
    ready = {m["name"] for m in index if m.get("state") == "READY"}
    for m in sorted(ready):
        v = variant_of(m)
        if v is not None and v[0] == name and v[2] == "cpu":
            backbones[v[1]] = m
    routed = [s for s in steps if s in backbones.values()]
    if not routed:
        raise ConfigError(
            f"ensemble {name!r} routes to {steps}, none of them a CPU backbone {name}_<precision>_cpu; "
            "`vitserve tune` tunes the CPU kind (the pip tritonserver)"
        )
    preprocess = next((s for s in steps if s not in backbones.values()), None)
    configs = {name: cfg, **{m: config(m) for m in backbones.values()}}
    if preprocess is not None:
        configs[preprocess] = config(preprocess)
    return Target(
        name, backbones, name, preprocess, all(_is_onnx_cpu(configs[m]) for m in backbones.values()), configs
    )


def current_knobs(target: Target) -> Knobs:
    """The configuration the server had when the tuner started (the variant the ensemble routes to)."""
    if target.ensemble is not None:
        steps = [s["model_name"] for s in target.configs[target.ensemble]["ensemble_scheduling"]["step"]]
        variant = next(v for v, m in target.backbones.items() if m in steps)
    else:
        variant = next(iter(target.backbones))
    cfg = target.configs[target.backbones[variant]]
    threads = spinning = lanes = None
    if target.onnx_cpu:
        params = json.loads(cfg["parameters"]["onnx_cpu"]["string_value"])
        t = params.get("intra_op_threads")
        threads = int(t) if str(t).isdigit() else None
        spinning = params.get("allow_spinning")
        n = params.get("lanes")
        lanes = int(n) if str(n).isdigit() else None
    db = cfg.get("dynamic_batching") or {}
    pre = pre_threads = None
    if target.preprocess is not None:
        pre_cfg = target.configs[target.preprocess]
        pre = sum(int(g.get("count", 1)) for g in pre_cfg.get("instance_group", []))
        if "preprocess" in (pre_cfg.get("parameters") or {}):  # the python model (not DALI)
            pre_threads = int(
                json.loads(pre_cfg["parameters"]["preprocess"]["string_value"]).get("threads", 1)
            )
    return Knobs(
        variant=variant,
        instances=sum(int(g.get("count", 1)) for g in cfg.get("instance_group", [])) or 1,
        threads=threads,
        spinning=spinning,
        queue_delay_us=int(db.get("max_queue_delay_microseconds", 0) or 0),
        preferred=tuple(int(b) for b in db.get("preferred_batch_size", [])),
        preprocess_instances=pre,
        lanes=lanes,
        preprocess_threads=pre_threads,
    )


def backbone_override(config: dict, knobs: Knobs, onnx_cpu: bool) -> dict:
    """The backbone's served config (JSON) with `knobs` applied."""
    cfg = copy.deepcopy(config)
    group = dict((cfg.get("instance_group") or [{"kind": "KIND_CPU"}])[0])
    group["count"] = knobs.instances
    cfg["instance_group"] = [group]
    db = cfg.setdefault("dynamic_batching", {})
    db["preferred_batch_size"] = list(knobs.preferred)
    db["max_queue_delay_microseconds"] = str(knobs.queue_delay_us)
    if onnx_cpu:
        params = json.loads(cfg["parameters"]["onnx_cpu"]["string_value"])
        params["intra_op_threads"] = knobs.threads
        params["share"] = 1
        params.pop("allow_spinning", None)
        if knobs.spinning is not None:
            params["allow_spinning"] = knobs.spinning
        if knobs.lanes is not None:
            params["lanes"] = knobs.lanes
        cfg["parameters"]["onnx_cpu"] = {"string_value": json.dumps(params)}
    return cfg


class Reloader:
    """Serves a configuration by reloading the models it changes (explicit model control, config
    override), then reads the served configs back and checks them."""

    def __init__(self, client, target: Target):
        self.client = client
        self.target = target

    def wanted(self, knobs: Knobs) -> dict[str, dict]:
        t = self.target
        backbone = t.backbones[knobs.variant]
        want = {backbone: backbone_override(t.configs[backbone], knobs, t.onnx_cpu)}
        if t.preprocess is not None and knobs.preprocess_instances is not None:
            pre = copy.deepcopy(t.configs[t.preprocess])
            group = dict((pre.get("instance_group") or [{"kind": "KIND_CPU"}])[0])
            group["count"] = knobs.preprocess_instances
            pre["instance_group"] = [group]
            if knobs.preprocess_threads is not None:
                params = json.loads(pre["parameters"]["preprocess"]["string_value"])
                params["threads"] = knobs.preprocess_threads
                pre["parameters"]["preprocess"] = {"string_value": json.dumps(params)}
            want[t.preprocess] = pre
        if t.ensemble is not None:
            ens = copy.deepcopy(t.configs[t.ensemble])
            for step in ens["ensemble_scheduling"]["step"]:
                if step["model_name"] in t.backbones.values():
                    step["model_name"] = backbone
            want[t.ensemble] = ens
        return want

    def apply(self, knobs: Knobs) -> list[str]:
        """Reload the models whose served config differs from `knobs`' until none does. Triton 2.51 reloads
        every composing model from its file when an ensemble is loaded that routes differently, and keeps
        an ensemble's config when it reloads it for a composing model: so a routing change is loaded first,
        then the composing models that lost (or never had) their overrides. Returns the models reloaded;
        ServerError when the server does not end up serving `knobs`."""
        want = self.wanted(knobs)
        ens = self.target.ensemble
        reloaded: list[str] = []
        for _ in range(4):
            stale = {n: problems for n in want if (problems := self.differs(n, want[n], knobs))}
            if not stale:
                return reloaded
            if ens in stale:
                self._load(ens, want[ens], knobs)
                reloaded.append(ens)
                continue
            for name in stale:
                self._load(name, want[name], knobs)
                reloaded.append(name)
        raise ServerError(
            f"the server does not serve {knobs.key()} after reloading {reloaded}: "
            + "; ".join(f"{n}: {', '.join(p)}" for n, p in stale.items())
        )

    def _load(self, name: str, config: dict, knobs: Knobs) -> None:
        from tritonclient.utils import InferenceServerException

        try:
            self.client.load_model(name, config=json.dumps(config))
        except InferenceServerException as e:
            hint = ""
            if "explicit" in e.message().lower() or "not allowed" in e.message().lower():
                hint = " (the server must run with --model-control-mode=explicit; or leave out --url)"
            raise ServerError(f"reloading {name!r} with {knobs.key()} failed: {e.message()}{hint}") from e

    def differs(self, name: str, cfg: dict, knobs: Knobs) -> list[str]:
        """How the served config of `name` differs from `cfg` in what the tuner sets (empty: it does not)."""
        from tritonclient.utils import InferenceServerException

        try:
            served = self.client.get_model_config(name, as_json=True)["config"]
        except InferenceServerException as e:
            return [f"not served ({e.message()})"]
        problems = []
        count = sum(int(g.get("count", 1)) for g in served.get("instance_group", []))
        wanted = sum(int(g.get("count", 1)) for g in cfg.get("instance_group", []))
        if count != wanted:
            problems.append(f"instances {count} != {wanted}")
        if "dynamic_batching" in cfg:
            db = served.get("dynamic_batching", {})
            got = int(db.get("max_queue_delay_microseconds", 0) or 0)
            if got != knobs.queue_delay_us:
                problems.append(f"max_queue_delay_us {got} != {knobs.queue_delay_us}")
            pref = [int(b) for b in db.get("preferred_batch_size", [])]
            if knobs.preferred and pref != list(knobs.preferred):
                problems.append(f"preferred_batch_size {pref} != {list(knobs.preferred)}")
        for key in ("onnx_cpu", "preprocess"):  # the backbone's and the python preprocess model's settings
            params = (cfg.get("parameters") or {}).get(key)
            if params is not None and (served.get("parameters") or {}).get(key) != params:
                problems.append(f"{key} parameters differ")
        if "ensemble_scheduling" in cfg:
            steps = [st["model_name"] for st in served.get("ensemble_scheduling", {}).get("step", [])]
            if steps != [st["model_name"] for st in cfg["ensemble_scheduling"]["step"]]:
                problems.append(f"ensemble steps {steps}")
        return problems


def signature(target_model: str, batch_size: int | list[int], duration_s: float, host: str) -> dict[str, Any]:
    """What a stored point must share with this run to be reused."""
    return {"model": target_model, "batch_size": batch_size, "duration_s": duration_s, "host": host,
            "knobs": KNOBS_VERSION}  # fmt: skip


def load_earlier(path: Path, sig: dict[str, Any]) -> list[Point]:
    """Points of `measurements.jsonl` measured with the same settings (others are left in the file)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            with contextlib.suppress(ValueError, TypeError, KeyError):
                p = Point.from_json(line)
                if {k: p.signature.get(k) for k in sig} == sig:
                    out.append(p)
    return out


# --- measuring -----------------------------------------------------------------------------------------


class Measurer:
    """Measures configurations on a running server: reload, warm up, perf_analyzer, Triton statistics."""

    def __init__(self, url, client, target, reloader, *, tensor, concurrencies, batch_sizes, duration_s,
                 warmup_s, images, raw_dir, sig):  # fmt: skip
        self.url, self.client, self.target, self.reloader = url, client, target, reloader
        self.tensor, self.concurrencies, self.batch_sizes = tensor, concurrencies, list(batch_sizes)
        self.duration_s, self.warmup_s, self.images, self.raw_dir, self.sig = (
            duration_s, warmup_s, images, raw_dir, sig,
        )  # fmt: skip
        self._input_data: dict[str, Path] = {}

    def __call__(self, knobs: Knobs, stage: str, *, tensor: bool | None = None, batch_size: int | None = None,
                 concurrencies: list[int] | None = None, shared_memory: str = "none") -> list[Point]:  # fmt: skip
        tensor = self.tensor if tensor is None else tensor
        workload = [
            (c, b) for b in ([batch_size] if batch_size else self.batch_sizes) for c in concurrencies or self.concurrencies
        ]  # fmt: skip
        model = self.target.measured(knobs, tensor)
        try:
            self.reloader.apply(knobs)
        except ServerError as e:
            return [
                Point(
                    knobs, stage, model, c, b, error=str(e), signature=self.sig, shared_memory=shared_memory
                )
                for c, b in workload
            ]
        return [self.point(knobs, stage, model, c, b, shared_memory) for c, b in workload]

    def point(self, knobs: Knobs, stage: str, model: str, concurrency: int, batch: int,
              shared_memory: str = "none") -> Point:  # fmt: skip
        from vitserve.perf import server_stats
        from vitserve.perf.inputs import describe_model, make_payloads, write_input_data
        from vitserve.perf.loadgen import run_load
        from vitserve.perf.perf_analyzer import run_perf_analyzer

        point = Point(
            knobs, stage, model, concurrency, batch, signature=self.sig, shared_memory=shared_memory
        )
        try:
            spec = describe_model(self.url, model)
            input_data = None
            if any(t.datatype == "BYTES" for t in spec.inputs):
                if self.images is None:
                    raise ConfigError(f"{model!r} takes encoded images: give --images DIR")
                if model not in self._input_data:
                    self._input_data[model] = write_input_data(
                        spec, self.images, self.raw_dir / f"input_{model}.json"
                    )
                input_data = self._input_data[model]
            duration_s = self.duration_s
            if self.warmup_s > 0:
                payloads = make_payloads(spec, batch, images=self.images, count=2)
                warm = run_load(
                    self.url, spec, payloads, concurrency=concurrency, duration_s=self.warmup_s, warmup_s=0
                )
                # perf_analyzer fails a window that no request finished in: on a slow (or shared) host a
                # point is lengthened to about ten warm request latencies
                p50 = warm.percentiles_us()[50]
                slowest = 2 * self.warmup_s if math.isnan(p50) else p50 / 1e6  # none finished: slower still
                duration_s = max(duration_s, 10 * slowest)
            watched = [model, *server_stats.ensemble_steps(spec.config)]
            before = {m: server_stats.snapshot(self.client, m) for m in watched}
            csv_path = self.raw_dir / f"pa_{model}_b{batch}_c{concurrency}_{shared_memory}.csv"
            try:
                pa = run_perf_analyzer(
                    self.url, spec, concurrency=concurrency, batch_size=batch, duration_s=duration_s,
                    csv_path=csv_path, input_data=input_data, shared_memory=shared_memory,
                )  # fmt: skip
            except ClientError as e:
                if "No valid requests recorded" not in str(e):
                    raise
                duration_s *= 3  # the host slowed down after the warm-up: once more, with longer windows
                pa = run_perf_analyzer(
                    self.url, spec, concurrency=concurrency, batch_size=batch, duration_s=duration_s,
                    csv_path=csv_path, input_data=input_data, shared_memory=shared_memory,
                )  # fmt: skip
            after = {m: server_stats.snapshot(self.client, m) for m in watched}
        except VitServeError as e:
            point.error = str(e)
            log.error("%s at concurrency %d: %s", knobs.key(), concurrency, e)
            return point
        point.duration_s = duration_s
        point.images_per_s = pa.row["images_per_s"]
        point.p50_us = pa.row["p50_us"]
        point.p99_us = pa.row["p99_us"]
        for m in watched:
            d = server_stats.delta(before[m], after[m])
            point.server[m] = {
                "requests": d.requests, "queue_us": d.queue_us, "compute_input_us": d.compute_input_us,
                "compute_infer_us": d.compute_infer_us, "compute_output_us": d.compute_output_us,
                "avg_batch": d.avg_batch,
            }  # fmt: skip
        return point


# --- served vs in-process --------------------------------------------------------------------------------


def backbone_onnx(repository: Path, model: str, config: dict) -> Path:
    """The ONNX file the served CPU backbone runs on this host: `model.onnx`, or for cpu-int8 the flavour
    the model picks from this host's CPU flags (the same rule as onnx_cpu.py; the server log confirms it)."""
    from vitserve.exporter.triton_models.onnx_cpu import cpu_flags, flavour_order, int8_isa

    params = json.loads(config["parameters"]["onnx_cpu"]["string_value"])
    folder = repository / model / "1"
    flavours = params.get("flavours") or {}
    if flavours:
        order = flavour_order(int8_isa(cpu_flags(), forced=params.get("isa")), list(flavours))
        if order:
            return folder / flavours[order[0]]
    return folder / "model.onnx"


CHECK_ROUNDS = 2


def compare_in_process(measure: Measurer, chosen: Knobs, repository: Path, batches: list[int],
                       concurrencies: list[int], duration_s: float, out_of_time: Callable[[], bool],
                       rounds: int = CHECK_ROUNDS, transports: tuple[str, ...] = ("none", "system"),
                       p99_budget_us: float | None = None) -> dict:  # fmt: skip
    """Served (tuned settings) against in-process onnxruntime on the same ONNX with every usable core, at
    its best batch size, for each CPU backbone variant's tensor path; then the bytes ensemble against the
    tensor path of the variant it routes to. Where the choice is one instance with lanes, the served model's
    own executor (onnx_cpu.py, lanes as chosen) is also run in-process at each batch size: served over that
    is the cost of serving alone (transfer, queue, the python stub).

    On a shared or throttled host speed drifts by more than the effect measured, so the runs are
    interleaved: per round and batch size, in-process, then the executor, then served at each concurrency,
    back to back; each ratio is taken within its round (against that round's best in-process batch size)
    and the median over `rounds` is reported, with the median served point. Served is measured with the
    tensors in the gRPC messages and in system shared memory (`transports`: a client on the server's host,
    as the python client's `shared_memory="system"` does): the difference is what the transfer costs."""
    from vitserve.exporter.triton_models.onnx_cpu import usable_cores
    from vitserve.perf.baseline import run_baseline

    target = measure.target
    cores = usable_cores()
    rows, inproc, ensemble_rows = [], {}, []
    for variant, model in target.backbones.items():
        cfg = target.configs[model]
        onnx = backbone_onnx(repository, model, cfg)
        opt = json.loads(cfg["parameters"]["onnx_cpu"]["string_value"]).get("optimization", "all")
        max_batch = int(cfg.get("max_batch_size", 1))
        knobs = replace(chosen, variant=variant)
        lanes = chosen.instances == 1 and (chosen.lanes or 1) > 1
        sizes = [b for b in sorted({1, 8, 16, *batches}) if b <= max_batch]
        base: dict[int, list[dict]] = {}
        executor: dict[int, list[float]] = {}
        served: dict[tuple[int, str, int], list[Point]] = {}
        for _ in range(rounds):
            for b in sizes:
                if out_of_time():
                    break
                r = run_baseline(onnx, b, threads=cores, optimization=opt, duration_s=duration_s)
                base.setdefault(b, []).append(
                    {"batch_size": b, "images_per_s": r.images_per_s, "p50_us": r.p50_us, "p99_us": r.p99_us}
                )
                if b not in batches:
                    continue
                if lanes:
                    executor.setdefault(b, []).append(
                        _executor_ips(repository / model, chosen, b, duration_s)
                    )
                for shm in transports:
                    for p in measure(knobs, "check", tensor=True, batch_size=b, concurrencies=concurrencies,
                                     shared_memory=shm):  # fmt: skip
                        served.setdefault((b, shm, p.concurrency), []).append(p)
        if not base:
            break
        n = min(len(v) for v in base.values())  # complete rounds (the time bound may cut the last one)
        best_per_round = [max(base[b][i]["images_per_s"] for b in base) for i in range(n)]
        runs = [_median_row(v) for v in base.values()]
        best = max(runs, key=lambda r: r["images_per_s"])
        inproc[variant] = {"onnx": str(onnx), "threads": cores, "optimization": opt, "rounds": n, "runs": runs,
                           "best": best}  # fmt: skip
        if executor:
            inproc[variant]["executor"] = {"lanes": chosen.lanes, "threads": chosen.threads or cores,
                                           "runs": [{"batch_size": b, "images_per_s": statistics.median(v)}
                                                    for b, v in executor.items()]}  # fmt: skip
        for (b, _, _), points in sorted(served.items()):
            ok = [p for p in points if p.ok]
            p = sorted(ok, key=lambda q: q.images_per_s)[(len(ok) - 1) // 2] if ok else points[-1]

            def ratio(ref: list[float], points=points) -> float | None:
                got = [q.images_per_s / ref[i] for i, q in enumerate(points[: len(ref)]) if q.ok]
                return statistics.median(got) if got else None

            rows.append({"variant": variant, "point": p, "rounds": len(ok),
                         "ratio": ratio(best_per_round),
                         "same_batch_ratio": ratio([r["images_per_s"] for r in base[b]]),
                         "executor_ratio": ratio(executor[b]) if b in executor else None})  # fmt: skip
    if target.ensemble is not None and measure.images is not None and not out_of_time():
        tensor = {
            (r["variant"], r["point"].batch_size, r["point"].concurrency): r["point"]
            for r in rows
            if r["point"].shared_memory == "none"
        }
        for b in sorted({1, *batches}):
            if out_of_time() or not any(k[:2] == (chosen.variant, b) for k in tensor):
                continue
            for p in measure(chosen, "check", tensor=False, batch_size=b, concurrencies=concurrencies):
                t = tensor.get((chosen.variant, b, p.concurrency))
                ok = p.ok and t is not None and t.ok
                ensemble_rows.append(
                    {"point": p, "tensor": t, "ratio": p.images_per_s / t.images_per_s if ok else None}
                )
    return {"cores": cores, "rounds": rounds, "in_process": inproc, "tensor": rows, "ensemble": ensemble_rows,
            "p99_budget_us": p99_budget_us, "summary": check_summary(rows, p99_budget_us)}  # fmt: skip


def _median_row(runs: list[dict]) -> dict:
    """The run with the median images/s (the lower middle of an even count)."""
    return sorted(runs, key=lambda r: r["images_per_s"])[(len(runs) - 1) // 2]


def _executor_ips(model_dir: Path, knobs: Knobs, batch: int, duration_s: float) -> float:
    """Images/s of the served model's own code, in this process, with the chosen threads, lanes and spinning
    (as `backbone_override` serves them: None leaves onnxruntime's default, whatever the repository's file
    says)."""
    import numpy as np

    from vitserve.exporter.triton_models.onnx_cpu import usable_cores
    from vitserve.perf.bench_lanes import images_per_s, load, read_dims

    model = load(
        model_dir,
        intra_op_threads=knobs.threads or usable_cores(),
        lanes=knobs.lanes,
        allow_spinning=knobs.spinning,
    )
    try:
        x = np.random.default_rng(0).standard_normal([batch, *read_dims(model_dir)]).astype(np.float32)
        return images_per_s(model, x, duration_s)
    finally:
        model.finalize()


def check_summary(rows: list[dict], p99_budget_us: float | None = None) -> list[dict]:
    """Per variant, transport and concurrency, the served tensor path at the client batch size that served
    it best with p99 within the budget (none fits: the best of all, marked), against in-process at its best
    batch size: the issue's acceptance view (a client picks its batch size as the in-process caller does,
    within its latency budget)."""
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for row in rows:
        p = row["point"]
        if p.ok:
            groups.setdefault((row["variant"], p.shared_memory, p.concurrency), []).append(row)
    out = []
    for (v, shm, c), group in sorted(groups.items()):
        fits = [r for r in group if p99_budget_us is None or r["point"].p99_us <= p99_budget_us]
        r = max(fits or group, key=lambda r: r["point"].images_per_s)
        out.append({"variant": v, "shared_memory": shm, "concurrency": c, "batch_size": r["point"].batch_size,
                    "images_per_s": r["point"].images_per_s, "p99_us": r["point"].p99_us, "ratio": r["ratio"],
                    "within_budget": bool(fits)})  # fmt: skip
    return out


# --- writing the choice back --------------------------------------------------------------------------


def tuned_section(knobs: Knobs, target: Target, *, host: str, p99_ms: float | None, report: str) -> dict:
    """The `tuned:` mapping for models.yaml (plain YAML types)."""
    out: dict[str, Any] = {}
    if target.ensemble is not None:
        out["precision"] = knobs.variant
    out["instances"] = knobs.instances
    if knobs.threads is not None:
        out["cpu_threads"] = knobs.threads
    if knobs.spinning is not None:
        out["cpu_spinning"] = knobs.spinning
    if knobs.lanes is not None:
        out["cpu_lanes"] = knobs.lanes
    out["dynamic_batching"] = {
        "preferred_batch_sizes": list(knobs.preferred),
        "max_queue_delay_us": knobs.queue_delay_us,
    }
    if knobs.preprocess_instances is not None:
        out["preprocess_instances"] = knobs.preprocess_instances
    if knobs.preprocess_threads is not None:
        out["preprocess_threads"] = knobs.preprocess_threads
    out["host"] = host
    out["p99_budget_ms"] = p99_ms
    out["report"] = report
    out["tuned_at"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    return out


def write_tuned(config_path: str | Path, model: str, tuned: dict) -> None:
    """Put `tuned` into `model`'s entry of models.yaml as its `tuned:` section (replacing an earlier one),
    keeping the rest of the file, comments included, byte for byte; then read the file back through the
    typed config and check it holds what was written. Written to a temporary name, renamed when whole."""
    import yaml

    from vitserve.exporter.config import Tuned, load_models

    path = Path(config_path)
    text = path.read_text()
    root = yaml.compose(text)
    models = None
    if isinstance(root, yaml.MappingNode):
        models = next((v for k, v in root.value if k.value == "models"), None)
    if not isinstance(models, yaml.SequenceNode):
        raise ConfigError(f"{path}: no `models:` list to write the tuned settings into")
    entry = None
    for node in models.value:
        if isinstance(node, yaml.MappingNode) and any(
            k.value == "name" and v.value == model for k, v in node.value
        ):
            entry = node
    if entry is None:
        raise ConfigError(
            f"{path} has no model named {model!r}; tune a model of this file or pass --no-write"
        )
    if entry.flow_style:
        raise ConfigError(
            f"{path}: model {model!r} is written as a flow mapping {{...}}; write it in block style"
        )
    lines = text.splitlines(keepends=True)

    def last_line(node) -> int:
        """0-based line of the node's last character: of its last leaf for a block collection, whose own
        end mark lies past the comments that follow it."""
        while isinstance(node, yaml.MappingNode | yaml.SequenceNode) and not node.flow_style and node.value:
            last = node.value[-1]
            node = last[1] if isinstance(last, tuple) else last
        end = node.end_mark
        return end.line if end.column > 0 else end.line - 1

    indent = entry.value[0][0].start_mark.column
    existing = [(k, v) for k, v in entry.value if k.value == "tuned"]
    if existing:
        k, v = existing[0]
        start, stop = k.start_mark.line, last_line(v)
        del lines[start : stop + 1]
        insert_at = start
    else:
        insert_at = max(last_line(v) for _, v in entry.value) + 1
    block = yaml.safe_dump({"tuned": tuned}, sort_keys=False, default_flow_style=None, width=10_000)
    block = block.replace("tuned:\n", f"tuned:  # by `vitserve tune`; {tuned.get('report')}\n", 1)
    if lines and insert_at > 0 and not lines[insert_at - 1].endswith("\n"):
        lines[insert_at - 1] += "\n"
    lines[insert_at:insert_at] = [" " * indent + line for line in block.splitlines(keepends=True)]
    tmp = path.with_name(f".{path.name}.tune-tmp")
    tmp.write_text("".join(lines))
    try:
        spec = next(s for s in load_models(tmp) if s.name == model)
        expected = Tuned.parse(tuned, f"model {model} tuned")
        if spec.tuned != expected:
            raise ConfigError(
                f"writing the tuned settings into {path} did not round-trip: {spec.tuned} != {expected}"
            )
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


# --- the whole run ----------------------------------------------------------------------------------------


@dataclass
class TuneResult:
    model: str
    measured_model: str
    host: str
    command: str | None
    p99_budget_ms: float | None
    max_minutes: float
    concurrencies: list[int]
    batch_sizes: list[int]
    duration_s: float
    server_mode: str
    current: Knobs
    points: list[Point]
    front: list[Point]
    chosen: Point | None
    measured_configs: int
    reused_configs: int
    truncated: bool
    note: str | None
    elapsed_s: float
    load_avg: list[float] = field(default_factory=list)  # 1-min load average at start and end (shared host?)
    tuned: dict | None = None
    written_to: str | None = None
    check: dict | None = None
    files: dict[str, str] = field(default_factory=dict)


def run_tune(
    model: str,
    *,
    url: str | None = None,
    repository: str | Path = "model_repository",
    config: str | Path | None = None,
    p99_ms: float | None = None,
    max_minutes: float = 20.0,
    concurrencies: list[int] | None = None,
    batch_sizes: list[int] | None = None,
    duration_s: float = 4.0,
    warmup_s: float = 1.0,
    tensor: bool = False,
    images: str | Path | None = None,
    out_dir: str | Path | None = None,
    fresh: bool = False,
    write: bool = True,
    check: bool = True,
    check_batches: list[int] | None = None,
    space: Space | None = None,
    command: str | None = None,
    progress: bool = True,
) -> TuneResult:
    """Tune `model` (an ensemble of models.yaml, or any model of the repository) on this host; see the
    module docstring. Without `url`, starts tritonserver on `repository` with explicit model control and
    stops it at the end; with `url`, uses that server and leaves the chosen configuration loaded."""
    from vitserve.exporter.triton_models.onnx_cpu import usable_cores
    from vitserve.hostinfo import cpu_summary
    from vitserve.perf.inputs import connect, list_images

    t0 = time.monotonic()
    load_start = os.getloadavg()[0]
    concurrencies = sorted(set(concurrencies or [1, 4]))
    batch_sizes = sorted(set(batch_sizes or [1]))
    if min(concurrencies) < 1 or min(batch_sizes) < 1 or duration_s <= 0 or max_minutes <= 0:
        raise ConfigError(
            f"need concurrencies >= 1, batch sizes >= 1, duration_s > 0 and max_minutes > 0; got {concurrencies}, "
            f"{batch_sizes}, {duration_s}, {max_minutes}"
        )
    if p99_ms is not None and p99_ms <= 0:
        raise ConfigError(f"--p99-ms must be > 0, got {p99_ms}")
    check_batches = check_batches or [1, 2, 4, 8, 16]
    repository = Path(repository)
    budget_us = p99_ms * 1e3 if p99_ms is not None else None
    deadline = t0 + max_minutes * 60
    out = Path(out_dir or f"perf/results/tune-{model}")
    out.mkdir(parents=True, exist_ok=True)
    # perf_analyzer's CSVs, its image input file and the server log are scratch: tune.json keeps every number
    raw = Path(tempfile.mkdtemp(prefix=f"vitserve-tune-{model}-"))
    if write and config is not None:
        from vitserve.exporter.config import load_models

        if model not in {s.name for s in load_models(config)}:
            raise ConfigError(
                f"{config} has no model {model!r} to write the tuned settings into (or pass --no-write)"
            )
    host = cpu_summary()
    server = None
    if url is None:
        from vitserve.server import TritonServer

        server = TritonServer(
            repository, log_path=raw / "tritonserver.log",
            extra_args=["--model-control-mode=explicit", "--load-model=*"],
        )  # fmt: skip
        server.start()
        url = server.grpc_url
        mode = (
            f"tritonserver started by the tuner on {repository} (explicit model control, config-override "
            f"reloads; log {server.log_path})"
        )
    else:
        mode = f"the running tritonserver at {url} (explicit model control, config-override reloads)"
    client = connect(url)
    try:
        target = discover(client, model)
        current = current_knobs(target)
        image_files = None
        if target.ensemble is not None:
            if images is None:
                from vitserve.exporter.samples import write_eval_images

                images = raw / "images"
                write_eval_images(images)
            image_files = list_images(images)
        if target.ensemble is not None and not tensor:
            measured_name = f"{model} (bytes ensemble: the held-out JPEGs or --images)"
        elif target.ensemble is not None:
            measured_name = f"{model} tensor path (pixel_values into the routed backbone)"
        else:
            measured_name = model
        sig = signature(measured_name, batch_sizes, duration_s, host)
        sig["concurrencies"] = concurrencies
        store = out / MEASUREMENTS
        if fresh and store.exists():
            store.rename(out / f"measurements.{int(time.time())}.jsonl")
        earlier = load_earlier(store, sig)
        cores = usable_cores()
        max_batch = int(target.configs[target.backbones[current.variant]].get("max_batch_size", 1))
        space = space or default_space(
            list(target.backbones), cores, target.onnx_cpu, max_batch, concurrencies, current,
            ensemble=target.ensemble is not None and not tensor,
        )  # fmt: skip
        reloader = Reloader(client, target)
        measure = Measurer(
            url, client, target, reloader, tensor=tensor, concurrencies=concurrencies, batch_sizes=batch_sizes,
            duration_s=duration_s, warmup_s=warmup_s, images=image_files, raw_dir=raw, sig=sig,
        )  # fmt: skip
        per_config_s = 6 + len(concurrencies) * len(batch_sizes) * (duration_s + warmup_s + 2.5)
        check_s = 0.0
        if check and target.onnx_cpu and target.ensemble is not None:
            per_point = duration_s + warmup_s + 2.5
            in_process_s = (len({1, 8, 16, *check_batches}) + len(check_batches)) * (duration_s + 1)
            check_s = len(target.backbones) * (
                6 + CHECK_ROUNDS * (2 * len(check_batches) * len(concurrencies) * per_point + in_process_s)
            )
            check_s += 6 + len(concurrencies) * per_point
        search_deadline = deadline - check_s

        def save(new: list[Point]) -> None:
            with open(store, "a") as f:
                for p in new:
                    f.write(p.to_json() + "\n")

        spent: list[float] = []

        def timed(knobs: Knobs, stage: str) -> list[Point]:
            t = time.monotonic()
            try:
                return measure(knobs, stage)
            finally:
                spent.append(time.monotonic() - t)

        def out_of_time() -> bool:  # the next configuration would end past the deadline
            expected = max(per_config_s, sum(spent) / len(spent)) if spent else per_config_s
            return time.monotonic() + expected > search_deadline

        bar = _bar(progress)
        outcome = search(
            space, current, timed, p99_budget_us=budget_us, out_of_time=out_of_time,
            earlier=earlier, on_points=save, progress=bar,
        )  # fmt: skip
        if bar is not None:
            bar.close()
        chosen = choose(outcome.points, budget_us)
        result = TuneResult(
            model=model, measured_model=measured_name, host=host, command=command, p99_budget_ms=p99_ms,
            max_minutes=max_minutes, concurrencies=concurrencies, batch_sizes=batch_sizes, duration_s=duration_s,
            server_mode=mode, current=current, points=outcome.points, front=pareto_front(outcome.points),
            chosen=chosen, measured_configs=outcome.measured, reused_configs=outcome.reused,
            truncated=outcome.truncated, note=outcome.note, elapsed_s=0.0,
        )  # fmt: skip
        if chosen is not None:
            result.tuned = tuned_section(chosen.knobs, target, host=host, p99_ms=p99_ms, report=str(out))
            if check_s:
                result.check = compare_in_process(
                    measure, chosen.knobs, repository, check_batches, concurrencies, duration_s,
                    out_of_time=lambda: time.monotonic() > deadline, p99_budget_us=budget_us,
                )  # fmt: skip
            if server is None:
                reloader.apply(chosen.knobs)  # the user's server goes on serving the choice
            if write and config is not None:
                write_tuned(config, model, result.tuned)
                result.written_to = str(config)
    finally:
        client.close()
        if server is not None:
            server.stop()
    result.elapsed_s = time.monotonic() - t0
    result.load_avg = [load_start, os.getloadavg()[0]]
    result.files = write_tune_report(result, out)
    return result


def _bar(enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    bar = tqdm(unit="config", desc="tune")

    def update(label: str, i: int, n: int) -> None:
        bar.total = max(bar.total or 0, bar.n + (n - i))
        bar.set_description(label[:60])
        bar.update(1)

    update.close = bar.close  # type: ignore[attr-defined]
    return update


# --- command line ------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_command(sub: argparse._SubParsersAction) -> None:
    """Add `tune` to the `vitserve` command line."""
    p = sub.add_parser(
        "tune",
        help="find the serving settings (variant, instances, threads, spinning, dynamic batching) with the "
        "most images/s within a p99 budget on this host, and write them into models.yaml",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--model", required=True, help="the model of models.yaml (its ensemble) to tune")
    p.add_argument("--p99-ms", type=float, default=None, help="p99 latency budget in ms (default: none)")
    p.add_argument("--max-minutes", type=float, default=20.0, help="time bound of the whole run")
    p.add_argument("--config", default="models.yaml", help="where the choice is written (tuned: section)")
    p.add_argument("--repository", default="model_repository")
    p.add_argument("--url", default=None,
                   help="a running tritonserver (gRPC host:port) started with --model-control-mode=explicit; "
                   "default: start one on --repository")  # fmt: skip
    p.add_argument("--concurrency", type=_ints, default=[1, 4], help="client concurrencies per configuration")
    p.add_argument(
        "--batch", type=_ints, default=[1, 8],
        help="images per request while tuning (the workload: every configuration at each batch and concurrency)",
    )  # fmt: skip
    p.add_argument("--duration-s", type=float, default=4.0, help="measured seconds per point")
    p.add_argument("--warmup-s", type=float, default=1.0)
    p.add_argument(
        "--tensor", action="store_true", help="measure the backbone (pixel_values) instead of the ensemble"
    )
    p.add_argument("--images", default=None, help="images for the ensemble (default: the held-out photos)")
    p.add_argument("--out", default=None, help="report folder (default perf/results/tune-MODEL)")
    p.add_argument("--fresh", action="store_true", help="do not resume from earlier measurements in --out")
    p.add_argument("--no-write", action="store_true", help="report only; leave models.yaml as it is")
    p.add_argument("--no-check", action="store_true", help="skip the served vs in-process comparison")
    p.add_argument(
        "--check-batches",
        type=_ints,
        default=[1, 2, 4, 8, 16],
        help="request batch sizes of that comparison (the client picks the best whose p99 fits the budget)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_tune)


def _tune(args: argparse.Namespace) -> int:
    argv = ["vitserve", "tune", "--model", args.model, "--max-minutes", f"{args.max_minutes:g}",
            "--config", args.config, "--repository", args.repository,
            "--concurrency", ",".join(map(str, args.concurrency)), "--batch", ",".join(map(str, args.batch)),
            "--duration-s", f"{args.duration_s:g}", "--warmup-s", f"{args.warmup_s:g}",
            "--check-batches", ",".join(map(str, args.check_batches))]  # fmt: skip
    for flag, value in (
        ("--p99-ms", args.p99_ms),
        ("--url", args.url),
        ("--images", args.images),
        ("--out", args.out),
    ):
        if value is not None:
            argv += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    argv += [f for f, on in (("--tensor", args.tensor), ("--fresh", args.fresh), ("--no-write", args.no_write),
                             ("--no-check", args.no_check)) if on]  # fmt: skip
    result = run_tune(
        args.model, url=args.url, repository=args.repository, config=args.config, p99_ms=args.p99_ms,
        max_minutes=args.max_minutes, concurrencies=args.concurrency, batch_sizes=args.batch,
        duration_s=args.duration_s, warmup_s=args.warmup_s, tensor=args.tensor, images=args.images,
        out_dir=args.out, fresh=args.fresh, write=not args.no_write, check=not args.no_check,
        check_batches=args.check_batches, command=shlex.join(argv), progress=not args.no_progress,
    )  # fmt: skip
    print(f"server: {result.server_mode}")
    print(
        f"configurations: {result.measured_configs} measured now, {result.reused_configs} from earlier runs"
    )
    if result.truncated:
        print(f"note: {result.note}")
    print(f"report: {result.files.get('markdown')}")
    if result.chosen is None:
        best = min((p for p in result.points if p.ok), key=lambda p: p.p99_us, default=None)
        lowest = (
            f"; the lowest p99 measured was {best.p99_us / 1e3:.1f} ms ({best.knobs.key()})" if best else ""
        )
        raise ClientError(
            f"no configuration of {args.model} met the p99 budget of {args.p99_ms:g} ms{lowest}; nothing written. "
            "Raise --p99-ms, lower --concurrency, or serve a faster variant"
            if args.p99_ms is not None
            else f"no configuration of {args.model} could be measured; see {result.files.get('markdown')}"
        )
    c = result.chosen
    print(
        f"chosen: {c.knobs.key()} at concurrency {c.concurrency}: {c.images_per_s:.1f} img/s, "
        f"p99 {c.p99_us / 1e3:.1f} ms" + (f" (budget {args.p99_ms:g} ms)" if args.p99_ms else "")
    )
    if result.written_to:
        print(f"written to {result.written_to} (tuned: section of {args.model}); `make engines` applies it")
    return 0


# --- report ----------------------------------------------------------------------------------------------

MODEL_ANALYZER = """\
Triton's own tuner, Model Analyzer (triton-inference-server/model_analyzer; docs: config_search.md,
cli.md), profiles configurations with perf_analyzer: brute search over max_batch_size, dynamic batching
and instance groups (single models), a hill-climbing quick search (the default, and the only automatic
mode, for ensemble and BLS models), optuna or manual sweeps for other config fields; in online mode with
`--latency-budget` it picks the highest throughput within the budget, and it writes the chosen configs to
an output model repository. What `vitserve tune` adds for this project's hosts: the knobs that decide a CPU
host and live inside a python-backend model (onnxruntime intra-op threads per instance, split from the
usable cores; lanes, which cut a batch into 1-thread slices run at once while a lone request keeps every
core; onnxruntime spinning), which precision the ensemble routes to, the python preprocess step sharing
the same cores, the p99 budget held across the whole ensemble (bytes in, embeddings out, as a client sees
it), a choice made for the whole workload (every concurrency and request size, so that a win at one does
not cost the others) rather than for one point, every served config read back and checked before it is
measured, resumable bounded runs, and a write-back that `make engines` keeps (models.yaml `tuned:`), with
served vs in-process (and vs the served model's own executor) checked after in interleaved rounds."""


def _one_line(text: str | None) -> str:
    """An error as one table cell: its first line, pipes escaped."""
    return (text or "").strip().splitlines()[0].replace("|", "/") if text else ""


def _ms(us: float | None) -> str:
    return "-" if us is None or (isinstance(us, float) and math.isnan(us)) else f"{us / 1e3:.1f}"


def _f(v: float | None, digits: int = 1) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _server_cols(p: Point) -> str:
    """Queue and infer (ms) and average batch of the point's backbone: the `*_cpu` step of an ensemble, or
    the measured model itself."""
    b = next((v for k, v in p.server.items() if k.endswith("_cpu")), p.server.get(p.model, {}))
    return f"{_ms(b.get('queue_us'))} | {_ms(b.get('compute_infer_us'))} | {_f(b.get('avg_batch'))}"


def _points_table(points: list[Point]) -> list[str]:
    lines = [
        "| stage | configuration | concurrency | batch | img/s | p50 ms | p99 ms | backbone queue ms | backbone infer ms | avg batch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        if p.ok:
            lines.append(
                f"| {p.stage} | `{p.knobs.key()}` | {p.concurrency} | {p.batch_size} | {p.images_per_s:.1f} | {_ms(p.p50_us)} | "
                f"{_ms(p.p99_us)} | {_server_cols(p)} |"
            )
        else:
            lines.append(
                f"| {p.stage} | `{p.knobs.key()}` | {p.concurrency} | {p.batch_size} | failed: {_one_line(p.error)} | | | | | |"
            )
    return lines


def _breakdown(p: Point) -> list[str]:
    lines = [
        f"Configuration `{p.knobs.key()}`, concurrency {p.concurrency}, batch {p.batch_size}"
        f"{'' if p.shared_memory == 'none' else f', tensors in {p.shared_memory} shared memory'}: client p50 "
        f"{_ms(p.p50_us)} ms.",
        "",
        "| model | requests | queue ms | compute input ms | compute infer ms | compute output ms | avg batch |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m, s in p.server.items():
        lines.append(
            f"| {m} | {s.get('requests')} | {_ms(s.get('queue_us'))} | {_ms(s.get('compute_input_us'))} | "
            f"{_ms(s.get('compute_infer_us'))} | {_ms(s.get('compute_output_us'))} | {_f(s.get('avg_batch'))} |"
        )
    return lines


def markdown(r: TuneResult) -> str:
    budget = f"{r.p99_budget_ms:g} ms" if r.p99_budget_ms is not None else "none"
    out = [
        f"# vitserve tune: {r.model}",
        "",
        f"Command: `{r.command}`"
        if r.command
        else "Command: (a library call, `vitserve.perf.tune.run_tune`)",
        "",
        f"- host: {r.host}; 1-min load average {' -> '.join(f'{x:.1f}' for x in r.load_avg)} at start -> end"
        + (
            " (above the core count: other jobs shared the host)"
            if max(r.load_avg or [0]) > (os.cpu_count() or 1)
            else ""
        ),
        f"- server: {r.server_mode}",
        f"- measured: `{r.measured_model}` with perf_analyzer, {', '.join(map(str, r.batch_sizes))} image(s) per "
        f"request, concurrency {', '.join(map(str, r.concurrencies))}, every configuration at each, at least {r.duration_s:g} s per point (about ten "
        "request latencies where requests are slower; each point's `duration_s` is in tune.json)",
        f"- p99 budget: {budget}; time bound {r.max_minutes:g} min, took {r.elapsed_s / 60:.1f} min; "
        f"{r.measured_configs} configurations measured now, {r.reused_configs} reused from earlier runs",
        f"- configuration before tuning: `{r.current.key()}`",
        "- weights: whatever the repository holds (random-init models time like trained ones: same graph)",
    ]
    if r.truncated:
        out.append(f"- **truncated**: {r.note}")
    out += ["", "## Chosen", ""]
    if r.chosen is None:
        out.append("No configuration met the budget; nothing was written.")
    else:
        c = r.chosen
        out += [
            f"`{c.knobs.key()}`: {c.images_per_s:.1f} img/s with p99 {_ms(c.p99_us)} ms at client concurrency "
            f"{c.concurrency}, {c.batch_size} image(s) per request; chosen for the whole workload (the geometric "
            "mean of its throughput over the best at each concurrency and batch size, p99 within the budget at "
            "each).",
            "",
            "```yaml",
            _yaml({"tuned": r.tuned}).rstrip(),
            "```",
            "",
            f"Written to: {r.written_to or 'nowhere (--no-write or no models.yaml)'}. `make engines` writes these "
            "settings into config.pbtxt (instance_group, dynamic_batching, the `onnx_cpu` parameters, the "
            "ensemble's backbone step) and marks the configs with a `vitserve_tuned` parameter.",
        ]
    out += ["", "## Pareto front (throughput vs p99)", "", *_points_table(r.front), "", "![front](front.png)"]
    out += ["", "## Every configuration", "", *_points_table(r.points)]
    effects = knob_effects(r.points)
    if effects:
        out += [
            "",
            "## What each knob did on this host",
            "",
            "Configurations that differ in one knob only, at the same concurrency and batch size: throughput and "
            "p99 of the second value over the first (geometric mean over the pairs measured).",
            "",
            "| knob | from | to | concurrency | batch | pairs | img/s x | p99 x |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        out += [
            f"| {e['knob']} | {e['from']} | {e['to']} | {e['concurrency']} | {e['batch_size']} | {e['pairs']} | "
            f"{e['images_per_s_x']:.2f} | {e['p99_x']:.2f} |"
            for e in effects
        ]
    if r.chosen is not None:
        out += ["", "## Where the time goes (chosen configuration)", "", *_breakdown(r.chosen)]
    if r.check:
        out += ["", *_check_markdown(r.check)]
    out += ["", "## Model Analyzer, and what vitserve adds", "", MODEL_ANALYZER, ""]
    return "\n".join(out)


def _check_markdown(check: dict) -> list[str]:
    out = [
        "## Served (tuned) vs in-process",
        "",
        f"In-process: onnxruntime on the same ONNX file, {check['cores']} intra-op threads (every usable core), "
        "at its best batch size of those run. Served: the tensor path (`pixel_values`) of each variant with the "
        f"chosen settings. {check.get('rounds', 1)} interleaved round(s): per round and batch size, in-process "
        "then served back to back; each ratio is taken within its round, the median over the rounds is shown "
        "(with the median served point).",
        "",
    ]
    if check.get("summary"):
        out += [
            "Each variant, tensor transport and concurrency: the client batch size that served best with p99 "
            "within the budget (where none fits: the best, marked 'no') against in-process at its best batch "
            "size (the client picks its batch size as the in-process caller does). Tensors in the gRPC "
            "messages, or in system shared memory (a client on the server's host):",
            "",
            "| variant | tensors | concurrency | best client batch | served img/s | p99 ms | p99 in budget | "
            "in-process best | served / in-process |",
            "|---|---|---:|---:|---:|---:|---|---:|---:|",
        ]
        for r in check["summary"]:
            best = check["in_process"][r["variant"]]["best"]
            out.append(
                f"| {r['variant']} | {_transport(r.get('shared_memory', 'none'))} | {r['concurrency']} | "
                f"{r['batch_size']} | {r['images_per_s']:.1f} | {_ms(r['p99_us'])} | "
                f"{'yes' if r.get('within_budget', True) else 'no'} | {best['images_per_s']:.1f} "
                f"(b{best['batch_size']}) | {_f(r['ratio'], 2)} |"
            )
        out += [
            "",
            "Every batch size measured (same batch: against in-process at the client's batch size):",
            "",
        ]
    out += [
        "| variant | tensors | in-process best | batch | concurrency | served img/s | p99 ms | served / in-process | "
        "same batch | same executor |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in check["tensor"]:
        p, best = row["point"], check["in_process"][row["variant"]]["best"]
        served = f"{p.images_per_s:.1f}" if p.ok else f"failed: {_one_line(p.error)}"
        out.append(
            f"| {row['variant']} | {_transport(p.shared_memory)} | {best['images_per_s']:.1f} (b{best['batch_size']}) | {p.batch_size} | "
            f"{p.concurrency} | {served} | {_ms(p.p99_us)} | {_f(row['ratio'], 2)} | "
            f"{_f(row.get('same_batch_ratio'), 2)} | {_f(row.get('executor_ratio'), 2)} |"
        )
    out += [
        "",
        "Same executor: against the served model's own code (onnx_cpu.py with the chosen threads, lanes and spinning) run "
        "in this process at the client's batch size, so what is left is the cost of serving (transfer, queue, "
        "the python stub). In-process runs:",
        "",
        "| variant | batch | one session img/s | p50 ms | same executor img/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for v, info in check["in_process"].items():
        ex = {r["batch_size"]: r["images_per_s"] for r in info.get("executor", {}).get("runs", [])}
        for run in info["runs"]:
            out.append(
                f"| {v} | {run['batch_size']} | {run['images_per_s']:.1f} | {_ms(run['p50_us'])} | "
                f"{_f(ex.get(run['batch_size']))} |"
            )
    if check["ensemble"]:
        out += [
            "",
            "Bytes ensemble (JPEG in, preprocess + backbone on the same cores) vs the tensor path of the variant "
            "it routes to (gRPC, the median round), at the same images per request and concurrency:",
            "",
            "| batch | concurrency | ensemble img/s | p99 ms | tensor path img/s | ensemble / tensor |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for row in check["ensemble"]:
            p, t = row["point"], row["tensor"]
            out.append(
                f"| {p.batch_size} | {p.concurrency} | {_f(p.images_per_s)} | {_ms(p.p99_us)} | "
                f"{_f(t.images_per_s) if t else '-'} | {_f(row['ratio'], 2)} |"
            )
        out += ["", "Where the ensemble's time goes:", ""]
        for row in check["ensemble"]:
            out += [*_breakdown(row["point"]), ""]
    tensor_c1 = [row["point"] for row in check["tensor"] if row["point"].ok and row["point"].concurrency == 1]
    if tensor_c1:
        out += ["", "Where a tensor request's time goes at concurrency 1:", ""]
        for p in tensor_c1:
            out += [*_breakdown(p), ""]
    return out


def _transport(shared_memory: str) -> str:
    return "gRPC" if shared_memory == "none" else f"{shared_memory} shm"


def _yaml(data) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=10_000)


def _plot(r: TuneResult, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [p for p in r.points if p.ok]
    if not ok:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c, b in sorted({(p.concurrency, p.batch_size) for p in ok}):
        pts = [p for p in ok if (p.concurrency, p.batch_size) == (c, b)]
        ax.scatter([p.p99_us / 1e3 for p in pts], [p.images_per_s for p in pts], s=18, alpha=0.6,
                   label=f"concurrency {c}, batch {b}")  # fmt: skip
    front = sorted(r.front, key=lambda p: p.p99_us)
    ax.step([p.p99_us / 1e3 for p in front], [p.images_per_s for p in front], where="post", color="k",
            lw=1, label="Pareto front")  # fmt: skip
    if r.p99_budget_ms is not None:
        ax.axvline(r.p99_budget_ms, color="r", ls="--", lw=1, label=f"p99 budget {r.p99_budget_ms:g} ms")
    if r.chosen is not None:
        ax.scatter([r.chosen.p99_us / 1e3], [r.chosen.images_per_s], s=120, facecolors="none", edgecolors="r",
                   label="chosen")  # fmt: skip
    ax.set_xlabel("p99 latency (ms)")
    ax.set_ylabel("images / s")
    ax.set_title(f"vitserve tune {r.model}: {r.measured_model}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return str(path)


def _json_ready(value):
    if isinstance(value, Point):
        return asdict(value)
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def write_tune_report(r: TuneResult, out_dir: str | Path) -> dict[str, str]:
    """report.md, tune.json and front.png in `out_dir` (written to temporary names, then renamed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    plot = _plot(r, out / "front.png")
    if plot:
        files["plot"] = plot
    data = _json_ready({k: getattr(r, k) for k in r.__dataclass_fields__ if k != "files"})
    data["current"] = asdict(r.current)
    for name, text in (("tune.json", json.dumps(data, indent=1, default=str)), ("report.md", markdown(r))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text + "\n")
        tmp.replace(out / name)
    files["json"] = str(out / "tune.json")
    files["markdown"] = str(out / "report.md")
    files["measurements"] = str(out / MEASUREMENTS)
    return files
