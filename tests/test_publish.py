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
    check_published_engines,
    current,
    parse_triton_url,
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


def test_a_failed_upload_whose_response_was_lost_leaves_nothing_behind(s3, tiny_repository):
    """An object that lands but whose response never comes back (simulated by really uploading it and
    then failing the call) is deleted too: cleanup lists the version's prefix; the version can be
    published again."""
    client, bucket = s3
    old = publish(tiny_repository, f"s3://{bucket}/m", client=client, version="good")
    landed = []
    observer = s3_client(client.meta.endpoint_url)

    def remember_key(params, context, **kwargs):
        context["key"] = params["Key"]

    def lose_the_response(context, **kwargs):
        if context.get("key", "").endswith("/add_one/config.pbtxt"):
            observer.head_object(Bucket=bucket, Key=context["key"])  # stored (raises if not)
            landed.append(context["key"])
            raise ConnectionError("connection reset after the object was stored")

    events = (
        ("before-parameter-build.s3.PutObject", remember_key),
        ("after-call.s3.PutObject", lose_the_response),
    )
    for event, handler in events:
        client.meta.events.register(event, handler)
    try:
        with pytest.raises(PublishError, match=r"connection reset.*partial upload was deleted"):
            publish(tiny_repository, f"s3://{bucket}/m", client=client, version="retry")
    finally:
        for event, handler in events:
            client.meta.events.unregister(event, handler)
    assert landed  # the object really was stored before the call failed
    assert _keys(client, bucket, "m/versions/retry/") == []
    assert current(f"s3://{bucket}/m", client=client) == old
    assert publish(tiny_repository, f"s3://{bucket}/m", client=client, version="retry").version == "retry"


def test_a_slower_older_publish_does_not_overwrite_a_newer_current(s3, tiny_repository):
    """Two publishes race: the one that started first finishes last. CURRENT stays on the newer one (S3
    conditional write on CURRENT's ETag) and the slower one is refused, its version uploaded, not current.
    The same holds for the very first publish (no CURRENT yet: If-None-Match)."""
    client, bucket = s3
    for prefix, before in (("first", None), ("m", "v0")):
        if before:
            publish(tiny_repository, f"s3://{bucket}/{prefix}", client=client, version=before)
        newer = []

        def meanwhile(key, prefix=prefix, newer=newer):
            if not newer:  # while the older publish uploads its first file, a newer one completes
                newer.append(
                    publish(tiny_repository, f"s3://{bucket}/{prefix}", client=client, version="newer")
                )

        with pytest.raises(PublishError, match=r"moved to version newer by another publish.*not changed"):
            publish(
                tiny_repository,
                f"s3://{bucket}/{prefix}",
                client=client,
                version="older",
                upload_hook=meanwhile,
            )
        assert current(f"s3://{bucket}/{prefix}", client=client).version == "newer"
        assert "older" in versions(f"s3://{bucket}/{prefix}", client=client)  # whole, never pointed at
    # Publishing again after the race moves CURRENT forward as usual.
    assert publish(tiny_repository, f"s3://{bucket}/m", client=client, version="v3").version == "v3"
    assert current(f"s3://{bucket}/m", client=client).version == "v3"


def test_two_publishes_of_one_version_cannot_mix(s3, tiny_repository):
    """The first publish of a version claims it (create-only) before uploading; a second one of the same
    version is refused and deletes nothing of the first, which completes."""
    client, bucket = s3
    refused = []

    def meanwhile(key):
        if not refused:
            with pytest.raises(PublishError, match="already exists") as e:
                publish(tiny_repository, f"s3://{bucket}/m", client=client, version="same")
            refused.append(e.value)

    p = publish(tiny_repository, f"s3://{bucket}/m", client=client, version="same", upload_hook=meanwhile)
    assert refused and current(f"s3://{bucket}/m", client=client) == p
    assert _keys(client, bucket, "m/versions/same/") == sorted(
        f"m/versions/same/{k}" for k in ("add_one/config.pbtxt", "add_one/1/model.py", RECORD)
    )


