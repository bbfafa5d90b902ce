"""vitserve.publish against moto's real S3 server on loopback: versions, the CURRENT pointer, a failed
upload leaving the old version current, refusals, and tritonserver loading the published s3:// version."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

pytest.importorskip("boto3", reason="boto3 is in the cluster extra")
pytest.importorskip("moto", reason="moto[server] is in the cluster extra")

from vitserve.publish import (
    POINTER,
    RECORD,
    PublishError,
    S3Location,
    current,
    publish,
    s3_client,
    triton_url,
    versions,
)

CREDS = {"AWS_ACCESS_KEY_ID": "test-not-a-secret", "AWS_SECRET_ACCESS_KEY": "test-not-a-secret"}


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server on 127.0.0.1, in its own process group."""
    from vitserve.server import free_port

    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"moto_server did not start: {log.read_text()}"
            time.sleep(0.2)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=10)


@pytest.fixture
def s3(s3_endpoint, monkeypatch, request):
    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = s3_client(s3_endpoint)
    bucket = "b-" + request.node.name.lower().replace("_", "-")[:50]
    client.create_bucket(Bucket=bucket)
    return client, bucket


def _keys(client, bucket, prefix=""):
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for p in pages for o in p.get("Contents", []))


def test_publish_uploads_a_version_then_points_current_at_it(s3, tiny_repository):
    client, bucket = s3
    p = publish(tiny_repository, f"s3://{bucket}/models/", client=client)
    base = f"models/versions/{p.version}"
    assert _keys(client, bucket, base + "/") == sorted(
        [f"{base}/add_one/config.pbtxt", f"{base}/add_one/1/model.py", f"{base}/{RECORD}"]
    )
    body = client.get_object(Bucket=bucket, Key=f"{base}/add_one/1/model.py")["Body"].read()
    assert body == (tiny_repository / "add_one" / "1" / "model.py").read_bytes()
    pointer = json.loads(client.get_object(Bucket=bucket, Key=f"models/{POINTER}")["Body"].read())
    assert pointer["version"] == p.version
    assert p.triton_url == f"s3://{client.meta.endpoint_url}/{bucket}/{base}"
    assert current(f"s3://{bucket}/models", client=client) == p
    assert versions(f"s3://{bucket}/models", client=client) == [p.version]


def test_empty_folders_are_published_as_folder_markers(s3, tiny_repository, tmp_path):
    """An ensemble's version folder is empty; without a marker tritonserver finds no version in S3."""
    import shutil

    client, bucket = s3
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repository, repo)
    (repo / "ens" / "1").mkdir(parents=True)
    (repo / "ens" / "config.pbtxt").write_text('name: "ens"')
    p = publish(repo, f"s3://{bucket}/m", client=client)
    marker = f"m/versions/{p.version}/ens/1/"
    assert marker in _keys(client, bucket, marker)
    assert p.files == 4


def test_publish_only_some_models(s3, tiny_repository, tmp_path):
    import shutil

    client, bucket = s3
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repository, repo)
    shutil.copytree(repo / "add_one", repo / "other")
    p = publish(repo, f"s3://{bucket}/m", client=client, models=["other"])
    keys = _keys(client, bucket, f"m/versions/{p.version}/")
    assert keys and not [k for k in keys if "/add_one/" in k]
    with pytest.raises(PublishError, match=r"nope.*it has: add_one, other"):
        publish(repo, f"s3://{bucket}/m", client=client, models=["nope"])


def test_a_new_version_moves_current_and_keeps_the_old_one(s3, tiny_repository):
    client, bucket = s3
    first = publish(tiny_repository, f"s3://{bucket}/m", client=client, version="v1")
    second = publish(tiny_repository, f"s3://{bucket}/m", client=client, version="v2")
    assert current(f"s3://{bucket}/m", client=client).version == second.version == "v2"
    assert versions(f"s3://{bucket}/m", client=client) == ["v1", "v2"]
    assert _keys(client, bucket, f"m/versions/{first.version}/")  # a pinned replica still finds v1
    with pytest.raises(PublishError, match="already exists"):
        publish(tiny_repository, f"s3://{bucket}/m", client=client, version="v1")


