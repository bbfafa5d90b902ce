"""What the real components do with deploy/'s files, replayed from their own sources at named versions
(tests/data/deploy/README.md): Kubernetes' strategic merge and resource rules, KServe v0.20.0's predictor
merge, HPA and CRD validation, prometheus-adapter v0.12.0's strict config loader and its query, and
tritonserver 2.51's restricted-API groups. Used by tests/test_deploy.py; each replay names the upstream
function it follows."""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
from fractions import Fraction
from pathlib import Path

import kubernetes_validate as kv
import yaml

DATA = Path(__file__).resolve().parent / "data" / "deploy"
KSERVE = DATA / "kserve-v0.20.0"
ADAPTER = DATA / "prometheus-adapter-v0.12.0"
ADAPTER_CHART = DATA / "prometheus-adapter-chart-5.3.0"


# --- Kubernetes: strategic merge and resource quantities --------------------------------------------------


def _k8s_defs() -> dict:
    version = kv.latest_version()
    ref = importlib.resources.files("kubernetes_validate") / (
        f"kubernetes-json-schema/v{version}-local-strict/_definitions.json"
    )
    return json.loads(ref.read_text())["$defs"]


K8S_DEFS = _k8s_defs()


def _schema(node: dict | None) -> dict | None:
    """Follow a `$ref` of the bundled OpenAPI to its definition."""
    if node and "$ref" in node:
        return K8S_DEFS[node["$ref"].rsplit("/", 1)[-1]]
    return node


def strategic_merge(original, patch, schema: dict | None):
    """Kubernetes' strategic merge patch (apimachinery strategicpatch.StrategicMergePatch) of `patch` over
    `original`, typed by `schema`: maps merge key by key (null deletes), lists with
    x-kubernetes-patch-strategy `merge` merge their elements by x-kubernetes-patch-merge-key, other lists and
    scalars are replaced."""
    schema = _schema(schema)
    if not (isinstance(original, dict) and isinstance(patch, dict)):
        return copy.deepcopy(patch)
    out = copy.deepcopy(original)
    props = (schema or {}).get("properties", {})
    for key, value in patch.items():
        field = _schema(props.get(key)) if props else _schema((schema or {}).get("additionalProperties"))
        if value is None:
            out.pop(key, None)
        elif key not in out:
            out[key] = copy.deepcopy(value)
        elif isinstance(value, dict):
            out[key] = strategic_merge(out[key], value, field)
        elif isinstance(value, list) and "merge" in (props.get(key) or {}).get(
            "x-kubernetes-patch-strategy", ""
        ):
            merge_key = props[key].get("x-kubernetes-patch-merge-key")
            item_schema = props[key].get("items") or {}
            merged = list(out[key])
            for item in value:
                if merge_key is None:  # a list of scalars: union
                    if item not in merged:
                        merged.append(item)
                    continue
                at = [i for i, o in enumerate(merged) if o.get(merge_key) == item.get(merge_key)]
                if at:
                    merged[at[0]] = strategic_merge(merged[at[0]], item, item_schema)
                else:
                    merged.append(copy.deepcopy(item))
            out[key] = merged
        else:
            out[key] = copy.deepcopy(value)
    return out


CONTAINER = "io.k8s.api.core.v1.Container"
POD_SPEC = "io.k8s.api.core.v1.PodSpec"
_SUFFIX = {
    "n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000), "": Fraction(1),
    "k": Fraction(10**3), "M": Fraction(10**6), "G": Fraction(10**9), "T": Fraction(10**12),
    "P": Fraction(10**15), "E": Fraction(10**18), "Ki": Fraction(2**10), "Mi": Fraction(2**20),
    "Gi": Fraction(2**30), "Ti": Fraction(2**40), "Pi": Fraction(2**50), "Ei": Fraction(2**60),
}  # fmt: skip


def quantity(value) -> Fraction:
    """A Kubernetes resource.Quantity ("500m", "2Gi", "1e3", 4) as an exact number."""
    m = re.fullmatch(r"([+-]?[0-9.]+)(?:([eE][+-]?[0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?)", str(value))
    if not m:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    number = Fraction(m.group(1))
    return number * (Fraction(10) ** int(m.group(2)[1:]) if m.group(2) else _SUFFIX[m.group(3) or ""])