def test_a_lost_response_on_current_is_not_a_conflict(s3, tiny_repository):
    """The CURRENT PUT lands but its response is lost: CURRENT names this version, so the publish
    succeeds instead of reporting a race with itself."""
    client, bucket = s3

    def remember_key(params, context, **kwargs):
        context["key"] = params["Key"]

    lost = []

    def lose_pointer_response(context, **kwargs):
        if context.get("key") == f"m/{POINTER}":
            lost.append(context["key"])
            raise ConnectionError("response lost")

    events = (
        ("before-parameter-build.s3.PutObject", remember_key),
        ("after-call.s3.PutObject", lose_pointer_response),
    )
    for event, handler in events:
        client.meta.events.register(event, handler)
    try:
        p = publish(tiny_repository, f"s3://{bucket}/m", client=client, version="v1")
    finally:
        for event, handler in events:
            client.meta.events.unregister(event, handler)
    assert lost == [f"m/{POINTER}"]
    assert current(f"s3://{bucket}/m", client=client) == p


def _tensorrt_repo(tmp_path, tiny_repository, record, plan: bool = True):
    """tiny_repository + a TensorRT model `m_fp16_tensorrt` as `make engines` / `make engines-gpu` leave
    it: build.sh always, the plan when built, and its engine record in vitserve-manifest.json."""
    import hashlib
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repository, repo)
    mdir = repo / "m_fp16_tensorrt"
    (mdir / "1").mkdir(parents=True)
    (mdir / "config.pbtxt").write_text('name: "m_fp16_tensorrt"\nplatform: "tensorrt_plan"\n')
    (mdir / "1" / "build.sh").write_text("#!/usr/bin/env bash\ntrtexec --onnx=../onnx/model.onnx\n")
    if plan:
        (mdir / "1" / "model.plan").write_bytes(b"serialized engine bytes")
        record = {"plan_sha256": hashlib.sha256(b"serialized engine bytes").hexdigest(), **record}
    manifest = {"models": {"m": {"engines": {"m_fp16_tensorrt": record}}}}
    (repo / "vitserve-manifest.json").write_text(json.dumps(manifest))
    return repo


VERIFIED = {
    "built": True,
    "published": True,
    "tensorrt_version": "10.13.3.9",
    "compute_capability": "9.0",
    "gpu_name": "NVIDIA H100 80GB HBM3",
    "fidelity": {"passed": True, "gate": "PASS: embeddings cosine_min 0.9995 >= 0.999"},
}


def test_publish_refuses_tensorrt_models_without_a_verified_plan(
    s3, tiny_repository, tmp_path, monkeypatch, capsys
):
    from vitserve.cli import main

    client, bucket = s3
    cases = {
        "only-build-sh": ({"built": False, "build_script": "m_fp16_tensorrt/1/build.sh"}, False, "only m_fp16_tensorrt/1/build.sh"),
        "failed-gate": ({**VERIFIED, "fidelity": {"passed": False, "gate": "FAIL: cosine_min 0.91 < 0.999"}}, True, "did not pass verification \\(FAIL"),
        "never-verified": ({k: v for k, v in VERIFIED.items() if k != "fidelity"}, True, "never verified"),
        "unrecorded": (None, True, "its plan is not recorded"),
    }  # fmt: skip
    for case, (record, plan, why) in cases.items():
        repo = _tensorrt_repo(tmp_path / case, tiny_repository, record or {}, plan)
        if record is None:
            (repo / "vitserve-manifest.json").write_text(json.dumps({"models": {}}))
        with pytest.raises(PublishError, match=rf"m_fp16_tensorrt: .*{why}.*make engines-gpu.*--force"):
            publish(repo, f"s3://{bucket}/{case}", client=client)
        assert _keys(client, bucket, f"{case}/") == []  # nothing uploaded, CURRENT untouched
    # A plan that is not the recorded one (sha256) is refused too.
    repo = _tensorrt_repo(tmp_path / "swapped", tiny_repository, VERIFIED)
    (repo / "m_fp16_tensorrt" / "1" / "model.plan").write_bytes(b"another engine")
    with pytest.raises(PublishError, match="not the plan the manifest recorded"):
        publish(repo, f"s3://{bucket}/swapped", client=client)

    # Verified: published. Only the other models: published. Forced: published, and recorded as such.
    ok = publish(
        _tensorrt_repo(tmp_path / "ok", tiny_repository, VERIFIED), f"s3://{bucket}/ok", client=client
    )
    assert f"ok/versions/{ok.version}/m_fp16_tensorrt/1/model.plan" in _keys(client, bucket, "ok/")
    unbuilt = _tensorrt_repo(tmp_path / "unbuilt", tiny_repository, {"built": False}, plan=False)
    publish(unbuilt, f"s3://{bucket}/cpu-only", client=client, models=["add_one"])
    forced = publish(unbuilt, f"s3://{bucket}/forced", client=client, force=True)
    rec = json.loads(
        client.get_object(Bucket=bucket, Key=f"forced/versions/{forced.version}/{RECORD}")["Body"].read()
    )
    assert "only build.sh" in rec["forced_unverified_plans"][0]

    # The CLI refuses the same way, and --force publishes.
    monkeypatch.setenv("AWS_ENDPOINT_URL", client.meta.endpoint_url)
    assert main(["publish", "--repository", str(unbuilt), "--to", f"s3://{bucket}/cli"]) == 2
    assert "only build.sh" in capsys.readouterr().err
    assert main(["publish", "--repository", str(unbuilt), "--to", f"s3://{bucket}/cli", "--force"]) == 0


