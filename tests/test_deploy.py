"""deploy/: the kustomize overlays render offline and every object passes `kubernetes-validate --strict`;
the settings the README promises (probes, drain, security, S3 secret, GPU, HPA rule, closed control APIs,
TLS at the proxy) are in the output, and what the real components do with these files holds: KServe's merge
of the predictor over its shipped `kserve-tritonserver` runtime, its HPA and CRD, prometheus-adapter's
strict loading of its own config, tritonserver 2.51 running the manifests' flags (tests/deploy_replay.py
replays the components from their sources, kept in tests/data/deploy/ with their versions).
"""

from __future__ import annotations

import copy
import gzip
import json
import re
import shutil
import subprocess
import urllib.request
from fractions import Fraction
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DATA = ROOT / "tests" / "data" / "deploy"
TARGETS = ["overlays/cpu", "overlays/gpu", "kserve", "monitoring", "ingress", "api"]
# Custom resources: kubernetes-validate bundles only Kubernetes' own schemas (the InferenceService is checked
# against KServe's CRD below)
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("serving.kserve.io/v1beta1", "InferenceService")}

kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the cluster extra")

from deploy_replay import (  # noqa: E402  (needs kubernetes-validate)
    KSERVE_DEPLOYMENT_MODES,
    KSERVE_LEGACY_MODES,
    AdapterConfigError,
    adapter_config_from_helm_values,
    adapter_query,
    crd_errors,
    http_api,
    isvc_crd_validator,
    kserve_deployment,
    kserve_hpa,
    kserve_runtime,
    load_adapter_config,
    quantity,
    resource_problems,
)


def render_dir(path: Path) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (it renders kustomize offline: `kubectl kustomize`)")
    out = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def render(target: str) -> list[dict]:
    return render_dir(DEPLOY / target)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {t: render(t) for t in TARGETS}


def find(objs: list[dict], kind: str, name: str | None = None) -> dict:
    hits = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def strict_validate(obj: dict) -> None:
    kv.validate(obj, kv.latest_version(), strict=True)


@pytest.mark.parametrize("target", TARGETS)
def test_every_rendered_object_passes_strict_validation(rendered, target):
    checked = 0
    for obj in rendered[target]:
        key = (obj["apiVersion"], obj["kind"])
        if key in CRDS:
            with pytest.raises(kv.SchemaNotFoundError):
                strict_validate(obj)
            checked += 1  # checked by this file's own assertions (the InferenceService: KServe's CRD)
            continue
        try:
            strict_validate(obj)
        except kv.ValidationError as e:
            pytest.fail(f"{target}: {obj['kind']}/{obj['metadata']['name']} is invalid: {e}")
        checked += 1
    assert checked >= 1


def test_strict_validation_refuses_a_misspelled_field(rendered):
    deployment = find(rendered["overlays/cpu"], "Deployment")
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kv.ValidationError):
        strict_validate(bad)


