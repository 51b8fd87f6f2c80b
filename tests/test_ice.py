"""ICE servers on loopback: TURN credentials minted per peer (TURN REST), their refresh,
the choice among several STUN/TURN URLs, and the words of a link that found no path.

The same things against a real coturn behind real NATs are in test_nat.py.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import socket
import time

import pytest
import websocket

import protocol as P
from conftest import RawPeer
from upstream_world import LoopbackStun

SECRET = "lab-secret"
TURN_URLS = ["turn:198.51.100.7:3478", "turn:198.51.100.7:3478?transport=tcp"]


def turn_server_accepts(username: str, password: str, secret: str = SECRET) -> bool:
    """What coturn --use-auth-secret checks: the password is base64(HMAC-SHA1(secret, username))
    and the username's leading EXPIRY has not passed."""
    expected = base64.b64encode(hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()).decode()
    return hmac.compare_digest(expected, password) and int(username.split(":", 1)[0]) > time.time()


@pytest.fixture
def turn_room(world):
    world.start_server("--ice-server", "stun:198.51.100.7:3478", "--turn-secret", SECRET,
                       "--turn-url", TURN_URLS[0], "--turn-url", TURN_URLS[1], "--turn-ttl", "6")
    world.create_room()
    return world


def test_each_peer_gets_its_own_turn_credentials_that_expire(turn_room):
    peers = {name: RawPeer(turn_room.ws_url) for name in ("alice", "bob")}
    handed = {name: peer.register(name, turn_room.room_id, turn_room.token)["ice_servers"]
              for name, peer in peers.items()}
    for name, servers in handed.items():
        assert servers[0] == {"urls": "stun:198.51.100.7:3478"}  # the static one, as before
        turn = servers[1]
        assert turn["urls"] == TURN_URLS
        expiry, _, who = turn["username"].partition(":")
        assert who == name and time.time() + 3 < int(expiry) <= time.time() + 7
        assert turn_server_accepts(turn["username"], turn["credential"])
        assert not turn_server_accepts(turn["username"], turn["credential"], secret="another")
    assert handed["alice"][1]["credential"] != handed["bob"][1]["credential"]
    for peer in peers.values():
        peer.close()


def test_a_long_registered_peer_gets_fresh_credentials_before_an_offer(turn_room):
    worker = P.SignalingClient(turn_room.ws_url, turn_room.room_id, turn_room.token, "worker", "worker")
    worker.connect()
    first = worker.ice_servers[1]["username"]
    client = RawPeer(turn_room.ws_url)
    client.register("client", turn_room.room_id, turn_room.token)
    # Before half the TTL has passed, an offer comes alone.
    client.send({"type": P.OFFER, "sender": "client", "target": "worker", "sdp": "v=0"})
    assert worker.next(lambda f: f["type"] == P.OFFER, timeout=5) is not None
    assert worker.ice_servers[1]["username"] == first
    time.sleep(3.5)  # past half of --turn-ttl 6
    client.send({"type": P.OFFER, "sender": "client", "target": "worker", "sdp": "v=0",
                 "ice_servers": [{"urls": "turn:203.0.113.66:3478", "username": "evil", "credential": "x"}]})
    assert worker.next(lambda f: f["type"] == P.OFFER, timeout=5) is not None
    fresh = worker.ice_servers[1]
    assert fresh["username"] != first and fresh["username"].endswith(":worker") and fresh["urls"] == TURN_URLS
    assert turn_server_accepts(fresh["username"], fresh["credential"])
    assert all("203.0.113.66" not in str(s) for s in worker.ice_servers)  # a member's field is not the server's word
    # The offering side got nothing: no one else's credentials.
    client.send({"type": "ping"})
    assert client.recv_type("pong")["type"] == "pong"
    client.ws.settimeout(0.5)
    frames = []
    with contextlib.suppress(websocket.WebSocketTimeoutException):  # half a second of nothing: all came
        while True:
            frames.append(client.ws.recv())
    assert not any(P.ICE_SERVERS in frame for frame in frames), frames
    worker.close()
    client.close()


def test_a_member_cannot_hand_out_ice_servers(turn_room):
    victim = P.SignalingClient(turn_room.ws_url, turn_room.room_id, turn_room.token, "victim", "worker")
    victim.connect()
    before = list(victim.ice_servers)
    attacker = RawPeer(turn_room.ws_url)
    attacker.register("attacker", turn_room.room_id, turn_room.token)
    evil = [{"urls": "turn:203.0.113.66:3478", "username": "evil", "credential": "x"}]
    reply = attacker.ask({"type": P.ICE_SERVERS, "ice_servers": evil})
    assert reply["type"] == P.ERROR and reply["code"] == P.UNKNOWN_MESSAGE_TYPE
    attacker.send({"type": P.PEER_MESSAGE, "from_peer_id": "attacker", "to_peer_id": "victim",
                   "payload": {"type": P.ICE_SERVERS, "ice_servers": evil}})
    assert victim.next(lambda f: f["type"] == P.PEER_MESSAGE, timeout=5) is not None
    assert victim.ice_servers == before
    victim.close()
    attacker.close()


