"""A built repository -> a Kubernetes-shaped cluster on one machine, under load, with failures (`make cluster-demo`).

What deploy/ describes for a real cluster, rehearsed here with the real parts, all bound to 127.0.0.1:

    moto's S3 server          holds the repository, published by `vitserve.publish` (versioned + CURRENT)
    N x tritonserver          each loads the CURRENT version from s3:// (its own process group, like a pod),
                              its control APIs behind a key made for the run (vitserve/apikey.py)
    nginx (Debian)            the Service and its ingress: TLS (a self-signed certificate made for the run),
                              a request-body limit, least_conn, HTTP and gRPC (grpc_pass); inference
                              retried on error/timeout/502/503 (it is idempotent), nothing else retried
    prometheus (Debian)       scrapes every replica and evaluates the HPA rule of deploy/ (the
                              prometheus-adapter query: queue time per request)
    load                      gRPC and HTTP VitClients through nginx over TLS, without the key, bounded in
                              requests and time; every answer compared with the expected embedding of its
                              image; a control call without the key is refused, with it accepted

Mid-run one replica is SIGKILLed (a node lost: no notice) and later another is terminated the way Kubernetes
does it: taken out of the load balancer (endpoints removed), the preStop pause, then SIGTERM, which lets
tritonserver finish what it holds. Afterwards every process group is gone, and nothing of the rehearsal
is left in /dev/shm or /tmp (a SIGKILLed tritonserver leaves its python stubs, their shared-memory regions
and its S3 download folders behind: the rehearsal kills the group and removes what it recorded).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import http.client
import ipaddress
import json
import math
import os
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitserve.apikey import CONTROL_APIS, headers
from vitserve.errors import ServerError
from vitserve.exporter.hostinfo import cpu_summary
from vitserve.server import TritonServer, free_port

# The HPA metric of deploy/ (prometheus-adapter rule from Triton's deploy/k8s-onprem chart): queue time per
# request over 30 s. The rehearsal records it under this name.
HPA_QUERY = "avg(delta(nv_inference_queue_duration_us[30s])/(1+delta(nv_inference_request_success[30s])))"
HPA_RECORD = "vitserve:queue_us_per_request"
HPA_TARGET_US = 50_000  # the HPA's averageValue in deploy/ (50 ms of queueing per request)
BUCKET = "vitserve"
# nginx's request-body limit (HTTP and gRPC): tritonserver 2.51 reads a body whole and has no limit of its
# own (--http-max-input-size came later). A batch of 8 ViT-L/336 tensors is 11 MB; encoded photos far less.
BODY_LIMIT_MB = 64
CREDENTIALS = {  # moto accepts any; these are fake and say so
    "AWS_ACCESS_KEY_ID": "rehearsal-not-a-secret",
    "AWS_SECRET_ACCESS_KEY": "rehearsal-not-a-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def hpa_replicas(current: int, value: float, target: float = HPA_TARGET_US, max_replicas: int = 8) -> int:
    """What Kubernetes' HPA picks for an AverageValue target: ceil(current * value / target), within
    [1, max_replicas], unchanged inside its 10 % tolerance."""
    if current < 1:
        return 1
    ratio = value / target
    if abs(ratio - 1.0) <= 0.1:
        return current
    return max(1, min(max_replicas, math.ceil(current * ratio)))


def _which(name: str, package: str) -> str:
    exe = shutil.which(name) or (shutil.which(name, path="/usr/sbin:/sbin") if name == "nginx" else None)
    if exe is None:
        raise ServerError(
            f"{name} was not found; install Debian's {package} (`sudo apt-get install {package}`, or "
            "`make cluster-deps` as root)"
        )
    return exe


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group_members(pgid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process in group `pgid`."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.getpgid(int(entry)) == pgid:
                cmd = (
                    Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                )
                out.append((int(entry), cmd.strip()))
    return out


def _wait_http(
    url: str,
    timeout_s: float,
    proc: subprocess.Popen | None = None,
    what: str = "",
    context: ssl.SSLContext | None = None,
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerError(f"{what} exited with code {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=2, context=context):
                return
        except urllib.error.HTTPError:
            return  # it answers: up
        except OSError:
            time.sleep(0.2)
    raise ServerError(f"{what} did not answer at {url} within {timeout_s:.0f} s")


@dataclass
class _Process:
    """A helper process (moto, nginx, prometheus) in its own process group, with its log."""

    name: str
    cmd: list[str]
    log: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen | None = None

    def start(self) -> _Process:
        with open(self.log, "w") as log:
            log.write("# " + " ".join(self.cmd) + "\n")
            log.flush()
            self.proc = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        return self

    @property
    def pgid(self) -> int:
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        self.proc.wait()


@dataclass
class Replica(TritonServer):
    """One tritonserver of the rehearsal: a TritonServer with the S3 credentials in its environment, bound
    to 127.0.0.1, with its own python-backend shared-memory prefix (so that what a SIGKILL leaves behind
    can be found and removed)."""

    index: int = 0
    env_extra: dict[str, str] = field(default_factory=dict)
    shm_prefix: str = ""
    stub_dirs: set[str] = field(default_factory=set)

    def environment(self) -> dict[str, str]:
        return super().environment() | self.env_extra

    def record_stub_dirs(self) -> None:
        """The /tmp folders tritonserver downloaded the S3 models to, read from its stubs' command lines."""
        if self.process is None:
            return
        for _pid, cmd in _group_members(self.process.pid):
            self.stub_dirs.update(m.group(1) for m in re.finditer(r"(/tmp/folder[A-Za-z0-9]{6})/", cmd))

    @property
    def pgid(self) -> int | None:
        return self.process.pid if self.process is not None else None


