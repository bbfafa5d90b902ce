"""The control APIs behind the operator's key, on the real tritonserver (vitserve/apikey.py).

Restricted (model-repository, shared-memory, statistics, trace, logging): refused without the key over HTTP
(403) and gRPC (UNAVAILABLE "This protocol is restricted"), accepted with it. Open: inference, health,
metadata and the model config. `vitserve serve` restricts them by default.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from vitserve.apikey import API_KEY_ENV, API_KEY_HEADER, CONTROL_APIS, GRPC_API_KEY_HEADER, headers
from vitserve.errors import ConfigError
from vitserve.server import TritonServer, free_port

pytestmark = pytest.mark.triton
KEY = "test-key_0123456789"

# (method, path) of one HTTP call per restricted API, and the gRPC client method that reaches the same API
HTTP_CONTROL = {
    "model-repository": ("POST", "/v2/repository/index"),
    "statistics": ("GET", "/v2/models/stats"),
    "shared-memory": ("GET", "/v2/systemsharedmemory/status"),
    "trace": ("GET", "/v2/trace/setting"),
    "logging": ("GET", "/v2/logging"),
}
GRPC_CONTROL = {
    "model-repository": "get_model_repository_index",
    "statistics": "get_inference_statistics",
    "shared-memory": "get_system_shared_memory_status",
    "trace": "get_trace_settings",
    "logging": "get_log_settings",
}


def _http(port: int, method: str, path: str, hdrs: dict | None = None) -> int:
    body = b"{}" if method == "POST" else None
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=body, method=method, headers=hdrs or {}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture(scope="module")
def closed_server(tiny_repository, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "closed_server.log"
    with TritonServer(tiny_repository, log_path=log, restricted=CONTROL_APIS, api_key=KEY) as server:
        yield server


@pytest.mark.parametrize("api", CONTROL_APIS)
def test_a_control_call_over_http_needs_the_key(closed_server, api):
    method, path = HTTP_CONTROL[api]
    assert _http(closed_server.http_port, method, path) == 403
    assert _http(closed_server.http_port, method, path, {API_KEY_HEADER: "wrong"}) == 403
    assert _http(closed_server.http_port, method, path, headers(KEY, grpc=False)) == 200


@pytest.mark.parametrize("api", CONTROL_APIS)
def test_a_control_call_over_grpc_needs_the_key(closed_server, api):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(closed_server.grpc_url)
    call = getattr(client, GRPC_CONTROL[api])
    with pytest.raises(InferenceServerException, match="restricted") as e:
        call()
    assert str(e.value.status()) == "StatusCode.UNAVAILABLE"  # what tritonserver 2.51 answers
    with pytest.raises(InferenceServerException, match="restricted"):
        call(headers={GRPC_API_KEY_HEADER: "wrong"})
    call(headers=headers(KEY, grpc=True))  # accepted
    assert closed_server.control_headers(grpc=True) == {GRPC_API_KEY_HEADER: KEY}


def test_inference_health_and_metadata_stay_open(closed_server):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    for module, url in ((grpcclient, closed_server.grpc_url), (httpclient, closed_server.http_url)):
        client = module.InferenceServerClient(url)
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("add_one")
        assert client.get_server_metadata()
        assert client.get_model_metadata("add_one")
        assert client.get_model_config("add_one")
        inp = module.InferInput("INPUT0", [2, 4], "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_array_equal(client.infer("add_one", [inp]).as_numpy("OUTPUT0"), x + 1)


def test_the_server_object_carries_its_key_and_keeps_it_out_of_the_log(closed_server):
    status, index = closed_server.api("POST", "/v2/repository/index")
    assert status == 200 and index[0]["name"] == "add_one"
    log = Path(closed_server.log_path).read_text()
    assert KEY not in log and f"{API_KEY_HEADER}=<key>" in log
    assert KEY not in repr(closed_server)


def test_unknown_api_names_are_refused_at_the_door(tiny_repository):
    with pytest.raises(ConfigError, match="unknown tritonserver API 'repository'"):
        TritonServer(tiny_repository, restricted=("repository",), api_key=KEY)
    with pytest.raises(ConfigError, match="letters, digits"):
        TritonServer(tiny_repository, restricted=CONTROL_APIS, api_key="has space")


def test_vitserve_serve_is_closed_by_default_with_a_key_file_only_its_owner_reads(tiny_repository, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    cmd = [
        str(Path(sys.executable).parent / "vitserve"), "serve", "--repository", str(tiny_repository),
        "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
        "--log", str(tmp_path / "serve.log"),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(line.startswith("log:") for line in lines):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        out = "".join(lines)
        key_file = tmp_path / "config" / "vitserve" / "api_key"
        assert f"key from {key_file}" in out, out
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_text().strip()
        assert len(key) >= 32
        assert _http(http_port, "POST", "/v2/repository/index") == 403
        assert _http(http_port, "POST", "/v2/repository/index", headers(key, grpc=False)) == 200
        assert _http(http_port, "GET", "/v2/health/ready") == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_grpc_tls_of_tritonserver_itself_with_the_readme_flags(tiny_repository, tmp_path):
    """README's direct gRPC TLS (`--grpc-use-ssl=true --grpc-server-cert --grpc-server-key`): a TLS client
    that trusts the certificate is served, the key still guards the control APIs, a plaintext one is not."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from vitserve.perf.cluster import self_signed_cert

    tls = self_signed_cert(tmp_path)
    flags = ["--grpc-use-ssl=true", f"--grpc-server-cert={tls.cert}", f"--grpc-server-key={tls.key}"]
    with TritonServer(
        tiny_repository, log_path=tmp_path / "tls.log", restricted=CONTROL_APIS, api_key=KEY, extra_args=flags
    ) as server:
        url = f"127.0.0.1:{server.grpc_port}"
        client = grpcclient.InferenceServerClient(url, ssl=True, root_certificates=str(tls.cert))
        inp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
        np.testing.assert_array_equal(client.infer("add_one", [inp]).as_numpy("OUTPUT0"), np.ones((1, 4)))
        assert client.get_model_repository_index(headers=headers(KEY, grpc=True)).models
        with pytest.raises(InferenceServerException, match="restricted"):
            client.get_model_repository_index()
        plain = grpcclient.InferenceServerClient(url)
        with pytest.raises(InferenceServerException):
            plain.is_server_live(client_timeout=3)
