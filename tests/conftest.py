"""Real processes on loopback: a signaling server, workers and clients started as a user would.

Every child gets SLEAP_RTC_ICE_HOSTS=127.0.0.1 (no WebRTC traffic leaves loopback, no
STUN server is contacted) and a HOME of its own.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["SLEAP_RTC_ICE_HOSTS"] = "127.0.0.1"

import protocol as P  # noqa: E402

PY = sys.executable


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end with real sleap-nn or long stand-ins; "
                                       "`pytest -m 'not slow'` is the quick subset")
    config.addinivalue_line("markers", "netlab: in network namespaces behind NAT routers (tests/netlab.py); "
                                       "needs root: without it, `pytest -m 'not netlab'`")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def job_id_of(output: str) -> str:
    """The job id in a client's "job ID accepted by WORKER" line."""
    return re.search(r"job (\S+) accepted by", output).group(1)


def stand_in(directory: Path, name: str, body: str) -> Path:
    """An executable Python script to run in sleap-nn's place (worker --sleap-nn)."""
    path = directory / name
    path.write_text(f"#!{PY}\n{body}")
    path.chmod(0o755)
    return path


@functools.cache
def weights_checkpoint() -> bytes:
    """A checkpoint that torch loads with weights_only=True, as a stand-in's best.ckpt: a
    worker that did not train it checks it by loading it that way."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(2)}}, buffer)
    return buffer.getvalue()


def sha256(path: Path) -> str:
    """The SHA-256 hex digest of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ledger(working_dir: Path, job_id: str) -> dict:
    """A worker's ledger row for a job, read straight from its SQLite file ({} if none)."""
    with sqlite3.connect(working_dir / "jobs.sqlite") as db:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    record = dict(row) if row else {}
    for column in ("outputs", "steps", "slurm", "stderr_tail", "pruned", "spec"):
        if record.get(column):
            record[column] = json.loads(record[column])
    return record


def state_of(working_dir: Path, job_id: str) -> str:
    return ledger(working_dir, job_id).get("state", "")


class Proc:
    """A child process whose stdout+stderr go to a log file that tests can search."""

    def __init__(self, args: list[str], log: Path, env: dict, cwd: Path):
        self.log = log
        self._file = open(log, "wb")
        self.popen = subprocess.Popen(args, stdout=self._file, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                      stdin=subprocess.DEVNULL)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match:
        def found():
            match = re.search(pattern, self.output())
            if match is None and self.popen.poll() is not None:
                raise AssertionError(f"process exited ({self.popen.returncode}) before /{pattern}/:\n{self.output()}")
            return match

        return wait_until(found, timeout, f"/{pattern}/ in {self.log.name}")

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        self.popen.wait(timeout=15)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._file.close()


