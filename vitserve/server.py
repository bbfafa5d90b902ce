"""Launch the real Triton Inference Server on a CPU-only host.

The nvidia-pytriton wheel ships `tritonserver` (2.51) with the python backend only. This module turns that
wheel into a usable server: a backend directory holding the python backend and the stub built for the
running Python, the wheel's bundled libraries on LD_LIBRARY_PATH, free ports, a readiness wait on
`/v2/health/ready`, a kept log and a clean shutdown of the whole process group (stubs included).

    with TritonServer("model_repository") as server:
        print(server.http_url, server.grpc_url)

`restricted` puts tritonserver APIs behind the operator's key (vitserve/apikey.py: CONTROL_APIS,
API_KEY_HEADER, API_KEY_ENV); `vitserve serve` and the cluster rehearsal restrict the control APIs by default.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitserve.apikey import (  # noqa: F401 (re-exported)
    API_KEY_ENV,
    API_KEY_HEADER,
    CONTROL_APIS,
    GRPC_API_KEY_HEADER,
    check_apis,
    check_key,
    headers,
    restricted_args,
    server_key,
)
from vitserve.errors import ServerError

_PY_TAG = f"{sys.version_info.major}.{sys.version_info.minor}"
_ERROR_LINE = re.compile(r"^E\d{4} |unrecognized option|invalid (argument|value)|^error:", re.IGNORECASE)
# a CPU-only host logs these at every start (and at every ensemble load)
_KNOWN_NOISE = ("NVML", "DCGM", "CudaDriverHelper", "CUDA driver version is insufficient")


def _pytriton_root() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError(
            "tritonserver was not found: install the serve extra (`pip install 'vitserve[serve]'`, which "
            "brings nvidia-pytriton's server) or run the NGC Triton container (see README)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def tritonserver_binary() -> Path:
    """Path of the tritonserver binary shipped by the nvidia-pytriton wheel."""
    return _pytriton_root() / "tritonserver" / "bin" / "tritonserver"


def backend_directory(cache_dir: Path | None = None) -> Path:
    """A backend directory with the python backend and the stub for this Python, made once and reused."""
    root = _pytriton_root() / "tritonserver"
    stub = root / "python_backend_stubs" / _PY_TAG / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerError(f"nvidia-pytriton ships no python backend stub for Python {_PY_TAG} ({stub})")
    cache_dir = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vitserve"
    target = cache_dir / f"backends-py{_PY_TAG}"
    marker = target / "python" / ".complete"
    if marker.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="backends-", dir=cache_dir))
    shutil.copytree(root / "backends" / "python", tmp / "python")
    shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
    (tmp / "python" / ".complete").touch()
    with contextlib.suppress(OSError):  # another process may have won the race; its copy is as good
        tmp.rename(target)
    shutil.rmtree(tmp, ignore_errors=True)
    return target


def free_port() -> int:
    """A TCP port that was free a moment ago (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_port_free(port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As tritonserver itself binds: connections of a server that just died linger in TIME_WAIT for a
        # minute and must not stop a restart on the same ports; a port someone listens on is still refused.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError as e:
            raise ServerError(
                f"{what} port {port} is already in use ({e.strerror}); choose another port"
            ) from e


@dataclass
class TritonServer:
    """The real tritonserver on `repository`, as a context manager.

    Ports left at 0 are chosen free. `log_path` keeps the server log (default: a file next to nothing,
    in the temp dir, named in every error). `extra_args` go to tritonserver verbatim, e.g.
    `["--exit-timeout-secs=10"]`. `restricted` (e.g. CONTROL_APIS) are the APIs that need the key
    `api_key` (default: the operator's, see vitserve/apikey.py); `api()` and `control_headers` carry it.
    """

    repository: str | Path
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    log_path: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    verbose: int = 0
    startup_timeout_s: float = 180.0
    restricted: tuple[str, ...] = ()
    api_key: str | None = field(default=None, repr=False)
    key_source: str | None = field(default=None, init=False)  # "$VITSERVE_API_KEY", the key file, "given"
    process: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _started: bool = field(default=False, init=False, repr=False)

    @property
    def http_url(self) -> str:
        return f"localhost:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://localhost:{self.metrics_port}/metrics"

    def __post_init__(self) -> None:
        self.restricted = check_apis(tuple(self.restricted))
        if self.api_key:
            self.api_key, self.key_source = check_key(self.api_key), "given"
        elif self.restricted:
            self.api_key, self.key_source = server_key()

    def control_headers(self, grpc: bool) -> dict[str, str]:
        """The header with the key (for tritonclient's `headers=`), {} when nothing is restricted."""
        return headers(self.api_key, grpc) if self.restricted else {}

    def command(self) -> list[str]:
        """The exact tritonserver command line (written at the top of the log with the key hidden)."""
        return [
            str(tritonserver_binary()),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_directory()}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            f"--log-verbose={self.verbose}",
            *restricted_args(self.restricted, self.api_key or ""),
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        libs = _pytriton_root().parent / "nvidia_pytriton.libs"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH")) if p)
        # The python backend stub runs `python` models with whatever interpreter environment it inherits:
        # put this interpreter's bin first so models see the same packages as the caller.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.setdefault("PYTHONNOUSERSITE", "1")
        return env

    def start(self) -> TritonServer:
        """Start the server and wait until `/v2/health/ready`; on failure nothing is left running."""
        repo = str(self.repository)
        if "://" not in repo and not Path(repo).is_dir():
            raise ServerError(f"model repository {repo!r} does not exist; build it with `make engines`")
        for what in ("http", "grpc", "metrics"):
            port = getattr(self, f"{what}_port")
            if port:
                _check_port_free(port, what)
        taken: set[int] = {self.http_port, self.grpc_port, self.metrics_port} - {0}
        for what in ("http", "grpc", "metrics"):
            if not getattr(self, f"{what}_port"):
                port = free_port()
                while port in taken:
                    port = free_port()
                taken.add(port)
                setattr(self, f"{what}_port", port)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.log_path = Path(self.log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        # a restart appends: the log of the run that died is what explains why
        with open(self.log_path, "a" if self._started else "w") as log:
            shown = " ".join(cmd).replace(self.api_key, "<key>") if self.api_key else " ".join(cmd)
            log.write("# " + shown + "\n")
            log.flush()
            self.process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=self.environment(), start_new_session=True
            )
        self._started = True
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"http://127.0.0.1:{self.http_port}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                errors = "\n".join(self.log_errors())
                raise ServerError(
                    f"tritonserver exited with code {self.process.returncode} while starting; "
                    + (f"errors:\n{errors}\n" if errors else "")
                    + f"log {self.log_path}:\n{self.log_tail()}"
                )
            with (
                contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError),
                urllib.request.urlopen(url, timeout=2) as r,
            ):
                if r.status == 200:
                    return
            time.sleep(0.25)
        raise ServerError(
            f"tritonserver was not ready after {self.startup_timeout_s:.0f} s; log {self.log_path}:\n"
            f"{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not Path(self.log_path).exists():
            return ""
        return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])

    def log_errors(self, limit: int = 10) -> list[str]:
        """Error lines of the log: Triton's `E<date>` records and the option parser's complaints, which a
        refused flag prints above 200 lines of usage text that `log_tail` would show instead."""
        if self.log_path is None or not Path(self.log_path).exists():
            return []
        lines = Path(self.log_path).read_text(errors="replace").splitlines()
        found = [
            line for line in lines if _ERROR_LINE.search(line) and not any(n in line for n in _KNOWN_NOISE)
        ]
        return found[:limit]

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def explicit_model_control(self) -> bool:
        """Started with `--model-control-mode=explicit`: models can be unloaded and loaded while it runs."""
        args = self.extra_args
        return "--model-control-mode=explicit" in args or any(
            a == "--model-control-mode" and b == "explicit" for a, b in itertools.pairwise(args)
        )

    def api(self, method: str, path: str, timeout_s: float = 5.0) -> tuple[int, Any]:
        """(HTTP status, parsed JSON body or None) of one call to the server's HTTP API, e.g.
        `api("POST", "/v2/repository/index")`; status 0 when the server cannot be reached."""
        body = b"{}" if method == "POST" else None
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}",
            data=body,
            method=method,
            headers=self.control_headers(False),
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                data = r.read()
                return r.status, json.loads(data) if data else None
        except urllib.error.HTTPError as e:
            return e.code, None
        except (urllib.error.URLError, OSError, ValueError):
            return 0, None

    def _drain_ensembles(self, timeout_s: float) -> None:
        """Unload the ensembles and wait until they are gone (explicit model control only).

        On SIGTERM tritonserver 2.51 stops every model's scheduler at once: an ensemble request between two
        steps is then refused ("Server is stopping, scheduler for model has stopped accepting new inference
        requests") instead of finishing. An ensemble being unloaded finishes its requests in flight while
        its steps still accept them; new requests get "unknown model" meanwhile."""
        if not self.explicit_model_control:
            return
        status, index = self.api("POST", "/v2/repository/index")
        if status != 200 or not isinstance(index, list):
            return
        ensembles = []
        for name in sorted({m["name"] for m in index if m.get("state") == "READY"}):
            status, cfg = self.api("GET", f"/v2/models/{name}/config")
            if status == 200 and cfg and cfg.get("platform") == "ensemble":
                self.api("POST", f"/v2/repository/models/{name}/unload")
                ensembles.append(name)
        deadline = time.monotonic() + timeout_s
        while ensembles and time.monotonic() < deadline:
            status, index = self.api("POST", "/v2/repository/index")
            busy = {m["name"] for m in index or [] if m.get("state") in ("READY", "UNLOADING")}
            if status != 200 or not busy & set(ensembles):
                return
            time.sleep(0.05)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """Stop the server: drain the ensembles (explicit model control), SIGTERM (it finishes the requests
        in its models' schedulers), SIGKILL its process group after `timeout_s`."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self._drain_ensembles(timeout_s)
        proc, self.process = self.process, None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout_s)
        with contextlib.suppress(ProcessLookupError):  # stubs that outlived the server
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return proc.returncode

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def perf_analyzer_command() -> tuple[list[str], dict[str, str]]:
    """The real perf_analyzer (tritonclient 2.51 wheel) and the environment it needs to load."""
    exe = shutil.which(
        "perf_analyzer", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    )
    if exe is None:
        raise ServerError(
            "perf_analyzer was not found; install `tritonclient[all]==2.51.0` (the serve extra)"
        )
    env = dict(os.environ)
    spec = importlib.util.find_spec("nvidia")
    libdirs = []
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cand = Path(loc) / "cuda_runtime" / "lib"
            if (cand / "libcudart.so.12").exists():
                libdirs.append(str(cand))
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libdirs, env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    return [exe], env