def test_parse_triton_url_inverts_triton_url():
    for endpoint in (None, "http://127.0.0.1:9000", "https://minio.example:443"):
        url = triton_url("bkt", "p/versions/v1", endpoint)
        assert parse_triton_url(url) == (endpoint, S3Location("bkt", "p/versions/v1"))
    assert parse_triton_url("s3://minio:9000/bkt/p") == ("http://minio:9000", S3Location("bkt", "p"))
    with pytest.raises(PublishError, match="s3://BUCKET/PREFIX"):
        parse_triton_url("gs://bkt/p")


HOST = {"tensorrt_version": "10.13.3", "compute_capability": "9.0", "gpu_name": "NVIDIA H100 80GB HBM3"}


def test_check_engines_of_a_published_repository(s3, tiny_repository, tmp_path):
    """`vitserve check-engines` on an s3:// repository reads the published manifest: each plan against the
    host, and the plan the publish record lists against the one the manifest records."""
    client, bucket = s3
    p = publish(_tensorrt_repo(tmp_path, tiny_repository, VERIFIED), f"s3://{bucket}/m", client=client)
    assert check_published_engines(p.triton_url, HOST, client=client) == (1, [])
    count, (problem,) = check_published_engines(
        p.triton_url, {**HOST, "tensorrt_version": "10.14.1"}, client=client
    )
    assert count == 1 and "m_fp16_tensorrt" in problem and "10.13.3.9" in problem and "10.14.1" in problem
    plain = publish(tiny_repository, f"s3://{bucket}/plain", client=client)
    assert check_published_engines(plain.triton_url, HOST, client=client) == (0, [])
    # A manifest that no longer describes the published plan.
    base = f"m/versions/{p.version}"
    client.put_object(Bucket=bucket, Key=f"{base}/vitserve-manifest.json", Body=b'{"models": {}}')
    (problem,) = check_published_engines(p.triton_url, HOST, client=client)[1]
    assert "not recorded in vitserve-manifest.json" in problem


def test_entrypoint_checks_plans_of_an_s3_repository(s3, tiny_repository, tmp_path):
    """docker/entrypoint.sh with tritonserver's s3:// repository (the Kubernetes path) runs the real
    `vitserve check-engines` on the published manifest: this host has no TensorRT and no GPU, so the
    published plan is refused before tritonserver starts; a repository without plans starts it."""
    from pathlib import Path

    client, bucket = s3
    p = publish(_tensorrt_repo(tmp_path, tiny_repository, VERIFIED), f"s3://{bucket}/k8s", client=client)
    plain = publish(tiny_repository, f"s3://{bucket}/plain", client=client)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "tritonserver").write_text('#!/usr/bin/env bash\necho "server started $*"\n')
    (fake_bin / "tritonserver").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{Path(sys.executable).parent}:{os.environ['PATH']}"}
    entry = str(Path(__file__).resolve().parents[1] / "docker" / "entrypoint.sh")
    refused = subprocess.run(
        ["bash", entry, "tritonserver", f"--model-repository={p.triton_url}"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 3, refused.stderr
    assert "server started" not in refused.stdout
    assert "m_fp16_tensorrt" in refused.stderr and "10.13.3.9" in refused.stderr
    ok = subprocess.run(
        ["bash", entry, "--model-repository", plain.triton_url],  # plain tritonserver args
        env=env,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert f"server started --model-repository {plain.triton_url}" in ok.stdout


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
