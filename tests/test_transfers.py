"""The receiving end of file transfers (protocol.Transfers) without a link: FILE_* messages
and binary chunks are fed in by hand, and what it says to the peer and to the inbox is
collected. No sockets, no aiortc: a direct path is a fake that the test drives."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

import protocol as P

CHUNK = 64 * 1024


class Side:
    """A Transfers receiving into `directory`, with what it sent to the peer (`sent`, as
    Messages) and what it put into the inbox (`events`)."""

    def __init__(self, directory, store=None, start_direct=None, races=None):
        self.sent: list[P.Message] = []
        self.events: list = []
        self.progress: list[tuple[int, int]] = []
        self.t = P.Transfers("peer", directory, store, lambda name, payload: self.sent.append(P.Message(name, payload)),
                             self.events.append, start_direct, races)
        self.t.on_progress = lambda received, total: self.progress.append((received, total))

    def feed(self, kind: str, /, **payload) -> None:
        """One decoded control message, as the link's dispatch table hands it on."""
        handlers = {P.FILE_BEGIN: self.t.begin, P.FILE_CHANNEL: self.t.channel, P.FILE_END: self.t.end,
                    P.FILE_ABORT: self.t.abort}
        handlers[kind](P.Message(kind, payload))

    def begin(self, transfer_id: str, name: str, data: bytes, **extra) -> None:
        self.feed(P.FILE_BEGIN, transfer_id=transfer_id, name=name, size=len(data),
                  sha256=hashlib.sha256(data).hexdigest(), **extra)

    def chunks(self, data: bytes) -> None:
        for i in range(0, len(data), CHUNK):
            self.t.chunk(data[i:i + CHUNK])

    def acks(self) -> list[dict]:
        return [m.payload for m in self.sent if m.name == P.FILE_ACK]