def _container(objs: list[dict]) -> dict:
    spec = find(objs, "Deployment", "vitserve-triton")["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    return c


@pytest.mark.parametrize("target", ["overlays/cpu", "overlays/gpu"])
def test_deployment_probes_drain_security_and_secret(rendered, target):
    objs = rendered[target]
    deployment = find(objs, "Deployment", "vitserve-triton")
    pod = deployment["spec"]["template"]
    c = _container(objs)
    # startup long enough for model load from S3; readiness = models ready; liveness = one inference
    assert c["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 300
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert "infer_probe.py" in " ".join(c["livenessProbe"]["exec"]["command"])
    args = " ".join(c["args"])
    assert "--strict-readiness=true" in args
    # drain: preStop pause + tritonserver's exit timeout fit in the grace period
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    exit_timeout = int(re.search(r"--exit-timeout-secs=(\d+)", args).group(1))
    assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop + exit_timeout
    # non-root, read-only root filesystem, writable /tmp (S3 download) and /dev/shm (python stubs)
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/tmp", "/dev/shm"}
    # S3 credentials from a Secret, the repository from the (hashed) ConfigMap
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "valueFrom" in e}
    assert secrets["AWS_ACCESS_KEY_ID"] == secrets["AWS_SECRET_ACCESS_KEY"] == "vitserve-s3"
    (ref,) = [e["configMapRef"]["name"] for e in c["envFrom"]]
    config = find(objs, "ConfigMap", ref)
    assert config["data"]["MODEL_REPOSITORY"].startswith("s3://")
    assert "$(MODEL_REPOSITORY)" in args
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert c["resources"]["requests"]["cpu"]
    # the Services and the PDB select exactly these pods
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for svc in (o for o in objs if o["kind"] == "Service"):
        assert svc["spec"]["selector"].items() <= labels.items()
    assert find(objs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # the probe script's ConfigMap is the one mounted (generated name with its hash)
    (probe,) = [v["configMap"]["name"] for v in pod["spec"]["volumes"] if v["name"] == "probe"]
    assert "infer_probe.py" in find(objs, "ConfigMap", probe)["data"]


def test_cpu_overlay_runs_vitserve_serve_and_gpu_overlay_the_serving_image(rendered):
    cpu, gpu = _container(rendered["overlays/cpu"]), _container(rendered["overlays/gpu"])
    assert cpu["command"] == ["vitserve"] and cpu["args"][0] == "serve"
    assert "--model-control-mode=explicit" in cpu["args"]
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    # the serving image's ENTRYPOINT (NGC's, then vitserve's engine check) runs tritonserver: args only
    assert "command" not in gpu and gpu["args"][0] == "tritonserver"
    assert gpu["image"] == "vitserve-triton:<tag>"  # set with `kustomize edit set image`
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1


# --- finding 6: the image's ENTRYPOINT is kept --------------------------------------------------------------


def test_deployment_keeps_the_images_entrypoint(rendered):
    """`command:` would replace the image's ENTRYPOINT (NGC's nvidia_entrypoint.sh and docker/entrypoint.sh,
    the engine check); the pod gives only args, starting with tritonserver as the entrypoint expects."""
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    entrypoint = re.search(r"^ENTRYPOINT\s+(\[.*\])", dockerfile, flags=re.M)
    assert entrypoint and "/opt/vitserve/entrypoint.sh" in json.loads(entrypoint.group(1))
    base = render("base")
    for objs in (base, rendered["overlays/gpu"]):
        c = _container(objs)
        assert "command" not in c, "command: replaces the image's ENTRYPOINT (and with it the engine check)"
        assert c["args"][0] == "tritonserver"
        assert any(a.startswith("--model-repository=") for a in c["args"])
    kserve = kserve_deployment(find(rendered["kserve"], "InferenceService"), kserve_runtime())
    (c,) = kserve["spec"]["template"]["spec"]["containers"]
    assert "command" not in c and c["args"][0] == "tritonserver"


# --- HPA and prometheus-adapter (finding 5) -----------------------------------------------------------------


def _cluster_constants():
    try:
        from vitserve.perf.cluster import HPA_QUERY, HPA_TARGET_US, nginx_config
    except ImportError:  # before the rehearsal moved out of the core package
        from vitserve.cluster import HPA_QUERY, HPA_TARGET_US, nginx_config
    return HPA_QUERY, HPA_TARGET_US, nginx_config


def _our_rule(cfg: dict, metric: str) -> dict:
    """The one rule of the adapter's config that serves `metric` (the chart's default rules come first)."""
    (rule,) = [r for r in cfg["rules"] if r["name"]["as"] == metric]
    return rule


@pytest.fixture(scope="module")
def adapter_values() -> dict:
    return yaml.safe_load((DEPLOY / "monitoring" / "prometheus-adapter-values.yaml").read_text())


def test_hpa_scales_on_the_adapter_rule_the_rehearsal_evaluates(rendered, adapter_values):
    hpa_query, hpa_target_us, _ = _cluster_constants()
    hpa = find(rendered["overlays/cpu"], "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "vitserve-triton"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["target"]["averageValue"] == str(hpa_target_us)
    cfg = load_adapter_config(adapter_config_from_helm_values(adapter_values))
    rule = _our_rule(cfg, metric["pods"]["metric"]["name"])
    # the adapter's query is the rehearsal's, with the adapter's label matchers and grouping
    plain = rule["metricsQuery"].replace("{<<.LabelMatchers>>}", "").replace(" by (<<.GroupBy>>)", "")
    assert plain == hpa_query


def test_adapter_rule_ships_as_the_adapters_own_config_and_loads_strictly(rendered, adapter_values):
    """The adapter reads one file (--config, from its ConfigMap in its namespace; Helm `rules.custom`): the
    rule is shipped as those values, not as a ConfigMap in the application's namespace, and that file loads
    the way the adapter loads it (unknown keys fail) and yields the rehearsal's query for the HPA's pods."""
    hpa_query, _, _ = _cluster_constants()
    assert not [o for o in rendered["monitoring"] if o["kind"] == "ConfigMap"], (
        "a ConfigMap in the application's namespace is never read by prometheus-adapter"
    )
    cfg = load_adapter_config(adapter_config_from_helm_values(adapter_values))
    rule = _our_rule(cfg, "queue_us_per_request")
    series = rule["name"]["matches"]
    assert re.fullmatch(rule["name"]["matches"], series) and series in rule["seriesQuery"]
    query = adapter_query(rule, series, "ns", ["vitserve-a", "vitserve-b"])
    matchers = '{namespace="ns",pod=~"vitserve-a|vitserve-b"}'
    assert query == re.sub(r"\b(nv_inference_\w+)\[", rf"\1{matchers}[", hpa_query) + " by (pod)"
    # the pods the HPA asks about carry these labels: the ServiceMonitor's targets (namespace, pod)
    assert {gr["resource"] for gr in rule["resources"]["overrides"].values()} == {"namespace", "pod"}


def test_adapter_loader_refuses_what_the_adapter_refuses(adapter_values):
    good = adapter_config_from_helm_values(adapter_values)
    load_adapter_config(good)
    misspelt = good.replace("metricsQuery:", "metricQuery:")
    with pytest.raises(AdapterConfigError, match=r"metricQuery not found in type config\.DiscoveryRule"):
        load_adapter_config(misspelt)
    with pytest.raises(AdapterConfigError, match="already set"):
        load_adapter_config(good + "rules: []\n")
    # and a rule dropped into Helm values the chart does not read is caught before it is lost
    with pytest.raises(AdapterConfigError, match="does not read: \\['rule'\\]"):
        adapter_config_from_helm_values({"rule": adapter_values["rules"], **adapter_values})


def test_adapter_query_parses_in_prometheus(adapter_values, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    rule = _our_rule(
        load_adapter_config(adapter_config_from_helm_values(adapter_values)), "queue_us_per_request"
    )
    query = adapter_query(rule, rule["name"]["matches"], "ns", ["a", "b"])
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "q", "expr": query}]}]}))
    out = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    rules.write_text(rules.read_text().replace("[30s]", "[30s"))
    assert subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True).returncode != 0


