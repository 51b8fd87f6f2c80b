"""Behind real NATs: a namespace internet (tests/netlab.py) with the signaling server and a
real coturn in it, a worker and a laptop each behind its own router.

These tests need root, iproute2, iptables, conntrack and coturn (`.ci/run` installs them).
They are marked `netlab`; without root, deselect them: `pytest -m "not netlab"`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

import netlab
from conftest import PY, ROOT, Env, Proc, job_id_of, stand_in, wait_until
from tiny_data import make_project

pytestmark = [pytest.mark.netlab, pytest.mark.slow]

WS_PORT, HTTP_PORT = 8080, 8001
# Which host of the lab runs each kind of process Env starts.
HOST_OF = {"signaling": "internet", "worker": "worker", "client": "laptop"}


def _check_can_build() -> None:
    """Fail, never skip: a lab that cannot be built is a broken CI machine, not a pass."""
    if os.geteuid() != 0:
        pytest.fail("the namespace tests need root (run as root, or deselect them: -m 'not netlab')")
    if netlab.missing_tools():
        pytest.fail(f"missing {', '.join(netlab.missing_tools())}: apt-get install iproute2 iptables conntrack coturn")


class LabEnv(Env):
    """Env whose processes run in the lab's namespaces: signaling in the internet, workers
    on the worker's LAN, clients on the laptop's. No SLEAP_RTC_ICE_HOSTS: each host offers
    what a real one would."""

    def __init__(self, tmp: Path, lab: netlab.Lab):
        super().__init__(tmp)
        self.lab = lab
        self.env.pop("SLEAP_RTC_ICE_HOSTS", None)

    def spawn(self, name: str, args: list[str], env: dict | None = None) -> Proc:
        log = self.tmp / f"{name}-{len(self.procs)}.log"
        proc = Proc(self.lab.wrap(HOST_OF[name], [PY, *args]), log, env or self.env, self.tmp)
        self.procs.append(proc)
        return proc

    def start_server(self, *extra: str, ports=None) -> Proc:
        """The server in the internet, on its fixed ports there (nothing else listens in it)."""
        return super().start_server("--host", netlab.SERVER_IP, *extra, ports=(WS_PORT, HTTP_PORT))

    @property
    def ws_url(self) -> str:
        return f"ws://{netlab.SERVER_IP}:{self.ws_port}"

    @property
    def http_url(self) -> str:
        return f"http://{netlab.SERVER_IP}:{self.http_port}"

    def peer_env(self) -> dict:
        env = super().peer_env()
        env.pop("SLEAP_RTC_ICE_HOSTS", None)
        return env

    def create_room(self) -> tuple[str, str]:
        result = self.client("rooms", "create", "--server", self.ws_url, "--http", self.http_url)
        assert result.returncode == 0, result.stdout + result.stderr
        self.room_id = re.search(r"room:\s*(\S+)", result.stdout).group(1)
        self.token = re.search(r"token:\s*(\S+)", result.stdout).group(1)
        return self.room_id, self.token

    def client(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.lab.wrap("laptop", [PY, str(ROOT / "client.py"), *args]), env=self.peer_env(),
                              cwd=self.tmp, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("project"), frames=12, epochs=2, steps=2)


@contextlib.contextmanager
def lab_world(tmp_path: Path, topology: str, turn: str = "static", server_options=netlab.Lab.ice_server_options):
    """A lab of `topology` with signaling (handing out `server_options(lab)`) and a room:
    the LabEnv; its processes and the lab are gone at the end."""
    _check_can_build()
    with netlab.Lab(topology, tmp_path / "lab", turn=turn) as lab:
        world = LabEnv(tmp_path, lab)
        try:
            world.start_server(*server_options(lab))
            world.create_room()
            yield world
        finally:
            world.close()


@pytest.fixture
def nat(request, tmp_path):
    with lab_world(tmp_path, request.param) as world:
        yield world
    assert world.worker_errors() == []


@pytest.mark.parametrize("nat", list(netlab.TOPOLOGIES), indirect=True)
def test_ping_upload_and_training_connect_in_every_topology(nat, project, tmp_path):
    worker, worker_id = nat.start_worker("--mount", f"{project['config'].parent}:data")
    began = time.monotonic()
    result = nat.client("ping", "--count", "2", "--interval", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 pings over WebRTC" in result.stdout
    connect_s = time.monotonic() - began

    payload = tmp_path / "payload.bin"
    payload.write_bytes(os.urandom(3 * 2**20))
    result = nat.client("upload", str(payload))
    assert result.returncode == 0, result.stdout + result.stderr
    stored = Path(re.search(r"uploaded payload.bin to \S+: (\S+)", result.stdout).group(1))
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == hashlib.sha256(payload.read_bytes()).hexdigest()

    result = nat.client("train", "--config", str(project["config"]), "--max-epochs", "2", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "epoch 2/2  loss" in result.stderr
    job_id = job_id_of(result.stdout)
    assert job_id and connect_s < 30


@pytest.mark.parametrize("secret", ["shared", "wrong"])
def test_turn_credentials_minted_by_the_signaling_server_work_with_coturn(tmp_path, secret):
    """Symmetric NATs on both sides: only the relay works, with per-peer credentials that
    signaling.py --turn-secret minted and coturn --static-auth-secret checks. With a
    secret coturn does not share, no relay, and the error says to check it."""
    def options(lab: netlab.Lab) -> list[str]:
        given = lab.ice_server_options()
        if secret == "wrong":
            given[given.index("--turn-secret") + 1] = "not-" + lab.turn_secret
        return given

    with lab_world(tmp_path, "symmetric", turn="secret", server_options=options) as world:
        world.start_worker()
        result = world.client("ping", "--count", "2", "--interval", "0")
    if secret == "shared":
        assert result.returncode == 0, result.stdout + result.stderr
    else:
        assert result.returncode != 0
        assert "neither side got a relay" in result.stderr and "--static-auth-secret" in result.stderr


@pytest.mark.parametrize("topology, servers, words", [
    ("symmetric", "stun", "NATs that change ports for every destination (symmetric)"),
    ("udp-blocked", "stun+turn/udp", "this machine got no relay from the TURN server"),
])
def test_without_a_path_the_client_says_why_within_30_s(tmp_path, topology, servers, words):
    lab_options = {"stun": lambda lab: ["--ice-server", lab.stun_url],
                   "stun+turn/udp": lambda lab: ["--ice-server", lab.stun_url, "--ice-server",
                                                 f"turn:{lab.turn_user}:{lab.turn_password}@{netlab.SERVER_IP}:3478"]}
    with lab_world(tmp_path, topology, server_options=lab_options[servers]) as world:
        world.start_worker()
        began = time.monotonic()
        result = world.client("ping", "--count", "1")
        took = time.monotonic() - began
    assert result.returncode != 0
    assert words in result.stderr, result.stderr
    assert re.search(r"this machine offered host(, srflx)?; worker-\S+ offered host, srflx", result.stderr)
    assert took < 30, f"the client took {took:.1f} s to give up"


COUNTER = """import sys, time
for i in range(1, int(sys.argv[1]) + 1):
    print(f"line {i}", flush=True)
    time.sleep(0.1)