def files(directory: Path) -> list[str]:
    """Every file under `directory`, part files included, relative to it."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


@pytest.fixture
def inbox_dir(tmp_path) -> Path:
    directory = tmp_path / "in"
    directory.mkdir()
    return directory


def test_a_file_in_chunks_lands_under_its_name_and_is_reported(inbox_dir):
    side = Side(inbox_dir)
    data = os.urandom(5 * CHUNK + 123)
    side.begin("t1", "labels.slp", data)
    side.chunks(data[:3 * CHUNK])
    assert files(inbox_dir) == [".labels.slp.t1.part"]  # nothing under the final name before the check
    side.chunks(data[3 * CHUNK:])
    side.feed(P.FILE_END, transfer_id="t1")

    assert files(inbox_dir) == ["labels.slp"]
    assert (inbox_dir / "labels.slp").read_bytes() == data
    [event] = side.events
    assert isinstance(event, P.FileReceived)
    assert (event.path, event.name, event.size, event.sha256, event.via) == (
        inbox_dir / "labels.slp", "labels.slp", len(data), hashlib.sha256(data).hexdigest(), "data channel")
    assert side.acks() == [{"transfer_id": "t1", "ok": True, "saved_as": "labels.slp"}]
    assert side.progress[-1] == (len(data), len(data)) and len(side.progress) == 6

    # The same name again never overwrites the first file.
    other = b"second"
    side.begin("t2", "labels.slp", other)
    side.chunks(other)
    side.feed(P.FILE_END, transfer_id="t2")
    assert side.acks()[-1] == {"transfer_id": "t2", "ok": True, "saved_as": "labels.1.slp"}
    assert (inbox_dir / "labels.slp").read_bytes() == data and (inbox_dir / "labels.1.slp").read_bytes() == other


@pytest.mark.parametrize("announced, sent, why", [
    (b"A" * 1000, b"B" * 1000, "SHA-256 mismatch"),  # same size, other bytes
    (b"A" * 1000, b"A" * 999, "received 999 of 1000 bytes"),  # cut short
])
def test_a_wrong_sha256_or_size_fails_and_keeps_nothing(inbox_dir, announced, sent, why):
    side = Side(inbox_dir)
    side.begin("t1", "model.ckpt", announced)
    side.chunks(sent)
    side.feed(P.FILE_END, transfer_id="t1")

    [event] = side.events
    assert isinstance(event, P.TransferFailed) and why in event.error
    [ack] = side.acks()
    assert ack["ok"] is False and why in ack["error"]
    assert files(inbox_dir) == []  # no final file, no part


def test_more_bytes_than_announced_are_refused_at_once(inbox_dir):
    side = Side(inbox_dir)
    side.begin("t1", "model.ckpt", b"A" * 1000)
    side.chunks(b"A" * 1001)
    [ack] = side.acks()  # the sender hears it before FILE_END and stops sending
    assert ack["ok"] is False and "more bytes than the 1000 announced" in ack["error"]
    side.chunks(b"A" * 10)  # what is still in flight is dropped
    side.feed(P.FILE_END, transfer_id="t1")
    assert len(side.acks()) == 1 and not any(isinstance(e, P.FileReceived) for e in side.events)
    assert files(inbox_dir) == []
    assert not any(m.name == P.LINK_ERROR for m in side.sent)  # the FILE_END was for the transfer it knew


@pytest.mark.parametrize("name, lands_as", [
    ("../../etc/passwd", "passwd"),
    ("/etc/passwd", "passwd"),
    ("..\\..\\windows\\win.ini", "win.ini"),
    ("evil\x00.txt", None),
    ("../..", None),
    ("sub/.bashrc", None),
    ("", None),
])
def test_a_hostile_name_stays_inside_the_receive_directory(tmp_path, inbox_dir, name, lands_as):
    side = Side(inbox_dir)
    data = b"payload"
    side.begin("t1", name, data)
    side.chunks(data)
    side.feed(P.FILE_END, transfer_id="t1")

    assert files(tmp_path) == ([f"in/{lands_as}"] if lands_as else [])  # nothing anywhere else
    if lands_as:
        assert (inbox_dir / lands_as).read_bytes() == data
        assert isinstance(side.events[0], P.FileReceived) and side.acks()[0]["saved_as"] == lands_as
    else:
        [event] = side.events
        assert isinstance(event, P.TransferFailed) and event.error.startswith("refused: refusing file name")
        [ack] = side.acks()  # one verdict, at FILE_BEGIN; the chunks and FILE_END after it are ignored
        assert ack["ok"] is False and ack["error"] == event.error
        assert not any(m.name == P.LINK_ERROR for m in side.sent)


@pytest.mark.parametrize("payload, why", [
    ({"name": "a.bin", "size": -1, "sha256": "0" * 64}, "needs a size"),
    ({"name": "a.bin", "size": 10, "sha256": "not hex"}, "needs a size"),
    ({"name": "a.bin", "sha256": "0" * 64}, "'size'"),
    ({"name": "a.bin", "size": 10, "sha256": "0" * 64, "offset": 5}, "only an upload into the store resumes"),
    ({"name": "a.bin", "size": 10, "sha256": "0" * 64, "store": True}, "keeps no upload store"),
])
def test_a_file_begin_this_side_cannot_take_is_refused(inbox_dir, payload, why):
    side = Side(inbox_dir)
    side.feed(P.FILE_BEGIN, transfer_id="t1", **payload)
    [event] = side.events
    assert isinstance(event, P.TransferFailed) and why in event.error
    assert side.acks() == [{"transfer_id": "t1", "ok": False, "error": event.error}]
    assert files(inbox_dir) == []


def test_no_receive_directory_takes_nothing(tmp_path):
    side = Side(None)
    side.begin("t1", "a.bin", b"data")
    assert "only into its upload store" in side.acks()[0]["error"]
    assert files(tmp_path) == []


def test_file_abort_mid_transfer_keeps_nothing_and_says_why(inbox_dir):
    side = Side(inbox_dir)
    data = os.urandom(4 * CHUNK)
    side.begin("t1", "video.mp4", data)
    side.chunks(data[:2 * CHUNK])
    side.feed(P.FILE_ABORT, transfer_id="t1", reason="the user pressed ctrl-c")

    [event] = side.events
    assert isinstance(event, P.TransferFailed)
    assert event.error == "video.mp4: the sender aborted (the user pressed ctrl-c)"
    assert side.acks() == []  # the sender gave up: it waits for no verdict
    assert files(inbox_dir) == []
    side.chunks(data[2 * CHUNK:])  # stragglers after the abort are dropped
    assert files(inbox_dir) == [] and len(side.events) == 1


class Store:
    """An upload store of one directory: parts by SHA-256, kept when a transfer is cut off."""

    def __init__(self, directory: Path):
        self.directory = directory

    def incoming(self, transfer_id, name, size, sha256, offset) -> P.Incoming:
        return P.Incoming(transfer_id, name, size, sha256, self.directory / f".{sha256}.part",
                          lambda: self.directory / name, offset, resumable=True)


def test_an_aborted_upload_into_the_store_keeps_its_part_and_resumes(tmp_path):
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    side = Side(None, store=Store(store_dir))
    data = os.urandom(4 * CHUNK)
    digest = hashlib.sha256(data).hexdigest()
    side.begin("t1", "big.bin", data, store=True)
    side.chunks(data[:CHUNK])
    side.feed(P.FILE_ABORT, transfer_id="t1", reason="bye")
    assert "kept for resuming" in side.events[-1].error
    assert (store_dir / f".{digest}.part").read_bytes() == data[:CHUNK]

    side.begin("t2", "big.bin", data, store=True, offset=CHUNK)
    side.chunks(data[CHUNK:])
    side.feed(P.FILE_END, transfer_id="t2")
    assert isinstance(side.events[-1], P.FileReceived)
    assert side.acks() == [{"transfer_id": "t2", "ok": True, "saved_as": "big.bin", "path": str(store_dir / "big.bin")}]
    assert files(store_dir) == ["big.bin"] and (store_dir / "big.bin").read_bytes() == data


def test_messages_and_chunks_for_an_unknown_transfer_are_refused(inbox_dir):
    side = Side(inbox_dir)
    side.t.chunk(b"stray bytes")  # no transfer open: dropped
    for name in (P.FILE_END, P.FILE_ABORT, P.FILE_CHANNEL):
        side.feed(name, transfer_id="nope")
    assert [m.payload["message"] for m in side.sent] == [
        "FILE_END for an unknown transfer", "FILE_ABORT for an unknown transfer", "FILE_CHANNEL for an unknown transfer"]
    assert all(m.name == P.LINK_ERROR for m in side.sent)

    # With a transfer open, a message naming another one leaves it alone.
    data = b"x" * 1000
    side.begin("t1", "a.bin", data)
    side.chunks(data)
    side.feed(P.FILE_ABORT, transfer_id="t2", reason="not yours")
    side.feed(P.FILE_END, transfer_id="t1")
    assert side.sent[-2] == P.Message(P.LINK_ERROR, {"message": "FILE_ABORT for an unknown transfer"})
    assert isinstance(side.events[-1], P.FileReceived) and (inbox_dir / "a.bin").read_bytes() == data
    assert side.events == [side.events[-1]]  # the stray chunk and messages made no inbox events


def test_a_second_file_begin_reusing_a_live_transfer_id_supersedes_the_first(inbox_dir):
    side = Side(inbox_dir)
    first, second = os.urandom(3 * CHUNK), os.urandom(2 * CHUNK)
    side.begin("t1", "a.bin", first)
    side.chunks(first[:CHUNK])
    side.begin("t1", "a.bin", second)
    [superseded] = side.events
    assert isinstance(superseded, P.TransferFailed) and superseded.error == "a.bin: superseded by a new transfer"
    side.chunks(second)
    side.feed(P.FILE_END, transfer_id="t1")

    assert isinstance(side.events[-1], P.FileReceived)
    assert files(inbox_dir) == ["a.bin"] and (inbox_dir / "a.bin").read_bytes() == second
    assert side.acks() == [{"transfer_id": "t1", "ok": True, "saved_as": "a.bin"}]


def test_a_link_lost_mid_transfer_fails_the_file(inbox_dir):
    side = Side(inbox_dir)
    data = os.urandom(2 * CHUNK)
    side.begin("t1", "a.bin", data)
    side.chunks(data[:CHUNK])
    side.t.lost("peer x stopped answering")
    [event] = side.events
    assert event == P.TransferFailed("a.bin", f"a.bin: link lost after {CHUNK} of {2 * CHUNK} bytes "
                                              "(peer x stopped answering)")
    assert files(inbox_dir) == []
    side.t.lost("again")  # nothing left to fail
    assert len(side.events) == 1


# -- the direct path's bookkeeping, with a fake direct receiver ---------------------------


class FakeDirect:
    """Stands for a _DirectReceiver: the test writes into `incoming` as its thread would."""

    def __init__(self, incoming, offer, on_data, on_failed):
        self.incoming, self.offer, self.on_data, self.on_failed = incoming, offer, on_data, on_failed
        self.hints = [["10.0.0.1", 4000]]
        self.started = self.stopped = False

    def start(self):
        self.started = True

    def stop(self):
        self.stopped = True

    def arrive(self, data: bytes) -> None:
        self.incoming.via = "direct TCP 10.0.0.1"
        self.incoming.write(data)
        self.on_data()


@pytest.fixture
def direct_side(inbox_dir, monkeypatch):
    monkeypatch.delenv(P.ENV_NO_DIRECT, raising=False)
    made: list[FakeDirect] = []

    def start_direct(*args):
        made.append(FakeDirect(*args))
        return made[-1]

    return Side(inbox_dir, start_direct=start_direct), made


def test_a_direct_path_that_breaks_goes_on_over_the_channel_from_the_byte_it_reached(direct_side, inbox_dir):
    side, made = direct_side
    data = os.urandom(4 * CHUNK)
    side.begin("t1", "video.mp4", data, direct={"key": "k", "token": "t", "hints": []})
    [direct] = made
    assert direct.started and side.sent == [P.Message(P.FILE_DIRECT, {"transfer_id": "t1", "hints": [["10.0.0.1", 4000]]})]
    direct.arrive(data[:CHUNK])
    assert side.progress == [(CHUNK, len(data))]

    side.feed(P.FILE_CHANNEL, transfer_id="t1")
    assert direct.stopped  # before the receive thread writes again
    assert side.sent[-1] == P.Message(P.FILE_OFFSET, {"transfer_id": "t1", "offset": CHUNK})
    side.chunks(data[CHUNK:])
    side.feed(P.FILE_END, transfer_id="t1")
    [event] = side.events
    assert isinstance(event, P.FileReceived)
    assert event.via == f"direct TCP 10.0.0.1, then data channel from byte {CHUNK}"
    assert (inbox_dir / "video.mp4").read_bytes() == data


def test_a_direct_stream_that_fails_its_checks_fails_the_transfer(direct_side, inbox_dir):
    side, made = direct_side
    data = os.urandom(2 * CHUNK)
    side.begin("t1", "labels.slp", data, direct={})
    made[0].arrive(data[:CHUNK])
    made[0].on_failed("labels.slp: a frame on the direct connection failed authentication")
    [event] = side.events
    assert isinstance(event, P.TransferFailed) and "failed authentication" in event.error
    assert side.acks()[-1]["ok"] is False
    side.feed(P.FILE_END, transfer_id="t1")  # the sender's FILE_END after its refusal changes nothing
    assert made[0].stopped and len(side.events) == 1 and len(side.acks()) == 1
    assert files(inbox_dir) == []


def test_direct_offers_this_side_cannot_take_are_answered_off(direct_side, inbox_dir, monkeypatch):
    side, made = direct_side

    def off_for(**kw) -> str:
        side.begin(f"t{len(side.sent)}", "a.bin", b"x", **kw)
        return side.sent[-1].payload["off"]

    assert off_for(direct="not an object") == "the direct offer must be an object"
    side.t._races = P.TokenBucket(0, 0)
    assert off_for(direct={}).startswith("too many direct transfers on this link")
    monkeypatch.setenv(P.ENV_NO_DIRECT, "1")
    assert off_for(direct={}) == "direct transfers are turned off on this side"
    assert made == []
    no_direct = Side(inbox_dir)  # a Transfers given no way to open a direct path
    no_direct.begin("t1", "b.bin", b"x", direct={})
    assert no_direct.sent[-1].payload["off"] == "direct transfers are turned off on this side"


def test_a_direct_offer_that_cannot_be_set_up_says_why(inbox_dir, monkeypatch):
    monkeypatch.delenv(P.ENV_NO_DIRECT, raising=False)

    def start_direct(*args):
        raise P.TransferError("the direct offer's key must be 64 hex digits")

    side = Side(inbox_dir, start_direct=start_direct)
    data = b"still arrives"
    side.begin("t1", "a.bin", data, direct={"key": "short"})
    assert side.sent == [P.Message(P.FILE_DIRECT, {"transfer_id": "t1",
                                                   "off": "the direct offer's key must be 64 hex digits"})]
    side.chunks(data)
    side.feed(P.FILE_END, transfer_id="t1")
    assert isinstance(side.events[-1], P.FileReceived)


# -- a Link's receive thread with no connection under it ----------------------------------


class NoConnection:
    """Stands for the RTCPeerConnection: frames are put where the data channel puts them."""

    async def close(self):
        pass


@pytest.fixture
def bare_link(inbox_dir):
    link = P.Link("peer", NoConnection(), inbox_dir)
    yield link
    link.close()


def test_a_link_hands_file_messages_to_its_transfers_and_the_rest_to_its_inbox(bare_link, inbox_dir):
    data = b"through the link"
    bare_link._raw.put(P.encode(P.FILE_BEGIN, {"transfer_id": "t1", "name": "a.bin", "size": len(data),
                                               "sha256": hashlib.sha256(data).hexdigest()}))
    bare_link._raw.put(data)
    bare_link._raw.put(P.encode(P.FILE_END, {"transfer_id": "t1"}))
    bare_link._raw.put(P.encode(P.LINK_PING, {"seq": 1}))
    event = bare_link.expect(lambda i: isinstance(i, P.FileReceived), 10, "file")
    assert event.path == inbox_dir / "a.bin" and event.path.read_bytes() == data
    assert bare_link.recv(timeout=10) == P.Message(P.LINK_PING, {"seq": 1})
    assert bare_link.recv(timeout=0.01) is None


def test_a_link_closed_by_an_exception_raises_link_closed_from_it(bare_link):
    bare_link._raw.put(12345)  # neither text nor bytes: the receive thread fails on it
    with pytest.raises(P.LinkClosed, match="the receive thread failed") as raised:
        bare_link.expect(lambda i: True, None, "anything")
    assert isinstance(raised.value.__cause__, AttributeError)
    with pytest.raises(P.LinkClosed) as again:
        bare_link.send(P.LINK_PING, {"seq": 1})
    assert isinstance(again.value.__cause__, AttributeError)


def test_a_link_closed_in_words_raises_link_closed_alone(bare_link):
    bare_link._mark_closed("the peer closed the link")
    with pytest.raises(P.LinkClosed, match="the peer closed the link") as raised:
        bare_link.recv(timeout=10)
    assert raised.value.__cause__ is None


def test_wake_returns_a_waiting_recv_at_once_and_expect_waits_on(bare_link):
    woken = []
    reader = threading.Thread(target=lambda: woken.append(bare_link.recv()))  # no timeout: only a wake ends it
    reader.start()
    bare_link.wake()
    reader.join(10)
    assert not reader.is_alive() and woken == [None]
    bare_link.wake()  # an expect without a timeout is not a stop check: it waits on for what it wants
    bare_link._raw.put(P.encode(P.LINK_PING, {"seq": 2}))
    assert bare_link.expect(lambda m: m.name == P.LINK_PING, None, "ping").payload == {"seq": 2}