def python_env_dirs() -> set[Path]:
    """The python backend's /tmp/python_env_* folders (tritonserver removes them when it stops, not when
    it is killed)."""
    return set(Path("/tmp").glob("python_env_*"))


def remove_leftovers(
    shm_prefixes: list[str], stub_dirs: list[str], env_candidates: set[Path], killed: int, log=print
) -> None:
    """What SIGKILLed tritonservers leave: python-backend shm regions with these prefixes (each replica has
    its own), the /tmp folders their stubs ran from (S3 downloads), and their python_env_* folders.

    Nothing names the tritonserver that made a python_env_* folder, so `env_candidates` are those that
    appeared while our servers started; after the others stopped (removing their own), the ones still there
    are the killed servers' unless other tritonservers started meanwhile: with more left than `killed`, none
    is removed (another server's may be among them) and they are named instead."""
    for prefix in shm_prefixes:
        for p in Path("/dev/shm").glob(prefix + "*"):
            with contextlib.suppress(OSError):
                p.unlink()
    for d in stub_dirs:
        shutil.rmtree(d, ignore_errors=True)
    left = sorted(d for d in env_candidates if d.is_dir())
    if len(left) > killed:
        log(f"not removing {', '.join(map(str, left))}: another tritonserver started with ours")
        return
    for d in left:
        with contextlib.suppress(OSError):
            if not any(d.iterdir()):
                d.rmdir()


@dataclass(frozen=True)
class Tls:
    """A certificate and its key (PEM files); the certificate is also the CA a client trusts."""

    cert: Path
    key: Path

    def context(self) -> ssl.SSLContext:
        """A client context that trusts this certificate only."""
        return ssl.create_default_context(cafile=str(self.cert))


def self_signed_cert(workdir: Path, days: int = 1) -> Tls:
    """A self-signed certificate for 127.0.0.1 and localhost (EC P-256, `days` valid), its key readable by
    its owner only: the rehearsal's stand-in for cert-manager or a TLS Secret."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vitserve rehearsal")])
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    tls = Tls(workdir / "tls.crt", workdir / "tls.key")
    fd = os.open(tls.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    tls.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return tls


def nginx_config(
    workdir: Path,
    http_port: int,
    grpc_port: int,
    replicas: list[Replica],
    retries: int = 3,
    tls: Tls | None = None,
) -> str:
    """nginx in front of `replicas`: least_conn for HTTP and gRPC; inference (idempotent: the same image
    gives the same answer) is retried on another replica on error/timeout/502/503, nothing else is. With
    `tls`, both listeners speak TLS only (HTTP/2 for gRPC); requests above BODY_LIMIT_MB are refused (413)."""
    ssl_on = " ssl" if tls else ""
    ssl_conf = (
        f"""
    ssl_certificate {tls.cert};
    ssl_certificate_key {tls.key};
    ssl_protocols TLSv1.2 TLSv1.3;"""
        if tls
        else ""
    )
    http = "\n".join(f"        server 127.0.0.1:{r.http_port} max_fails=1 fail_timeout=5s;" for r in replicas)
    grpc = "\n".join(f"        server 127.0.0.1:{r.grpc_port} max_fails=1 fail_timeout=5s;" for r in replicas)
    w = workdir
    return f"""# written by vitserve.perf.cluster (the rehearsal's load balancer)
