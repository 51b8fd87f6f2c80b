"""Start a signaling server and workers as child processes for the benchmarks (loopback only)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# bench/queue.py would shadow the standard library's queue (which protocol.py imports) for
# every script run from this folder: take the folder off the path once this module is in.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("SLEAP_RTC_ICE_HOSTS", "127.0.0.1")

import protocol as P  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BenchWorld:
    """A server on free ports with one room; workers started on demand; all stopped on exit."""

    def __init__(self, *server_args: str):
        self.tmp = Path(tempfile.mkdtemp(prefix="sleap-rtc-bench-"))
        self.ws_port, self.http_port = free_port(), free_port()
        self.procs: list[subprocess.Popen] = []
        self._spawn([str(ROOT / "signaling.py"), "--port", str(self.ws_port), "--http-port", str(self.http_port),
                     *server_args], "signaling.log", r"signaling: websocket", os.environ)
        room = P.create_room(self.http_url)
        self.room_id, self.token = room["room_id"], room["token"]

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def env(self) -> dict:
        return {**os.environ, P.ENV_SERVER: self.ws_url, P.ENV_HTTP: str(self.http_port),
                P.ENV_ROOM: self.room_id, P.ENV_TOKEN: self.token}

    def script(self, name: str, body: str) -> Path:
        """An executable Python script in tmp, e.g. a stand-in for sleap-nn (worker --sleap-nn)."""
        path = self.tmp / name
        path.write_text(f"#!{sys.executable}\n{body}")
        path.chmod(0o755)
        return path

    def start_worker(self, *extra: str) -> str:
        n = len(self.procs)
        log = self._spawn([str(ROOT / "worker.py"), "--working-dir", str(self.tmp / f"worker{n}"), *extra],
                          f"worker{n}.log", r"registered as (\S+)", self.env())
        return log.group(1)

    def _spawn(self, args: list[str], log_name: str, ready: str, env: dict, timeout: float = 120) -> re.Match:
        log = self.tmp / log_name
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT,
                                    env={**env, "PYTHONUNBUFFERED": "1"}, stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(ready, log.read_text(errors="replace"))
            if match:
                return match
            if proc.poll() is not None:
                raise RuntimeError(f"{args[0]} exited:\n{log.read_text()}")
            time.sleep(0.05)
        raise RuntimeError(f"{args[0]} did not get ready in {timeout} s")

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
