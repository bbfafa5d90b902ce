"""deploy/: the kustomize overlays render offline and every object passes `kubernetes-validate --strict`;
the settings the README promises (probes, drain, security, S3 secret, GPU, HPA rule) are in the output."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
TARGETS = ["overlays/cpu", "overlays/gpu", "kserve", "monitoring"]
# Custom resources: kubernetes-validate bundles only Kubernetes' own schemas
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("serving.kserve.io/v1beta1", "InferenceService")}

kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the cluster extra")


def render(target: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (it renders kustomize offline: `kubectl kustomize`)")
    out = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / target)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, f"kubectl kustomize {target} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {t: render(t) for t in TARGETS}


def find(objs: list[dict], kind: str, name: str | None = None) -> dict:
    hits = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


@pytest.mark.parametrize("target", TARGETS)
def test_every_rendered_object_passes_strict_validation(rendered, target):
    version = kv.latest_version()
    checked = 0
    for obj in rendered[target]:
        key = (obj["apiVersion"], obj["kind"])
        if key in CRDS:
            with pytest.raises(kv.SchemaNotFoundError):
                kv.validate(obj, version, strict=True)
            continue
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{target}: {obj['kind']}/{obj['metadata']['name']} is invalid for {version}: {e}")
        checked += 1
    assert checked >= 1


def test_strict_validation_refuses_a_misspelled_field(rendered):
    deployment = find(rendered["overlays/cpu"], "Deployment")
    bad = yaml.safe_load(yaml.safe_dump(deployment))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, kv.latest_version(), strict=True)


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


def test_cpu_overlay_runs_vitserve_serve_and_gpu_overlay_the_serving_image(rendered):
    cpu, gpu = _container(rendered["overlays/cpu"]), _container(rendered["overlays/gpu"])
    assert cpu["command"] == ["vitserve"] and cpu["args"][0] == "serve"
    assert "--model-control-mode=explicit" in cpu["args"]
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    assert gpu["command"] == ["tritonserver"]
    assert gpu["image"] == "vitserve-triton:<tag>"  # set with `kustomize edit set image`
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_hpa_scales_on_the_adapter_rule_the_rehearsal_evaluates(rendered):
    from vitserve.perf.cluster import HPA_QUERY, HPA_TARGET_US

    hpa = find(rendered["overlays/cpu"], "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "vitserve-triton"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["target"]["averageValue"] == str(HPA_TARGET_US)
    rules = yaml.safe_load(find(rendered["monitoring"], "ConfigMap")["data"]["config.yaml"])["rules"]
    (rule,) = rules
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    # the adapter's query is the rehearsal's, with the adapter's label matchers and grouping
    plain = rule["metricsQuery"].replace("{<<.LabelMatchers>>}", "").replace(" by (<<.GroupBy>>)", "")
    assert plain == HPA_QUERY


def test_kserve_variant_uses_triton_with_the_v2_protocol(rendered):
    isvc = find(rendered["kserve"], "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "triton"
    assert model["protocolVersion"] == "v2"
    assert model["storageUri"].startswith("s3://")
    sa = find(rendered["kserve"], "ServiceAccount")
    assert isvc["spec"]["predictor"]["serviceAccountName"] == sa["metadata"]["name"]
