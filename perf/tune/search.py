"""Measured points -> the configurations to measure next and the choice: the tuner's search, no server.

A configuration is `Knobs` (its knobs named as models.yaml `tuned:` and the served parameters name them:
`cpu_threads`, `cpu_spinning`, `cpu_lanes`, `flavour`, `preprocess_instances`, `preprocess_threads`), a
measurement of it at one (concurrency, images per request) a `Point`. The stages (`stage_plan`): `compute`
(variant x instances/threads x lanes x spinning, batching as configured), then `engine` (each variant, with
the best compute settings, on every other flavour, engine + file, that its model has, this host's order
tries and that passed its probe here: an engine's speed depends on the host more than on the settings tuned
around it, so it is measured once, not crossed with them), then `batching` (queue delay x preferred
sizes around the best so far), then `preprocess` (instances x threads; ensemble only), then `refine` (the
compute knobs again under the batching and preprocess chosen, and the other variants), then `untuned` (the
configuration the server had before tuning, measured as it is, so that the report can say what tuning
bought: `untuned_over_tuned`). The choice (`choose`) is the configuration with the best geometric mean of
its throughput over the best seen at each workload point, p99 within the budget at every one;
`pareto_front` and `knob_effects` are for the report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from vitserve.errors import ConfigError

STAGES = ("compute", "engine", "batching", "preprocess", "refine", "untuned")
# points stored by a tuner with other knobs (before `lanes`, preprocess threads, the contract's names) are
# not reused; a point without `flavour` (before the engine knob) was measured as served, which `flavour`
# None still means: those are reused
KNOBS_VERSION = 4
TIE_TOLERANCE = 0.02  # points within 2 % of the best throughput are ties; the lowest p99 wins


@dataclass(frozen=True)
class Knobs:
    """One serving configuration. `cpu_threads`/`cpu_spinning` are None where they do not apply (not a
    vitserve CPU backbone; spinning None: onnxruntime's default), `preprocess_instances` None where there is
    no preprocess model or it is left as configured. `variant` is the precision the ensemble routes to (for a
    plain model: its name); `flavour` the engine and file it is pinned to (contract.CPU_FLAVOURS; None: as
    served, the host's pick). Each knob is named as contract.CpuBackboneParams / PreprocessParams and models.yaml
    `tuned:` (exporter.config.Tuned) name it; tune/configs.py and tune/writeback.py carry them there."""

    variant: str
    instances: int
    cpu_threads: int | None
    cpu_spinning: bool | None
    queue_delay_us: int
    preferred: tuple[int, ...]
    preprocess_instances: int | None = None
    cpu_lanes: int | None = None  # slices a batch runs as at once (1: off); None: as served
    preprocess_threads: int | None = None  # images of one request preprocessed at once; None: as served
    flavour: str | None = None  # the CPU backbone's engine + file, pinned; None: as served (the host's pick)

    def key(self) -> str:
        spin = {None: "default", True: "on", False: "off"}[self.cpu_spinning]
        pref = ",".join(map(str, self.preferred)) or "none"
        pre = f"{self.preprocess_instances or '-'}" + (
            f"x{self.preprocess_threads}" if self.preprocess_threads else ""
        )
        engine = f"@{self.flavour}" if self.flavour else ""
        return (
            f"{self.variant}{engine} i{self.instances} t{self.cpu_threads or '-'} l{self.cpu_lanes or '-'} spin={spin} "
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
    `lanes`: False (one session) and/or True (one 1-thread lane per thread), for instances of 2+ threads;
    `shared_cores`: more pairs whose instances each get every core (they overlap one another's serving
    work, the stub round trip and the transfer, with compute), tried with spinning off only: two spinning
    pools on the same cores stall each other. `flavours`: per variant, the flavours to pin it to in the
    `engine` stage (those its model has, this host's order tries and that passed their probe here, less the
    one it serves unpinned; tune/configs.py `engine_candidates`)."""

    variants: list[str]
    instance_threads: list[tuple[int, int | None]]
    spinning: list[bool | None]
    queue_delays_us: list[int]
    preferred: list[tuple[int, ...]]
    preprocess_instances: list[int | None] = field(default_factory=lambda: [None])
    lanes: list[bool] = field(default_factory=lambda: [False])
    preprocess_threads: list[int | None] = field(default_factory=lambda: [None])
    shared_cores: list[tuple[int, int]] = field(default_factory=list)
    flavours: dict[str, list[str]] = field(default_factory=dict)


def default_space(
    variants: list[str],
    cores: int,
    onnx_cpu: bool,
    max_batch_size: int,
    concurrencies: list[int],
    current: Knobs,
    ensemble: bool,
    shared_cores: bool = False,
    flavours: dict[str, list[str]] | None = None,
) -> Space:
    """The space for a host with `cores` usable cores: instances 1, 2, 4, ... <= cores, each with the
    cores split among them, and one instance with a core left free (vitserve CPU backbones; other models
    keep their threads); spinning on/off; lanes off/on (a batch cut into 1-thread slices run at once);
    queue delays 0, 2 ms, 10 ms and the configured one; preferred sizes as configured, the largest batch the
    highest concurrency can form, and max_batch_size; preprocess instances 1 and the cores, each with 1 and
    `cores` threads (ensemble; threads for the python preprocess model only: a request's images at once).
    `shared_cores`: also two instances of every core each (vitserve CPU backbones, 2+ cores). `flavours`:
    per variant, the other engines to try (vitserve CPU backbones; see `Space`)."""
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
        shared_cores=[(2, cores)] if shared_cores and onnx_cpu and cores > 1 else [],
        flavours={v: list(f) for v, f in (flavours or {}).items() if f and v in variants} if onnx_cpu else {},
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
            replace(routed_to(current, v), instances=i, cpu_threads=t, cpu_spinning=s, cpu_lanes=n)
            for v in space.variants
            for i, t in space.instance_threads
            for n in lanes(t)
            for s in (space.spinning if t is None or t > 1 else [None])
        ]
        plan += [
            replace(routed_to(current, v), instances=i, cpu_threads=t, cpu_spinning=False, cpu_lanes=n)
            for v in space.variants
            for i, t in space.shared_cores
            for n in lanes(t)
        ]
    elif stage == "engine":
        # each variant with the best compute settings on its other engines, unpinned too where it is not the
        # best's variant (the reference the pins are compared with; `refine` would measure it anyway)
        plan = []
        for v, others in space.flavours.items():
            plan += [replace(best, variant=v, flavour=f) for f in others]
            plan += [routed_to(best, v)] if others and v != best.variant else []
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
        plan += [routed_to(best, v) for v in space.variants if v != best.variant]
    elif stage == "untuned":
        plan = [current]  # the reference for untuned / tuned: the served defaults, as they are
    else:
        raise ConfigError(f"unknown tuning stage {stage!r}; stages: {', '.join(STAGES)}")
    return list(dict.fromkeys(plan))


def routed_to(knobs: Knobs, variant: str) -> Knobs:
    """`knobs` routed to `variant`: a flavour pin is one model's (another variant has other flavours), so
    another variant serves as served."""
    return knobs if variant == knobs.variant else replace(knobs, variant=variant, flavour=None)


def untuned_over_tuned(points: Iterable[Point], untuned: Knobs, tuned: Knobs) -> dict[str, Any] | None:
    """The untuned configuration's throughput over the tuned one's at every workload point both were measured
    at, and the geometric mean of those ratios (None when either was not measured)."""
    ok = [p for p in points if p.ok]
    at = {k: {(p.concurrency, p.batch_size): p for p in ok if p.knobs == k} for k in (untuned, tuned)}
    shared = sorted(set(at[untuned]) & set(at[tuned]))
    if not shared:
        return None
    rows = [
        {"concurrency": c, "batch_size": b, "untuned": at[untuned][(c, b)].images_per_s,
         "tuned": at[tuned][(c, b)].images_per_s,
         "ratio": at[untuned][(c, b)].images_per_s / at[tuned][(c, b)].images_per_s}
        for c, b in shared
    ]  # fmt: skip
    geomean = math.exp(sum(math.log(r["ratio"]) for r in rows) / len(rows))
    return {"knobs": untuned.key(), "chosen": tuned.key(), "points": rows, "geomean": geomean}


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
    "engine": ("flavour",),
    "instances x threads": ("instances", "cpu_threads", "cpu_spinning"),  # 1 thread: no pool, no spinning
    "spinning": ("cpu_spinning",),
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
