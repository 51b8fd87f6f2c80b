"""The signaling server under many peers: registration rate, discovery latency, peer_message
throughput, and memory per peer.

    python bench/signaling.py [--peers 1000] [--queries 300] [--messages 5000]
                              [--big-peers 10000] [--big-rooms 100] [--runs 3]

1. --peers peers join one room over real WebSocket connections (a quarter of them workers
   with varied GPU memory), from 8 threads at once: peers registered per second.
2. With them in the room, `discover_peers` round trips from one client (workers with at
   least 16 GB), p50/p99, against `ping`/`pong` round trips on the same connection,
   measured in the same run: the ratio of the p50s.
3. peer_message frames per second from one peer to another in that room.
4. --big-peers peers over --big-rooms rooms held at once: the server's resident memory
   per peer (RSS with them, less RSS before they came, over their count).

Each figure is the median of --runs; the server is a child process, on loopback only.
Every peer costs the server a file descriptor and the bench another: the bench raises
its descriptor limit, which the server inherits (as root, past the hard limit too).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import os
import resource
import socket
import statistics
import threading
import time
from pathlib import Path

from _world import BenchWorld, P

REGISTRARS = 8  # threads registering peers at once


class RawPeer:
    """A bare WebSocket client over a plain socket: the handshake and whole text frames,
    nothing else. websocket-client spends about a millisecond of CPU per handshake, which
    on a two-core machine would measure the bench instead of the server."""

    def __init__(self, url: str):
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16))
        self.sock.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (host.encode(), key))
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(head.decode(errors="replace"))

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("closed by the server")
        self.buffer += chunk

    def _take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._fill()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def send(self, text: str) -> None:
        payload = text.encode()
        n = len(payload)
        header = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
                                  if n < 65536 else bytes([0x80 | 127]) + n.to_bytes(8, "big"))
        mask = os.urandom(4)
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes((mask * (n // 4 + 1))[:n], "big")).to_bytes(n, "big")
        self.sock.sendall(header + mask + masked)

    def recv(self) -> str:
        """The next text frame (pings and other control frames are skipped)."""
        while True:
            first, second = self._take(2)
            n = second & 0x7F
            if n == 126:
                n = int.from_bytes(self._take(2), "big")
            elif n == 127:
                n = int.from_bytes(self._take(8), "big")
            payload = self._take(n)
            if first & 0x0F == 0x1:
                return payload.decode()

    def close(self) -> None:
        self.sock.close()


def connect_and_register(url: str, peer_id: str, room_id: str, token: str, role: str, props: dict) -> RawPeer:
    peer = RawPeer(url)
    peer.send(json.dumps({"type": "register", "peer_id": peer_id, "room_id": room_id, "token": token, "role": role,
                          "metadata": {"tags": ["sleap-rtc"], "properties": props}}))
    reply = peer.recv()
    # The answer starts with its type; the peer list after it is not this bench's to parse.
    if not reply.startswith('{"type": "registered_auth"'):
        raise RuntimeError(f"{peer_id}: {reply[:200]}")
    return peer


def register_all(url: str, peers: list[tuple[str, str, str]], room_of) -> tuple[list, float]:
    """Register (peer id, role, room) triples from REGISTRARS threads; (sockets, seconds)."""
    def one(entry):
        peer_id, role, room = entry
        index = int(peer_id.rsplit("-", 1)[1])
        props = {"gpu_memory_mb": 4000 * (index % 8), "status": "available"} if role == "worker" else {}
        return connect_and_register(url, peer_id, *room_of(room), role, props)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(REGISTRARS) as pool:
        sockets = list(pool.map(one, peers))
    return sockets, time.perf_counter() - started


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


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def close_all(sockets: list[RawPeer]) -> None:
    for peer in sockets:
        peer.close()


def one_room(args, world: BenchWorld) -> dict:
    """Parts 1-3 in a fresh room: rate, latencies and throughput."""
    room = P.create_room(world.http_url)
    ids = [(f"peer-{i:05d}", "worker" if i % 4 == 0 else "client", "") for i in range(args.peers)]
    sockets, seconds = register_all(world.ws_url, ids, lambda _: (room["room_id"], room["token"]))
    me, target = sockets[0], sockets[1]
    discover = {"type": "discover_peers", "from_peer_id": "peer-00000",
                "filters": {"role": "worker", "properties": {"gpu_memory_mb": {"$gte": 16000}}}}
    ping = round_trips(me, {"type": "ping"}, "pong", args.queries)
    latency = round_trips(me, discover, "peer_list", args.queries)

    payload = json.dumps({"type": "peer_message", "from_peer_id": "peer-00000", "to_peer_id": "peer-00001",
                          "payload": {"app_message_type": "bench", "pad": "x" * 100}})
    received = []

    def receive():
        got = 0
        while got < args.messages:
            if json.loads(target.recv())["type"] == "peer_message":
                got += 1
        received.append(time.perf_counter())

    receiver = threading.Thread(target=receive, name="bench-receiver")
    receiver.start()
    started = time.perf_counter()
    for _ in range(args.messages):
        me.send(payload)
    receiver.join(timeout=120)
    close_all(sockets)
    return {"rate": args.peers / seconds, "discover": statistics.median(latency),
            "discover_p99": percentile(latency, 99), "ping": statistics.median(ping),
            "ping_p99": percentile(ping, 99),
            "messages": args.messages / (received[0] - started) if received else 0.0}


def many_rooms(args, world: BenchWorld) -> dict:
    """Part 4: --big-peers peers over --big-rooms rooms at once; RSS per peer."""
    pid = world.procs[0].pid
    rooms = [P.create_room(world.http_url) for _ in range(args.big_rooms)]
    time.sleep(0.5)
    before = rss_kb(pid)
    ids = [(f"peer-{i:05d}", "worker" if i % 4 == 0 else "client", str(i % args.big_rooms))
           for i in range(args.big_peers)]
    sockets, seconds = register_all(world.ws_url, ids, lambda r: (rooms[int(r)]["room_id"], rooms[int(r)]["token"]))
    time.sleep(1.0)
    held = rss_kb(pid)
    _, metrics = P.http_call("GET", world.http_url + "/metrics")
    close_all(sockets)
    return {"rate": args.big_peers / seconds, "per_peer_kb": (held - before) / args.big_peers,
            "held_mb": held / 1024, "connections": metrics["active_connections"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--big-peers", type=int, default=10_000)
    parser.add_argument("--big-rooms", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    need = 2 * max(args.peers, args.big_peers) + 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(need, soft), max(need, hard)))  # root may raise hard
    except (ValueError, OSError):
        if hard < need:
            print(f"note: at most {hard} descriptors may be open; --big-peers {args.big_peers} needs about {need}")

    unlimited = ("--max-peers-per-room", str(max(args.peers, args.big_peers) + 10), "--rate", "1000000",
                 "--max-rooms-per-address", "100000", "--max-rooms-per-user", "100000", "--max-rooms", "100000")
    runs, big = [], []
    for run in range(args.runs):
        with BenchWorld(*unlimited) as world:
            runs.append(one_room(args, world))
            print(f"run {run + 1}: {args.peers} peers registered at {runs[-1]['rate']:,.0f}/s; discover p50 "
                  f"{runs[-1]['discover']:.2f} ms, ping p50 {runs[-1]['ping']:.2f} ms; "
                  f"{runs[-1]['messages']:,.0f} peer_message/s", flush=True)
        if args.big_peers:
            with BenchWorld(*unlimited) as world:
                big.append(many_rooms(args, world))
                print(f"run {run + 1}: {args.big_peers} peers in {args.big_rooms} rooms registered at "
                      f"{big[-1]['rate']:,.0f}/s, held with {big[-1]['per_peer_kb']:.1f} KB each "
                      f"({big[-1]['held_mb']:.0f} MB RSS, {big[-1]['connections']} connections)", flush=True)

    def median(rows: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    print(f"\n{args.peers} peers in one room, median of {args.runs} runs ({args.queries} queries each):")
    print(f"  registration:                         {median(runs, 'rate'):,.0f} peers/s")
    print(f"  discover_peers (workers >= 16000 MB): p50 {median(runs, 'discover'):.2f} ms   "
          f"p99 {median(runs, 'discover_p99'):.2f} ms")
    print(f"  ping/pong reference:                  p50 {median(runs, 'ping'):.2f} ms   "
          f"p99 {median(runs, 'ping_p99'):.2f} ms")
    print(f"  ratio discover/ping p50:              {median(runs, 'discover') / median(runs, 'ping'):.2f}")
    print(f"  peer_message throughput (1 -> 1):     {median(runs, 'messages'):,.0f} messages/s over {args.messages}")
    if big:
        print(f"{args.big_peers} peers over {args.big_rooms} rooms, median of {args.runs} runs:")
        print(f"  registration:                         {median(big, 'rate'):,.0f} peers/s")
        print(f"  server RSS per peer:                  {median(big, 'per_peer_kb'):.1f} KB "
              f"({median(big, 'held_mb'):.0f} MB in all)")


if __name__ == "__main__":
    main()