def resource_problems(container: dict) -> list[str]:
    """What the API server refuses in a container's resources (pkg/apis/core/validation
    ValidateResourceRequirements): a request above its limit; for resources that cannot be overcommitted
    (extended ones such as nvidia.com/gpu, hugepages) a request without a limit or different from it."""
    res = container.get("resources") or {}
    requests, limits = res.get("requests") or {}, res.get("limits") or {}
    problems = []
    for name, req in requests.items():
        native = "/" not in name or name.startswith("kubernetes.io/")
        if name in limits and quantity(req) > quantity(limits[name]):
            problems.append(
                f"{container['name']}: requests.{name} {req} must be <= limits.{name} {limits[name]}"
            )
        if (not native or name.startswith("hugepages-")) and (
            name not in limits or quantity(req) != quantity(limits[name])
        ):
            problems.append(f"{container['name']}: {name} cannot be overcommitted: request must equal limit")
    return problems


# --- KServe v0.20.0 -------------------------------------------------------------------------------------


KSERVE_DEPLOYMENT_MODES = {"Standard", "Knative", "ModelMeshDeployment"}
KSERVE_LEGACY_MODES = {"RawDeployment": "Standard", "Serverless": "Knative"}
KSERVE_DEFAULT_CPU_UTILIZATION = 80
KSERVE_CONTAINER = "kserve-container"


def kserve_runtime() -> dict:
    return yaml.safe_load((KSERVE / "kserve-tritonserver.yaml").read_text())


def kserve_deployment(isvc: dict, runtime: dict) -> dict:
    """The predictor Deployment KServe v0.20.0 builds in Standard mode (components/predictor.go buildPodSpec,
    utils.MergeServingRuntimeAndInferenceServiceSpecs, deployment_reconciler.createRawDefaultDeployment):
    spec.predictor.model's container fields merged over the runtime's kserve-container by strategic merge,
    args appended to the runtime's; the predictor's pod fields over the runtime's pod fields; the
    INFERENCE_SERVICE_NAME env added; a TCP readiness probe on 8080 when none is given."""
    predictor = isvc["spec"]["predictor"]
    container_fields = set(K8S_DEFS[CONTAINER]["properties"])
    pod_fields = set(K8S_DEFS[POD_SPEC]["properties"])
    model = {
        k: v for k, v in predictor["model"].items() if k in container_fields
    }  # json tags of corev1.Container
    (runtime_container,) = [c for c in runtime["spec"]["containers"] if c["name"] == KSERVE_CONTAINER]
    container = strategic_merge(runtime_container, model, {"$ref": f"#/$defs/{CONTAINER}"})
    container["name"] = container.get("name") or KSERVE_CONTAINER
    container["args"] = list(runtime_container.get("args", [])) + list(model.get("args", []))
    runtime_pod = {
        k: runtime["spec"][k]
        for k in ("nodeSelector", "affinity", "tolerations", "volumes", "imagePullSecrets", "schedulerName")
        if k in runtime["spec"]
    }
    pod = strategic_merge(
        runtime_pod, {k: v for k, v in predictor.items() if k in pod_fields}, {"$ref": f"#/$defs/{POD_SPEC}"}
    )
    if not any(e["name"] == "INFERENCE_SERVICE_NAME" for e in container.get("env", [])):
        container.setdefault("env", []).append(
            {"name": "INFERENCE_SERVICE_NAME", "value": isvc["metadata"]["name"]}
        )
    container.setdefault("readinessProbe", {"tcpSocket": {"port": 8080}, "periodSeconds": 10})
    pod["containers"] = [container]
    name = f"{isvc['metadata']['name']}-predictor"
    labels = {"app": f"isvc.{name}"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": dict(labels)},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }


def kserve_hpa(isvc: dict) -> dict | None:
    """The HPA KServe v0.20.0 makes for a predictor (reconcilers/hpa/hpa_reconciler.go createHPA and
    getHPAMetrics without spec.predictor.autoScaling): spec.predictor.scaleMetric / scaleTarget, nothing else."""
    annotations = isvc["metadata"].get("annotations", {})
    if annotations.get("serving.kserve.io/autoscalerClass", "hpa") != "hpa":
        return None
    predictor = isvc["spec"]["predictor"]
    min_replicas = max(predictor.get("minReplicas", 1), 1)
    max_replicas = max(predictor.get("maxReplicas", 0), min_replicas)
    metric = predictor.get("scaleMetric", "cpu")
    metrics = []
    if metric == "cpu":
        target = predictor.get("scaleTarget", KSERVE_DEFAULT_CPU_UTILIZATION)
        metrics.append({"type": "Utilization", "averageUtilization": target})
    elif metric == "memory" and "scaleTarget" in predictor:
        metrics.append({"type": "Utilization", "averageUtilization": predictor["scaleTarget"]})
    name = f"{isvc['metadata']['name']}-predictor"
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": min_replicas,
            "maxReplicas": max_replicas,
            "metrics": [{"type": "Resource", "resource": {"name": metric, "target": t}} for t in metrics],
        },
    }


