"""The launcher starts the real tritonserver (CPU build from nvidia-pytriton) and perf_analyzer talks to it."""

from __future__ import annotations

import csv
import socket
import subprocess

import numpy as np
import pytest

from vitserve.errors import ServerError
from vitserve.server import TritonServer, perf_analyzer_command

pytestmark = pytest.mark.triton


def test_infer_over_http_and_grpc(tiny_server):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    for mod, url in ((httpclient, tiny_server.http_url), (grpcclient, tiny_server.grpc_url)):
        client = mod.InferenceServerClient(url)
        assert client.is_server_ready()
        inp = mod.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("add_one", [inp])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x + 1)


def test_perf_analyzer_csv(tiny_server, tmp_path):
    cmd, env = perf_analyzer_command()
    report = tmp_path / "pa.csv"
    proc = subprocess.run(
        [
            *cmd,
            "-m",
            "add_one",
            "-u",
            tiny_server.grpc_url,
            "-i",
            "grpc",
            "--shape",
            "INPUT0:4",
            "--concurrency-range",
            "1:2",
            "--measurement-interval",
            "1000",
            "--stability-percentage",
            "1000",
            "--max-trials",
            "3",
            "-f",
            str(report),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = list(csv.DictReader(report.open()))
    assert [int(r["Concurrency"]) for r in rows] == [1, 2]
    assert all(float(r["Inferences/Second"]) > 0 for r in rows)
    assert all(float(r["p50 latency"]) <= float(r["p99 latency"]) for r in rows)


def test_missing_repository_fails_fast(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ServerError, match=str(missing)):
        TritonServer(missing).start()


def test_port_in_use_fails_fast(tiny_repository):
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        server = TritonServer(tiny_repository, http_port=port)
        with pytest.raises(ServerError, match=f"port {port}"):
            server.start()
        assert server.process is None


def test_server_crash_reports_log_and_leaves_nothing(tmp_path):
    bad = tmp_path / "repo"
    (bad / "broken" / "1").mkdir(parents=True)
    (bad / "broken" / "config.pbtxt").write_text('backend: "no_such_backend"\n')
    server = TritonServer(bad, extra_args=["--exit-on-error=true"], startup_timeout_s=60)
    with pytest.raises(ServerError, match="tritonserver"):
        server.start()
    assert server.process is None
