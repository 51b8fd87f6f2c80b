"""A small internet in Linux network namespaces: NAT routers, a laptop, a worker, coturn.

    internet  100.64.0.1   signaling server and coturn (STUN + TURN on 3478, UDP and TCP;
       |      100.64.0.2   coturn's second address, for telling NAT kinds apart)
       |      default route into a dummy interface: nothing leaves the machine, and a
       |      packet to an address nobody has vanishes as it would on the internet
       +-- 100.64.1.2  worker's router --- LAN --- worker
       +-- 100.64.2.2  laptop's router --- LAN --- laptop

Topologies (TOPOLOGIES):
- routed:      the worker has a routed address (a lab box on a campus network, no NAT, no
               inbound filter); the laptop sits behind a home router.
- home:        both behind home routers: MASQUERADE, which keeps the source port.
- symmetric:   both behind NATs that pick a new port for every destination
               (MASQUERADE --random-fully): hole punching cannot work, only TURN can.
- udp-blocked: the worker behind a home router; the laptop's network lets no UDP out
               (a guest or corporate network), so only TURN over TCP reaches it.

Every router drops unsolicited packets from the internet to itself and to its LAN, as a
home router does. (One that accepts them to itself breaks hole punching: an early check
from the far side gets a conntrack entry that the router's own outbound mapping then
clashes with.)

Needs root, `ip` (iproute2), `iptables`, `conntrack` and coturn's `turnserver`. Run by
hand to look around (it waits until Ctrl-C, then tears everything down):

    sudo python tests/netlab.py symmetric
    sudo ip netns exec <printed laptop namespace> ping 100.64.0.1
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SERVER_IP = "100.64.0.1"
# coturn's second address: with two it names the other in STUN answers (RFC 5780's
# OTHER-ADDRESS), which is how `client.py doctor` tells a NAT that keeps its port from
# one that picks a new one per destination.
SECOND_IP = "100.64.0.2"
TURN_PORT = 3478
# Private ranges the relay never sends to: coturn closes a whole allocation when one send
# fails locally (a peer's private host candidate with no route), so a real deployment
# denies them too (see the README's TURN guide).
# (The lab's own internet is 100.64/10, which a real TURN server denies as well.)
DENIED_PEERS = ("0.0.0.0-0.255.255.255", "10.0.0.0-10.255.255.255", "169.254.0.0-169.254.255.255",
                "172.16.0.0-172.31.255.255", "192.168.0.0-192.168.255.255")
TOOLS = ("ip", "iptables", "conntrack", "turnserver")


@dataclass(frozen=True)
class Side:
    """One site: its router's NAT kind ("none", "home", "symmetric") and whether its
    network lets UDP out."""

    nat: str
    udp: bool = True


TOPOLOGIES: dict[str, tuple[Side, Side]] = {  # (worker's site, laptop's site)
    "routed": (Side("none"), Side("home")),
    "home": (Side("home"), Side("home")),
    "symmetric": (Side("symmetric"), Side("symmetric")),
    "udp-blocked": (Side("home"), Side("home", udp=False)),
}


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def sh(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    command = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {result.stderr.strip() or result.stdout.strip()}")
    return result


class Lab:
    """The namespaces of one topology, and a coturn in the internet. `up()` builds it,
    `down()` removes every namespace and process it made; use it as a context manager.

    Hosts are named "internet", "worker", "laptop", "worker-router" and "laptop-router";
    `ns(host)` is the namespace to run a process of that host in (`wrap(host, argv)`).
    `turn` picks coturn's credentials: "static" (a user and password) or "secret" (TURN
    REST: credentials minted from a shared secret, which the signaling server then hands out).
    """

    def __init__(self, topology: str, workdir: Path, turn: str = "static"):
        self.topology = topology
        self.worker_side, self.laptop_side = TOPOLOGIES[topology]
        self.workdir = workdir
        self.turn = turn
        self.prefix = "sr" + secrets.token_hex(3)
        self.turn_user, self.turn_password = "lab", secrets.token_hex(8)
        self.turn_secret = secrets.token_hex(16)
        self._namespaces: list[str] = []
        self._moves: dict[str, int] = {}  # how often each site got a new address
        self._coturn: subprocess.Popen | None = None

    # -- names ------------------------------------------------------------------------

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def wrap(self, host: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host), *argv]

    @property
    def stun_url(self) -> str:
        return f"stun:{SERVER_IP}:{TURN_PORT}"

    def turn_urls(self) -> list[str]:
        """TURN over UDP, then over TCP: the order a lab's signaling server would list them."""
        return [f"turn:{SERVER_IP}:{TURN_PORT}", f"turn:{SERVER_IP}:{TURN_PORT}?transport=tcp"]

    def ice_server_options(self) -> list[str]:
        """signaling.py options handing out this lab's STUN and TURN servers."""
        options = ["--ice-server", self.stun_url]
        if self.turn == "secret":
            options += ["--turn-secret", self.turn_secret]
            for url in self.turn_urls():
                options += ["--turn-url", url]
        else:
            for url in self.turn_urls():
                scheme, _, address = url.partition(":")
                options += ["--ice-server", f"{scheme}:{self.turn_user}:{self.turn_password}@{address}"]
        return options

    # -- building ---------------------------------------------------------------------

    def __enter__(self) -> "Lab":
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for host in ("internet", "void", "worker-router", "laptop-router", "worker", "laptop"):
            sh("ip", "netns", "add", self.ns(host))
            self._namespaces.append(self.ns(host))
            sh("ip", "link", "set", "lo", "up", ns=self.ns(host))
        internet, void = self.ns("internet"), self.ns("void")
        sh("ip", "addr", "add", f"{SERVER_IP}/32", "dev", "lo", ns=internet)
        sh("ip", "addr", "add", f"{SECOND_IP}/32", "dev", "lo", ns=internet)
        # The void: a neighbour that takes every packet the internet has no route for and
        # never answers (no forwarding, no address of its own to reply from), so it
        # vanishes as it would on the internet.
        sh("ip", "link", "add", "name", "void", "netns", internet, "type", "veth", "peer", "name", "eth0",
           "netns", void)
        sh("ip", "addr", "add", "100.64.255.1/30", "dev", "void", ns=internet)
        sh("ip", "link", "set", "void", "up", ns=internet)
        sh("ip", "link", "set", "eth0", "up", ns=void)
        sh("iptables", "-A", "INPUT", "-j", "DROP", ns=void)
        sh("ip", "route", "add", "default", "via", "100.64.255.2", "dev", "void", ns=internet)
        # Answer ARP for the void's gateway address without owning it: the next hop exists
        # and takes the packets, and nothing comes back.
        sh("ip", "neigh", "add", "100.64.255.2", "lladdr", "02:00:00:00:00:01", "dev", "void", ns=internet)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=internet)
        self._site("worker", 1, self.worker_side)
        self._site("laptop", 2, self.laptop_side)
        self._start_coturn()

    def _site(self, host: str, n: int, side: Side) -> None:
        """A router between the internet (100.64.n.0/24) and a LAN, and the host on it."""
        router, internet, lan_host = self.ns(f"{host}-router"), self.ns("internet"), self.ns(host)
        wan, router_wan = f"100.64.{n}.1", f"100.64.{n}.2"
        # A routed site gets addresses the internet can reach; a NATed one a private LAN.
        lan = f"100.64.{10 + n}" if side.nat == "none" else f"10.0.{n}"
        sh("ip", "link", "add", "name", "wan", "netns", router, "type", "veth", "peer", "name", f"site{n}",
           "netns", internet)
        sh("ip", "link", "add", "name", "lan", "netns", router, "type", "veth", "peer", "name", "eth0",
           "netns", lan_host)
        for ns, dev, address in ((internet, f"site{n}", wan), (router, "wan", router_wan),
                                 (router, "lan", f"{lan}.1"), (lan_host, "eth0", f"{lan}.2")):
            sh("ip", "addr", "add", f"{address}/24", "dev", dev, ns=ns)
            sh("ip", "link", "set", dev, "up", ns=ns)
        sh("ip", "route", "add", "default", "via", wan, ns=router)
        sh("ip", "route", "add", "default", "via", f"{lan}.1", ns=lan_host)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=router)
        if side.nat == "none":
            sh("ip", "route", "add", f"{lan}.0/24", "via", router_wan, ns=internet)
        rules = [
            # Nothing unsolicited from the internet reaches the router itself.
            ["-A", "INPUT", "-i", "wan", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
            ["-A", "INPUT", "-i", "wan", "-j", "DROP"],
        ]
        if not side.udp:
            rules.append(["-A", "FORWARD", "-i", "lan", "-p", "udp", "-j", "DROP"])
        if side.nat != "none":
            rules += [
                ["-A", "FORWARD", "-i", "lan", "-j", "ACCEPT"],
                ["-A", "FORWARD", "-i", "wan", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED",
                 "-j", "ACCEPT"],
                ["-A", "FORWARD", "-i", "wan", "-j", "DROP"],
                ["-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE",
                 *(["--random-fully"] if side.nat == "symmetric" else [])],
            ]
        for rule in rules:
            sh("iptables", *rule, ns=router)

    def _start_coturn(self) -> None:
        log = self.workdir / "coturn.log"
        credentials = (["--use-auth-secret", f"--static-auth-secret={self.turn_secret}"] if self.turn == "secret"
                       else ["--lt-cred-mech", "--user", f"{self.turn_user}:{self.turn_password}"])
        argv = ["turnserver", "-n", "--listening-port", str(TURN_PORT), "--listening-ip", SERVER_IP,
                "--listening-ip", SECOND_IP, "--relay-ip", SERVER_IP, "--realm", "lab",
                "--no-tls", "--no-dtls", "--no-cli", "--no-tcp-relay", "--no-multicast-peers",
                "--log-file", str(log), "--simple-log", "--pidfile", str(self.workdir / "coturn.pid"),
                "--userdb", str(self.workdir / "turndb"),
                *[f"--denied-peer-ip={r}" for r in DENIED_PEERS], *credentials]
        self._coturn = subprocess.Popen(self.wrap("internet", argv), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        wanted = {(transport, f"{ip}:{TURN_PORT}") for transport in ("udp", "tcp") for ip in (SERVER_IP, SECOND_IP)}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # listening on both addresses and transports before anyone asks
            if self._coturn.poll() is not None:
                said = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"coturn exited ({self._coturn.returncode}): {said}")
            listening = {(line.split()[0], line.split()[4]) for line in
                         sh("ss", "-Hlnut", ns=self.ns("internet")).stdout.splitlines() if line.strip()}
            if wanted <= listening:
                return
            time.sleep(0.1)
        raise RuntimeError("coturn did not start listening within 10 s")

    # -- while it runs ----------------------------------------------------------------

    def new_address(self, host: str) -> str:
        """The site moves to a new public address under its connections (a new Wi-Fi, a
        router that reconnected): the router's WAN address changes and every NAT mapping
        is forgotten, so no packet of an old flow reaches either end any more. Returns the
        new address."""
        side = self.worker_side if host == "worker" else self.laptop_side
        if side.nat == "none":
            raise ValueError(f"{host} has a routed address; only a NATed site moves")
        router, n = self.ns(f"{host}-router"), 1 if host == "worker" else 2
        self._moves[host] = self._moves.get(host, 0) + 1
        old, new = f"100.64.{n}.{1 + self._moves[host]}", f"100.64.{n}.{2 + self._moves[host]}"
        sh("ip", "addr", "del", f"{old}/24", "dev", "wan", ns=router)
        sh("ip", "addr", "add", f"{new}/24", "dev", "wan", ns=router)
        sh("ip", "route", "replace", "default", "via", f"100.64.{n}.1", ns=router)
        sh("conntrack", "-F", ns=router, check=False)  # exits 1 on "0 flow entries" with some versions
        return new

    def down(self) -> None:
        if self._coturn is not None and self._coturn.poll() is None:
            self._coturn.terminate()
            try:
                self._coturn.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._coturn.kill()
                self._coturn.wait()
        for ns in reversed(self._namespaces):
            # Anything still running in a namespace would keep it alive: end it first.
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", ns, check=False)
        self._namespaces.clear()


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in TOPOLOGIES:
        print(f"usage: sudo python tests/netlab.py {{{','.join(TOPOLOGIES)}}}", file=sys.stderr)
        return 2
    if missing_tools():
        print(f"missing: {', '.join(missing_tools())} (apt-get install iproute2 iptables conntrack coturn)",
              file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="netlab-"))
    with Lab(argv[0], workdir) as lab:
        print(f"{argv[0]}: namespaces {lab.prefix}-{{internet,worker-router,laptop-router,worker,laptop}}")
        print(f"server {SERVER_IP}; signaling options: {' '.join(lab.ice_server_options())}")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
