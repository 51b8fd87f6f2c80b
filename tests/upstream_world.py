"""What tests of unmodified sleap-rtc 0.0.7 programs need: their command, an environment
pointing them at our server with loopback-only WebRTC, and a STUN server on loopback for
our signaling server to hand out."""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
SLEAP_RTC = Path(sys.executable).parent / "sleap-rtc"  # requirements-dev.txt installs sleap-rtc==0.0.7


def upstream_env(world, home: Path | None = None) -> dict:
    """The environment of an upstream process: our server's two URLs, a HOME of its own
    (its credentials file) and sitecustomize.py, which keeps its WebRTC on loopback."""
    env = {**world.env, "SLEAP_RTC_SIGNALING_WS": world.ws_url, "SLEAP_RTC_SIGNALING_HTTP": world.http_url,
           "PYTHONPATH": str(HERE / "upstream_site"), "NO_COLOR": "1", "COLUMNS": "200"}
    if home is not None:
        env["HOME"] = str(home)
    return env


class LoopbackStun:
    """A STUN server on 127.0.0.1 that answers binding requests, in thread "test-stun"."""

    def __init__(self):
        from aioice import stun

        self._stun = stun
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.requests = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-stun", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"stun:127.0.0.1:{self.port}"

    def _serve(self) -> None:
        stun = self._stun
        while not self._stop.is_set():
            try:
                data, address = self.sock.recvfrom(2048)
                request = stun.parse_message(data)
            except (socket.timeout, ValueError):
                continue
            if request.message_method != stun.Method.BINDING or request.message_class != stun.Class.REQUEST:
                continue
            self.requests += 1
            response = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.RESPONSE,
                                    transaction_id=request.transaction_id)
            response.attributes["XOR-MAPPED-ADDRESS"] = address
            self.sock.sendto(bytes(response), address)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()
