"""The command line as people type it: common options before or after the command, and
room tokens a shell and argparse accept."""

from __future__ import annotations

import re
import subprocess

import protocol as P
from conftest import PY, ROOT


def test_common_options_go_before_or_after_the_command(room):
    before = room.client("--server", room.ws_url, "--http", room.http_url, "rooms", "create")
    assert before.returncode == 0, before.stderr
    room_id = re.search(r"room:\s*(\S+)", before.stdout).group(1)
    token = re.search(r"token:\s*(\S+)", before.stdout).group(1)
    _, worker_id = room.start_worker()

    for args in (["--room", room.room_id, "--token", room.token, "workers"],
                 ["workers", "--room", room.room_id, "--token", room.token],
                 ["--room", room.room_id, "workers", "--token", room.token],
                 ["--worker-id", worker_id, "--no-direct", "ping", "--count", "1"],
                 ["ping", "--count", "1", "--worker-id", worker_id, "--debug"]):
        result = room.client(*args)
        assert result.returncode == 0, (args, result.stdout + result.stderr)
        assert worker_id in result.stdout, args
    # What comes before the command is used, not the environment's value: an empty room.
    empty = room.client("--room", room_id, "--token", token, "workers")
    assert empty.returncode == 1 and f"no workers in room {room_id}" in empty.stdout, empty.stdout + empty.stderr
    unreachable = room.client("--server", "ws://127.0.0.1:1", "workers")
    assert unreachable.returncode == 1 and "ws://127.0.0.1:1" in unreachable.stderr
    # Given on both sides, the later one wins, as with any repeated option.
    later = room.client("--server", "ws://127.0.0.1:1", "workers", "--server", room.ws_url)
    assert later.returncode == 0, later.stderr
    missing = room.client("--worker-id", "nobody-here", "ping")
    assert missing.returncode == 1 and "worker nobody-here is not in room" in missing.stderr


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
