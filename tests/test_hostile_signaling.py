"""A room member against the signaling server and its HTTP API: nothing it sends may
break the room for others, hold a thread, or make the server echo or keep too much."""

from __future__ import annotations

import json
import random
import socket
import string
import time
from pathlib import Path

import protocol as P
from conftest import RawPeer, wait_until


def deep(levels: int) -> dict:
    node: dict = {}
    for _ in range(levels):
        node = {"n": node}
    return node


def test_deep_metadata_is_refused_and_the_room_keeps_working(room, raw):
    attacker = raw()
    # Built as text: json.dumps itself gives up at this depth.
    attacker.send('{"type": "register", "peer_id": "attacker", "room_id": "%s", "token": "%s", '
                  '"metadata": {"tags": [], "properties": %s{}%s}}' % (room.room_id, room.token, '{"n": ' * 986,
                                                                         "}" * 986))
    reply = attacker.recv()
    # Refused whether json gives up at this depth (INVALID_JSON) or the depth check does.
    assert reply["type"] == P.ERROR and reply["code"] in (P.INVALID_JSON, P.INVALID_MESSAGE)
    assert "deeper" in reply["message"]
    assert attacker.ask({"type": "ping"})["type"] == "pong"  # the connection stays up
    for name in ("alice", "bob"):  # later members register and see each other
        assert raw().register(name, room.room_id, room.token)["type"] == P.REGISTERED_AUTH
    carol = raw()
    carol.register("carol", room.room_id, room.token)
    found = carol.ask({"type": "discover_peers", "from_peer_id": "carol", "filters": {}}, "peer_list")
    assert {p["peer_id"] for p in found["peers"]} == {"alice", "bob"}


def test_deep_json_and_non_ascii_tokens_get_errors_not_closed_connections(room, raw):
    peer = raw()
    peer.send("[" * 6000 + "]" * 6000)
    assert peer.recv()["code"] == P.INVALID_JSON
    peer.send(json.dumps({"type": "register", "peer_id": "p", "room_id": room.room_id, "token": "tøkén✓"}))
    assert peer.recv()["code"] == P.INVALID_TOKEN
    peer.send(json.dumps({"type": "register", "peer_id": "p", "room_id": room.room_id, "token": room.token,
                          "id_token": "ïd.tøkén"}))
    assert peer.recv()["code"] == P.INVALID_TOKEN
    assert peer.register("p", room.room_id, room.token)["type"] == P.REGISTERED_AUTH


def test_the_frame_limit_counts_bytes_and_errors_echo_little(room, raw):
    peer = raw()
    peer.send(json.dumps({"type": "ping", "pad": "\U0001F600" * 300_000}, ensure_ascii=False))  # 1.2 MB, 0.3 M chars
    reply = peer.recv()
    assert reply["code"] == P.MESSAGE_TOO_LARGE
    peer.ws.settimeout(5)
    peer.send(json.dumps({"type": "x" * 900_000}))
    text = peer.ws.recv()
    assert json.loads(text)["code"] == P.UNKNOWN_MESSAGE_TYPE and len(text) < 1000
    peer.register("p", room.room_id, room.token)
    peer.send(json.dumps({"type": "peer_message", "from_peer_id": "y" * 500_000, "to_peer_id": "p", "payload": 1}))
    text = peer.ws.recv()
    assert json.loads(text)["code"] == P.SPOOFED_SENDER and len(text) < 1000


