"""The cluster rehearsal's parts (nginx, prometheus rule, HPA formula, the liveness inference probe), clients
behind the load balancer with real tritonservers, and (slow tier) the whole failover rehearsal."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from vitserve.perf.cluster import (
    BODY_LIMIT_MB,
    HPA_QUERY,
    HPA_RECORD,
    control_calls,
    control_closed,
    format_table,
    hpa_replicas,
    nginx_config,
    oversized_request,
    prometheus_files,
    python_env_dirs,
    remove_leftovers,
    self_signed_cert,
    start_nginx,
)

ROOT = Path(__file__).resolve().parents[1]
PROBE = next(
    (
        p
        for p in (ROOT / "deploy" / "probe" / "infer_probe.py", ROOT / "deploy" / "base" / "infer_probe.py")
        if p.exists()
    ),
    ROOT / "deploy" / "probe" / "infer_probe.py",
)


def _nginx() -> str:
    exe = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if exe is None:
        pytest.skip("Debian's nginx-light is not installed (make setup installs it as root)")
    return exe


class _Ports:
    def __init__(self, http_port: int, grpc_port: int, metrics_port: int = 0) -> None:
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port


def test_hpa_formula():
    assert hpa_replicas(3, 100_000, 50_000) == 6
    assert hpa_replicas(3, 52_000, 50_000) == 3  # inside the HPA's 10 % tolerance
    assert hpa_replicas(3, 0.0, 50_000) == 1
    assert hpa_replicas(2, 1e9, 50_000, max_replicas=8) == 8
    assert hpa_replicas(0, 1e9) == 1


def test_nginx_config_is_valid_and_retries_only_inference(tmp_path):
    nginx = _nginx()
    conf = nginx_config(tmp_path, 18000, 18001, [_Ports(18100, 18101), _Ports(18200, 18201)])
    (tmp_path / "nginx.conf").write_text(conf)
    out = subprocess.run(
        [nginx, "-t", "-e", str(tmp_path / "e.log"), "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert conf.count("least_conn;") == 2 and "grpc_pass grpc://triton_grpc;" in conf
    # non-idempotent retries are allowed in exactly the two inference locations
    blocks = conf.split("location ")
    retried = [b.split("{", 1)[0].strip() for b in blocks if "non_idempotent" in b]
    assert retried == [
        "~ ^/v2/models/[^/]+(/versions/[0-9]+)?/infer$",
        "/inference.GRPCInferenceService/ModelInfer",
    ]
    assert "127.0.0.1:18201" in conf and "listen 127.0.0.1:18001 http2;" in conf


def test_prometheus_rule_and_config_pass_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("Debian's prometheus (promtool) is not installed (make setup installs it as root)")
    config = prometheus_files(tmp_path, [_Ports(1, 2, 18002), _Ports(3, 4, 18003)])
    out = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert HPA_RECORD in (tmp_path / "hpa-rules.yml").read_text()
    assert HPA_QUERY in (tmp_path / "hpa-rules.yml").read_text()


def test_format_table_names_every_row():
    table = format_table(
        {
            "share": {"0": 50, "1": 10, "2": 40},
            "sent": 100,
            "correct": 100,
            "wrong": 0,
            "failed": 0,
            "min_cosine": 0.9991,
            "images_per_s": 12.5,
            "seconds": 8.0,
            "queue_us_per_request_load": 80000.0,
            "queue_us_per_request_idle": 0.0,
            "hpa_replicas_load": 5,
            "hpa_replicas_idle": 1,
            "replicas": 3,
            "alive_after": 1,
            "leftovers": [],
        }
    )
    for words in ("requests sent", "answered correctly", "failed", "#0 50 (50%)", "80,000 us", "choose 5"):
        assert words in table


@pytest.mark.triton
def test_inference_probe_passes_on_a_serving_model_and_fails_otherwise(vitb32_server, tiny_server):
    ok = subprocess.run(
        [sys.executable, str(PROBE), "--url", f"http://{vitb32_server.http_url}", "--model", "vitb32"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = subprocess.run(
        [sys.executable, str(PROBE), "--url", f"http://{tiny_server.http_url}", "--model", "vitb32"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "vitb32" in bad.stderr


@pytest.fixture(scope="module")
def tiny_cluster(tiny_repository, tmp_path_factory):
    """3 tritonservers on the tiny repository behind nginx (the rehearsal's nginx config); a test that
    kills one starts it again."""
    from vitserve.server import TritonServer, free_port

    _nginx()
    workdir = Path(tempfile.mkdtemp(prefix="vitserve-lb-test-"))
    servers, proxy = [], None
    envs, candidates = python_env_dirs(), set()
    prefixes = [f"vitserve-lb-test-{os.getpid()}-{i}_" for i in range(3)]
    try:
        for i, prefix in enumerate(prefixes):
            servers.append(
                TritonServer(
                    tiny_repository,
                    log_path=tmp_path_factory.mktemp("lb") / f"r{i}.log",
                    extra_args=[
                        "--http-address=127.0.0.1",
                        "--grpc-address=127.0.0.1",
                        f"--backend-config=python,shm-region-prefix-name={prefix}",
                    ],
                ).start()
            )
        candidates = python_env_dirs() - envs
        http_port, grpc_port = free_port(), free_port()
        proxy = start_nginx(workdir, http_port, grpc_port, servers)
        yield servers, http_port, grpc_port, workdir
    finally:
        if proxy is not None:
            proxy.stop(signal.SIGQUIT)
        stoppers = [threading.Thread(target=s.stop) for s in servers]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        shutil.rmtree(workdir, ignore_errors=True)
        remove_leftovers(prefixes, [], candidates, 1)  # what the SIGKILLed replica left


def _answered_by(workdir: Path, servers) -> dict[int, int]:
    ports = {}
    for i, s in enumerate(servers):
        ports[f"127.0.0.1:{s.http_port}"] = ports[f"127.0.0.1:{s.grpc_port}"] = i
    counts = dict.fromkeys(range(len(servers)), 0)
    for line in (workdir / "nginx-access.log").read_text().splitlines():
        parts = line.split("|")
        if parts[1].endswith(("/infer", "/ModelInfer")):
            counts[ports[parts[3].split(", ")[-1]]] += 1
    return counts


@pytest.mark.triton
def test_one_long_lived_client_is_spread_over_replicas_and_survives_a_killed_one(tiny_cluster):
    """Behind an L7 balancer one gRPC channel (one HTTP/2 connection) and one HTTP keep-alive pool reach
    every replica, request by request; a SIGKILLed replica costs no request (nginx retries inference)."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    servers, http_port, grpc_port, workdir = tiny_cluster
    x = np.arange(8, dtype=np.float32).reshape(2, 4)

    def infer(module, client) -> np.ndarray:
        inp = module.InferInput("INPUT0", [2, 4], "FP32")
        inp.set_data_from_numpy(x)
        return client.infer("add_one", [inp]).as_numpy("OUTPUT0")

    g = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    h = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
    try:
        for _ in range(30):
            np.testing.assert_array_equal(infer(grpcclient, g), x + 1)
            np.testing.assert_array_equal(infer(httpclient, h), x + 1)
        share = _answered_by(workdir, servers)
        assert sum(share.values()) == 60
        assert all(n > 0 for n in share.values()), f"one client stuck to some replicas: {share}"
        victim = servers[1]
        os.killpg(victim.process.pid, signal.SIGKILL)
        victim.process.wait()
        victim.process = None
        try:
            for _ in range(30):  # same channel, same pool: no request lost
                np.testing.assert_array_equal(infer(grpcclient, g), x + 1)
                np.testing.assert_array_equal(infer(httpclient, h), x + 1)
        finally:
            victim.start()  # same ports: the other tests of the module get three replicas again
    finally:
        g.close()
        h.close()


@pytest.mark.triton
def test_grpc_round_robin_over_a_list_of_replicas_without_a_proxy(tiny_cluster):
    """Without an L7 proxy (a Kubernetes headless Service), gRPC's own round_robin policy over every
    address spreads one channel's requests; the default pick_first would send them all to one."""
    import tritonclient.grpc as grpcclient

    servers, *_ = tiny_cluster
    target = "ipv4:" + ",".join(f"127.0.0.1:{s.grpc_port}" for s in servers)
    x = np.ones((1, 4), dtype=np.float32)
    for policy, spread in (("round_robin", 3), ("pick_first", 1)):
        before = [_successes(s) for s in servers]
        c = grpcclient.InferenceServerClient(target, channel_args=[("grpc.lb_policy_name", policy)])
        for _ in range(12):
            inp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
            inp.set_data_from_numpy(x)
            c.infer("add_one", [inp])
        c.close()
        got = [_successes(s) - b for s, b in zip(servers, before, strict=True)]
        assert sum(got) == 12 and sum(n > 0 for n in got) == spread, f"{policy}: {got}"


def _successes(server) -> int:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/v2/models/add_one/stats") as r:
        import json

        stats = json.load(r)["model_stats"][0]
    return int(stats["inference_stats"]["success"]["count"])


@pytest.mark.slow
@pytest.mark.triton
def test_cluster_rehearsal_loses_nothing(vitb32_build, tmp_path):
    """`make cluster-demo` in small: 3 replicas from moto S3 behind nginx, prometheus; SIGKILL one and
    terminate another under load; every answer checked; nothing left behind."""
    from vitserve.perf.cluster import rehearse

    shm_before = set(os.listdir("/dev/shm"))
    lines: list[str] = []
    t = rehearse(
        vitb32_build["repository"],
        "vitb32",
        replicas=3,
        requests=150,
        duration_s=120,
        concurrency=3,
        idle_s=35,
        artifacts=tmp_path,
        log=lines.append,
    )
    print("\n".join(lines))
    # bounded by count and time: on a busy machine the time bound may end it before 150
    assert t["sent"] >= 30 and t["correct"] == t["sent"], t["errors"]
    assert t["failed"] == 0 and t["wrong"] == 0
    assert all(v > 0 for v in t["share"].values()), t["share"]
    assert t["alive_after"] == 1
    assert t["queue_us_per_request_load"] is not None
    assert (t["queue_us_per_request_idle"] or 0.0) < t["queue_us_per_request_load"]
    assert t["leftovers"] == []
    assert t["probe"].startswith("inference probe ok"), t["probe"]
    assert control_closed(t["control"]), t["control"]
    assert t["oversized"].startswith("413"), t["oversized"]
    assert not [p for p in set(os.listdir("/dev/shm")) - shm_before if p.startswith("vitserve-cluster")]


@pytest.mark.triton
def test_the_proxy_speaks_tls_limits_bodies_and_the_replicas_refuse_control_calls_without_the_key(
    tiny_repository, tmp_path
):
    """The rehearsal's front door: nginx with a self-signed certificate made for the run, in front of a
    tritonserver whose control APIs are behind a key. Through it, inference over HTTPS and gRPC/TLS needs
    no key; the repository index is refused without the key (HTTP 403, gRPC "restricted") and answered
    with it; a body above the limit is refused from its headers (413); plain HTTP gets no answer."""
    import tritonclient.grpc as grpcclient

    from vitserve.apikey import CONTROL_APIS
    from vitserve.server import TritonServer, free_port

    _nginx()
    key = "rehearsal-test-key"
    workdir = Path(tempfile.mkdtemp(prefix="vitserve-tls-test-"))
    prefix = f"vitserve-tls-test-{os.getpid()}_"
    server = TritonServer(
        tiny_repository, log_path=tmp_path / "r.log", restricted=CONTROL_APIS, api_key=key,
        extra_args=["--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
                    f"--backend-config=python,shm-region-prefix-name={prefix}"],
    )  # fmt: skip
    proxy = None
    try:
        server.start()
        tls = self_signed_cert(workdir)
        assert oct(tls.key.stat().st_mode & 0o777) == "0o600"
        http_port, grpc_port = free_port(), free_port()
        proxy = start_nginx(workdir, http_port, grpc_port, [server], tls=tls)
        conf = (workdir / "nginx.conf").read_text()
        assert (
            f"listen 127.0.0.1:{grpc_port} ssl http2;" in conf
            and f"client_max_body_size {BODY_LIMIT_MB}m;" in conf
        )

        control = control_calls(http_port, grpc_port, tls, key)
        assert control_closed(control), control
        assert oversized_request(http_port, tls, "add_one").startswith("413")

        body = json.dumps(
            {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        ).encode()
        req = urllib.request.Request(f"https://127.0.0.1:{http_port}/v2/models/add_one/infer", data=body)
        with urllib.request.urlopen(req, timeout=10, context=tls.context()) as r:
            assert json.load(r)["outputs"][0]["data"] == [2, 3, 4, 5]
        g = grpcclient.InferenceServerClient(
            f"127.0.0.1:{grpc_port}", ssl=True, root_certificates=str(tls.cert)
        )
        inp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
        inp.set_data_from_numpy(np.arange(4, dtype=np.float32).reshape(1, 4))
        np.testing.assert_array_equal(g.infer("add_one", [inp]).as_numpy("OUTPUT0"), [[1, 2, 3, 4]])
        g.close()
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=5).read()
    finally:
        if proxy is not None:
            proxy.stop(signal.SIGQUIT)
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