worker_processes 1;
daemon off;
pid {w}/nginx.pid;
error_log {w}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format upstream '$server_port|$request_uri|$status|$upstream_addr|$upstream_status|$request_time';
    access_log {w}/nginx-access.log upstream;
    client_body_temp_path {w}/nginx-body;
    proxy_temp_path {w}/nginx-proxy;
    fastcgi_temp_path {w}/nginx-fastcgi;
    uwsgi_temp_path {w}/nginx-uwsgi;
    scgi_temp_path {w}/nginx-scgi;
    # tritonserver 2.51 reads HTTP bodies whole and has no size limit of its own
    client_max_body_size {BODY_LIMIT_MB}m;
    client_body_buffer_size 1m;{ssl_conf}
    upstream triton_http {{
        least_conn;
{http}
        keepalive 16;
    }}
    upstream triton_grpc {{
        least_conn;
{grpc}
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{http_port}{ssl_on};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_connect_timeout 2s;
        proxy_read_timeout 60s;
        location ~ ^/v2/models/[^/]+(/versions/[0-9]+)?/infer$ {{
            proxy_pass http://triton_http;
            proxy_next_upstream error timeout http_502 http_503 non_idempotent;
            proxy_next_upstream_tries {retries};
        }}
        location / {{
            proxy_pass http://triton_http;
            proxy_next_upstream error timeout;
        }}
    }}
    server {{
        listen 127.0.0.1:{grpc_port}{ssl_on} http2;
        grpc_connect_timeout 2s;
        grpc_read_timeout 60s;
        location /inference.GRPCInferenceService/ModelInfer {{
            grpc_pass grpc://triton_grpc;
            grpc_next_upstream error timeout http_502 http_503 non_idempotent;
            grpc_next_upstream_tries {retries};
        }}
        location / {{
            grpc_pass grpc://triton_grpc;
            grpc_next_upstream off;
        }}
    }}
}}
"""


def start_nginx(
    workdir: Path, http_port: int, grpc_port: int, replicas: list, tls: Tls | None = None
) -> _Process:
    """Debian's nginx in front of `replicas` (anything with http_port/grpc_port), config in `workdir`; returns
    once it answers (over TLS with `tls`). Its logs and temp folders stay in `workdir`."""
    nginx = _which("nginx", "nginx-light")
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_config(workdir, http_port, grpc_port, replicas, tls=tls))
    proc = _Process(
        "nginx",
        [nginx, "-e", str(workdir / "nginx-error.log"), "-p", str(workdir), "-c", str(conf)],
        workdir / "nginx.log",
    ).start()
    try:
        scheme = "https" if tls else "http"
        _wait_http(
            f"{scheme}://127.0.0.1:{http_port}/", 30, proc.proc, "nginx", tls.context() if tls else None
        )
    except BaseException:
        proc.stop()
        raise
    return proc


def prometheus_files(workdir: Path, replicas: list[Replica]) -> Path:
    """prometheus.yml (1 s scrapes of every replica's metrics) and the HPA recording rule; returns the config."""
    rules = workdir / "hpa-rules.yml"
    rules.write_text(
        json.dumps(
            {"groups": [{"name": "vitserve-hpa", "rules": [{"record": HPA_RECORD, "expr": HPA_QUERY}]}]},
            indent=1,
        )
    )
    config = workdir / "prometheus.yml"
    targets = [f"127.0.0.1:{r.metrics_port}" for r in replicas]
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(rules)],
                "scrape_configs": [{"job_name": "triton", "static_configs": [{"targets": targets}]}],
            },
            indent=1,
        )
    )
    return config


@dataclass
class LoadResult:
    sent: int = 0
    correct: int = 0
    wrong: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    min_cosine: float = 1.0  # of the correct answers, to their expected embedding

    @property
    def per_s(self) -> float:
        return self.correct / self.seconds if self.seconds else 0.0


async def _load(
    urls: dict[str, str],
    model: str,
    photos: list[bytes],
    expected: np.ndarray,
    requests: int,
    duration_s: float,
    concurrency: int,
    events: list[tuple[float, Any]] | None = None,
    ca_file: Path | None = None,
) -> LoadResult:
    """`requests` single-image embed calls (at most `duration_s`), `concurrency` workers per protocol, each
    answer checked: nearest to its own image's expected embedding among all photos, cosine >= 0.99. With
    `ca_file`, over TLS trusting it. The clients send no API key (api_key=""): inference needs none.
    `events` [(fraction, callable)] run in a thread once that fraction of the requests was sent or of
    the time has passed, whichever comes first (the failures, placed mid-run)."""
    from vitserve.client import AsyncVitClient

    result = LoadResult()
    start = time.monotonic()
    deadline = start + duration_s
    counter = iter(range(requests))
    clients = [
        AsyncVitClient(
            url, model, protocol=proto, batch_size=1, retries=3, api_key="",
            ca_file=None if ca_file is None else str(ca_file),
        )
        for proto, url in urls.items()
    ]  # fmt: skip

    async def worker(client) -> None:
        while time.monotonic() < deadline:
            try:
                i = next(counter)
            except StopIteration:
                return
            k = i % len(photos)
            result.sent += 1
            try:
                emb = (await client.embed([photos[k]], strict=True)).embeddings[0]
            except Exception as e:
                result.failed += 1
                if len(result.errors) < 10:
                    result.errors.append(f"{client.config.protocol.value}: {e}")
                continue
            cos = expected @ emb
            if int(np.argmax(cos)) == k and cos[k] >= 0.99:
                result.correct += 1
                result.min_cosine = min(result.min_cosine, float(cos[k]))
            else:
                result.wrong += 1
                if len(result.errors) < 10:
                    result.errors.append(f"image {k}: answer nearest to image {int(np.argmax(cos))}")

    async def fire(fraction: float, action) -> None:
        while result.sent < fraction * requests and time.monotonic() < start + fraction * duration_s:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(action)

    try:
        tasks = [worker(c) for c in clients for _ in range(concurrency)]
        tasks += [fire(fraction, action) for fraction, action in events or []]
        await asyncio.gather(*tasks)
    finally:
        for c in clients:
            await c.close()
    result.seconds = time.monotonic() - start
    return result