def test_rooms_per_user_and_per_address_are_limited_and_empty_rooms_expire(world):
    state = world.tmp / "rooms.json"
    world.start_server("--max-rooms-per-user", "3", "--max-rooms-per-address", "5", "--room-ttl", "1",
                       "--ping-interval", "0.3", "--state-file", str(state))
    _, signin = P.http_call("POST", world.http_url + "/anonymous-signin", {})
    made = [P.http_call("POST", world.http_url + "/create-room", {}, bearer=signin["id_token"]) for _ in range(4)]
    assert [status for status, _ in made] == [200, 200, 200, 429]
    assert "has created 3 rooms already" in made[3][1]["error"]
    _, other = P.http_call("POST", world.http_url + "/anonymous-signin", {})
    more = [P.http_call("POST", world.http_url + "/create-room", {}, bearer=other["id_token"])[0] for _ in range(3)]
    assert more == [200, 200, 429]  # five from this address in all
    # A room with a peer in it stays; empty ones expire, in memory and in the state file.
    kept = made[0][1]
    peer = RawPeer(world.ws_url)
    assert peer.register("stayer", kept["room_id"], kept["token"])["type"] == P.REGISTERED_AUTH
    time.sleep(2.0)
    gone = RawPeer(world.ws_url)
    assert gone.register("late", made[1][1]["room_id"], made[1][1]["token"])["code"] == P.ROOM_NOT_FOUND
    wait_until(lambda: list(json.loads(state.read_text())["rooms"]) == [kept["room_id"]], 5, "the state file")
    peer.close()
    gone.close()


def test_http_requests_that_stall_or_lie_are_answered_or_dropped(world):
    world.start_server("--http-timeout", "1")
    host, port = "127.0.0.1", world.http_port

    def raw_http(data: bytes, wait: float = 5.0) -> bytes:
        with socket.create_connection((host, port), timeout=wait) as s:
            s.sendall(data)
            chunks = []
            try:
                while chunk := s.recv(65536):
                    chunks.append(chunk)
            except TimeoutError:
                return b"TIMEOUT"
            return b"".join(chunks)

    assert raw_http(b"POST /create-room HTTP/1.1\r\nContent-Length: -1\r\n\r\n").startswith(b"HTTP/1.0 400")
    assert raw_http(b"POST /create-room HTTP/1.1\r\nContent-Length: abc\r\n\r\n").startswith(b"HTTP/1.0 400")
    nested = ("[" * 5000 + "]" * 5000).encode()
    assert raw_http(b"POST /anonymous-signin HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(nested) + nested) \
        .startswith(b"HTTP/1.0 400")
    bearer = "Authorization: Bearer tøkén".encode("utf-8")
    assert raw_http(b"POST /create-room HTTP/1.1\r\n" + bearer + b"\r\nContent-Length: 2\r\n\r\n{}") \
        .startswith(b"HTTP/1.0 401")
    room_id, _ = world.create_room()  # a real room, so that the token is compared
    body = json.dumps({"room_id": room_id, "token": "tøkén"}).encode()
    assert raw_http(b"POST /delete-peers-and-room HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body) \
        .startswith(b"HTTP/1.0 403")
    began = time.monotonic()
    half = [socket.create_connection((host, port)) for _ in range(20)]  # half-sent headers, then silence
    for s in half:
        s.sendall(b"POST /create-room HTTP/1.1\r\nContent-Le")
    for s in half:
        s.settimeout(5)
        assert s.recv(100) == b""  # closed by the server
        s.close()
    assert time.monotonic() - began < 4
    with socket.create_connection((host, port), timeout=5) as s:  # a body shorter than announced
        s.sendall(b"POST /anonymous-signin HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
        began = time.monotonic()
        assert s.recv(100) == b"" and time.monotonic() - began < 4
    assert P.http_call("GET", world.http_url + "/health")[0] == 200


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _fuzz_frame(rng: random.Random, room, other_room: str, me: str):
    """One frame of a kind that must get an error: (frame to send, is it binary)."""
    kind = rng.randrange(9)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))), True
    if kind == 1:
        text = "".join(rng.choice(string.printable) for _ in range(rng.randrange(1, 300)))
        return ("{" + text if text[:1] not in "{[" else text), False
    if kind == 2:
        return json.dumps(rng.choice([1, "s", None, [1, 2], {"no": "type"}, {"type": 5}, {"type": ["x"]}])), False
    if kind == 3:
        depth = rng.randrange(40, 8000)
        return "[" * depth + "]" * depth, False
    if kind == 4:
        return json.dumps({"type": "peer_message", "from_peer_id": me, "to_peer_id": "x", "payload": deep(40)}), False
    if kind == 5:
        return json.dumps({"type": rng.choice(["offer", "register", "discover_peers", "candidate", "answer"]),
                           "junk": "\u00e9\U0001F600" * rng.randrange(1, 50)}), False
    if kind == 6:
        spoofed = {"type": "peer_message", "from_peer_id": "someone-else", "to_peer_id": me, "payload": 1}
        return json.dumps(spoofed), False
    if kind == 7:
        return json.dumps({"type": "peer_message", "from_peer_id": me, "to_peer_id": other_room, "payload": 1}), False
    return json.dumps({"type": "x" * rng.randrange(1, 2000), "pad": "y" * rng.randrange(0, 2000)}), False