def test_servicemonitor_is_selected_by_kube_prometheus_stack(rendered, adapter_values):
    """kube-prometheus-stack's Prometheus selects ServiceMonitors labelled `release: <release>` (chart
    default serviceMonitorSelectorNilUsesHelmValues); the adapter queries that same release's Prometheus."""
    sm = find(rendered["monitoring"], "ServiceMonitor")
    release = sm["metadata"]["labels"].get("release")
    assert release == "kube-prometheus-stack"
    # the stack's Service is <fullname>-prometheus, fullname being the release when it contains the chart name
    assert adapter_values["prometheus"]["url"].startswith(f"http://{release}-prometheus.")
    # it selects the Service that has the metrics port
    services = [o for o in rendered["overlays/gpu"] if o["kind"] == "Service"]
    selected = [
        s
        for s in services
        if sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    ports = {p["name"] for s in selected for p in s["spec"]["ports"]}
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= ports


# --- Kubernetes semantics: strategic merge and resource quantities ------------------------------------------


def test_resource_check_refuses_what_the_api_server_refuses():
    ok = {
        "name": "c",
        "resources": {
            "requests": {"cpu": "500m", "nvidia.com/gpu": 1},
            "limits": {"cpu": "1", "nvidia.com/gpu": "1"},
        },
    }
    assert resource_problems(ok) == []
    assert quantity("2Gi") == 2 * 2**30 and quantity("1e3") == 1000 and quantity("250m") == Fraction(1, 4)
    high = {"name": "c", "resources": {"requests": {"cpu": "4"}, "limits": {"cpu": "1"}}}
    assert "requests.cpu 4 must be <= limits.cpu 1" in resource_problems(high)[0]
    gpu = {"name": "c", "resources": {"requests": {"nvidia.com/gpu": "1"}}}
    assert resource_problems(gpu)


# --- KServe: the predictor merged over the shipped runtime (findings 1, 3, 4) -------------------------------


# KServe v0.20.0 pkg/constants: what GetDeploymentMode accepts from the annotation, its default CPU target
@pytest.fixture(scope="module")
def isvc_validator():
    return isvc_crd_validator()


def test_inferenceservice_passes_kserves_crd_strictly(rendered, isvc_validator):
    isvc = find(rendered["kserve"], "InferenceService")
    assert crd_errors(isvc_validator, isvc) == []
    bad = copy.deepcopy(isvc)
    bad["spec"]["predictor"]["scaleTargett"] = 70
    assert any("scaleTargett" in e for e in crd_errors(isvc_validator, bad))


def test_kserve_predictor_merged_over_kserves_runtime_is_a_valid_pod(rendered):
    """Finding 1: KServe's runtime sets requests AND limits (cpu 1, memory 2Gi) and the merge keeps every key
    the predictor does not give; the merged pod must be one the API server accepts."""
    runtime = kserve_runtime()
    assert runtime["kind"] == "ClusterServingRuntime" and runtime["metadata"]["name"] == "kserve-tritonserver"
    isvc = find(rendered["kserve"], "InferenceService")
    assert isvc["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert isvc["spec"]["predictor"]["model"]["modelFormat"]["name"] in formats
    assert isvc["spec"]["predictor"]["model"]["protocolVersion"] in runtime["spec"]["protocolVersions"]
    deployment = kserve_deployment(isvc, runtime)
    strict_validate(deployment)
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    assert resource_problems(c) == []
    # every resource the runtime bounds is bounded consistently, and the GPU is requested
    assert set(c["resources"]["limits"]) >= {"cpu", "memory", "nvidia.com/gpu"}
    # the runtime's non-root security context survives, with the read-only root filesystem added
    assert (
        c["securityContext"]["runAsNonRoot"] is True
        and c["securityContext"]["readOnlyRootFilesystem"] is True
    )
    # tritonserver's own flags: the runtime's, then ours, none given twice
    flags = [a.split("=")[0] for a in c["args"] if a.startswith("--")]
    assert len(flags) == len(set(flags)), f"a tritonserver flag given twice: {c['args']}"
    assert "--model-store=/mnt/models" in c["args"] and "--strict-readiness=true" in c["args"]
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    exit_timeout = int(next(a for a in c["args"] if a.startswith("--exit-timeout-secs=")).split("=")[1])
    assert grace > int(c["lifecycle"]["preStop"]["exec"]["command"][-1]) + exit_timeout


def test_kserve_merge_check_refuses_the_predictor_that_asked_4_cpus_under_a_limit_of_1(rendered):
    """The check above can fail: the old predictor (requests.cpu 4, no cpu limit) merged over KServe's runtime
    keeps the runtime's limits.cpu 1."""
    isvc = copy.deepcopy(find(rendered["kserve"], "InferenceService"))
    isvc["spec"]["predictor"]["model"]["resources"] = {
        "requests": {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": "1"},
        "limits": {"memory": "16Gi", "nvidia.com/gpu": "1"},
    }
    (c,) = kserve_deployment(isvc, kserve_runtime())["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["cpu"] == "1"
    assert any("requests.cpu 4 must be <= limits.cpu 1" in p for p in resource_problems(c))


def test_kserve_pod_has_a_memory_backed_dev_shm_for_the_python_stubs(rendered):
    """Finding 3: KServe's Triton runtime mounts no /dev/shm (a container's default is 64 MiB); the merged pod
    gets a Memory emptyDir as large as deploy/base's."""
    deployment = kserve_deployment(find(rendered["kserve"], "InferenceService"), kserve_runtime())
    pod = deployment["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    (mount,) = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in pod.get("volumes", []) if v["name"] == mount["name"]]
    base_pod = find(rendered["overlays/gpu"], "Deployment")["spec"]["template"]["spec"]
    (base_mount,) = [m for m in base_pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (base_volume,) = [v for v in base_pod["volumes"] if v["name"] == base_mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    assert quantity(volume["emptyDir"]["sizeLimit"]) == quantity(base_volume["emptyDir"]["sizeLimit"])
    # a Memory emptyDir counts against the container's memory limit: it must fit with room to spare
    assert quantity(volume["emptyDir"]["sizeLimit"]) * 4 <= quantity(c["resources"]["limits"]["memory"])
    # the probe script is mounted from the generated (hashed) ConfigMap that the same build renders
    (probe,) = [v["configMap"]["name"] for v in pod["volumes"] if v["name"] == "probe"]
    assert "infer_probe.py" in find(rendered["kserve"], "ConfigMap", probe)["data"]


def test_kserve_autoscaling_comes_from_scale_metric_and_target(rendered, isvc_validator):
    """Finding 2: KServe 0.15+ reads spec.predictor.scaleMetric/scaleTarget (the annotations metric and
    targetUtilizationPercentage are not read); Standard replaces the deprecated RawDeployment mode."""
    isvc = find(rendered["kserve"], "InferenceService")
    annotations = isvc["metadata"]["annotations"]
    mode = annotations["serving.kserve.io/deploymentMode"]
    assert mode in KSERVE_DEPLOYMENT_MODES and mode not in KSERVE_LEGACY_MODES
    assert mode == "Standard"
    unread = {"serving.kserve.io/metric", "serving.kserve.io/targetUtilizationPercentage"}
    assert not unread & set(annotations), f"KServe does not read {sorted(unread & set(annotations))}"
    predictor = isvc["spec"]["predictor"]
    assert predictor["scaleMetric"] == "cpu" and predictor["scaleTarget"] == 70
    hpa = kserve_hpa(isvc)
    strict_validate(hpa)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"] == {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    # CPU utilisation is measured against requests.cpu, which the merged pod sets
    (c,) = kserve_deployment(isvc, kserve_runtime())["spec"]["template"]["spec"]["containers"]
    assert quantity(c["resources"]["requests"]["cpu"]) >= 1


def test_kustomize_images_reaches_the_kserve_predictor_image(tmp_path):
    """Finding 4: `images:` (what `kustomize edit set image` writes) sets spec.predictor.model.image, and the
    merged pod runs that image (the runtime's own image is replaced)."""
    for d in ("kserve", "probe"):
        shutil.copytree(DEPLOY / d, tmp_path / d)
    kustomization = tmp_path / "kserve" / "kustomization.yaml"
    k = yaml.safe_load(kustomization.read_text())
    k["images"] = [
        {"name": "vitserve-triton", "newName": "registry.example/team/vitserve-triton", "newTag": "25.11-1"}
    ]
    kustomization.write_text(yaml.safe_dump(k))
    isvc = find(render_dir(tmp_path / "kserve"), "InferenceService")
    assert isvc["spec"]["predictor"]["model"]["image"] == "registry.example/team/vitserve-triton:25.11-1"
    (c,) = kserve_deployment(isvc, kserve_runtime())["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "registry.example/team/vitserve-triton:25.11-1"
    # without the transformer configuration kustomize leaves the field alone (what the issue found)
    k.pop("configurations")
    kustomization.write_text(yaml.safe_dump(k))
    isvc = find(render_dir(tmp_path / "kserve"), "InferenceService")
    assert isvc["spec"]["predictor"]["model"]["image"] == "vitserve-triton:latest"


# --- closed by default, TLS and a body limit at the proxy (finding 9) ---------------------------------------


# tritonserver 2.51's HTTP routes and the API name --http-restricted-api puts each under (the probes' own
# paths are also called on the real server below, without the key)
def _probe_paths(c: dict) -> list[str]:
    paths = []
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        p = c.get(probe) or {}
        if "httpGet" in p:
            paths.append(p["httpGet"]["path"])
        elif "exec" in p:
            assert "infer_probe.py" in " ".join(p["exec"]["command"]), p
            src = (DEPLOY / "probe" / "infer_probe.py").read_text()
            assert "/v2/models/{model}/infer" in src
            paths.append("/v2/models/vitb32/infer")
    return paths


def _serving_containers(rendered) -> dict[str, dict]:
    kserve = kserve_deployment(find(rendered["kserve"], "InferenceService"), kserve_runtime())
    return {
        "overlays/gpu": _container(rendered["overlays/gpu"]),
        "overlays/cpu": _container(rendered["overlays/cpu"]),
        "kserve": kserve["spec"]["template"]["spec"]["containers"][0],
    }


def test_control_apis_need_the_key_from_a_secret_and_probes_use_open_apis(rendered):
    from vitserve.apikey import API_KEY_ENV, API_KEY_HEADER, CONTROL_APIS, restricted_args

    value = f"{','.join(CONTROL_APIS)}:{API_KEY_HEADER}=$({API_KEY_ENV})"
    for target, c in _serving_containers(rendered).items():
        env = {e["name"]: e for e in c.get("env", [])}
        ref = env[API_KEY_ENV]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "vitserve-api-key" and not ref.get("optional"), (
            f"{target}: the pod must not start without the key"
        )
        if target == "overlays/cpu":
            # `vitserve serve` restricts CONTROL_APIS itself, with the key from $VITSERVE_API_KEY
            assert not any(a.startswith("--open-apis") for a in c["args"]), target
        else:
            assert f"--http-restricted-api={value}" in c["args"], target
            assert f"--grpc-restricted-protocol={value}" in c["args"], target
        open_apis = {http_api(p) for p in _probe_paths(c)}
        assert open_apis and not open_apis & set(CONTROL_APIS), f"{target}: a probe needs a restricted API"
    assert http_api("/v2/models/stats") == "statistics"
    assert http_api("/v2/repository/index") == "model-repository"
    # README's flags for a server run directly are the same (vitserve/apikey.py writes them for `vitserve serve`)
    assert restricted_args(CONTROL_APIS, "KEY")[0] in (ROOT / "README.md").read_text()


@pytest.mark.triton
def test_restricted_args_of_the_manifests_work_on_the_real_tritonserver(rendered, tiny_repository, tmp_path):
    """The flags exactly as the Deployment gives them ($(VAR) expanded by the kubelet) on tritonserver 2.51:
    a control call without the key is refused, with it answered; health and inference stay open."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from vitserve.apikey import API_KEY_ENV, API_KEY_HEADER, GRPC_API_KEY_HEADER
    from vitserve.server import TritonServer

    key = "k8s-secret-value_0123"
    c = _container(rendered["overlays/gpu"])
    flags = [a.replace(f"$({API_KEY_ENV})", key) for a in c["args"] if "restricted" in a]
    assert len(flags) == 2
    with TritonServer(tiny_repository, log_path=tmp_path / "triton.log", extra_args=flags) as server:
        http = httpclient.InferenceServerClient(server.http_url)
        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        for path in _probe_paths(c):
            if http_api(path) == "health":  # as the kubelet calls them: no key
                with urllib.request.urlopen(f"http://{server.http_url}{path}", timeout=10) as r:
                    assert r.status == 200, path
        for client in (http, grpc):
            assert client.is_server_ready()
            x = np.ones((1, 4), dtype=np.float32)
            inp = (httpclient if client is http else grpcclient).InferInput("INPUT0", [1, 4], "FP32")
            inp.set_data_from_numpy(x)
            np.testing.assert_array_equal(client.infer("add_one", [inp]).as_numpy("OUTPUT0"), x + 1)
        with pytest.raises(InferenceServerException, match="restricted"):
            http.get_inference_statistics()
        with pytest.raises(InferenceServerException, match="restricted"):
            grpc.get_model_repository_index()
        assert http.get_inference_statistics(headers={API_KEY_HEADER: key})
        assert grpc.get_model_repository_index(headers={GRPC_API_KEY_HEADER: key}) is not None
        with pytest.raises(InferenceServerException):
            http.get_inference_statistics(headers={API_KEY_HEADER: key + "x"})
        http.close()
        grpc.close()  # an open channel holds tritonserver's shutdown for its exit timeout


def test_ingress_terminates_tls_for_http_and_grpc_with_a_body_limit(rendered):
    _, _, nginx_config = _cluster_constants()
    rehearsal_limit = re.search(r"client_max_body_size (\S+);", nginx_config(Path("/w"), 1, 2, [])).group(1)
    ingresses = {i["metadata"]["name"]: i for i in rendered["ingress"] if i["kind"] == "Ingress"}
    service = find(rendered["overlays/gpu"], "Service", "vitserve-triton")
    ports = {p["name"] for p in service["spec"]["ports"]}
    backends = {}
    for ing in ingresses.values():
        annotations = ing["metadata"]["annotations"]
        assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == rehearsal_limit
        hosts = {h for t in ing["spec"]["tls"] for h in t["hosts"]}
        assert {r["host"] for r in ing["spec"]["rules"]} <= hosts, "every host is served over TLS"
        assert {t["secretName"] for t in ing["spec"]["tls"]} == {"vitserve-tls"}
        for rule in ing["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] == service["metadata"]["name"] and backend["port"]["name"] in ports
                backends[backend["port"]["name"]] = (
                    annotations.get("nginx.ingress.kubernetes.io/backend-protocol", "HTTP"),
                    path["path"],
                )
    assert backends["grpc"] == ("GRPC", "/inference.GRPCInferenceService")
    assert backends["http"] == ("HTTP", "/v2")
    assert "metrics" not in backends


def test_kserve_variant_uses_triton_with_the_v2_protocol(rendered):
    isvc = find(rendered["kserve"], "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "triton"
    assert model["protocolVersion"] == "v2"
    assert model["storageUri"].startswith("s3://")
    sa = find(rendered["kserve"], "ServiceAccount")
    assert isvc["spec"]["predictor"]["serviceAccountName"] == sa["metadata"]["name"]


def test_test_data_is_what_its_readme_names():
    """The kept upstream files are byte-identical to the blobs the README names (git's blob hash)."""
    import hashlib

    readme = (DATA / "README.md").read_text()
    for path, blob in re.findall(r"^\| `([^`]+)` \| [^|]+ \| `([0-9a-f]{40})` \|", readme, flags=re.M):
        data = (DATA / path).read_bytes()
        if path.endswith(".gz"):
            data = gzip.decompress(data)
        assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == blob, path
    assert len(re.findall(r"^\| `", readme, flags=re.M)) == 6


@pytest.mark.triton
def test_readmes_direct_grpc_tls_flags_work_on_the_real_tritonserver(tiny_repository, tmp_path):
    """README "Serving on a GPU host": gRPC TLS without a proxy is tritonserver's own; the flags as written
    there serve TLS (a plaintext client is refused) and inference answers over it."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from vitserve.server import TritonServer

    readme = (ROOT / "README.md").read_text()
    flags = re.search(r"`(--grpc-use-ssl=true --grpc-server-cert=FILE --grpc-server-key=FILE)`", readme)
    assert flags, "README no longer documents --grpc-use-ssl for direct use"
    from vitserve.perf.cluster import self_signed_cert

    tls = self_signed_cert(tmp_path)
    cert, key = tls.cert, tls.key
    args = [
        f.replace("cert=FILE", f"cert={cert}").replace("key=FILE", f"key={key}")
        for f in flags.group(1).split()
    ]
    with TritonServer(tiny_repository, log_path=tmp_path / "triton.log", extra_args=args) as server:
        url = f"localhost:{server.grpc_port}"
        tls = grpcclient.InferenceServerClient(url, ssl=True, root_certificates=str(cert))
        assert tls.is_server_ready() and tls.is_model_ready("add_one")
        plain = grpcclient.InferenceServerClient(url)
        with pytest.raises(InferenceServerException):
            plain.is_server_ready(client_timeout=5)
        tls.close()
        plain.close()


def test_readme_deploy_steps_name_what_the_manifests_use(rendered):
    """README "Scale out": every `kubectl apply -k` target is rendered and validated here, and the Secrets
    it creates are the ones (names and keys) the manifests read."""
    from vitserve.apikey import API_KEY_ENV

    readme = (ROOT / "README.md").read_text()
    applied = set(re.findall(r"kubectl apply -k deploy/(\S+)", readme))
    assert applied and applied <= set(TARGETS), applied - set(TARGETS)
    created = {}
    for kind, name, rest in re.findall(r"kubectl create secret (generic|tls) (\S+)(.*)", readme):
        keys = (
            set(re.findall(r"--from-literal=(\w+)=", rest)) if kind == "generic" else {"tls.crt", "tls.key"}
        )
        created[name] = keys
    used: dict[str, set[str]] = {}
    for c in (_container(rendered["overlays/gpu"]), _container(rendered["overlays/cpu"])):
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref and not ref.get("optional"):
                used.setdefault(ref["name"], set()).add(ref["key"])
    for ing in rendered["ingress"]:
        for t in ing["spec"]["tls"]:
            used.setdefault(t["secretName"], set()).update({"tls.crt", "tls.key"})
    for name, keys in used.items():
        assert name in created and keys <= created[name], f"README does not create Secret {name} with {keys}"
    assert API_KEY_ENV in created["vitserve-api-key"]


def test_api_runs_vitserve_api_beside_the_triton_pods_closed_by_default(rendered):
    """deploy/api: `vitserve api` on the port its Service and Ingress name, talking gRPC to every pod of the
    headless Triton Service of deploy/base (a dns:/// target, balanced per request); the bearer key and the Triton control key from the Secrets the README creates;
    probes on routes the app has; the ingress body limit is the API's own."""
    from vitserve.api import DEFAULT_PORT, MAX_BODY_BYTES, ApiSettings, create_app
    from vitserve.apikey import API_KEY_ENV, EMBEDDINGS_KEY_ENV

    objs = rendered["api"]
    deployment = find(objs, "Deployment", "vitserve-api")
    pod = deployment["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    assert c["command"] == ["vitserve"] and c["args"][0] == "api"
    from vitserve.cli import build_parser

    args = build_parser().parse_args(["api", *c["args"][1:]])
    assert args.port == DEFAULT_PORT == c["ports"][0]["containerPort"] and not args.open
    from vitserve.client.config import ClientConfig, is_resolver_target

    pods = find(rendered["overlays/cpu"], "Service", "vitserve-triton-pods")
    assert pods["spec"]["clusterIP"] == "None"  # headless: DNS answers every ready pod's address
    assert is_resolver_target(ClientConfig(args.triton_url).url)  # the client takes it as it is
    host, port = args.triton_url.removeprefix("dns:///").split(":")
    grpc_port = next(p["port"] for p in pods["spec"]["ports"] if p["name"] == "grpc")
    assert (host, int(port)) == (pods["metadata"]["name"], grpc_port)
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
    assert secrets[EMBEDDINGS_KEY_ENV] == {"name": "vitserve-embeddings-key", "key": EMBEDDINGS_KEY_ENV}
    assert secrets[API_KEY_ENV] == {"name": "vitserve-api-key", "key": API_KEY_ENV}
    routes = {r.path for r in create_app(ApiSettings(open_access=True)).routes}
    assert {c["readinessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["path"]} <= routes
    assert {"/v1/embeddings", "/v1/models"} <= routes
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    service = find(objs, "Service", "vitserve-api")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    ingress = find(objs, "Ingress", "vitserve-api")
    limit = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert quantity(limit.upper() + "i") == MAX_BODY_BYTES  # 64m in nginx's units is 64 MiB
    (path,) = ingress["spec"]["rules"][0]["http"]["paths"]
    assert path["path"] == "/v1" and path["backend"]["service"]["name"] == "vitserve-api"
    readme = (ROOT / "README.md").read_text()
    assert (
        f"kubectl create secret generic vitserve-embeddings-key --from-literal={EMBEDDINGS_KEY_ENV}="
        in readme
    )