def test_a_failed_upload_leaves_the_old_version_current(s3, tiny_repository):
    client, bucket = s3
    old = publish(tiny_repository, f"s3://{bucket}/m", client=client, version="good")
    calls = []

    def fail_on_second(key):
        calls.append(key)
        if len(calls) == 2:
            raise ConnectionError("network went away mid-upload")

    with pytest.raises(PublishError, match=r"network went away.*CURRENT still names the previous version"):
        publish(
            tiny_repository, f"s3://{bucket}/m", client=client, version="broken", upload_hook=fail_on_second
        )
    assert current(f"s3://{bucket}/m", client=client) == old
    assert _keys(client, bucket, "m/versions/broken/") == []  # the partial upload was removed
    assert versions(f"s3://{bucket}/m", client=client) == ["good"]


def test_current_refuses_a_pointer_to_an_incomplete_version(s3, tiny_repository):
    client, bucket = s3
    with pytest.raises(PublishError, match="nothing is published"):
        current(f"s3://{bucket}/none", client=client)
    client.put_object(Bucket=bucket, Key=f"x/{POINTER}", Body=b'{"version": "ghost"}')
    with pytest.raises(PublishError, match="incomplete or deleted"):
        current(f"s3://{bucket}/x", client=client)


def test_bad_input_is_refused_with_what_to_do(s3, tiny_repository, tmp_path):
    client, bucket = s3
    with pytest.raises(PublishError, match="s3://BUCKET/PREFIX"):
        S3Location.parse("/local/path")
    with pytest.raises(PublishError, match="has no prefix"):
        S3Location.parse(f"s3://{bucket}")
    with pytest.raises(PublishError, match=r"'\.\.'"):
        S3Location.parse(f"s3://{bucket}/a/../b")
    with pytest.raises(PublishError, match="make engines"):
        publish(tmp_path / "nope", f"s3://{bucket}/m", client=client)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PublishError, match="holds no model"):
        publish(tmp_path / "empty", f"s3://{bucket}/m", client=client)
    with pytest.raises(PublishError, match="does not exist; create it"):
        publish(tiny_repository, "s3://no-such-bucket-here/m", client=client)


def test_triton_url_forms():
    assert triton_url("b", "p/versions/v1") == "s3://b/p/versions/v1"
    assert triton_url("b", "/p/v/", "http://127.0.0.1:9000/") == "s3://http://127.0.0.1:9000/b/p/v"


def test_cli_publish_and_published(s3, tiny_repository, monkeypatch, capsys):
    from vitserve.cli import main

    client, bucket = s3
    monkeypatch.setenv("AWS_ENDPOINT_URL", client.meta.endpoint_url)
    assert main(["publish", "--repository", str(tiny_repository), "--to", f"s3://{bucket}/cli"]) == 0
    out = capsys.readouterr().out
    assert "CURRENT ->" in out and "--model-repository=s3://" in out
    assert main(["published", f"s3://{bucket}/cli"]) == 0
    assert current(f"s3://{bucket}/cli", client=client).triton_url in capsys.readouterr().out
    assert main(["published", f"s3://{bucket}/missing"]) == 2
    assert "vitserve publish --to" in capsys.readouterr().err


@pytest.mark.triton
def test_tritonserver_serves_the_current_version_from_s3(s3, tiny_repository, tmp_path):
    """The real tritonserver with --model-repository=s3://http://127.0.0.1:PORT/BUCKET/.../versions/V."""
    import tritonclient.http as httpclient

    from vitserve.server import TritonServer

    client, bucket = s3
    publish(tiny_repository, f"s3://{bucket}/serve", client=client)
    url = current(f"s3://{bucket}/serve", client=client).triton_url
    prefix = f"vitserve-test-{os.getpid()}_"
    server = TritonServer(
        url,
        log_path=tmp_path / "triton.log",
        extra_args=["--http-address=127.0.0.1", f"--backend-config=python,shm-region-prefix-name={prefix}"],
    )
    with server:
        c = httpclient.InferenceServerClient(server.http_url)
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        inp = httpclient.InferInput("INPUT0", [2, 4], "FP32")
        inp.set_data_from_numpy(x)
        out = c.infer("add_one", [inp]).as_numpy("OUTPUT0")
        c.close()
    np.testing.assert_array_equal(out, x + 1)
    assert not [p for p in os.listdir("/dev/shm") if p.startswith(prefix)]
