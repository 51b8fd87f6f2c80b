"""The signaling server's v2 API against a real server process."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request

import pytest

import protocol as P
import signaling
from conftest import RawPeer, wait_until


def register_pair(raw, room):
    a, b = raw(), raw()
    assert a.register("alice", room.room_id, room.token)["type"] == "registered_auth"
    assert b.register("bob", room.room_id, room.token)["type"] == "registered_auth"
    return a, b


def second_room(room):
    other = P.create_room(room.http_url)
    return other["room_id"], other["token"]


# -- HTTP API ------------------------------------------------------------------------------


def test_health_and_metrics(room, raw):
    status, health = P.http_call("GET", room.http_url + "/health")
    assert status == 200 and health["status"] == "healthy" and health["version"] == P.VERSION
    assert "timestamp" in health
    raw().register("w1", room.room_id, room.token, role="worker")
    status, metrics = P.http_call("GET", room.http_url + "/metrics")
    assert status == 200
    assert metrics["active_rooms"] == 1 and metrics["rooms_created"] == 1
    assert metrics["peers_by_role"] == {"worker": 1}
    assert metrics["active_connections"] >= 1 and metrics["total_connections"] >= 1
    assert metrics["total_messages"] >= 1
    request = urllib.request.Request(room.http_url + "/metrics", headers={"Accept": "text/plain"})
    with urllib.request.urlopen(request, timeout=5) as response:
        text = response.read().decode()
    assert response.headers["Content-Type"].startswith("text/plain")
    assert 'sleap_rtc_peers_by_role{role="worker"} 1' in text and "sleap_rtc_active_rooms 1" in text
    assert P.http_call("GET", room.http_url + "/nope")[0] == 404


def test_create_room_needs_a_valid_id_token(room):
    assert P.http_call("POST", room.http_url + "/create-room", {})[0] == 401
    status, body = P.http_call("POST", room.http_url + "/create-room", {}, bearer="forged.token")
    assert status == 401 and "invalid" in body["error"]
    status, signin = P.http_call("POST", room.http_url + "/anonymous-signin", {})
    assert status == 200 and signin["username"].startswith("anon-")
    status, created = P.http_call("POST", room.http_url + "/create-room", {}, bearer=signin["id_token"])
    assert status == 200 and created["room_id"] and created["token"]


def test_only_the_rooms_creator_removes_peers_or_deletes_the_room(room, raw):
    a, b = register_pair(raw, room)
    url = room.http_url + "/delete-peers-and-room"
    _, member = P.http_call("POST", room.http_url + "/anonymous-signin", {})
    # The room's token makes a member, not an owner: neither it nor another user's sign-in deletes.
    for bearer in (None, member["id_token"]):
        status, body = P.http_call("POST", url, {"room_id": room.room_id, "token": room.token}, bearer=bearer)
        assert status == 403 and "only the creator" in body["error"], body
    owner = room.owner_id_token
    assert P.http_call("POST", url, {"room_id": room.room_id, "peer_id": "nobody"}, bearer=owner)[0] == 404
    assert P.http_call("POST", url, {"peer_id": "bob"}, bearer=owner)[0] == 400
    status, body = P.http_call("POST", url, {"room_id": room.room_id, "peer_id": "bob"}, bearer=owner)
    assert status == 200 and body["deleted_peers"] == ["bob"]
    wait_until(lambda: [p["peer_id"] for p in a.ask({"type": "discover_peers", "from_peer_id": "alice"},
                                                    "peer_list")["peers"]] == [], 5, "bob to leave")
    status, body = P.http_call("POST", url, {"room_id": room.room_id}, bearer=owner)
    assert status == 200 and body["room_deleted"] and body["deleted_peers"] == ["alice"]
    again = raw()
    reply = again.register("carol", room.room_id, room.token)
    assert reply["code"] == P.ROOM_NOT_FOUND


# -- registration --------------------------------------------------------------------------


def test_register_answers_registered_auth_and_sends_no_notices(room, raw):
    a = raw()
    reply = a.register("alice", room.room_id, room.token, role="worker",
                       metadata={"tags": ["gpu"], "properties": {"gpu_memory_mb": 8000}})
    assert reply == {"type": "registered_auth", "room_id": room.room_id, "peer_id": "alice",
                     "peer_list": [], "ice_servers": []}
    b = raw()
    reply = b.register("bob", room.room_id, room.token)
    assert [p["peer_id"] for p in reply["peer_list"]] == ["alice"]
    assert reply["peer_list"][0]["metadata"]["properties"] == {"gpu_memory_mb": 8000}
    assert reply["peer_list"][0]["role"] == "worker" and reply["peer_list"][0]["connected_at"]
    # peer_joined / peer_left are not part of the v2 API: alice's next frame is the answer to her ping.
    b.close()
    assert a.ask({"type": "ping"})["type"] == "pong"


@pytest.mark.parametrize("frame, code", [
    ({"type": "register", "peer_id": "x", "room_id": "nope", "token": "t"}, P.ROOM_NOT_FOUND),
    ({"type": "register", "peer_id": "x", "room_id": "ROOM", "token": "wrong"}, P.INVALID_TOKEN),
    ({"type": "register", "peer_id": "x", "room_id": "ROOM", "token": "TOKEN", "id_token": "bad.sig"},
     P.INVALID_TOKEN),
    ({"type": "register", "peer_id": "x", "room_id": "ROOM"}, P.INVALID_MESSAGE),
    ({"type": "register", "peer_id": "has space", "room_id": "ROOM", "token": "TOKEN"}, P.INVALID_MESSAGE),
    ({"type": "register", "peer_id": "x", "room_id": "ROOM", "token": "TOKEN", "metadata": {"tags": "a"}},
     P.INVALID_MESSAGE),
    ({"type": "discover_peers", "from_peer_id": "x"}, P.NOT_IN_ROOM),
    ({"type": "peer_message", "from_peer_id": "x", "to_peer_id": "y", "payload": {}}, P.NOT_IN_ROOM),
    ({"type": "teleport"}, P.UNKNOWN_MESSAGE_TYPE),
    ({"no_type": 1}, P.INVALID_MESSAGE),
])
def test_bad_frames_get_errors_and_the_connection_keeps_working(room, raw, frame, code):
    frame = json.loads(json.dumps(frame).replace("ROOM", room.room_id).replace("TOKEN", room.token))
    peer = raw()
    reply = peer.ask(frame)
    assert reply["type"] == "error" and reply["code"] == code and reply["message"]
    assert peer.register("after-error", room.room_id, room.token)["type"] == "registered_auth"


def test_malformed_json_binary_and_oversized_frames(room, raw):
    peer = raw()
    reply = peer.ask("{not json")
    assert reply["code"] == P.INVALID_JSON
    peer.ws.send_binary(b"\x00\x01")
    assert peer.recv()["code"] == P.INVALID_MESSAGE
    reply = peer.ask(json.dumps({"type": "ping", "pad": "x" * (P.MAX_FRAME_BYTES + 1)}))
    assert reply["code"] == P.MESSAGE_TOO_LARGE
    assert peer.register("survivor", room.room_id, room.token)["type"] == "registered_auth"
    assert peer.ask({"type": "ping"})["type"] == "pong"


def test_peer_id_taken_and_double_register(room, raw):
    a = raw()
    a.register("alice", room.room_id, room.token)
    assert a.register("alice2", room.room_id, room.token)["code"] == P.ALREADY_REGISTERED
    assert raw().register("alice", room.room_id, room.token)["code"] == P.PEER_ID_TAKEN


def test_peer_ids_are_unique_per_room_and_a_claimed_id_comes_back_only_with_its_key(room, raw):
    """A stranger with a room of its own cannot take, or even see, a worker's id; a
    worker that registered with a key gets its id back after a restart, even while its
    old connection lingers, and nobody without the key takes it in between."""
    other_room, other_token = second_room(room)
    worker = raw()
    frame = {"type": "register", "peer_id": "gpu-1", "room_id": room.room_id, "token": room.token,
             "role": "worker", "peer_key": "k" * 40}
    assert worker.ask(frame)["type"] == "registered_auth"
    stranger = raw()
    assert stranger.register("gpu-1", other_room, other_token)["type"] == "registered_auth"  # its own room's gpu-1
    member = raw()
    assert member.register("gpu-1", room.room_id, room.token)["code"] == P.PEER_ID_TAKEN  # no key
    wrong = raw()
    assert wrong.ask({**frame, "peer_key": "guess"})["code"] == P.PEER_ID_TAKEN
    restarted = raw()  # the old connection is still open: the key's holder replaces it
    assert restarted.ask(frame)["type"] == "registered_auth"
    with pytest.raises(Exception):
        worker.recv(timeout=3)  # cut off
    lister = raw()
    lister.register("lister", room.room_id, room.token)
    found = lister.ask({"type": "discover_peers", "from_peer_id": "lister", "filters": {}}, "peer_list")["peers"]
    assert [p["peer_id"] for p in found] == ["gpu-1"]
    restarted.close()
    wait_until(lambda: lister.ask({"type": "discover_peers", "from_peer_id": "lister", "filters": {}},
                                  "peer_list")["count"] == 0, 5, "the worker to leave")
    squatter = raw()  # the worker is away: its id stays its own
    assert squatter.register("gpu-1", room.room_id, room.token)["code"] == P.PEER_ID_TAKEN
    assert raw().ask(frame)["type"] == "registered_auth"


def test_valid_id_token_is_accepted(room, raw):
    _, signin = P.http_call("POST", room.http_url + "/anonymous-signin", {})
    peer = raw()
    reply = peer.ask({"type": "register", "peer_id": "signed", "room_id": room.room_id, "token": room.token,
                      "id_token": signin["id_token"]})
    assert reply["type"] == "registered_auth"


# -- discovery and metadata ----------------------------------------------------------------


def test_discover_filters(room, raw):
    specs = {
        "big": ("worker", ["sleap-rtc", "training-worker"], {"gpu_memory_mb": 24000, "status": "available"}),
        "small": ("worker", ["sleap-rtc", "inference-worker"], {"gpu_memory_mb": 8000, "status": "busy"}),
        "nogpu": ("worker", ["sleap-rtc"], {"status": "available"}),
        "laptop": ("client", [], {}),
    }
    for peer_id, (role, tags, props) in specs.items():
        raw().register(peer_id, room.room_id, room.token, role=role, metadata={"tags": tags, "properties": props})
    other_room, other_token = second_room(room)
    raw().register("elsewhere", other_room, other_token, role="worker")
    me = raw()
    me.register("me", room.room_id, room.token)

    def discover(filters):
        reply = me.ask({"type": "discover_peers", "from_peer_id": "me", "filters": filters}, "peer_list")
        assert reply["to_peer_id"] == "me" and reply["count"] == len(reply["peers"])
        return sorted(p["peer_id"] for p in reply["peers"])

    assert discover({}) == ["big", "laptop", "nogpu", "small"]  # never me, never another room
    assert discover({"role": "worker"}) == ["big", "nogpu", "small"]
    assert discover({"tags": ["sleap-rtc", "training-worker"]}) == ["big"]
    assert discover({"properties": {"gpu_memory_mb": {"$gte": 10000}}}) == ["big"]
    assert discover({"properties": {"gpu_memory_mb": {"$lte": 10000}}}) == ["small"]
    assert discover({"properties": {"gpu_memory_mb": {"$gte": 8000, "$lte": 8000}}}) == ["small"]
    assert discover({"properties": {"status": "available"}}) == ["big", "nogpu"]
    assert discover({"properties": {"status": {"$eq": "busy"}}}) == ["small"]
    assert discover({"properties": {"gpu_memory_mb": {"$gte": "a string"}}}) == []
    bad = me.ask({"type": "discover_peers", "from_peer_id": "me", "filters": {"properties": {"x": {"$gt": 1}}}})
    assert bad["code"] == P.INVALID_MESSAGE and "$gte" in bad["message"]


def test_update_metadata_changes_discovery(room, raw):
    worker, me = raw(), raw()
    worker.register("w", room.room_id, room.token, role="worker",
                    metadata={"tags": ["a"], "properties": {"status": "available", "queue_length": 0}})
    me.register("me", room.room_id, room.token)
    query = {"type": "discover_peers", "from_peer_id": "me", "filters": {"properties": {"status": "available"}}}
    assert me.ask(query, "peer_list")["count"] == 1
    reply = worker.ask({"type": "update_metadata", "peer_id": "w",
                        "metadata": {"tags": ["b"], "properties": {"status": "busy"}}}, "metadata_updated")
    assert reply["peer_id"] == "w"
    assert reply["metadata"] == {"tags": ["a", "b"], "properties": {"status": "busy", "queue_length": 0}}
    assert me.ask(query, "peer_list")["count"] == 0
    spoof = me.ask({"type": "update_metadata", "peer_id": "w", "metadata": {"properties": {"status": "available"}}})
    assert spoof["code"] == P.SPOOFED_SENDER
    assert me.ask(query, "peer_list")["count"] == 0


# -- routing ------------------------------------------------------------------------------


def test_peer_message_and_webrtc_frames_are_forwarded_unchanged(room, raw):
    a, b = register_pair(raw, room)
    frames = [
        {"type": "peer_message", "from_peer_id": "alice", "to_peer_id": "bob",
         "payload": {"app_message_type": "job_request", "nested": [1, {"x": None}]}},
        {"type": "offer", "sender": "alice", "target": "bob", "sdp": "v=0 offer"},
        {"type": "answer", "sender": "alice", "target": "bob", "sdp": "v=0 answer"},
        {"type": "candidate", "sender": "alice", "target": "bob", "candidate": {"candidate": "c", "sdpMid": "0"}},
    ]
    for frame in frames:
        a.send(frame)
        assert b.recv_type(frame["type"]) == frame


def test_a_peer_cannot_speak_as_another_or_reach_another_room(room, raw):
    a, b = register_pair(raw, room)
    other_room, other_token = second_room(room)
    stranger = raw()
    stranger.register("stranger", other_room, other_token)
    for frame in [
        {"type": "peer_message", "from_peer_id": "bob", "to_peer_id": "alice", "payload": {}},
        {"type": "offer", "sender": "bob", "target": "alice", "sdp": "x"},
        {"type": "discover_peers", "from_peer_id": "bob"},
    ]:
        reply = a.ask(frame)
        assert reply["code"] == P.SPOOFED_SENDER and reply["in_reply_to"] == frame["type"]
    reply = a.ask({"type": "peer_message", "from_peer_id": "alice", "to_peer_id": "stranger", "payload": {}})
    assert reply["code"] == P.PEER_NOT_FOUND and room.room_id in reply["message"]  # not "it is elsewhere"
    reply = a.ask({"type": "candidate", "sender": "alice", "target": "ghost", "candidate": {}})
    assert reply["code"] == P.PEER_NOT_FOUND
    # Nothing leaked: the stranger and bob received none of it.
    b.send({"type": "ping"})
    assert b.recv()["type"] == "pong"
    stranger.send({"type": "ping"})
    assert stranger.recv()["type"] == "pong"


def test_delivery_failed_when_the_target_connection_is_gone():
    """The one error a live server cannot be made to produce on demand: the target's
    connection closes between lookup and queueing."""
    server = signaling.SignalingServer()

    class DeadConnection:
        def enqueue(self, text):
            return False

    room = signaling.Room("r", "t", "now")
    server.directory.rooms["r"] = room
    alice = signaling.Peer("alice", "r", "peer", {}, DeadConnection())
    room.add(alice)
    room.add(signaling.Peer("bob", "r", "peer", {}, DeadConnection()))
    reply = server._forward(alice, {"type": "peer_message", "from_peer_id": "alice", "to_peer_id": "bob",
                                    "payload": {}})
    assert reply["code"] == P.DELIVERY_FAILED


def test_ping_pong_both_ways(world):
    world.start_server("--ping-interval", "0.3")
    world.create_room()
    peer = RawPeer(world.ws_url)
    try:
        assert peer.ask({"type": "ping"})["type"] == "pong"
        peer.register("p", world.room_id, world.token)
        assert peer.recv_type("ping", timeout=3) == {"type": "ping"}
    finally:
        peer.close()


# -- limits -------------------------------------------------------------------------------


def test_limits_answer_with_clear_errors(world):
    world.start_server("--max-peers-per-room", "2", "--max-rooms", "2", "--rate", "20")
    room_id, token = world.create_room()
    peers = [RawPeer(world.ws_url) for _ in range(3)]
    try:
        assert peers[0].register("p0", room_id, token)["type"] == "registered_auth"
        assert peers[1].register("p1", room_id, token)["type"] == "registered_auth"
        full = peers[2].register("p2", room_id, token)
        assert full["code"] == P.ROOM_FULL and "2 peers" in full["message"]
        world.create_room()
        with pytest.raises(P.SignalingError, match="maximum of 2 rooms"):
            world.create_room()
        flood = peers[2]
        for _ in range(100):
            flood.send({"type": "ping"})
        replies = [flood.recv() for _ in range(100)]
        limited = [r for r in replies if r.get("code") == P.RATE_LIMITED]
        assert limited and "frames/s" in limited[0]["message"]
        time.sleep(1.0)
        assert flood.ask({"type": "ping"})["type"] == "pong"  # the bucket refills
    finally:
        for peer in peers:
            peer.close()


# -- presence -----------------------------------------------------------------------------


def test_a_killed_worker_leaves_the_room(room):
    watcher = room.signaling_client("watcher")
    try:
        proc, worker_id = room.start_worker()
        assert [w["peer_id"] for w in watcher.discover(role="worker")] == [worker_id]
        proc.kill()
        wait_until(lambda: watcher.discover(role="worker") == [], 10, "the worker to leave the room")
    finally:
        watcher.close()


def test_state_file_keeps_rooms_and_sign_in_across_restarts(world):
    state = world.tmp / "rooms.json"
    world.start_server("--state-file", str(state))
    room_id, token = world.create_room()
    _, signin = P.http_call("POST", world.http_url + "/anonymous-signin", {})
    world.server.stop()
    world.start_server("--state-file", str(state), ports=(world.ws_port, world.http_port))
    assert P.http_call("POST", world.http_url + "/create-room", {}, bearer=signin["id_token"])[0] == 200
    peer = RawPeer(world.ws_url)
    try:
        assert peer.register("back", room_id, token)["type"] == "registered_auth"
    finally:
        peer.close()
    assert oct(state.stat().st_mode & 0o777) == "0o600"


def test_the_directory_keeps_claims_and_refuses_in_order_without_a_socket(tmp_path):
    """Directory alone, as the server's threads use it: a claim made by a registration is
    written by the pinger's tidy (not by the reader), and a new Directory on the same file
    holds the room, the claim and the signing secret."""
    state = tmp_path / "rooms.json"
    directory = signaling.Directory(state, signaling.Limits(max_peers_per_room=1))
    room = directory.create_room("alice", "10.0.0.1")
    id_token, user = directory.issue_id_token()
    frame = {"type": P.REGISTER, "peer_id": "w1", "room_id": room.room_id, "token": room.token, "peer_key": "k1"}
    with directory.lock:
        assert directory.admission_problem(room, frame, "") is None
        directory.claim(room, "w1", "k1")
        room.add(signaling.Peer("w1", room.room_id, "worker", {"tags": [], "properties": {}}, conn=None))
    assert "w1" not in json.loads(state.read_text())["rooms"][room.room_id]["claims"]  # not yet written
    directory.tidy()
    assert "w1" in json.loads(state.read_text())["rooms"][room.room_id]["claims"]

    again = signaling.Directory(state, signaling.Limits(max_peers_per_room=1))
    assert again.check_id_token(id_token) == user
    room = again.rooms[room.room_id]

    def refusal(**changes):
        with again.lock:
            problem = again.admission_problem(room, {**frame, **changes}, "")
        return problem and problem["code"]

    # A wrong token is refused before anything about the id; a claimed id wants its key.
    assert refusal(token="wrong", peer_key=None) == P.INVALID_TOKEN
    assert refusal(peer_key=None) == P.PEER_ID_TAKEN
    assert refusal(peer_key="not-k1") == P.PEER_ID_TAKEN
    assert refusal() is None  # the key's holder may come back
    room.add(signaling.Peer("w1", room.room_id, "worker", {"tags": [], "properties": {}}, conn=None))
    assert refusal(peer_id="w2", peer_key=None) == P.ROOM_FULL


def _open_sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except FileNotFoundError:  # the descriptor listdir itself used
            pass
    return count


def test_reconnects_close_the_socket_they_replace(room):
    client = room.signaling_client("leaky")
    try:
        before = _open_sockets()
        for round_ in range(1, 6):  # the server evicts the peer; the client reconnects and registers again
            status, _ = P.http_call("POST", room.http_url + "/delete-peers-and-room",
                                    {"room_id": room.room_id, "peer_id": "leaky"}, bearer=room.owner_id_token)
            assert status == 200
            wait_until(lambda: client.reconnects == round_ and client.connected, 15, f"reconnect {round_}")
        time.sleep(0.2)
        assert _open_sockets() <= before, "each reconnect must close the socket it replaces"
    finally:
        client.close()


def test_a_frame_that_is_not_json_is_skipped_not_taken_for_a_lost_connection():
    """A misbehaving server (websockets' own sync server) sends garbage between two good frames."""
    from websockets.sync.server import serve

    def misbehave(conn):
        conn.recv()  # register
        conn.send(json.dumps({"type": P.REGISTERED_AUTH, "room_id": "r", "peer_id": "p", "ice_servers": []}))
        conn.send("this is not JSON")
        conn.send("[1, 2]")
        conn.send(json.dumps({"type": P.PEER_MESSAGE, "from_peer_id": "w", "to_peer_id": "p", "payload": "hi"}))
        time.sleep(2)

    with serve(misbehave, "127.0.0.1", 0) as server:
        threading.Thread(target=server.serve_forever, name="misbehaving-server", daemon=True).start()
        client = P.SignalingClient(f"ws://127.0.0.1:{server.socket.getsockname()[1]}", "r", "t", "p")
        client.connect()
        try:
            frame = client.next(lambda f: f.get("type") == P.PEER_MESSAGE, timeout=5)
            assert frame is not None and frame["payload"] == "hi"
            assert client.reconnects == 0 and client.connected
        finally:
            client.close()
        server.shutdown()