@pytest.mark.parametrize("options, message", [
    (["--turn-secret", SECRET], "--turn-secret and --turn-url go together"),
    (["--turn-url", TURN_URLS[0]], "--turn-secret and --turn-url go together"),
    (["--turn-secret", SECRET, "--turn-url", "http://x"], "expected turn:HOST:PORT"),
    (["--turn-secret", SECRET, "--turn-url", TURN_URLS[0], "--turn-ttl", "0"], "--turn-ttl must be positive"),
])
def test_turn_options_are_checked_at_start(world, options, message):
    result = world.spawn("signaling", [str(P.Path(__file__).resolve().parent.parent / "signaling.py"),
                                       "--port", "0", *options])
    assert result.popen.wait(timeout=30) == 2
    assert message in result.output()


# -- which STUN/TURN URL aiortc gets -------------------------------------------------------


def closed_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def servers(stun_port: int) -> list[dict]:
    return [{"urls": f"stun:127.0.0.1:{stun_port}"},
            {"urls": ["turn:127.0.0.1:3478", "turn:127.0.0.1:3478?transport=tcp"], "username": "u",
             "credential": "p"}]


def test_where_udp_gets_through_stun_and_turn_over_udp_are_used():
    responder = LoopbackStun()
    try:
        P.forget_network()
        chosen = P.usable_ice_servers(servers(responder.port))
        assert chosen == [{"urls": responder.url},
                          {"urls": "turn:127.0.0.1:3478", "username": "u", "credential": "p"}]
        P.usable_ice_servers(servers(responder.port))
        assert responder.requests == 1  # asked once, then remembered
        assert P.stun_mapped_address("127.0.0.1", responder.port)[0] == "127.0.0.1"
    finally:
        responder.close()
        P.forget_network()


def test_where_no_udp_gets_through_only_turn_over_tcp_is_used_and_no_stun():
    port = closed_udp_port()
    P.forget_network()
    began = time.monotonic()
    chosen = P.usable_ice_servers(servers(port))
    assert chosen == [{"urls": "turn:127.0.0.1:3478?transport=tcp", "username": "u", "credential": "p"}]
    assert time.monotonic() - began < 3  # the probe's own bound (1 s), not aioice's 5 s STUN wait
    P.forget_network()
    assert P.usable_ice_servers([]) == []
    assert P.usable_ice_servers([{"urls": "ftp://nope"}]) == []


# -- what a link that found no path says ---------------------------------------------------

HOST = "a=candidate:1 1 UDP 2130706431 10.0.1.2 5000 typ host"
SRFLX = "a=candidate:2 1 UDP 1694498815 100.64.1.2 6000 typ srflx raddr 10.0.1.2 rport 5000"
RELAY = "a=candidate:3 1 UDP 16777215 100.64.0.1 50000 typ relay raddr 100.64.1.2 rport 6000"


def test_candidate_types_are_read_from_the_sdp():
    assert P.candidate_types("\n".join(["v=0", RELAY, HOST, SRFLX])) == ["host", "srflx", "relay"]
    assert P.candidate_types("v=0\na=candidate:bogus") == []


@pytest.mark.parametrize("local, remote, given, words", [
    (["host"], ["host"], [], "hands out no STUN or TURN server"),
    (["host", "srflx"], ["host", "srflx"], [{"urls": "stun:h:3478"}], "symmetric"),
    (["host"], ["host", "srflx"], [{"urls": "stun:h:3478"}], "this machine got no answer from the STUN server"),
    (["host", "srflx"], ["host", "srflx", "relay"], servers(3478), "this machine got no relay"),
    (["host", "srflx", "relay"], ["host", "relay"], servers(3478), "both sides reached the TURN server"),
    (["host", "srflx"], ["host", "srflx"], servers(3478), "neither side got a relay"),
])
def test_a_failed_link_names_the_topology_and_the_fix(local, remote, given, words):
    advice = P.no_route_advice(local, remote, "worker-1", given)
    assert f"this machine offered {', '.join(local)}; worker-1 offered {', '.join(remote)}" in advice
    assert words in advice
