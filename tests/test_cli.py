"""The command line as people type it: common options before or after the command, room
tokens a shell and argparse accept, --json for scripts, rooms kept and listed, and a
lost link that is not retried forever."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time

import pytest

import client
import protocol as P
from conftest import PY, ROOT, job_id_of


def _bare_env(room, home) -> dict:
    """The child environment with no SLEAP_RTC_SERVER, _ROOM, _TOKEN or _HTTP: only what the
    command line says counts."""
    home.mkdir(exist_ok=True)
    return {**{k: v for k, v in room.env.items() if k not in (P.ENV_SERVER, P.ENV_ROOM, P.ENV_TOKEN, P.ENV_HTTP)},
            "HOME": str(home)}


def test_common_options_go_before_or_after_the_command(room, tmp_path):
    env = _bare_env(room, tmp_path / "home")

    def client(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([PY, str(ROOT / "client.py"), *args], capture_output=True, text=True, timeout=120,
                              env=env, cwd=tmp_path, stdin=subprocess.DEVNULL)

    server = ["--server", room.ws_url, "--http", room.http_url]
    inside = ["--room", room.room_id, "--token", room.token]
    made = client(*server, "rooms", "create")
    assert made.returncode == 0, made.stderr
    _, first = room.start_worker()
    _, second = room.start_worker()
    for args in ([*server, *inside, "workers"], ["workers", *server, *inside],
                 [*server, "--room", room.room_id, "workers", "--token", room.token]):
        listed = client(*args)
        assert listed.returncode == 0 and first in listed.stdout and second in listed.stdout, (args, listed.stderr)
    # --worker-id, --no-direct and --debug on either side, each with an effect to see.
    for worker, args in ((second, [*server, *inside, "--worker-id", second, "--no-direct", "--debug", "upload"]),
                         (first, [*server, "upload", *inside, "--worker-id", first, "--no-direct", "--debug"])):
        upload = tmp_path / f"for-{worker}.bin"
        upload.write_bytes(os.urandom(1000))
        sent = client(*args, str(upload))
        assert sent.returncode == 0, (args, sent.stderr)
        assert f"uploaded {upload.name} to {worker}:" in sent.stdout
        assert "over data channel" in sent.stderr and "direct" not in sent.stderr.split("over data channel")[1][:40]
        assert " DEBUG " in sent.stderr  # the transport's debug log
    # Given on both sides, the later one wins, as with any repeated option.
    later = client("--server", "ws://127.0.0.1:1", "--http", room.http_url, "workers", *inside,
                   "--server", room.ws_url)
    assert later.returncode == 0, later.stderr
    unreachable = client("--server", "ws://127.0.0.1:1", "--http", room.http_url, *inside, "workers")
    assert unreachable.returncode == 1 and "ws://127.0.0.1:1" in unreachable.stderr
    missing = client(*server, *inside, "--worker-id", "nobody-here", "ping")
    assert missing.returncode == 1 and "worker nobody-here is not in room" in missing.stderr
    # A token alone names no room, even with a default room kept: it is an error that says so.
    alone = client(*server, "--token", room.token, "workers")
    assert alone.returncode == 1 and "say which room" in alone.stderr, alone.stdout + alone.stderr


def test_new_tokens_and_keys_start_with_a_letter_or_digit():
    tokens = [P.new_secret(24) for _ in range(3000)]  # about 90 would start with '-' otherwise
    assert all(t[0].isalnum() for t in tokens)
    assert len(set(tokens)) == len(tokens) and all(len(t) == 32 for t in tokens)


def test_a_token_that_starts_with_a_dash_is_taken_after_an_equals_sign(room):
    for program, args in (("client.py", ["workers", "--room", room.room_id, "--token", "-Xy12"]),
                          ("worker.py", ["--server", room.ws_url, "--room", room.room_id, "--token", "-Xy12"])):
        result = subprocess.run([PY, str(ROOT / program), *args], capture_output=True, text=True, timeout=60,
                                env=room.env, stdin=subprocess.DEVNULL)
        assert result.returncode == 2
        assert "argument --token: expected one argument" in result.stderr
        assert "--token=-abc" in result.stderr, result.stderr
    # With '=', the old token reaches the server, which judges it (this one is wrong).
    taken = room.client("workers", "--room", room.room_id, "--token=-Xy12")
    assert taken.returncode == 1 and "INVALID_TOKEN" in taken.stderr, taken.stderr


def test_json_output_for_scripts(room, tmp_path):
    """`workers`, `jobs`, `status JOB` and `files ls` with --json: one JSON document on
    stdout, with the field names the README lists."""
    worker_dir = tmp_path / "w"
    _, worker_id = room.start_worker("--allow-command", "seq=/usr/bin/seq", working_dir=worker_dir)
    done = room.client("run", "--non-interactive", "seq", "--", "1", "3")
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = job_id_of(done.stdout)
    upload = tmp_path / "notes.txt"
    upload.write_text("some bytes\n")
    assert room.client("upload", str(upload)).returncode == 0

    def document(*args: str) -> dict:
        result = room.client(*args, "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)

    workers = document("workers")
    assert workers["room"] == room.room_id
    [worker] = workers["workers"]
    assert set(worker) == {"peer_id", "name", "status", "gpu_model", "gpu_memory_mb", "queue_length", "executor",
                           "job_types", "refusing"}
    assert worker["peer_id"] == worker_id and worker["status"] == P.AVAILABLE and "train" in worker["job_types"]

    jobs = document("jobs")
    assert jobs["unanswered"] == [] and jobs["errors"] == {}
    [job] = [j for j in jobs["jobs"] if j["job_id"] == job_id]
    assert job == {**job, "worker": worker_id, "type": P.COMMAND, "state": P.COMPLETED}
    assert set(job) == {"job_id", "type", "state", "submitted_at", "duration_s", "worker"}

    status = document("status", job_id)
    assert status["job_id"] == job_id and status["worker"] == worker_id and status["state"] == P.COMPLETED
    assert status["exit_code"] == 0 and status["error"] is None and status["log_path"].endswith("job.log")
    assert {"queue_position", "started_at", "finished_at", "outputs", "stderr_tail", "slurm"} <= set(status)

    store = document("files", "ls")
    assert store["worker"] == worker_id
    [held] = store["files"]
    assert held["sha256"] == hashlib.sha256(upload.read_bytes()).hexdigest() and held["size"] == 11
    assert held["names"] == ["notes.txt"] and held["partial"] is False

    refused = room.client("files", "rm", "abcdef", "--json")
    assert refused.returncode == 1 and "--json goes with files ls" in refused.stderr


def test_a_link_that_opens_and_dies_at_once_does_not_loop_forever(monkeypatch):
    """with_link_again's patience restarts only after a link that lasted; one that dies
    as soon as it opens uses it up, and the loss is raised."""
    clock = {"now": 1000.0}
    monkeypatch.setattr(time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(time, "sleep", lambda seconds: clock.__setitem__("now", clock["now"] + seconds))

    class Closed:
        closed = True

        def close(self, timeout=None):
            pass

    opened = []
    monkeypatch.setattr(client, "connect", lambda args: Closed())
    monkeypatch.setattr(P, "open_link", lambda signaling, worker, receive_dir: opened.append(1) or Closed())

    def work(link):
        clock["now"] += 0.5  # it runs a moment, then the link is gone
        raise P.LinkClosed("the peer vanished")

    with pytest.raises(P.LinkClosed, match="vanished"):
        client.with_link_again(None, "worker-1", work, ".", (Closed(), Closed()))
    assert 5 < len(opened) < 100  # it kept trying, with backoff, for the patience, not forever


def test_rooms_people_can_find_again(room, tmp_path):
    """`rooms create` and `rooms join` keep the room's token for this server (what
    room.env holds); `rooms list` shows them with the workers in each now, and no other
    user's rooms; `--room R` alone is enough afterwards."""
    server = ["--server", room.ws_url, "--http", room.http_url]
    bare = {k: v for k, v in room.env.items() if not k.startswith("SLEAP_RTC_") or k == "SLEAP_RTC_ICE_HOSTS"}

    def client(*args: str, home: str = "alice") -> subprocess.CompletedProcess:
        (tmp_path / home).mkdir(exist_ok=True)
        return subprocess.run([PY, str(ROOT / "client.py"), *args], capture_output=True, text=True, timeout=60,
                              env={**bare, "HOME": str(tmp_path / home)}, cwd=tmp_path, stdin=subprocess.DEVNULL)

    made = client("rooms", "create", *server)
    assert made.returncode == 0, made.stderr
    own_room = re.search(r"room:\s*(\S+)", made.stdout).group(1)
    _, worker_id = room.start_worker()  # in the fixture's room, which alice joins next
    wrong = client("rooms", "join", room.room_id, "--token", "not-the-token", *server)
    assert wrong.returncode == 1 and "joining room" in wrong.stderr
    joined = client("rooms", "join", room.room_id, "--token", room.token, *server)
    assert joined.returncode == 0, joined.stderr
    assert "kept" in joined.stdout

    # The joined room is the default now; another is named by --room alone.
    workers = client("workers", *server)
    assert workers.returncode == 0 and worker_id in workers.stdout, workers.stdout + workers.stderr
    empty = client("workers", "--room", own_room, *server)
    assert empty.returncode == 1 and f"no workers in room {own_room}" in empty.stdout
    # A room named with another room's token in the environment takes the token kept for it.
    bare["SLEAP_RTC_ROOM"], bare["SLEAP_RTC_TOKEN"] = room.room_id, room.token
    named = client("workers", "--room", own_room, *server)
    assert named.returncode == 1 and f"no workers in room {own_room}" in named.stdout, named.stderr
    del bare["SLEAP_RTC_ROOM"], bare["SLEAP_RTC_TOKEN"]

    listed = client("rooms", "list", *server, "--json")
    assert listed.returncode == 0, listed.stderr
    rooms = {r["room_id"]: r for r in json.loads(listed.stdout)["rooms"]}
    assert set(rooms) == {own_room, room.room_id}
    assert rooms[own_room]["created"] and rooms[own_room]["workers"] == [] and rooms[own_room]["token_kept"]
    assert not rooms[room.room_id]["created"] and rooms[room.room_id]["default"]
    assert [w["peer_id"] for w in rooms[room.room_id]["workers"]] == [worker_id]
    table = client("rooms", "list", *server)
    assert re.search(rf"{room.room_id} \*\s+joined\s+yes\s+{worker_id}", table.stdout), table.stdout
    credentials = (tmp_path / "alice" / ".sleap-rtc" / "credentials.json")
    assert oct(credentials.stat().st_mode & 0o777) == "0o600" and room.token in credentials.read_text()
    assert room.token not in listed.stdout and room.token not in table.stdout  # listed, never shown

    # Another user sees neither room, and the server never says a token.
    other = client("rooms", "list", *server, home="bob")
    assert other.returncode == 0 and "no rooms of yours" in other.stdout, other.stdout + other.stderr
    status, body = P.http_call("POST", room.http_url + "/my-rooms", {})
    assert status == 401 and "Bearer" in body["error"]

    deleted = client("rooms", "delete", own_room, *server)
    assert deleted.returncode == 0, deleted.stderr
    assert own_room not in client("rooms", "list", *server).stdout
    assert os.path.exists(credentials)


def test_the_loss_plot_counts_whole_epochs(tmp_path):
    from matplotlib.figure import Figure

    drawn = []

    class Kept(Figure):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            drawn.append(self)

    epochs = [{"epoch": e, "loss": 1.0 / (e + 1), "val_loss": None, "model": "m"} for e in range(3)]
    plot = client.LossPlot(tmp_path / "loss.png", "job j", epochs)
    plot._draw(Kept, epochs)
    ticks = drawn[0].axes[0].get_xticks()
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
