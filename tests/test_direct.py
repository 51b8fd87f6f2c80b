"""File bytes over a direct, encrypted TCP connection beside the link, and every way back
to the data channel: no route, a wrong token, a flipped byte, a cut connection, --no-direct.

The process tests run worker and client as users do. The others hold both ends of a real
link in this process, so that a relay can be put between them: the relay is a real TCP
relay, and the only thing patched is which address each side hands out as its hint.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

import protocol as P
from conftest import sha256, wait_until

MB = 1024 * 1024


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


# -- process tests ------------------------------------------------------------------------


@pytest.mark.slow
def test_a_50_mb_upload_and_download_take_the_direct_path(room):
    worker_dir = room.tmp / "w"
    room.start_worker(working_dir=worker_dir)
    original = random_file(room.tmp / "video.bin", 50 * MB)
    digest = sha256(original)

    up = room.client("upload", str(original))
    assert up.returncode == 0, up.stderr
    assert "over direct TCP 127.0.0.1:" in up.stderr and "MB/s" in up.stderr, up.stderr
    stored = worker_dir / "uploads" / digest / "video.bin"
    assert sha256(stored) == digest

    down = room.client("download", str(stored), "--download", str(room.tmp / "down"))
    assert down.returncode == 0, down.stderr
    assert "over direct TCP 127.0.0.1:" in down.stderr, down.stderr
    assert sha256(room.tmp / "down" / "video.bin") == digest
    assert sorted(p.name for p in (room.tmp / "down").iterdir()) == ["video.bin"]


def test_no_direct_on_either_side_keeps_the_bytes_on_the_data_channel(room):
    worker_dir = room.tmp / "w"
    room.start_worker(working_dir=worker_dir, env={P.ENV_NO_DIRECT: "1"})
    original = random_file(room.tmp / "a.bin", 2 * MB)
    digest = sha256(original)

    # The client offers; the worker says no, and why.
    up = room.client("upload", str(original))
    assert up.returncode == 0, up.stderr
    assert "over data channel (the receiver: direct transfers are turned off on this side)" in up.stderr
    # The client's own switch: it offers nothing at all.
    stored = worker_dir / "uploads" / digest / "a.bin"
    down = room.client("download", "--no-direct", str(stored), "--download", str(room.tmp / "down"))
    assert down.returncode == 0, down.stderr
    assert "over data channel:" in down.stderr, down.stderr
    assert sha256(room.tmp / "down" / "a.bin") == digest


# -- both ends in this process ------------------------------------------------------------


@pytest.fixture
def pair(room, tmp_path):
    """(sending link, receiving link, the receiver's directory) over a real aiortc link."""
    received = tmp_path / "received"
    received.mkdir()
    with room.link_pair(received) as (sender, receiver):
        yield sender, receiver, received


def next_file_event(link: P.Link):
    return link.expect(lambda i: isinstance(i, (P.FileReceived, P.TransferFailed)), 30, "file event")


class Relay:
    """A TCP relay on 127.0.0.1 in front of `target` that can flip one byte or cut the
    stream once that many bytes went through in one direction."""

    def __init__(self, target: tuple[str, int], flip_at: int | None = None, cut_at: int | None = None):
        self.target, self.flip_at, self.cut_at = target, flip_at, cut_at
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, name="test-relay-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                return
            self.connections += 1
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(src, dst), name="test-relay-pump", daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        seen = 0
        try:
            while data := src.recv(65536):
                if self.flip_at is not None and seen <= self.flip_at < seen + len(data):
                    i = self.flip_at - seen
                    data = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]
                if self.cut_at is not None and seen + len(data) > self.cut_at:
                    dst.sendall(data[:self.cut_at - seen])
                    break
                dst.sendall(data)
                seen += len(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.server.close()


def hand_out(monkeypatch, rewrite):
    """Every listener this process opens for a transfer hands out `rewrite(hints)` instead."""
    real = P._direct_listen

    def listen():
        listeners, hints = real()
        return listeners, rewrite(hints)

    monkeypatch.setattr(P, "_direct_listen", listen)


def test_a_hint_to_a_closed_port_falls_back_to_the_data_channel_within_2_s(pair, monkeypatch, tmp_path):
    sender, receiver, received = pair
    with socket.create_server(("127.0.0.1", 0)) as s:
        closed_port = s.getsockname()[1]
    hand_out(monkeypatch, lambda hints: [["127.0.0.1", closed_port]])
    # Nobody may reach the real listeners either: each side's hint is the closed port.
    source = random_file(tmp_path / "small.bin", 256 * 1024)
    started = time.monotonic()
    ack = sender.send_file(source)
    elapsed = time.monotonic() - started
    assert ack["ok"] and ack["via"] == "data channel (no direct connection)"
    assert elapsed < 2.0, elapsed
    item = next_file_event(receiver)
    assert isinstance(item, P.FileReceived) and item.via == "data channel"
    assert sha256(received / "small.bin") == sha256(source)


def test_a_wrong_token_is_refused_and_the_real_transfer_goes_direct(pair, monkeypatch, tmp_path):
    sender, receiver, received = pair
    answers = []

    def intrude(hints):
        for host, port in hints:
            intruder = socket.create_connection((host, port), timeout=5)
            intruder.sendall(P._DIRECT_MAGIC + os.urandom(P._PROOF_BYTES))

            def listen(sock=intruder):
                try:
                    answers.append(sock.recv(100))
                except OSError as exc:
                    answers.append(exc)
                sock.close()

            threading.Thread(target=listen, name="test-intruder", daemon=True).start()
        return hints

    hand_out(monkeypatch, intrude)
    source = random_file(tmp_path / "model.ckpt", 5 * MB)
    ack = sender.send_file(source)
    assert ack["ok"] and ack["via"] == "direct TCP 127.0.0.1", ack
    item = next_file_event(receiver)
    assert isinstance(item, P.FileReceived) and item.via == "direct TCP 127.0.0.1"
    assert sha256(received / "model.ckpt") == sha256(source)
    # Both listeners (the sender's and the receiver's) took the intruder and said nothing to
    # it: a close, or a reset when the close found its bytes unread.
    wait_until(lambda: len(answers) == 2, 5, "both listeners closing on the intruder")
    assert all(a == b"" or isinstance(a, ConnectionResetError) for a in answers), answers


def test_a_byte_flipped_in_flight_fails_the_transfer_and_keeps_nothing(pair, monkeypatch, tmp_path):
    sender, receiver, received = pair
    relays: list[Relay] = []

    def through_relays(hints):
        relays.extend(Relay((host, port), flip_at=1_000_000) for host, port in hints)
        return [["127.0.0.1", relay.port] for relay in relays[-len(hints):]]

    hand_out(monkeypatch, through_relays)
    source = random_file(tmp_path / "labels.slp", 8 * MB)
    with pytest.raises(P.TransferError, match="failed authentication"):
        sender.send_file(source)
    item = next_file_event(receiver)
    assert isinstance(item, P.TransferFailed) and "tampered with in transit" in item.error
    assert sum(relay.connections for relay in relays) >= 1
    assert list(received.iterdir()) == []  # no final file, no part
    # The link serves on: the next transfer is whole (over the relays, before any flip).
    small = random_file(tmp_path / "next.bin", 100_000)
    assert sender.send_file(small)["ok"]
    assert sha256(received / "next.bin") == sha256(small)
    for relay in relays:
        relay.close()


def test_a_direct_connection_cut_mid_transfer_goes_on_over_the_data_channel(pair, monkeypatch, tmp_path):
    sender, receiver, received = pair
    relays: list[Relay] = []

    def through_relays(hints):
        relays.extend(Relay((host, port), cut_at=3 * MB) for host, port in hints)
        return [["127.0.0.1", relay.port] for relay in relays[-len(hints):]]

    hand_out(monkeypatch, through_relays)
    source = random_file(tmp_path / "video.mp4", 8 * MB)
    ack = sender.send_file(source)
    assert ack["ok"]
    assert ack["via"].startswith("direct TCP 127.0.0.1, then data channel from byte "), ack["via"]
    resumed_at = int(ack["via"].split("from byte ")[1].split()[0])
    assert 0 < resumed_at <= 3 * MB
    item = next_file_event(receiver)
    assert isinstance(item, P.FileReceived) and item.via.startswith("direct TCP 127.0.0.1, then data channel")
    assert sha256(received / "video.mp4") == sha256(source)
    assert sorted(p.name for p in received.iterdir()) == ["video.mp4"]
    for relay in relays:
        relay.close()


def test_hints_from_a_peer_are_addresses_never_names():
    offered = {"10.0.0.5"}
    assert P._check_hints([["10.0.0.5", 4000]], offered) == [("10.0.0.5", 4000)]
    assert P._check_hints([["10.0.0.6", 4000], ["10.0.0.5", 22]], offered) == [("10.0.0.5", 22)]  # not an ICE candidate
    for bad in ("x", [["example.org", 80]], [["10.0.0.5", 0]], [["10.0.0.5", "80"]], [["10.0.0.5"]],
                [["10.0.0.5", 1]] * 9, [["::1", 80]]):
        with pytest.raises(P.TransferError):
            P._check_hints(bad, offered)


def test_a_peer_cannot_offer_this_machines_own_services_as_candidates(monkeypatch):
    monkeypatch.setenv(P.ENV_ICE_HOSTS, "127.0.0.1")  # this side offers loopback itself (tests do)
    assert P._check_hints([["127.0.0.1", 6379]], {"127.0.0.1"}) == [("127.0.0.1", 6379)]
    monkeypatch.delenv(P.ENV_ICE_HOSTS)  # as in the field: aioice never offers loopback
    for special in ("127.0.0.1", "169.254.1.1", "224.0.0.1", "0.0.0.0"):
        assert P._check_hints([[special, 6379]], {special}) == []


def test_the_addresses_a_peer_offered_to_ice_are_read_from_its_sdp():
    sdp = ("v=0\r\na=candidate:1 1 udp 2130706431 10.1.2.3 50000 typ host\r\n"
           "a=candidate:2 1 udp 1694498815 198.51.100.7 40000 typ srflx raddr 10.1.2.3 rport 50000\r\n"
           "a=candidate:broken\r\na=end-of-candidates\r\n")
    assert P.sdp_addresses(sdp) == {"10.1.2.3", "198.51.100.7"}