class Env:
    """One test's world: child environment, a signaling server and helpers to start peers."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        home = tmp / "home"
        home.mkdir(exist_ok=True)
        self.env = {**os.environ, "HOME": str(home), "PYTHONUNBUFFERED": "1", "SLEAP_RTC_ICE_HOSTS": "127.0.0.1"}
        for key in (P.ENV_SERVER, P.ENV_ROOM, P.ENV_TOKEN, P.ENV_HTTP):
            self.env.pop(key, None)
        self.procs: list[Proc] = []
        self.server: Proc | None = None
        self.ws_port = self.http_port = 0
        self.room_id = self.token = ""
        self.owner_id_token = ""  # the id_token of the room's creator: it may delete the room

    # -- signaling server ---------------------------------------------------------------

    def start_server(self, *extra: str, ports=None) -> Proc:
        for attempt in range(3):
            # A port free a moment ago can be taken by any outgoing connection since: pick again then.
            self.ws_port, self.http_port = ports or (free_port(), free_port())
            self.server = self.spawn("signaling", [str(ROOT / "signaling.py"), "--port", str(self.ws_port),
                                                   "--http-port", str(self.http_port), *extra])
            try:
                self.server.wait_for(r"signaling: websocket")
                return self.server
            except AssertionError:
                if ports or attempt == 2 or "Address already in use" not in self.server.output():
                    raise
        raise AssertionError("unreachable")

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def create_room(self) -> tuple[str, str]:
        room = P.create_room(self.http_url)
        self.room_id, self.token, self.owner_id_token = room["room_id"], room["token"], room["id_token"]
        return self.room_id, self.token

    def peer_env(self) -> dict:
        return {**self.env, P.ENV_SERVER: self.ws_url, P.ENV_HTTP: str(self.http_port),
                P.ENV_ROOM: self.room_id, P.ENV_TOKEN: self.token}

    # -- peers --------------------------------------------------------------------------

    def spawn(self, name: str, args: list[str], env: dict | None = None) -> Proc:
        log = self.tmp / f"{name}-{len(self.procs)}.log"
        proc = Proc([PY, *args], log, env or self.env, self.tmp)
        self.procs.append(proc)
        return proc

    def start_worker(self, *extra: str, working_dir: Path | None = None,
                     env: dict | None = None) -> tuple[Proc, str]:
        """A worker process (`env` adds to the peers' environment): (its process, its peer id)."""
        working_dir = working_dir or self.tmp / f"worker{len(self.procs)}"
        proc = self.spawn("worker", [str(ROOT / "worker.py"), "--working-dir", str(working_dir), *extra],
                          {**self.peer_env(), **(env or {})})
        peer_id = proc.wait_for(r"registered as (\S+)", timeout=60).group(1)
        return proc, peer_id

    def submit(self, config: Path, *extra: str) -> str:
        """`client.py train --config CONFIG --detach ...`, which must be accepted: the job id."""
        result = self.client("train", "--config", str(config), "--detach", *extra)
        assert result.returncode == 0, result.stdout + result.stderr
        return job_id_of(result.stdout)

    def client(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([PY, str(ROOT / "client.py"), *args], env=self.peer_env(), cwd=self.tmp,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def start_client(self, *args: str) -> Proc:
        return self.spawn("client", [str(ROOT / "client.py"), *args], self.peer_env())

    def signaling_client(self, peer_id: str, role: str = "client", metadata: dict | None = None,
                         **kwargs) -> P.SignalingClient:
        client = P.SignalingClient(self.ws_url, self.room_id, self.token, peer_id, role, metadata, **kwargs)
        client.connect()
        return client

    @contextlib.contextmanager
    def link_pair(self, receive_dir: Path):
        """Both ends of a real link in this process: (the offering link, the answering
        link), each taking files into `receive_dir`; both closed at the end."""
        offerer, answerer = self.signaling_client("offerer"), self.signaling_client("answerer")
        links = {}

        def answer():
            offer = answerer.next(lambda f: f.get("type") == P.OFFER, timeout=20)
            links["answer"] = P.accept_link(answerer, offer, receive_dir)

        thread = threading.Thread(target=answer, name="test-answering")
        thread.start()
        try:
            links["offer"] = P.open_link(offerer, "answerer", receive_dir)
            thread.join(timeout=20)
            yield links["offer"], links["answer"]
        finally:
            for link in links.values():
                link.close()
            offerer.close()
            answerer.close()

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def worker_errors(self) -> list[str]:
        """ERROR lines in every worker's log: a thread that died or a request that raised."""
        return [line for proc in self.procs if proc.log.name.startswith("worker")
                for line in proc.output().splitlines() if re.match(r"\S+ \S+ ERROR ", line)]


@pytest.fixture
def world(tmp_path):
    env = Env(tmp_path)
    yield env
    env.close()
    # Whatever a test checks, no worker may have logged an error it did not expect.
    assert env.worker_errors() == []


@pytest.fixture
def room(world):
    """A running signaling server with one room."""
    world.start_server()
    world.create_room()
    return world


# -- raw WebSocket frames for API tests ---------------------------------------------------


class RawPeer:
    """A bare websocket-client connection speaking JSON frames, for testing the server's API."""

    def __init__(self, url: str):
        import websocket

        self.ws = websocket.create_connection(url, timeout=5)

    def send(self, frame) -> None:
        self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    def recv(self, timeout: float = 5) -> dict:
        self.ws.settimeout(timeout)
        return json.loads(self.ws.recv())

    def recv_type(self, kind: str, timeout: float = 5) -> dict:
        """The next frame of type `kind`, skipping others (pings and the like)."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.recv(max(0.1, deadline - time.monotonic()))
            if frame.get("type") == kind:
                return frame

    def ask(self, frame, kind: str | None = None) -> dict:
        self.send(frame)
        return self.recv_type(kind) if kind else self.recv()

    def register(self, peer_id: str, room_id: str, token: str, role: str = "peer", metadata=None) -> dict:
        frame = {"type": "register", "peer_id": peer_id, "room_id": room_id, "token": token, "role": role}
        if metadata is not None:
            frame["metadata"] = metadata
        return self.ask(frame)

    def close(self) -> None:
        self.ws.close()


@pytest.fixture
def raw(room):
    """Factory for raw connections to the room's server; all closed at the end."""
    peers: list[RawPeer] = []

    def make() -> RawPeer:
        peer = RawPeer(room.ws_url)
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        peer.close()