def _separation(expected: np.ndarray) -> float:
    """The largest cosine between the expected embeddings of two different photos."""
    sims = expected @ expected.T
    np.fill_diagonal(sims, -1.0)
    return float(sims.max())


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def control_calls(http_port: int, grpc_port: int, tls: Tls, api_key: str) -> dict[str, str]:
    """A control call (the repository index) through a TLS proxy over HTTP and gRPC, without the key and
    with it: what each answered."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    out = {}
    for label, key in (("without key", None), ("with key", api_key)):
        req = urllib.request.Request(
            f"https://127.0.0.1:{http_port}/v2/repository/index", data=b"{}", method="POST",
            headers=headers(key, grpc=False),
        )  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=10, context=tls.context()) as r:
                out[f"http {label}"] = f"{r.status}"
        except urllib.error.HTTPError as e:
            out[f"http {label}"] = f"{e.code} {json.loads(e.read() or b'{}').get('error', '')}".strip()
        client = grpcclient.InferenceServerClient(
            f"127.0.0.1:{grpc_port}", ssl=True, root_certificates=str(tls.cert)
        )
        try:
            n = len(client.get_model_repository_index(headers=headers(key, grpc=True)).models)
            out[f"grpc {label}"] = f"OK ({n} models)"
        except InferenceServerException as e:
            out[f"grpc {label}"] = f"{e.status()} {e.message()}"
        finally:
            client.close()
    return out


def oversized_request(http_port: int, tls: Tls, model: str) -> str:
    """What a TLS proxy answers an inference request whose body is above BODY_LIMIT_MB (refused from its
    headers, before any byte of the body)."""
    conn = http.client.HTTPSConnection("127.0.0.1", http_port, timeout=10, context=tls.context())
    try:
        conn.putrequest("POST", f"/v2/models/{model}/infer")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str((BODY_LIMIT_MB + 1) * 1024 * 1024))
        conn.endheaders()
        r = conn.getresponse()
        return f"{r.status} {r.reason}"
    finally:
        conn.close()


class Cluster:
    """moto S3 + `replicas` tritonservers loading from it + nginx + prometheus, all on 127.0.0.1; a context
    manager whose exit stops everything and removes what it made (see `leftovers`)."""

    def __init__(self, repository: str | Path, model: str = "vitb32", replicas: int = 3, log=print) -> None:
        if replicas < 1:
            raise ServerError(f"replicas {replicas!r} must be >= 1")
        self.repository = Path(repository)
        self.model = model
        self.n = replicas
        self.log = log
        self.workdir = Path(tempfile.mkdtemp(prefix="vitserve-cluster-"))
        self.tag = f"vitserve-cluster-{os.getpid()}-{int(time.time())}"
        self.replicas: list[Replica] = []
        self.helpers: dict[str, _Process] = {}
        self.groups: dict[str, int] = {}  # every process group ever started, by name
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.prom_port = free_port()
        self.s3_port = free_port()
        self.published = None
        self.env_candidates: set[Path] = set()  # python_env_* folders that appeared while replicas started
        self.killed = 0
        # the operator's key of the run (a Kubernetes Secret in deploy/), and the proxy's certificate
        self.api_key = secrets.token_urlsafe(32)
        self.tls = self_signed_cert(self.workdir)

    def serving_models(self) -> list[str]:
        """The model and, for an ensemble, the models of its steps (what `--load-model` loads)."""
        from vitserve.exporter.repository import read_config

        path = self.repository / self.model / "config.pbtxt"
        if not path.exists():
            raise ServerError(
                f"model {self.model!r} is not in {str(self.repository)!r}; build it with `make engines`"
            )
        cfg = read_config(path)
        return [self.model, *sorted({s.model_name for s in cfg.ensemble_scheduling.step})]

    # -- start --------------------------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _helper(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> _Process:
        p = _Process(name, cmd, self.workdir / f"{name}.log", env).start()
        self.helpers[name] = p
        self.groups[name] = p.pgid
        return p

    def start(self) -> None:
        from vitserve.publish import publish, s3_client

        _which("nginx", "nginx-light")
        prometheus = _which("prometheus", "prometheus")
        s3 = f"http://127.0.0.1:{self.s3_port}"
        moto = self._helper(
            "moto-s3",
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.s3_port)],
            env=dict(os.environ, TMPDIR=str(self.workdir)),
        )
        _wait_http(s3, 30, moto.proc, "moto_server")
        os_env = {k: os.environ.get(k) for k in CREDENTIALS}
        try:
            os.environ.update(CREDENTIALS)
            client = s3_client(s3)
            client.create_bucket(Bucket=BUCKET)
            t0 = time.monotonic()
            self.published = publish(
                self.repository, f"s3://{BUCKET}/{self.model}", client=client, models=self.serving_models()
            )
        finally:
            for k, v in os_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        p = self.published
        self.log(
            f"published {p.files} files ({p.bytes / 1e6:.0f} MB) to {p.version_url} in "
            f"{time.monotonic() - t0:.1f} s; tritonserver loads {p.triton_url}"
        )
        for i in range(self.n):
            self.replicas.append(
                Replica(
                    p.triton_url,
                    log_path=self.workdir / f"replica-{i}.log",
                    extra_args=[
                        "--http-address=127.0.0.1",
                        "--grpc-address=127.0.0.1",
                        "--metrics-address=127.0.0.1",
                        "--model-control-mode=explicit",
                        f"--load-model={self.model}",
                        "--exit-timeout-secs=20",
                        f"--backend-config=python,shm-region-prefix-name={self.tag}-{i}_",
                    ],
                    startup_timeout_s=300,
                    restricted=CONTROL_APIS,
                    api_key=self.api_key,
                    index=i,
                    env_extra=dict(CREDENTIALS),
                    shm_prefix=f"{self.tag}-{i}_",
                )
            )
        t0 = time.monotonic()
        errors: list[BaseException] = []

        def boot(r: Replica) -> None:
            try:
                r.start()
            except BaseException as e:
                errors.append(e)
            if r.process is not None:
                self.groups[f"replica-{r.index}"] = r.process.pid

        threads = [threading.Thread(target=boot, args=(r,)) for r in self.replicas]
        envs = python_env_dirs()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.env_candidates |= python_env_dirs() - envs
        if errors:
            raise errors[0]
        for r in self.replicas:
            r.record_stub_dirs()
        self.log(
            f"{self.n} replicas READY from s3:// in {time.monotonic() - t0:.1f} s (ports: "
            + ", ".join(f"#{r.index} http {r.http_port} grpc {r.grpc_port}" for r in self.replicas)
            + ")"
        )
        self.nginx_conf = self.workdir / "nginx.conf"
        ng = start_nginx(self.workdir, self.http_port, self.grpc_port, self.replicas, tls=self.tls)
        self.helpers["nginx"] = ng
        self.groups["nginx"] = ng.pgid
        pconf = prometheus_files(self.workdir, self.replicas)
        pr = self._helper(
            "prometheus",
            [
                prometheus,
                f"--config.file={pconf}",
                f"--storage.tsdb.path={self.workdir / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{self.prom_port}",
                "--log.level=warn",
            ],
        )
        _wait_http(f"http://127.0.0.1:{self.prom_port}/-/ready", 60, pr.proc, "prometheus")
        self.log(
            f"nginx on 127.0.0.1 (HTTPS {self.http_port}, gRPC over TLS {self.grpc_port}, certificate "
            f"{self.tls.cert}, bodies up to {BODY_LIMIT_MB} MB); control APIs ({', '.join(CONTROL_APIS)}) "
            "behind the run's key; prometheus "
            f"127.0.0.1:{self.prom_port} evaluating {HPA_RECORD} = {HPA_QUERY}"
        )

    # -- operations ---------------------------------------------------------------------------------------

    @property
    def urls(self) -> dict[str, str]:
        """The proxy's endpoints (TLS: pass `self.tls.cert` as the client's ca_file)."""
        return {"grpc": f"grpcs://127.0.0.1:{self.grpc_port}", "http": f"https://127.0.0.1:{self.http_port}"}

    def control_calls(self) -> dict[str, str]:
        """`control_calls` through this cluster's proxy."""
        return control_calls(self.http_port, self.grpc_port, self.tls, self.api_key)

    def oversized_request(self) -> str:
        """`oversized_request` to this cluster's proxy."""
        return oversized_request(self.http_port, self.tls, self.model)

    def set_upstreams(self, replicas: list[Replica]) -> None:
        """Rewrite nginx's upstreams to `replicas` and reload it (graceful: requests in flight finish) —
        what an endpoints update does to a Kubernetes Service."""
        self.nginx_conf.write_text(
            nginx_config(self.workdir, self.http_port, self.grpc_port, replicas, tls=self.tls)
        )
        os.kill(self.helpers["nginx"].proc.pid, signal.SIGHUP)
        time.sleep(0.5)  # the new workers take over; the old ones finish their connections

    def sigkill(self, replica: Replica) -> None:
        """A lost node: SIGKILL the replica's whole process group, no notice to anyone."""
        replica.record_stub_dirs()
        os.killpg(replica.process.pid, signal.SIGKILL)
        replica.process.wait()
        self.log(f"  SIGKILL replica #{replica.index} (process group {replica.process.pid})")

    def terminate(self, replica: Replica, pre_stop_s: float = 2.0) -> int | None:
        """Kubernetes' pod termination: endpoints removed (nginx no longer routes to it), the preStop pause,
        SIGTERM to tritonserver (it finishes what it holds), then the container's leftovers killed."""
        replica.record_stub_dirs()
        alive = [r for r in self.replicas if r is not replica and r.is_running()]
        self.set_upstreams(alive)
        self.log(
            f"  replica #{replica.index} removed from nginx (endpoints); preStop {pre_stop_s:g} s; SIGTERM"
        )
        time.sleep(pre_stop_s)
        proc = replica.process
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            code = None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self.log(f"  replica #{replica.index} exited with code {code} after SIGTERM")
        return code

    def query(self, expr: str) -> float | None:
        """The value of a PromQL expression now (None when it has no data)."""
        url = f"http://127.0.0.1:{self.prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as r:
            data = json.load(r)
        res = data.get("data", {}).get("result", [])
        if not res:
            return None
        value = float(res[0]["value"][1])
        return None if math.isnan(value) else value

    def share(self, since_line: int = 0) -> tuple[dict[int, int], int]:
        """Requests each replica answered through nginx (access log, the upstream that answered) after line
        `since_line`, and the log's line count."""
        ports = {}
        for r in self.replicas:
            ports[f"127.0.0.1:{r.http_port}"] = r.index
            ports[f"127.0.0.1:{r.grpc_port}"] = r.index
        counts = {r.index: 0 for r in self.replicas}
        path = self.workdir / "nginx-access.log"
        lines = path.read_text().splitlines() if path.exists() else []
        for line in lines[since_line:]:
            parts = line.split("|")
            if len(parts) < 5 or not parts[1].endswith(("/infer", "/ModelInfer")):
                continue
            # with retries: "addr1, addr2" (and " : " between upstream groups); the last one answered
            last = re.split(r"[,:] ", parts[3])[-1].strip()
            if last in ports:
                counts[ports[last]] += 1
        return counts, len(lines)

    # -- stop ---------------------------------------------------------------------------------------------

    def stop(self) -> None:
        def stop_one(r: Replica) -> None:
            if r.process is not None:
                r.record_stub_dirs()
                # a tritonserver that overran --exit-timeout-secs (busy machine) or was killed leaves its
                # python_env_* folder behind, like a SIGKILLed one
                if r.stop(timeout_s=30) != 0:
                    self.killed += 1

        threads = [threading.Thread(target=stop_one, args=(r,)) for r in self.replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for name in ("prometheus", "nginx", "moto-s3"):
            if name in self.helpers:
                self.helpers[name].stop(signal.SIGQUIT if name == "nginx" else signal.SIGTERM)
        self._clean()

    def _clean(self) -> None:
        """Remove what killed processes left, and the work folder."""
        remove_leftovers(
            [r.shm_prefix for r in self.replicas if r.shm_prefix],
            [d for r in self.replicas for d in r.stub_dirs],
            self.env_candidates,
            self.killed,
            self.log,
        )
        shutil.rmtree(self.workdir, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """What is still there after `stop()`: live process groups, shm regions, /tmp folders (empty when
        the rehearsal cleaned up after itself)."""
        deadline = time.monotonic() + 10  # killed stubs take a moment to be reaped
        while any(_group_alive(g) for g in self.groups.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [f"process group {name} ({pgid})" for name, pgid in self.groups.items() if _group_alive(pgid)]
        left += [str(p) for p in Path("/dev/shm").glob(self.tag + "*")]
        left += [d for r in self.replicas for d in r.stub_dirs if Path(d).exists()]
        left += [str(self.workdir)] if self.workdir.exists() else []
        left += [str(d) for d in sorted(self.env_candidates) if d.exists()]
        return left


_DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
PROBE = next(
    (p for p in (_DEPLOY / "probe" / "infer_probe.py", _DEPLOY / "base" / "infer_probe.py") if p.exists()),
    _DEPLOY / "probe" / "infer_probe.py",
)


def run_probe(replica: Replica, model: str) -> str:
    """deploy/'s liveness probe (one real inference) against `replica`: its output line."""
    if not PROBE.exists():
        return f"skipped: {PROBE} is not here (a source checkout has it)"
    out = subprocess.run(
        [sys.executable, str(PROBE), "--url", f"http://127.0.0.1:{replica.http_port}", "--model", model],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return (out.stdout + out.stderr).strip() + ("" if out.returncode == 0 else f" (exit {out.returncode})")


def expected_embeddings(cluster: Cluster, photos: list[bytes]) -> tuple[np.ndarray, float]:
    """Embeddings of `photos` from replica #0 directly, one image per request (nothing batched with them),
    and the smallest cosine between replicas' answers (they load the same version: all must agree)."""
    from vitserve.client import VitClient

    answers = []
    for r in cluster.replicas:
        with VitClient(r.grpc_url, model=cluster.model, batch_size=1, max_in_flight=1) as client:
            answers.append(client.embed(photos, strict=True).embeddings)
    agree = min(float(_cosines(answers[0], a).min()) for a in answers)
    return answers[0] / np.linalg.norm(answers[0], axis=1, keepdims=True), agree


def _photos(artifacts: Path) -> list[bytes]:
    from vitserve.exporter.samples import write_eval_images

    return [p.read_bytes() for p in write_eval_images(artifacts / "cluster_images")]


def rehearse(
    repository: str | Path,
    model: str = "vitb32",
    replicas: int = 3,
    requests: int = 600,
    duration_s: float = 90.0,
    concurrency: int = 4,
    idle_s: float = 35.0,
    artifacts: str | Path = "artifacts",
    log=print,
) -> dict:
    """The failover rehearsal: load through nginx; at 1/3 of it SIGKILL replica #1, at 2/3 terminate
    replica #2 (Kubernetes-style); then idle. Returns the table's numbers (and prints the table)."""
    photos = _photos(Path(artifacts))
    cluster = Cluster(repository, model, replicas, log)
    with cluster:
        probe = run_probe(cluster.replicas[0], model)
        log(f"liveness probe of deploy/ on replica #0: {probe}")
        expected, agree = expected_embeddings(cluster, photos)
        log(
            f"expected embeddings of {len(photos)} photos from replica #0; replicas agree to cosine >= "
            f"{agree:.6f}; different photos are at most {_separation(expected):.4f} apart in cosine (an answer "
            "counts as correct when it is nearest to its own photo and at cosine >= 0.99)"
        )
        control = cluster.control_calls()
        oversized = cluster.oversized_request()
        log(
            f"control API (repository index) through the proxy: {control}; {BODY_LIMIT_MB + 1} MB body: {oversized}"
        )
        _, mark = cluster.share()
        # the kill at a third of the run, the termination at two thirds (of the requests or the time)
        events = []
        if replicas >= 2:
            events.append((1 / 3, lambda: cluster.sigkill(cluster.replicas[1])))
        if replicas >= 3:
            events.append((2 / 3, lambda: cluster.terminate(cluster.replicas[2])))
        peak: list[float] = []

        def sample() -> None:
            while not done.is_set():
                with contextlib.suppress(OSError, ValueError):
                    v = cluster.query(HPA_RECORD)
                    if v is not None:
                        peak.append(v)
                done.wait(1.0)

        done = threading.Event()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        log(
            f"load: {requests} requests (at most {duration_s:g} s), {concurrency} gRPC + {concurrency} HTTP workers "
            "through nginx over TLS, without the key"
        )
        result = asyncio.run(
            _load(
                cluster.urls,
                model,
                photos,
                expected,
                requests,
                duration_s,
                concurrency,
                events,
                cluster.tls.cert,
            )
        )
        done.set()
        sampler.join()
        counts, _ = cluster.share(mark)
        under_load = max(peak) if peak else None
        alive = sum(r.is_running() for r in cluster.replicas)
        log(f"idle {idle_s:g} s for the {HPA_RECORD} window to pass")
        time.sleep(idle_s)
        idle = cluster.query(HPA_RECORD)
        table = {
            "replicas": replicas,
            "sent": result.sent,
            "correct": result.correct,
            "wrong": result.wrong,
            "failed": result.failed,
            "seconds": result.seconds,
            "images_per_s": result.per_s,
            "min_cosine": result.min_cosine,
            "replicas_agree_cosine": agree,
            "max_cosine_between_photos": _separation(expected),
            "share": {str(k): v for k, v in counts.items()},
            "queue_us_per_request_load": under_load,
            "queue_us_per_request_idle": idle,
            "hpa_target_us": HPA_TARGET_US,
            "alive_after": alive,
            "hpa_replicas_load": hpa_replicas(replicas, under_load or 0.0),
            "hpa_replicas_idle": hpa_replicas(alive, idle or 0.0),
            "errors": result.errors,
            "published": cluster.published.version_url,
            "loadavg_1min": round(os.getloadavg()[0], 2),
            "probe": probe,
            "control": control,
            "oversized": oversized,
        }
    table["leftovers"] = cluster.leftovers()
    log(format_table(table))
    return table


def control_closed(control: dict[str, str]) -> bool:
    """Whether `Cluster.control_calls` found the control API refused without the key and open with it."""
    return (
        control.get("http without key", "").startswith("403")
        and "restricted" in control.get("grpc without key", "")
        and control.get("http with key") == "200"
        and control.get("grpc with key", "").startswith("OK")
    )


def format_table(t: dict) -> str:
    total = sum(t["share"].values()) or 1
    share = "  ".join(f"#{k} {v} ({100 * v / total:.0f}%)" for k, v in t["share"].items())
    load = t["queue_us_per_request_load"]
    idle = t["queue_us_per_request_idle"]
    fmt = lambda v: "no data" if v is None else f"{v:,.0f} us"  # noqa: E731
    rows = [
        ("requests sent", f"{t['sent']}"),
        ("answered correctly", f"{t['correct']} (min cosine to expected {t['min_cosine']:.5f})"),
        ("wrong answers", f"{t['wrong']}"),
        ("failed", f"{t['failed']}"),
        ("throughput", f"{t['images_per_s']:.1f} images/s over {t['seconds']:.1f} s"),
        ("per-replica share (nginx)", share),
        (
            "queue per request, under load",
            f"{fmt(load)}  -> HPA would choose {t['hpa_replicas_load']} replica(s) of {t['replicas']}",
        ),
        (
            "queue per request, idle",
            f"{fmt(idle)}  -> HPA would choose {t['hpa_replicas_idle']} replica(s) of {t['alive_after']} alive",
        ),
        *[(f"control API, {k}", v) for k, v in t.get("control", {}).items()],
        *([("body above the proxy's limit", t["oversized"])] if "oversized" in t else []),
        ("left behind", ", ".join(t["leftovers"]) or "nothing (process groups, /dev/shm, /tmp)"),
        ("machine load (1 min avg)", f"{t.get('loadavg_1min', '?')} on {os.cpu_count()} cores"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"  {k:<{width}}  {v}" for k, v in rows]
    bar = "-" * (width + 60)
    return "\n".join([bar, *lines, bar])


def throughput(
    repository: str | Path,
    model: str = "vitb32",
    replicas: int = 3,
    duration_s: float = 20.0,
    concurrency: int = 4,
    artifacts: str | Path = "artifacts",
    log=print,
) -> list[dict]:
    """Images/s through nginx with 1..`replicas` replicas behind it (upstreams reloaded, same processes)."""
    photos = _photos(Path(artifacts))
    rows = []
    with Cluster(repository, model, replicas, log) as cluster:
        expected, _ = expected_embeddings(cluster, photos)
        for n in range(1, replicas + 1):
            cluster.set_upstreams(cluster.replicas[:n])
            ca = cluster.tls.cert
            asyncio.run(
                _load(cluster.urls, model, photos, expected, 10**9, 3.0, concurrency, ca_file=ca)
            )  # warm-up
            _, mark = cluster.share()
            load_before = os.getloadavg()[0]
            r = asyncio.run(
                _load(cluster.urls, model, photos, expected, 10**9, duration_s, concurrency, ca_file=ca)
            )
            counts, _ = cluster.share(mark)
            rows.append(
                {
                    "replicas": n,
                    "images_per_s": r.per_s,
                    "sent": r.sent,
                    "correct": r.correct,
                    "failed": r.failed,
                    "wrong": r.wrong,
                    "seconds": r.seconds,
                    "share": {str(k): v for k, v in counts.items() if k < n},
                    # the machine's 1-minute load average before and after: other work shares the 2 cores
                    "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                }
            )
            log(f"  {n} replica(s): {r.per_s:.1f} images/s ({r.correct}/{r.sent} correct, {r.failed} failed)")
        left = cluster
    leftovers = left.leftovers()
    if leftovers:
        raise ServerError(f"the rehearsal left behind: {', '.join(leftovers)}")
    return rows


def write_throughput(rows: list[dict], out: str | Path, command: str) -> None:
    """perf/results-style Markdown + JSON of a `throughput` run."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    host = cpu_summary()
    data = {"command": command, "host_cpu": host, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    base = rows[0]["images_per_s"] or 1.0
    lines = [
        "| replicas behind nginx | images/s | vs 1 replica | correct / sent | failed | per-replica share "
        "| load average (1 min) before / after |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['replicas']} | {r['images_per_s']:.1f} | {r['images_per_s'] / base:.2f}x | "
            f"{r['correct']} / {r['sent']} | {r['failed']} | "
            + " ".join(f"#{k}:{v}" for k, v in r["share"].items())
            + f" | {r['loadavg_1min'][0]} / {r['loadavg_1min'][1]} |"
        )
    out.with_suffix(".md").write_text(f"Command: `{command}`\n\nHost: {host}\n\n" + "\n".join(lines) + "\n")


def run_cluster_demo(args) -> int:
    """`vitserve cluster-demo`: build the default model if needed (random-init weights when offline, said
    loudly), then the failover rehearsal (or `--throughput OUT`). Exit 1 when any request failed or was
    answered wrongly, or anything was left behind."""
    from vitserve.demo import weights_hub_reachable
    from vitserve.exporter.config import load_models
    from vitserve.exporter.pipeline import build_all

    model = load_models(args.config)[0].name
    if not (Path(args.repository) / model / "config.pbtxt").exists():
        random_init = not weights_hub_reachable()
        if random_init:
            print("OFFLINE: building the model with RANDOM-INIT weights (untrained; the rehearsal is real)")
        build_all(args.config, args.repository, args.artifacts, random_init=random_init, only=[model])
    command = "vitserve " + " ".join(sys.argv[1:]) if sys.argv[1:] else "vitserve cluster-demo"
    if args.throughput:
        rows = throughput(
            args.repository, model, args.replicas, args.duration_s, args.concurrency, args.artifacts
        )
        write_throughput(rows, args.throughput, command)
        print(f"wrote {args.throughput}.md and .json")
        return 0 if all(r["failed"] == 0 and r["wrong"] == 0 for r in rows) else 1
    table = rehearse(
        args.repository,
        model,
        args.replicas,
        args.requests,
        args.duration_s,
        args.concurrency,
        artifacts=args.artifacts,
    )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(
            json.dumps(table | {"command": command, "host_cpu": cpu_summary()}, indent=1)
        )
        out.with_suffix(".md").write_text(
            f"Command: `{command}`\n\nHost: {cpu_summary()}\n\n```\n{format_table(table)}\n```\n"
        )
        print(f"wrote {out.with_suffix('.md')} and .json")
    bad = table["failed"] or table["wrong"] or table["leftovers"] or not control_closed(table["control"])
    if bad:
        for e in table["errors"]:
            print(f"  error: {e}", file=sys.stderr)
    return 1 if bad else 0
