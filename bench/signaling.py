"""Signaling server under 1,000 registered peers: discovery latency and peer_message throughput.

    python bench/signaling.py [--peers 1000] [--queries 300] [--messages 5000]

Registers the peers (a quarter of them workers with varied GPU memory) over real
WebSocket connections to a server process, then times `discover_peers` round trips from
one client (p50/p99) and counts peer_message frames per second from one peer to another.
The reference is a `ping`/`pong` round trip on the same connection, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import websocket

from _world import BenchWorld


def connect_and_register(url: str, peer_id: str, room_id: str, token: str, role: str, props: dict):
    ws = websocket.create_connection(url, timeout=30)
    ws.send(json.dumps({"type": "register", "peer_id": peer_id, "room_id": room_id, "token": token, "role": role,
                        "metadata": {"tags": ["sleap-rtc"], "properties": props}}))
    while json.loads(ws.recv())["type"] != "registered_auth":
        pass
    return ws


def round_trips(ws, frame: dict, reply_type: str, n: int) -> list[float]:
    times = []
    text = json.dumps(frame)
    for _ in range(n):
        started = time.perf_counter()
        ws.send(text)
        while json.loads(ws.recv())["type"] != reply_type:
            pass
        times.append((time.perf_counter() - started) * 1000)
    return times


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--messages", type=int, default=5000)
    args = parser.parse_args()
    with BenchWorld("--max-peers-per-room", str(args.peers + 10), "--rate", "1000000") as world:
        started = time.perf_counter()
        sockets = []
        for i in range(args.peers):
            role = "worker" if i % 4 == 0 else "client"
            props = {"gpu_memory_mb": 4000 * (i % 8), "status": "available"} if role == "worker" else {}
            sockets.append(connect_and_register(world.ws_url, f"peer-{i:04d}", world.room_id, world.token,
                                                role, props))
        register_s = time.perf_counter() - started
        print(f"registered {args.peers} peers in {register_s:.1f} s ({args.peers / register_s:.0f}/s)", flush=True)
        # Nobody reads the idle sockets; drain them so peer_joined frames never back up the server.
        stop = threading.Event()
        drainer = threading.Thread(target=_drain, args=(sockets[2:], stop), name="bench-drain", daemon=True)
        drainer.start()

        me, target = sockets[0], sockets[1]
        discover = {"type": "discover_peers", "from_peer_id": "peer-0000",
                    "filters": {"role": "worker", "properties": {"gpu_memory_mb": {"$gte": 16000}}}}
        for s in (me, target):  # skip the peer_joined frames queued on them
            s.settimeout(0.5)
            try:
                while True:
                    s.recv()
            except websocket.WebSocketTimeoutException:
                pass
            s.settimeout(30)
        ping = round_trips(me, {"type": "ping"}, "pong", args.queries)
        latency = round_trips(me, discover, "peer_list", args.queries)

        payload = json.dumps({"type": "peer_message", "from_peer_id": "peer-0000", "to_peer_id": "peer-0001",
                              "payload": {"app_message_type": "bench", "pad": "x" * 100}})
        received = []

        def receive():
            for _ in range(args.messages):
                target.recv()
            received.append(time.perf_counter())

        receiver = threading.Thread(target=receive, name="bench-receiver")
        receiver.start()
        started = time.perf_counter()
        for _ in range(args.messages):
            me.send(payload)
        receiver.join(timeout=120)
        throughput = args.messages / (received[0] - started) if received else 0.0
        stop.set()
        for s in sockets:
            s.close()

    print(f"\n{args.peers} peers in one room, {args.queries} queries each:")
    print(f"  discover_peers (workers >= 16000 MB): p50 {statistics.median(latency):.2f} ms   "
          f"p99 {percentile(latency, 99):.2f} ms")
    print(f"  ping/pong reference:                  p50 {statistics.median(ping):.2f} ms   "
          f"p99 {percentile(ping, 99):.2f} ms")
    print(f"  ratio discover/ping p50:              {statistics.median(latency) / statistics.median(ping):.2f}")
    print(f"  peer_message throughput (1 -> 1):     {throughput:,.0f} messages/s over {args.messages}")


def _drain(sockets, stop: threading.Event) -> None:
    import selectors

    selector = selectors.DefaultSelector()
    for s in sockets:
        selector.register(s.sock, selectors.EVENT_READ, s)
    while not stop.is_set():
        for key, _ in selector.select(timeout=0.2):
            try:
                key.data.recv()
            except Exception:
                selector.unregister(key.fileobj)


if __name__ == "__main__":
    main()