def test_fuzz_every_frame_gets_an_error_and_memory_stays_bounded(world):
    world.start_server("--rate", "100000")
    world.create_room()
    other = RawPeer(world.ws_url)  # a peer of another room, as a target that must stay unreachable
    other_room = P.create_room(world.http_url)
    assert other.register("elsewhere", other_room["room_id"], other_room["token"])["type"] == P.REGISTERED_AUTH
    rng = random.Random(20261126)
    pid = world.server.popen.pid
    peers = []
    for i in range(8):
        peer = RawPeer(world.ws_url)
        assert peer.register(f"fuzzer-{i}", world.room_id, world.token)["type"] == P.REGISTERED_AUTH
        peers.append(peer)
    big = json.dumps({"type": "ping", "pad": "z" * (P.MAX_FRAME_BYTES + 10)})
    baseline = None
    sent, deadline = 0, time.monotonic() + 120
    while sent < 10_000 and time.monotonic() < deadline:
        i = sent % len(peers)
        frame, binary = _fuzz_frame(rng, world, "elsewhere", f"fuzzer-{i}")
        if sent % 1000 == 999:
            frame, binary = big, False  # over the limit
        if binary:
            peers[i].ws.send_binary(frame)
        else:
            peers[i].send(frame)
        reply = peers[i].recv_type(P.ERROR, 10)  # skipping join notices and pings
        assert reply["code"], (frame[:200], reply)
        sent += 1
        if sent == 1000:
            baseline = _rss_kb(pid)
    assert sent == 10_000
    assert _rss_kb(pid) - baseline < 50_000, "the server's memory grew by more than 50 MB under fuzzing"
    fresh = RawPeer(world.ws_url)
    assert fresh.register("fresh", world.room_id, world.token)["type"] == P.REGISTERED_AUTH
    found = fresh.ask({"type": "discover_peers", "from_peer_id": "fresh", "filters": {}}, "peer_list")
    assert {p["peer_id"] for p in found["peers"]} == {f"fuzzer-{i}" for i in range(8)}
    for peer in peers + [other, fresh]:
        peer.close()


class StalledPeer(RawPeer):
    """A member that registered and then never reads again (a laptop asleep with its
    connection open), with a small receive buffer so that it fills quickly."""

    def __init__(self, url: str):
        import websocket

        self.ws = websocket.create_connection(url, timeout=5, sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),))


