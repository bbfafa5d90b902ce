"""Keep a tritonserver serving: restart it when it dies, bring a model back when its python stub dies.

What Triton 2.51 does when a python-backend stub process dies (killed, OOM-killed, segfault), observed
with the pip tritonserver: the model stays READY in `/v2/models/NAME/ready`, `/v2/health/ready` stays 200
and the repository index says READY, while every request to it fails after about 1 s with HTTP 500 /
gRPC INTERNAL "Stub process 'NAME_0_0' is not healthy.". The stub is never restarted, and a `load` of the
unchanged model is a no-op; only an `unload` followed by a `load` (explicit model control) or a server
restart starts a new stub. While a model is unloaded the ensembles using it are too ("unknown model"), and
Triton loads them again with it. Every request that failed on the dead stub keeps the old model from
finishing its unload: the server then carries it as a live model, and its shutdown waits out
`--exit-timeout-secs` and exits 1 (a restart clears it). Readiness probes therefore cannot see the fault: something has to look at the
stub processes (this module), or an orchestrator that runs tritonserver by itself needs a probe that sends
one real inference (`vitserve classify --url localhost:8001 --model vitb32 probe.jpg` exits non-zero when
the request fails).

`Supervisor` polls every `poll_s`:
  - the tritonserver process has exited, or `/v2/health/live` failed `live_failures` times in a row:
    restart it on the same ports;
  - a READY python-backend model has fewer stub processes than its config's instance count: with
    `--model-control-mode=explicit`, unload and load that model (the others keep serving); otherwise
    restart the server (also when the reload fails). A restart brings back the models of the command line
    (`--load-model`), not those loaded later through the repository API.
It gives up (ServerError) after `max_restarts` heals within `window_s`, so a crash loop surfaces to
whatever runs `vitserve serve --supervise` instead of spinning forever.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from vitserve.errors import ServerError
from vitserve.server import TritonServer

log = logging.getLogger(__name__)

STUB_NAME = "triton_python_backend_stub"


@dataclass(frozen=True)
class Stub:
    """A python-backend stub process: its pid, the model it serves and its instance name."""

    pid: int
    model: str
    instance: str


def stub_processes(server_pid: int) -> list[Stub]:
    """The python-backend stubs of the tritonserver `server_pid`, read from /proc.

    A stub's command line is `triton_python_backend_stub REPO/MODEL/VERSION/model.py SHM_REGION SIZE SIZE
    SERVER_PID PYTHON_DIR IPC_SIZE INSTANCE_NAME DEFAULT`: stubs of other servers on the host are left
    out by the server pid among the arguments."""
    stubs = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        args = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        if len(args) < 9 or Path(args[0]).name != STUB_NAME or str(server_pid) not in args[1:]:
            continue
        stubs.append(Stub(int(entry.name), Path(args[1]).parent.parent.name, args[-2]))
    return stubs


@dataclass(frozen=True)
class Fault:
    """What is wrong: `server` (process gone or not live) or `stub` (models whose stubs died)."""

    kind: str
    detail: str
    models: tuple[str, ...] = ()


@dataclass
class Supervisor:
    """Watches `server` (already started) and heals it; see the module docstring."""

    server: TritonServer
    poll_s: float = 2.0
    live_failures: int = 3
    max_restarts: int = 5
    window_s: float = 600.0
    events: list[dict] = field(default_factory=list)  # every fault and what was done, for logs and tests
    _instances: dict[str, int] = field(default_factory=dict, repr=False)  # model -> stubs it should have
    _not_live: int = field(default=0, repr=False)
    _heals: deque = field(default_factory=deque, repr=False)

    def _expected_stubs(self) -> dict[str, int]:
        """READY python-backend models and their instance counts (configs read once per load)."""
        status, index = self.server.api("POST", "/v2/repository/index")
        if status != 200 or not isinstance(index, list):
            return {}
        ready = {m["name"] for m in index if m.get("state") == "READY"}
        self._instances = {k: v for k, v in self._instances.items() if k in ready}
        for name in ready - set(self._instances):
            status, cfg = self.server.api("GET", f"/v2/models/{name}/config")
            if status != 200 or not cfg:
                continue
            count = 0
            if cfg.get("backend") == "python":
                count = sum(int(g.get("count", 1)) for g in cfg.get("instance_group", []) or [{}])
            self._instances[name] = count
        return {k: v for k, v in self._instances.items() if v}

    def check(self) -> Fault | None:
        """The first fault found now, or None when the server and every stub are up."""
        proc = self.server.process
        if proc is None or proc.poll() is not None:
            code = None if proc is None else proc.returncode
            return Fault("server", f"tritonserver exited (code {code})")
        status, _ = self.server.api("GET", "/v2/health/live", timeout_s=min(5.0, self.poll_s * 2))
        if status != 200:
            self._not_live += 1
            if self._not_live >= self.live_failures:
                return Fault("server", f"/v2/health/live failed {self._not_live} times in a row")
            return None
        self._not_live = 0
        expected = self._expected_stubs()
        running: dict[str, int] = {}
        for stub in stub_processes(proc.pid):
            running[stub.model] = running.get(stub.model, 0) + 1
        # a model that lost its stub may also have left the index meanwhile; only READY ones are judged
        lost = sorted(m for m, n in expected.items() if running.get(m, 0) < n)
        if lost:
            detail = ", ".join(f"{m} ({running.get(m, 0)}/{expected[m]} stubs)" for m in lost)
            return Fault("stub", f"python stub process gone: {detail}", tuple(lost))
        return None

    def heal(self, fault: Fault) -> str:
        """Repair `fault`; returns what was done. Raises ServerError when it cannot be repaired, or after
        `max_restarts` heals within `window_s`."""
        now = time.monotonic()
        while self._heals and now - self._heals[0] > self.window_s:
            self._heals.popleft()
        if len(self._heals) >= self.max_restarts:
            raise ServerError(
                f"giving up: {len(self._heals)} repairs within {self.window_s:g} s and again {fault.detail}; "
                f"log {self.server.log_path}:\n{self.server.log_tail()}"
            )
        self._heals.append(now)
        self._not_live = 0
        if fault.kind == "stub" and self.server.explicit_model_control:
            try:
                for model in fault.models:
                    self._reload(model)
                return "reloaded " + ", ".join(fault.models)
            except ServerError as e:
                log.warning("supervisor: %s; restarting the server instead", e)
        self._instances.clear()
        self.server.stop()
        try:
            self.server.start()
        except ServerError as e:  # the next poll finds no process and tries again, within max_restarts
            return f"restart failed: {e}"
        return f"restarted tritonserver on HTTP {self.server.http_port} gRPC {self.server.grpc_port}"

    def _reload(self, model: str) -> None:
        # `load` of an unchanged loaded model keeps the dead stub: it has to be unloaded first. Ensembles
        # using the model are unavailable meanwhile ("unknown model") and come back with it.
        status, _ = self.server.api("POST", f"/v2/repository/models/{model}/unload", timeout_s=60)
        if status != 200:
            raise ServerError(f"could not unload model {model!r} (HTTP {status}); log {self.server.log_path}")
        timeout_s = self.server.startup_timeout_s
        status, _ = self.server.api("POST", f"/v2/repository/models/{model}/load", timeout_s=timeout_s)
        self._instances.pop(model, None)
        if status != 200:
            raise ServerError(
                f"could not load model {model!r} again (HTTP {status}); log {self.server.log_path}:\n"
                f"{self.server.log_tail()}"
            )

    def step(self) -> dict | None:
        """One poll: check, and heal what is found; returns the event recorded, if any."""
        fault = self.check()
        if fault is None:
            return None
        t0 = time.monotonic()
        log.warning("supervisor: %s", fault.detail)
        action = self.heal(fault)
        event = {
            "time": time.time(),
            "fault": fault.kind,
            "detail": fault.detail,
            "action": action,
            "heal_s": round(time.monotonic() - t0, 2),
        }
        log.warning("supervisor: %s in %.1f s", action, event["heal_s"])
        self.events.append(event)
        return event

    def run(self, stop: threading.Event) -> None:
        """Poll until `stop` is set; ServerError when the server cannot be kept up."""
        while not stop.wait(self.poll_s):
            self.step()

    @contextlib.contextmanager
    def watching(self):
        """Run the supervisor in a background thread for the `with` block (tests, embedding)."""
        stop = threading.Event()
        errors: list[BaseException] = []

        def target():
            try:
                self.run(stop)
            except BaseException as e:  # surfaced when the block ends
                errors.append(e)

        thread = threading.Thread(target=target, name="vitserve-supervisor", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
        if errors:
            raise errors[0]
