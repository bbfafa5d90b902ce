"""The served models a tune changes: read from the server, rewritten with a configuration, reloaded, checked.

`discover` finds what is tuned (`Target`: an ensemble, its preprocess step and the CPU backbone variants it
can route to, or a plain model), `current_knobs` the configuration the server had, `backbone_override` and
`Reloader.wanted` the configs that serve a configuration, and `Reloader` loads them through Triton's load API
with a config override (the repository's files are never touched) and reads the served configs back;
`engine_candidates` scores each variant's flavours on its probe in this process (onnx_cpu.probe_flavours) for
the `engine` stage. The
`onnx_cpu` and `preprocess` parameters are read and written through the served-model contract
(contract.CpuBackboneParams, PreprocessParams), validated both ways; `cpu_params` is the one place the
knobs meet them.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from vitserve.contract import (
    CPU_BACKBONE_PARAM,
    FP32_FLAVOURS,
    PREPROCESS_PARAM,
    ContractError,
    CpuBackboneParams,
    Kind,
    PreprocessParams,
    parse_backbone_model_name,
)
from vitserve.errors import ConfigError, ServerError
from vitserve.perf.tune.search import Knobs


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
    return config.get("backend") == "python" and CPU_BACKBONE_PARAM in (config.get("parameters") or {})


def served_params(cls: type[CpuBackboneParams] | type[PreprocessParams], config: dict):
    """A served model's typed parameters from its config (Triton's JSON), validated; ConfigError naming the
    model and the key when they are malformed."""
    try:
        return cls.from_model_config(config)
    except ContractError as e:
        raise ConfigError(f"{e}; rebuild the repository (`make engines`)") from None


def with_params(config: dict, params: CpuBackboneParams | PreprocessParams) -> dict:
    """`config` (Triton's JSON, changed in place) carrying `params` as its parameter `params.KEY`."""
    config.setdefault("parameters", {})[params.KEY] = {"string_value": params.to_json()}
    return config


def cpu_params(params: CpuBackboneParams, knobs: Knobs) -> CpuBackboneParams:
    """The served CPU backbone parameters `params` with the knobs' threads, spinning, lanes and flavour
    (None: threads "auto", spinning onnxruntime's default, lanes and flavour as served). `share` 1: the
    threads are per instance, as chosen for this model alone."""
    lanes = params.cpu_lanes if knobs.cpu_lanes is None else knobs.cpu_lanes
    flavour = params.flavour if knobs.flavour is None else knobs.flavour
    return replace(params, cpu_threads=knobs.cpu_threads or "auto", cpu_spinning=knobs.cpu_spinning,
                   cpu_lanes=lanes, flavour=flavour, share=1)  # fmt: skip


def discover(client, name: str) -> Target:
    """Read `name` from the server: an ensemble (its preprocess step and the backbone variants
    `NAME_{precision}_cpu` the repository serves) or a plain model."""
    from tritonclient.utils import InferenceServerException

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
        v = parse_backbone_model_name(m)
        if v is not None and v[0] == name and v[2] is Kind.CPU:
            backbones[v[1].value] = m
    routed = [s for s in steps if s in backbones.values()]
    if not routed:
        raise ConfigError(
            f"ensemble {name!r} routes to {steps}, none of them a CPU backbone ({name}_PRECISION_cpu); "
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
    threads = spinning = lanes = flavour = None
    if target.onnx_cpu:
        params = served_params(CpuBackboneParams, cfg)
        threads = params.cpu_threads if isinstance(params.cpu_threads, int) else None  # "auto": not a knob
        spinning = params.cpu_spinning
        lanes = params.cpu_lanes if isinstance(params.cpu_lanes, int) else None
        flavour = params.flavour
    db = cfg.get("dynamic_batching") or {}
    pre = pre_threads = None
    if target.preprocess is not None:
        pre_cfg = target.configs[target.preprocess]
        pre = sum(int(g.get("count", 1)) for g in pre_cfg.get("instance_group", []))
        if PREPROCESS_PARAM in (pre_cfg.get("parameters") or {}):  # the python model (not DALI)
            pre_threads = served_params(PreprocessParams, pre_cfg).preprocess_threads
    return Knobs(
        variant=variant,
        instances=sum(int(g.get("count", 1)) for g in cfg.get("instance_group", [])) or 1,
        cpu_threads=threads,
        cpu_spinning=spinning,
        queue_delay_us=int(db.get("max_queue_delay_microseconds", 0) or 0),
        preferred=tuple(int(b) for b in db.get("preferred_batch_size", [])),
        preprocess_instances=pre,
        cpu_lanes=lanes,
        preprocess_threads=pre_threads,
        flavour=flavour,
    )


def engine_candidates(target: Target, repository: str | Path, threads: int = 1) -> dict[str, dict]:
    """Per variant of a CPU target, its flavours scored on its probe in this process, as the server would
    score them (onnx_cpu.probe_flavours on the model's folder in `repository`, the model's `isa` parameter
    honoured): `flavours` (flavour -> cosine and max abs, or the error), `serves` (what it serves unpinned,
    its served `flavour` pin first) and `sweep` (the flavours the `engine` stage pins it to: those this
    host's order tries and that passed, less `serves`). A quantized model's FP32 flavours are its fallback,
    the fp32 variant's engines: not swept there. A variant whose folder is not here (a remote repository)
    gets a `note` and no sweep."""
    from vitserve.exporter.triton_models.onnx_cpu import (
        cpu_flags,
        flavour_order,
        host_isa,
        probe_flavours,
        probe_passed,
    )

    out: dict[str, dict] = {}
    if not target.onnx_cpu:
        return out
    for variant, model in target.backbones.items():
        params = served_params(CpuBackboneParams, target.configs[model])
        if len(params.flavours) < 2:
            continue
        folder = Path(repository) / model
        if not (folder / "config.pbtxt").is_file():
            out[variant] = {"model": model, "sweep": [], "note": f"{folder} not found: engines not swept"}
            continue
        if not _serves_pins(folder):
            note = "its served code predates the `flavour` pin: rebuild (`make engines`) to sweep engines"
            out[variant] = {"model": model, "sweep": [], "note": note}
            continue
        isa = host_isa(cpu_flags(), forced=params.isa)
        order = flavour_order(isa, list(params.flavours))
        quantized = any(f not in FP32_FLAVOURS for f in params.flavours)
        scored = [f for f in order if f not in FP32_FLAVOURS] if quantized else order
        scored += [params.flavour] if params.flavour and params.flavour not in scored else []
        # an engine missing here or failing on the file comes back with its `error`: not a candidate
        r = probe_flavours(str(folder), params.isa, threads, every=True, only=scored)
        scores = {f: {**r["flavours"][f], "passed": probe_passed(r, f)} for f in scored}
        # what serves unpinned: the first of the served order that passes (an unscored FP32 fallback serves)
        served = flavour_order(isa, list(params.flavours), params.flavour)
        serves = next((f for f in served if scores.get(f, {"passed": True})["passed"]), None)
        out[variant] = {
            "model": model, "isa": isa, "min_cosine": params.probe_min_cosine, "flavours": scores,
            "serves": serves, "sweep": [f for f in order if scores.get(f, {}).get("passed") and f != serves],
        }  # fmt: skip
    return out


def _serves_pins(folder: Path) -> bool:
    """Whether the served copy of the contract beside a CPU model's model.py (written at build time) has
    the `flavour` parameter: a repository built before it refuses the key."""
    import ast

    try:
        tree = ast.parse((folder / "1" / "vitserve_contract.py").read_text())
    except (OSError, SyntaxError):
        return False
    return any(
        isinstance(node, ast.ClassDef) and node.name == CpuBackboneParams.__name__
        and any(isinstance(a, ast.AnnAssign) and getattr(a.target, "id", None) == "flavour" for a in node.body)
        for node in ast.walk(tree)
    )  # fmt: skip


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
        with_params(cfg, cpu_params(served_params(CpuBackboneParams, cfg), knobs))
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
                params = served_params(PreprocessParams, pre)
                with_params(pre, replace(params, preprocess_threads=knobs.preprocess_threads))
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
        for cls in (CpuBackboneParams, PreprocessParams):  # the backbone's and the python preprocess model's
            if cls.KEY in (cfg.get("parameters") or {}):
                try:
                    same = cls.from_model_config(served) == served_params(cls, cfg)
                except ContractError:
                    same = False
                if not same:
                    problems.append(f"{cls.KEY} parameters differ")
        if "ensemble_scheduling" in cfg:
            steps = [st["model_name"] for st in served.get("ensemble_scheduling", {}).get("step", [])]
            if steps != [st["model_name"] for st in cfg["ensemble_scheduling"]["step"]]:
                problems.append(f"ensemble steps {steps}")
        return problems
