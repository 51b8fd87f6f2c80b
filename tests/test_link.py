"""Worker and client processes over a real aiortc link on loopback."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
from pathlib import Path

import protocol as P
from conftest import sha256, wait_until

MB = 1024 * 1024


def random_file(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_ping_opens_a_link_and_reports_round_trips(room):
    _, worker_id = room.start_worker()
    result = room.client("ping", "--worker-id", worker_id, "--count", "3", "--interval", "0")
    assert result.returncode == 0, result.stderr
    assert len(re.findall(rf"pong from {worker_id}: seq=\d rtt=[\d.]+ ms", result.stdout)) == 3
    assert "median rtt" in result.stdout


def test_files_cross_the_link_both_ways_and_are_checked(room):
    worker_dir = room.tmp / "w"
    room.start_worker(working_dir=worker_dir)
    original = room.tmp / "labels.bin"
    digest = random_file(original, 6 * MB + 12345)

    up = room.client("upload", str(original))
    assert up.returncode == 0, up.stderr
    stored = worker_dir / "uploads" / digest / "labels.bin"  # the store keeps content by its SHA-256
    assert sha256(stored) == digest
    assert "uploaded labels.bin to " in up.stdout and str(stored) in up.stdout
    assert "upload labels.bin: 100.0%" in up.stderr  # progress is shown

    # The same bytes again, under another name: nothing is sent, and the name is there too.
    (room.tmp / "copy.bin").write_bytes(original.read_bytes())
    again = room.client("upload", str(room.tmp / "copy.bin"))
    assert again.returncode == 0, again.stderr
    assert "copy.bin: already on the worker" in again.stderr and "sent 0 bytes" in again.stderr
    assert "upload copy.bin:" not in again.stderr
    assert sha256(stored.with_name("copy.bin")) == digest

    down_dir = room.tmp / "down"
    down = room.client("download", str(stored), "--download", str(down_dir))
    assert down.returncode == 0, down.stderr
    assert sha256(down_dir / "labels.bin") == digest
    assert digest in down.stdout
    assert leftovers(down_dir) == ["labels.bin"]

    # A second download never overwrites the first.
    again = room.client("download", str(stored), "--download", str(down_dir))
    assert again.returncode == 0 and leftovers(down_dir) == ["labels.1.bin", "labels.bin"]


def test_download_outside_the_mounts_is_refused(room):
    _, worker_id = room.start_worker()
    outside = room.tmp / "secret.txt"
    outside.write_text("not yours")
    result = room.client("download", str(outside), "--download", str(room.tmp / "down"))
    assert result.returncode == 1
    assert f"Access denied: {outside} is outside the worker's mounts" in result.stderr
    assert leftovers(room.tmp / "down") == []
    assert room.client("ping", "--count", "1").returncode == 0  # the worker serves on


def test_an_upload_killed_half_way_resumes_from_what_the_worker_kept(room):
    worker_dir = room.tmp / "w"
    worker, _ = room.start_worker(working_dir=worker_dir)
    big = room.tmp / "big.bin"
    size = 24 * MB
    digest = random_file(big, size)
    part = worker_dir / "uploads" / f".{digest}.part"
    # Over the data channel, slow enough to be cut at half (a direct path is in test_direct.py).
    uploader = room.start_client("upload", "--no-direct", str(big))
    wait_until(lambda: part.exists() and part.stat().st_size >= size // 2, 60, "half the upload to arrive")
    uploader.kill()
    assert not (worker_dir / "uploads" / digest).exists()  # nothing under a final name

    # At once, while the worker may still hold the dead link's half-written part.
    retry = room.client("upload", "--no-direct", str(big))
    assert retry.returncode == 0, retry.stderr
    held, sent = map(int, re.search(r"the worker holds (\d+) of \d+ bytes.*\n(?:.*\n)*?big.bin: sent (\d+) bytes",
                                     retry.stderr).groups())
    assert held >= size // 2 and held + sent == size and sent <= 0.6 * size, retry.stderr
    assert sha256(worker_dir / "uploads" / digest / "big.bin") == digest
    assert leftovers(worker_dir / "uploads") == [digest]  # the part became the content
    worker.wait_for(r"upload from client-\w+ failed: big.bin: link lost after \d+ of 25165824 bytes; kept for "
                    r"resuming", timeout=15)


def test_sender_killed_mid_download_gives_a_clear_error_and_no_file(room):
    worker_dir = room.tmp / "w"
    worker, _ = room.start_worker(working_dir=worker_dir)
    big = worker_dir / "big.bin"
    random_file(big, 24 * MB)
    down_dir = room.tmp / "down"
    downloader = room.start_client("download", "--no-direct", str(big), "--download", str(down_dir))
    downloader.wait_for(r"download big.bin:\s+[1-9]\d\.\d%", timeout=60)
    worker.kill()
    assert downloader.popen.wait(timeout=20) == 1
    assert re.search(r"error: download failed: big.bin: link lost after \d+ of 25165824 bytes "
                     r"\((peer worker-\S+ stopped answering|the data channel closed|WebRTC connection)",
                     downloader.output()), downloader.output()
    assert leftovers(down_dir) == []


def test_worker_and_client_reconnect_after_the_server_restarts(world):
    state = world.tmp / "rooms.json"
    world.start_server("--state-file", str(state))
    world.create_room()
    _, worker_id = world.start_worker()
    client = world.signaling_client("steady-client")
    try:
        world.server.kill()
        world.start_server("--state-file", str(state), ports=(world.ws_port, world.http_port))
        assert client.next(lambda f: f["type"] == "_reconnected", timeout=30) is not None
        assert client.reconnects == 1
        workers = wait_until(lambda: client.discover(role="worker"), 30, "the worker to register again")
        assert [w["peer_id"] for w in workers] == [worker_id]
        assert workers[0]["metadata"]["properties"]["status"] == "available"  # same metadata as before
    finally:
        client.close()
    result = world.client("ping", "--worker-id", worker_id, "--count", "1")
    assert result.returncode == 0, result.stderr


def test_ctrl_c_deregisters_the_worker(room):
    watcher = room.signaling_client("watcher")
    try:
        worker, worker_id = room.start_worker()
        worker.popen.send_signal(signal.SIGINT)
        assert worker.popen.wait(timeout=15) == 0
        assert "worker: stopped" in worker.output()
        wait_until(lambda: watcher.discover(role="worker") == [], 5, "the worker to leave the room")
    finally:
        watcher.close()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_embedded_default_starts_a_server_and_a_room(world):
    assert _port_free(P.DEFAULT_WS_PORT) and _port_free(P.DEFAULT_HTTP_PORT), \
        "the embedded-default test needs ports 8080 and 8001 free on this machine"
    working_dir = world.tmp / "embedded"
    worker = world.spawn("worker", [str(Path(__file__).parent.parent / "worker.py"), "--working-dir",
                                    str(working_dir)])
    worker.wait_for(r"registered as (\S+)", timeout=60)
    created = worker.wait_for(r"created room (\w+)\n  token: (\S+)")
    env_file = (working_dir / "room.env").read_text()
    assert f"SLEAP_RTC_ROOM={created.group(1)}" in env_file and f"SLEAP_RTC_TOKEN={created.group(2)}" in env_file
    world.ws_port, world.http_port = P.DEFAULT_WS_PORT, P.DEFAULT_HTTP_PORT
    world.room_id, world.token = created.group(1), created.group(2)
    result = world.client("ping", "--count", "1")
    assert result.returncode == 0, result.stderr


def test_aiortc_handlers_are_registered_on_the_loop_thread(room, tmp_path, monkeypatch):
    """Every `on(...)` of a peer connection or data channel happens on "aiortc-loop"."""
    import threading

    from pyee.asyncio import AsyncIOEventEmitter

    threads = []
    real_on = AsyncIOEventEmitter.on

    def recording_on(self, event, *args):
        threads.append((type(self).__name__, event, threading.current_thread().name))
        return real_on(self, event, *args)

    monkeypatch.setattr(AsyncIOEventEmitter, "on", recording_on)
    with room.link_pair(tmp_path) as (offer, answer):
        offer.send(P.LINK_PING, {"seq": 1})
        assert answer.expect(lambda m: m.name == P.LINK_PING, 10, "ping").payload == {"seq": 1}
    ours = [t for t in threads if t[0] in ("RTCPeerConnection", "RTCDataChannel")]
    assert {"connectionstatechange", "message"} <= {event for _, event, _ in ours}
    assert all(thread == "aiortc-loop" for _, _, thread in ours), ours
