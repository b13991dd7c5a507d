"""Run `quanta serve` in a child process for tests and benchmarks (loopback, a free port, wait until healthy)."""

from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

_LISTENING = re.compile(r"listening on (http://\S+)")

# The server gets SIGTERM (a graceful shutdown) when the process that started it dies, e.g. a test run killed
# by a timeout: no server outlives its tests.
_DIE_WITH_PARENT = """
import os, signal, sys
if sys.platform.startswith("linux"):
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    if os.getppid() != {ppid}:
        sys.exit(1)
"""


class ServerProcess:
    """`quanta serve MODEL ARGS... --port 0` in a child process; `.url` once it answers /health.

    `prelude`: Python code run in the child before the CLI (e.g. to patch the engine for a fault test).
    """

    def __init__(self, model: str, *args: str, prelude: str | None = None, env: dict | None = None,
                 startup_timeout: float = 180.0):
        self.model = str(model)
        self.args = [str(a) for a in args]
        self.prelude = prelude
        self.env = env
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.lines: list[str] = []
        self._reader: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def command(self) -> list[str]:
        argv = ["serve", self.model, *self.args]
        if "--port" not in self.args:
            argv += ["--port", "0"]
        code = _DIE_WITH_PARENT.format(ppid=os.getpid()) + (self.prelude or "") + \
            f"\nimport sys\nfrom quanta.cli import main\nsys.exit(main({argv!r}))\n"
        return [sys.executable, "-c", code]

    def start(self) -> ServerProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.update(self.env or {})
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._reader.join(5)
                raise RuntimeError(f"quanta serve exited with {self.proc.returncode}:\n{self.output}")
            m = _LISTENING.search(self.output)
            if m and self._healthy(m.group(1)):
                self.url = m.group(1)
                return self
            time.sleep(0.1)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"quanta serve did not become healthy in {self.startup_timeout} s:\n{self.output}")

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @staticmethod
    def _healthy(url: str) -> bool:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def send_signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        rc = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        return rc

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._reader is not None:
            self._reader.join(5)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_SHARED: dict[tuple, ServerProcess] = {}


# Tests run servers of tiny models next to their client on small CPU boxes: one torch thread each avoids
# OpenMP workers spinning against the client and the event loop (many times slower when cores are busy).
TEST_ENV = {"OMP_NUM_THREADS": "1"}


def shared_server(model: str, *args: str, env: dict | None = None) -> ServerProcess:
    """One server per (model, args) for the whole process (test modules share it); stopped at exit."""
    key = (str(model), *args)
    srv = _SHARED.get(key)
    if srv is None or srv.proc is None or srv.proc.poll() is not None:
        srv = _SHARED[key] = ServerProcess(model, *args, env=TEST_ENV if env is None else env).start()
    return srv


@atexit.register
def _stop_shared() -> None:
    for srv in _SHARED.values():
        srv.stop(timeout=10)
