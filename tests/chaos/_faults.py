"""chaos-b's fault makers: a hostile HTTP server and a lazily generated tar stream.

* :class:`HostileServer` answers fixed routes on 127.0.0.1 (status, headers, body), so a
  test can serve an HTML page as ``image/jpeg``, a redirect loop or a redirect to a private
  address from a real socket.
* :func:`run_cli` runs the CLI (tests/chaos/_chaos.py's ``run``), once more when Ray's node
  timed out during its start-up (Ray waits a fixed 30 s for its raylet, which a loaded 2-core
  machine can miss): a failure of the machine, not of the run under test.
* :func:`ray_head` starts one local Ray head for a module's runs (``RAY_ADDRESS``): each CLI
  run then connects in about a second instead of starting a node of its own.
* :class:`LazyTar` is a readable stream of a tar archive whose members may *declare* hundreds
  of MiB of zeros that exist nowhere: a reader that reads such a member whole allocates it, a
  reader that streams past it does not.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.chaos._chaos import env, run
from tests.conftest import free_port

RAY_START_TIMEOUT = "The current node timed out during startup"


def run_cli(args: list[str], log: Path, timeout: float = 400) -> tuple[int, str, float]:
    """``_chaos.run``, retried once when Ray's start-up timed out (nothing was done then)."""
    rc, text, wall = run(args, log, timeout)
    if rc != 0 and RAY_START_TIMEOUT in text:
        rc, text, wall2 = run(args, log, timeout)
        wall += wall2
    return rc, text, wall


def _start_head(log: Path, num_cpus: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    temp = tempfile.mkdtemp(prefix="fvray-chaosb-", dir="/tmp")
    f = open(log, "ab")  # noqa: SIM115 - the child holds it
    cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block"]
    cmd += [f"--port={port}", f"--num-cpus={num_cpus}", "--include-dashboard=false", f"--temp-dir={temp}"]
    cmd += ["--object-store-memory=200000000"]
    proc = subprocess.Popen(cmd, env=env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    f.close()
    return proc, f"127.0.0.1:{port}"


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def ray_head(log: Path, num_cpus: int = 2, tries: int = 3):
    """A local Ray head in its own process group (``ray start --head --block``), its address
    in ``RAY_ADDRESS`` while it lives; SIGKILL to that group (never ``ray stop``: that would stop
    every Ray on the machine) at the end. A start that times out (Ray waits a fixed 30 s for its
    raylet) is tried again, up to ``tries`` times."""
    old = os.environ.get("RAY_ADDRESS")
    if old:  # a cluster given from outside (CI, or a head another module started): use it
        yield old
        return
    proc = None
    try:
        for attempt in range(tries):
            seen = len(log.read_text(errors="replace")) if log.exists() else 0
            proc, address = _start_head(log, num_cpus)
            deadline = time.time() + 180
            while proc.poll() is None and time.time() < deadline:
                if "Ray runtime started" in log.read_text(errors="replace")[seen:]:
                    break
                time.sleep(0.2)
            else:
                _kill_group(proc)
                if attempt == tries - 1:
                    raise RuntimeError(f"ray head did not start:\n{log.read_text(errors='replace')[-3000:]}")
                continue
            break
        os.environ["RAY_ADDRESS"] = address
        yield address
    finally:
        if old is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = old
        if proc is not None:
            _kill_group(proc)


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


class HostileServer:
    """A threaded HTTP server on 127.0.0.1 serving ``routes`` (path without the leading slash)."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self.hits: Counter = Counter()
        state = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.lstrip("/")
                state.hits[path] += 1
                route = state.routes.get(path, Route(404, b"not found"))
                self.send_response(route.status)
                headers = {"Content-Type": "application/octet-stream", **route.headers}
                headers["Content-Length"] = str(len(route.body))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(route.body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def __enter__(self) -> HostileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class LazyTar(io.RawIOBase):
    """A tar stream of ``members`` — ``(name, bytes)`` or ``(name, n)`` for n zero bytes that are
    generated as they are read, never held — in ustar format, read sequentially only."""

    def __init__(self, members: list[tuple[str, bytes | int]]) -> None:
        self._parts: Iterator[bytes | int] = self._layout(members)
        self._zeros = 0  # zero bytes still due from the current part
        self._buf = b""
        self.bytes_read = 0

    @staticmethod
    def _layout(members: list[tuple[str, bytes | int]]) -> Iterator[bytes | int]:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = data if isinstance(data, int) else len(data)
            yield info.tobuf(format=tarfile.USTAR_FORMAT)
            yield data
            pad = -info.size % tarfile.BLOCKSIZE
            if pad:
                yield pad
        yield 2 * tarfile.BLOCKSIZE  # end of archive (zero blocks)

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        want = len(b)
        while not self._buf and not self._zeros:
            nxt = next(self._parts, None)
            if nxt is None:
                return 0
            if isinstance(nxt, int):
                self._zeros = nxt
            else:
                self._buf = nxt
        if self._buf:
            n = min(want, len(self._buf))
            b[:n] = self._buf[:n]
            self._buf = self._buf[n:]
        else:
            n = min(want, self._zeros)
            b[:n] = bytes(n)
            self._zeros -= n
        self.bytes_read += n
        return n


# ---------------------------------------------------------------- a captioner in its own process


def serve_captioner(port: int, service_s: float) -> None:
    """The recaption tests' fault server, healthy, in this process until it is killed."""
    import time

    from tests.recaption.recap_fault_server import FaultServer

    FaultServer(port=port, service_s=service_s).start()
    print("ready", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["captioner"]:
        serve_captioner(int(sys.argv[2]), float(sys.argv[3]))