def crd_strict(node):
    """An OpenAPI v3 CRD schema as JSON Schema with unknown fields refused, as the API server does with
    strict field validation (kubectl's default): an object with `properties` takes no other key unless it
    keeps unknown fields; int-or-string and nullable as Kubernetes reads them."""
    if isinstance(node, list):
        return [crd_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: crd_strict(v) for k, v in node.items() if k != "description"}
    keeps_unknown = node.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in node and "additionalProperties" not in node and not keeps_unknown:
        out["additionalProperties"] = False
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def isvc_crd_validator():
    """A JSON-schema validator of KServe's InferenceService CRD (v1beta1), strict as the API server is."""
    import gzip

    import jsonschema

    text = gzip.decompress((KSERVE / "serving.kserve.io_inferenceservices.yaml.gz").read_bytes())
    crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1.9 MB: libyaml if present
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    return jsonschema.Draft7Validator(crd_strict(version["schema"]["openAPIV3Schema"]))


def crd_errors(validator, obj: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


# --- prometheus-adapter v0.12.0 (and its Helm chart 5.3.0) ---------------------------------------------------


def _go_structs(source: str) -> dict[str, dict[str, str]]:
    """{struct: {yaml key: Go type}} from Go source: the adapter's config schema, read from its own file."""
    structs = {}
    for name, body in re.findall(r"^type (\w+) struct \{\n(.*?)^\}", source, flags=re.M | re.S):
        fields = {}
        for typ, tag in re.findall(r"^\s*\w+\s+(\S+)\s+`[^`]*yaml:\"([^\"]*)\"", body, flags=re.M):
            key = tag.split(",")[0]
            assert key and key != "-", f"unexpected yaml tag {tag!r} in {name}"
            fields[key] = typ
        structs[name] = fields
    return structs


ADAPTER_STRUCTS = _go_structs((ADAPTER / "config.go").read_text())
_PROM_DURATION = re.compile(r"^(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?$")


class AdapterConfigError(ValueError):
    pass


def _decode(value, typ: str, where: str):
    """yaml.v2 UnmarshalStrict of `value` into Go type `typ`: unknown keys and mismatched kinds fail."""
    if value is None:  # yaml null leaves the zero value
        return None
    if typ.startswith("*"):
        return _decode(value, typ[1:], where)
    if typ.startswith("[]"):
        if not isinstance(value, list):
            raise AdapterConfigError(f"{where}: cannot unmarshal {type(value).__name__} into {typ}")
        return [_decode(v, typ[2:], f"{where}[{i}]") for i, v in enumerate(value)]
    if typ.startswith("map[string]"):
        if not isinstance(value, dict):
            raise AdapterConfigError(f"{where}: cannot unmarshal {type(value).__name__} into {typ}")
        return {str(k): _decode(v, typ[len("map[string]") :], f"{where}.{k}") for k, v in value.items()}
    if typ == "string":
        if isinstance(value, (dict, list)):
            raise AdapterConfigError(f"{where}: cannot unmarshal {type(value).__name__} into string")
        return str(value)
    if typ == "bool":
        if not isinstance(value, bool):
            raise AdapterConfigError(f"{where}: cannot unmarshal {value!r} into bool")
        return value
    if typ == "pmodel.Duration":
        if not isinstance(value, str) or not _PROM_DURATION.match(value) or not value:
            raise AdapterConfigError(f"{where}: not a Prometheus duration: {value!r}")
        return value
    fields = ADAPTER_STRUCTS[typ]
    if not isinstance(value, dict):
        raise AdapterConfigError(f"{where}: cannot unmarshal {type(value).__name__} into {typ}")
    unknown = set(value) - set(fields)
    if unknown:
        raise AdapterConfigError(f"{where}: field {sorted(unknown)[0]} not found in type config.{typ}")
    return {k: _decode(v, fields[k], f"{where}.{k}") for k, v in value.items()}


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.v2's strict mode also refuses a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        dup = {k for k in keys if keys.count(k) > 1}
        if dup:
            raise AdapterConfigError(f"line {node.start_mark.line + 1}: key {sorted(dup)[0]!r} already set")
        return super().construct_mapping(node, deep=deep)


def load_adapter_config(text: str) -> dict:
    """prometheus-adapter's config.FromYAML (pkg/config/loader.go): yaml.UnmarshalStrict into
    MetricsDiscoveryConfig, then the checks NamersFromConfig makes before the adapter serves a rule."""
    cfg = _decode(yaml.load(text, Loader=_UniqueKeyLoader), "MetricsDiscoveryConfig", "config")
    for i, rule in enumerate(cfg.get("rules") or []):
        where = f"rules[{i}]"
        resources = rule.get("resources") or {}
        if not resources.get("template") and not resources.get("overrides"):
            raise AdapterConfigError(f"{where}: no resources.template or resources.overrides")
        for label, gr in (resources.get("overrides") or {}).items():
            if not gr.get("resource"):
                raise AdapterConfigError(f"{where}: override {label} names no resource")
        name = rule.get("name") or {}
        matches = re.compile(name.get("matches") or ".*")
        if not name.get("as") and matches.groups > 1:
            raise AdapterConfigError(f"{where}: must specify an 'as' value for {matches.pattern!r}")
        used = set(re.findall(r"<<(.*?)>>", rule.get("metricsQuery", "")))
        allowed = {".Series", ".LabelMatchers", ".GroupBy"}  # what this replay substitutes
        if used - allowed:
            raise AdapterConfigError(f"{where}: template actions {sorted(used - allowed)} not replayed here")
    return cfg


def adapter_query(rule: dict, series: str, namespace: str, pods: list[str]) -> str:
    """The query the adapter sends for a Pods metric (pkg/naming/metrics_query.go Build): label matchers
    for the namespace and the pods (=~ when several), grouped by the pod label."""
    labels = {gr["resource"]: label for label, gr in rule["resources"]["overrides"].items()}
    pod_matcher = f'{labels["pod"]}="{pods[0]}"' if len(pods) == 1 else f'{labels["pod"]}=~"{"|".join(pods)}"'
    args = {
        ".Series": series,
        ".LabelMatchers": ",".join([f'{labels["namespace"]}="{namespace}"', pod_matcher]),
        ".GroupBy": labels["pod"],
    }
    return re.sub(r"<<(.*?)>>", lambda m: args[m.group(1)], rule["metricsQuery"])


def _chart_default_rules() -> list[dict]:
    """The rules the chart writes when `rules.default` is true: plain YAML inside its configmap template."""
    template = (ADAPTER_CHART / "configmap.yaml").read_text()
    block = re.search(r"\{\{- if \.Values\.rules\.default \}\}\n(.*?)\n\{\{- end -\}\}", template, flags=re.S)
    return yaml.safe_load(block.group(1))


def adapter_config_from_helm_values(values: dict) -> str:
    """The adapter's config.yaml as the chart (prometheus-adapter 5.3.0 templates/configmap.yaml) writes it:
    `rules:` with the chart's default rules (when `rules.default`, true by default) and then
    `toYaml .Values.rules.custom`. Helm itself ignores a value the chart does not read, so a misspelt key
    would be lost without a word: that is refused here."""
    chart_values = yaml.safe_load((ADAPTER_CHART / "values.yaml").read_text())

    def unknown_keys(ours: dict, theirs: dict, where: str) -> list[str]:
        out = []
        for k, v in ours.items():
            if k not in theirs:
                out.append(f"{where}{k}")
            elif isinstance(v, dict) and isinstance(theirs[k], dict):
                out += unknown_keys(v, theirs[k], f"{where}{k}.")
        return out

    unknown = unknown_keys(values, chart_values, "")
    if unknown:
        raise AdapterConfigError(f"values the prometheus-adapter chart does not read: {unknown}")
    rules = values.get("rules", {})
    default = rules.get("default", chart_values["rules"]["default"])
    config = {"rules": (_chart_default_rules() if default else []) + list(rules.get("custom") or [])}
    return yaml.safe_dump(config, sort_keys=False)


# --- tritonserver 2.51 ---------------------------------------------------------------------------------------

_HTTP_APIS = [
    (r"^/v2/health/(live|ready)$", "health"),
    (r"^/v2/models/[^/]+(/versions/\d+)?/ready$", "health"),
    (r"^/v2/models/[^/]+(/versions/\d+)?/infer$", "inference"),
    (r"^/v2/models/[^/]+(/versions/\d+)?/config$", "model-config"),
    (r"^/v2/models/([^/]+(/versions/\d+)?/)?stats$", "statistics"),
    (r"^/v2/repository", "model-repository"),
    (r"^/v2/(system|cuda)sharedmemory", "shared-memory"),
    (r"^/v2(/models/[^/]+(/versions/\d+)?)?/trace", "trace"),
    (r"^/v2/logging$", "logging"),
    (r"^/v2(/models/[^/]+(/versions/\d+)?)?$", "metadata"),
]


def http_api(path: str) -> str:
    return next(api for pattern, api in _HTTP_APIS if re.match(pattern, path))
