"""Loaded (through PYTHONPATH) by every sleap-rtc 0.0.7 process the tests start.

Our own processes offer only SLEAP_RTC_ICE_HOSTS as host candidates; upstream ones get
the same here: host candidates on 127.0.0.1 only, and no STUN or TURN server but one on
127.0.0.1 (aiortc's default is Google's STUN server, which the Python API always uses).
It says on stderr that it is in force, and every server it takes away, so that tests can
see both.
"""

import sys
from urllib.parse import urlsplit


def _loopback_only() -> None:
    import aioice.ice
    from aiortc import rtcicetransport

    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]
    gatherer_init = rtcicetransport.RTCIceGatherer.__init__

    def on_loopback(server) -> bool:
        urls = [server.urls] if isinstance(server.urls, str) else server.urls
        return all(urlsplit("//" + url.split(":", 1)[1]).hostname == "127.0.0.1" for url in urls)

    def loopback_gatherer(self, iceServers=None, *args, **kwargs):
        servers = [s for s in (iceServers or []) if on_loopback(s)]
        dropped = [s.urls for s in (iceServers or []) if not on_loopback(s)]
        if iceServers is None or dropped:
            print(f"sitecustomize: ICE servers {dropped or 'default (Google STUN)'} not used", file=sys.stderr)
        gatherer_init(self, servers, *args, **kwargs)

    rtcicetransport.RTCIceGatherer.__init__ = loopback_gatherer
    print("sitecustomize: WebRTC host candidates on 127.0.0.1 only", file=sys.stderr)


_loopback_only()