def test_a_stalled_peer_delays_nobody_is_evicted_and_the_server_still_stops_at_once(world):
    world.start_server("--ping-interval", "0.3", "--rate", "100000", "--outbox-mb", "1")
    world.create_room()
    stalled, asleep = StalledPeer(world.ws_url), StalledPeer(world.ws_url)
    assert stalled.register("stalled", world.room_id, world.token)["type"] == P.REGISTERED_AUTH
    assert asleep.register("asleep", world.room_id, world.token)["type"] == P.REGISTERED_AUTH
    listener, flooder = RawPeer(world.ws_url), RawPeer(world.ws_url)
    listener.register("listener", world.room_id, world.token)
    flooder.register("flooder", world.room_id, world.token)
    payload = {"pad": "x" * 100_000}
    # A little for the one asleep (its buffers fill, its outbox does not), a flood for the other.
    for target, count in (("asleep", 5), ("stalled", 200)):
        for _ in range(count):
            flooder.send({"type": "peer_message", "from_peer_id": "flooder", "to_peer_id": target,
                          "payload": payload})
    flooder.send({"type": "ping"})
    flooder.recv_type("pong", timeout=10)  # the flooder's own thread was never held up

    newcomer = RawPeer(world.ws_url)
    began = time.monotonic()
    assert newcomer.register("newcomer", world.room_id, world.token)["type"] == P.REGISTERED_AUTH
    found = newcomer.ask({"type": "discover_peers", "from_peer_id": "newcomer", "filters": {}}, "peer_list")
    assert time.monotonic() - began < 1.0, "a newcomer must be answered at once"
    assert "listener" in {p["peer_id"] for p in found["peers"]}
    assert listener.recv_type("ping", timeout=3) == {"type": "ping"}  # keep-alives still reach the others

    def present() -> set:
        reply = newcomer.ask({"type": "discover_peers", "from_peer_id": "newcomer", "filters": {}}, "peer_list")
        return {p["peer_id"] for p in reply["peers"]}

    wait_until(lambda: "stalled" not in present(), 10, "the stalled peer to be evicted")
    assert "asleep" in present()
    world.server.wait_for(r"closed stalled \(room \S+\): too slow", timeout=5)

    began = time.monotonic()
    world.server.popen.terminate()
    world.server.popen.wait(timeout=10)
    assert time.monotonic() - began < 2.0, "SIGTERM must stop the server within 2 s, a sleeping peer or not"
    for peer in (stalled, asleep, listener, flooder, newcomer):
        peer.ws.shutdown()


def test_a_room_cannot_grow_a_peer_list_bigger_than_an_outbox(world):
    """Fat metadata on many peers would make every newcomer's registered_auth (and every
    discover_peers answer) too big to send, and cut everyone joining as too slow."""
    world.start_server("--outbox-mb", "0.25", "--rate", "100000")  # peer lists of at most 128 KiB
    world.create_room()
    fat = {"tags": [], "properties": {"pad": "x" * 50_000}}
    peers = [RawPeer(world.ws_url) for _ in range(3)]
    try:
        assert peers[0].register("a", world.room_id, world.token, metadata=fat)["type"] == P.REGISTERED_AUTH
        assert peers[1].register("b", world.room_id, world.token, metadata=fat)["type"] == P.REGISTERED_AUTH
        refused = peers[2].register("c", world.room_id, world.token, metadata=fat)
        assert refused["code"] == P.ROOM_FULL and "peer list would pass" in refused["message"]
        assert peers[2].register("c", world.room_id, world.token)["type"] == P.REGISTERED_AUTH  # small is fine
        grow = peers[2].ask({"type": "update_metadata", "peer_id": "c", "metadata": fat})
        assert grow["code"] == P.MESSAGE_TOO_LARGE and "peer list would pass" in grow["message"]
    finally:
        for peer in peers:
            peer.close()


def test_a_returning_peer_is_not_counted_twice_and_a_refused_one_claims_nothing(world):
    """A restarted worker with fat metadata registers again with its peer_key while its old
    connection still holds its id: its old entry is not counted against the peer-list cap.
    A registration refused by the cap does not claim the id it asked for."""
    world.start_server("--outbox-mb", "0.25", "--rate", "100000")  # peer lists of at most 128 KiB
    world.create_room()
    fat = {"tags": [], "properties": {"pad": "x" * 50_000}}
    peers = [RawPeer(world.ws_url) for _ in range(5)]
    try:
        first = {"type": "register", "peer_id": "w", "room_id": world.room_id, "token": world.token,
                 "role": "worker", "peer_key": "k" * 40, "metadata": fat}
        assert peers[0].ask(first)["type"] == P.REGISTERED_AUTH
        assert peers[1].register("b", world.room_id, world.token, metadata=fat)["type"] == P.REGISTERED_AUTH
        assert peers[2].ask(first)["type"] == P.REGISTERED_AUTH  # the key's holder, back
        refused = peers[3].ask({**first, "peer_id": "c", "peer_key": "c" * 40})
        assert refused["code"] == P.ROOM_FULL and "peer list would pass" in refused["message"]
        small = {**first, "peer_id": "c", "peer_key": "other-key", "metadata": {}}
        assert peers[4].ask(small)["type"] == P.REGISTERED_AUTH  # "c" was not claimed by the refused one
    finally:
        for peer in peers:
            peer.close()