"""


def test_a_follow_and_an_upload_survive_a_new_network(tmp_path):
    """The laptop's site gets a new public address mid-way (conntrack flushed, as after a
    new Wi-Fi): `logs --follow` reconnects on its own and goes on from the byte it had,
    every line once, to the job's end; an upload resumes from the bytes the worker kept."""
    with lab_world(tmp_path, "home") as world:
        counter = stand_in(tmp_path, "counter", COUNTER)
        worker, _ = world.start_worker("--allow-command", f"count={counter}",
                                       working_dir=tmp_path / "w")
        result = world.client("run", "--detach", "--non-interactive", "count", "--", "250")
        assert result.returncode == 0, result.stdout + result.stderr
        job_id = job_id_of(result.stdout)
        follow = world.start_client("logs", job_id, "--follow")
        follow.wait_for(r"line 30\n", timeout=60)
        world.lab.new_address("laptop")
        assert follow.popen.wait(timeout=180) == 0, follow.output()
        out = follow.output()
        assert "lost the link" in out and "connected to" in out and "again" in out
        assert re.findall(r"^line (\d+)$", out, re.M) == [str(i) for i in range(1, 251)], out
        assert re.search(rf"job {job_id} completed", out)
        assert world.worker_errors() == []

        payload = tmp_path / "big.bin"
        payload.write_bytes(os.urandom(40 * 2**20))
        upload = world.start_client("upload", str(payload))
        part = tmp_path / "w" / "uploads" / f".{hashlib.sha256(payload.read_bytes()).hexdigest()}.part"
        wait_until(lambda: part.exists() and part.stat().st_size > 4 * 2**20, 120, "4 MB of the upload")
        world.lab.new_address("laptop")
        assert upload.popen.wait(timeout=300) == 0, upload.output()
        out = upload.output()
        assert "lost the link" in out and re.search(r"the worker holds \d+ of \d+ bytes from an earlier try", out), out
        stored = Path(re.search(r"uploaded big.bin to \S+: (\S+)", out).group(1))
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == hashlib.sha256(payload.read_bytes()).hexdigest()


@pytest.mark.parametrize("topology, expected", [
    ("home", [r"NAT kind\s+ok\s+keeps its port", r"TURN over UDP\s+ok", r"TURN over TCP\s+ok",
              r"worker\s+ok\s+.*over (host|srflx) <-> (host|srflx)"]),
    ("symmetric", [r"NAT kind\s+warn\s+a new port for every destination", r"TURN over UDP\s+ok",
                   r"worker\s+ok\s+.*over relay <-> "]),
    ("udp-blocked", [r"STUN\s+FAIL\s+no answer .* over UDP", r"TURN over UDP\s+FAIL", r"TURN over TCP\s+ok",
                     r"worker\s+ok\s+.*over relay <-> "]),
])
def test_doctor_tells_what_the_network_allows(tmp_path, topology, expected):
    with lab_world(tmp_path, topology) as world:
        world.start_worker()
        result = world.client("doctor")
        assert result.returncode == 0, result.stdout + result.stderr
        checks = [line[:18].strip() for line in result.stdout.splitlines()[1:]]
        in_order = ["signaling server", "STUN", "NAT kind", "TURN over UDP", "TURN over TCP", "worker"]
        if topology == "udp-blocked":  # no STUN answer: no NAT kind to tell
            in_order.remove("NAT kind")
        assert checks == in_order, result.stdout
        assert re.search(r"signaling server\s+ok\s+ws://", result.stdout)
        for pattern in expected:
            assert re.search(pattern, result.stdout), f"/{pattern}/ not in:\n{result.stdout}"
