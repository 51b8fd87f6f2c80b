"""Command jobs (`client.py run NAME -- ARGS`), routing by what each worker offers, and
read-only SQL over every worker's ledger (`client.py jobs --sql`).

Real signaling server, worker and client processes; the commands are the machine's own
/bin/echo, /bin/ls and /usr/bin/env.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import time
from pathlib import Path

import pytest

import protocol as P
from conftest import job_id_of, ledger, stand_in

SECRET = "hunter2-do-not-print"


def test_a_worker_runs_only_the_commands_its_admin_allowed(room, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "labels.slp").write_text("x")
    worker_dir = tmp_path / "w"
    _, plain_id = room.start_worker("--mount", str(data))
    # Without --allow-command a worker offers nothing to run.
    refused = room.client("run", "--worker-id", plain_id, "echo", "--", "hi")
    assert refused.returncode == 1
    assert f"worker {plain_id} is not in room" in refused.stderr and "cannot take command:echo jobs" in refused.stderr
    # A client that skips negotiation and submits anyway is refused by the worker itself.
    signaling = room.signaling_client("bypasser")
    try:
        link = P.open_link(signaling, plain_id, tmp_path)
        link.send(P.JOB_SUBMIT, {"job_id": "bypass-1", "spec": {"type": P.COMMAND, "command": "echo", "args": ["hi"]}})
        rejected = link.expect(lambda m: m.name == P.JOB_REJECTED, 15, "the rejection").payload
        link.close()
    finally:
        signaling.close()
    assert rejected["errors"][0]["code"] == "NOT_ALLOWED"
    assert "'echo' is not a command this worker allows; it allows: none" in rejected["errors"][0]["message"]

    _, worker_id = room.start_worker("--mount", str(data), "--allow-command", "echo=/bin/echo",
                                     "--allow-command", "ls=/bin/ls", "--allow-command", "env=/usr/bin/env",
                                     working_dir=worker_dir, env={"LAB_SECRET_TOKEN": SECRET})
    ok = room.client("run", "--non-interactive", "echo", "--", "hi", str(data / "labels.slp"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    job_id = job_id_of(ok.stdout)
    assert f"hi {data / 'labels.slp'}" in ok.stdout  # the command's output, streamed
    assert f"started on {worker_id}: command echo" in ok.stderr
    record = ledger(worker_dir, job_id)
    assert record["type"] == P.COMMAND and record["state"] == P.COMPLETED and record["exit_code"] == 0
    assert f"hi {data / 'labels.slp'}" in Path(record["log_path"]).read_text()

    # A failing command is failed, with what it said on stderr.
    failing = room.client("run", "--non-interactive", "ls", "--", str(data / "missing.slp"))
    assert failing.returncode != 0
    record = ledger(worker_dir, job_id_of(failing.stdout))
    assert record["state"] == P.FAILED and record["exit_code"] == 2 and record["error"] == "ls exited with code 2"
    assert any("No such file or directory" in line for line in record["stderr_tail"])

    # Not allowed by name, or a path outside the mounts: refused before anything runs.
    rm = room.client("run", "rm", "--", "-rf", "/")
    assert rm.returncode == 1
    assert "no worker in room" in rm.stderr and "offers command:rm" in rm.stderr
    assert f"command:echo ({worker_id})" in rm.stderr  # what the room offers instead
    outside = room.client("run", "--non-interactive", "ls", "--", "/etc/passwd")
    assert outside.returncode != 0
    assert re.search(r"args: argument 1 \('/etc/passwd'\): .*outside the worker's mounts", outside.stderr), \
        outside.stderr
    climbing = room.client("run", "--non-interactive", "ls", "--", "--color=../../../etc")
    assert climbing.returncode != 0 and "outside the worker's mounts" in climbing.stderr

    # Secret-looking variables are not passed on.
    env = room.client("run", "--non-interactive", "env")
    assert env.returncode == 0, env.stderr
    assert "PATH=" in env.stdout
    assert SECRET not in env.stdout and room.token not in env.stdout
    assert "LAB_SECRET_TOKEN" not in env.stdout and "SLEAP_RTC_TOKEN" not in env.stdout


def test_a_command_job_goes_to_the_worker_that_offers_it(room, tmp_path):
    _, plain = room.start_worker()
    converter_dir = tmp_path / "converter"
    _, converter = room.start_worker("--allow-command", "convert=/bin/echo", working_dir=converter_dir)
    result = room.client("run", "--non-interactive", "convert", "--", "converted")
    assert result.returncode == 0, result.stderr
    assert f"chose {converter}" in result.stderr and plain not in result.stderr
    assert ledger(converter_dir, job_id_of(result.stdout))["state"] == P.COMPLETED

    nobody = room.client("run", "transcode", "--", "x")
    assert nobody.returncode == 1
    assert "no worker in room" in nobody.stderr and "offers command:transcode" in nobody.stderr
    assert re.search(rf"train \((?=[^)]*{converter})(?=[^)]*{plain})", nobody.stderr), nobody.stderr
    assert f"command:convert ({converter})" in nobody.stderr


@pytest.mark.slow
def test_sql_over_every_ledger_is_read_only_and_bounded(room, tmp_path):
    dirs = [tmp_path / "a", tmp_path / "b"]
    ids = [room.start_worker("--allow-command", "echo=/bin/echo", working_dir=d)[1] for d in dirs]
    jobs = {}
    for worker_id in ids:
        result = room.client("run", "--non-interactive", "--worker-id", worker_id, "echo", "--", worker_id)
        assert result.returncode == 0, result.stderr
        jobs[worker_id] = job_id_of(result.stdout)

    def ledgers() -> list:
        rows = []
        for d in dirs:
            with sqlite3.connect(d / "jobs.sqlite") as db:
                rows.append((db.execute("SELECT * FROM jobs ORDER BY seq").fetchall(),
                             db.execute("SELECT sql FROM sqlite_master").fetchall()))
        return rows

    before = ledgers()
    merged = room.client("jobs", "--sql", "SELECT job_id, type, state, exit_code FROM jobs", "--json")
    assert merged.returncode == 0, merged.stderr
    rows = json.loads(merged.stdout)
    assert sorted((r["worker"], r["job_id"]) for r in rows) == sorted(jobs.items())
    assert all(r["type"] == "command" and r["state"] == "completed" and r["exit_code"] == 0 for r in rows)
    table = room.client("jobs", "--sql", "SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
    assert re.search(r"WORKER\s+STATE\s+N", table.stdout) and table.stdout.count("completed") == 2

    for sql in ("DELETE FROM jobs", "UPDATE jobs SET state = 'failed'", "ATTACH DATABASE '/tmp/x.db' AS x",
                "PRAGMA writable_schema = ON", "SELECT * FROM sqlite_master", "SELECT * FROM sqlite_sequence",
                "SELECT 1; DELETE FROM jobs"):
        refused = room.client("jobs", "--sql", sql)
        assert refused.returncode == 1, (sql, refused.stdout)
        assert refused.stderr.count("refused") == 2, (sql, refused.stderr)
    forever = room.client("jobs", "--sql", "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
                                           "SELECT COUNT(*) FROM c")
    assert forever.returncode == 1
    assert forever.stderr.count("the query ran longer than 2 s and was stopped") == 2, forever.stderr
    assert ledgers() == before


def test_a_worker_short_of_disk_refuses_new_jobs_and_says_why(room, tmp_path):
    worker_dir = tmp_path / "w"
    _, worker_id = room.start_worker("--allow-command", "echo=/bin/echo", "--min-free-gb", "1000000",
                                     working_dir=worker_dir)
    workers = room.client("workers")
    assert re.search(rf"{worker_id}\s+\S*\s+low_disk", workers.stdout), workers.stdout
    assert f"{worker_id} takes no new jobs: only " in workers.stdout and "--min-free-gb" in workers.stdout
    refused = room.client("run", "--non-interactive", "echo", "--", "hi")
    assert refused.returncode == 1
    assert f"{worker_id}: low_disk (only " in refused.stderr and "GB free in" in refused.stderr
    with sqlite3.connect(worker_dir / "jobs.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0  # nothing was accepted


def test_a_log_goes_on_from_a_byte_offset_and_odd_offsets_are_harmless(room, tmp_path):
    """JOB_ATTACH's `since` (what a client that lost its link had): the log from that byte,
    each batch saying how far it reached; any other value is a replay from the start, or
    past the end an empty one, and the link stays up."""
    worker_dir = tmp_path / "w"
    _, worker_id = room.start_worker("--allow-command", "seq=/usr/bin/seq", working_dir=worker_dir)
    done = room.client("run", "--non-interactive", "seq", "--", "1", "200")
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = job_id_of(done.stdout)
    log = Path(ledger(worker_dir, job_id)["log_path"]).read_bytes()
    middle = log.index(b"\n100\n") + 1  # the start of the line "100"

    signaling = room.signaling_client("reader")
    link = P.open_link(signaling, worker_id, tmp_path)

    def attach(since) -> tuple[bytes, list]:
        link.send(P.JOB_ATTACH, {"job_id": job_id, "follow": True, "since": since})
        got, offsets = [], []
        while True:
            item = link.expect(lambda m: m.name in (P.JOB_LOG, P.JOB_ATTACHED), 20, "the log")
            if item.name == P.JOB_ATTACHED:
                assert item.payload["state"] == P.COMPLETED and not item.payload["following"]
                return b"".join(line.encode() + b"\n" for line in got), offsets
            got += [text for _, text in item.payload["lines"]]
            offsets.append(item.payload["offset"])

    try:
        text, offsets = attach(middle)
        assert text == log[middle:] and offsets[-1] == len(log)
        for odd in (-5, "12", True, None, 1.5, [3]):
            text, _ = attach(odd)
            assert text == log, odd
        assert attach(len(log) + 10**12) == (b"", [])
    finally:
        link.close()
        signaling.close()


COUNTER = """import sys, time
for i in range(1, int(sys.argv[1]) + 1):
    print(f"line {i}", flush=True)
    time.sleep(0.1)
"""


@pytest.mark.slow
def test_a_follow_whose_link_dies_reconnects_and_goes_on_from_its_byte(room, tmp_path):
    """The worker freezes (SIGSTOP) past the link's heartbeat timeout mid-follow: the
    client says it lost the link, connects again once the worker answers, and prints
    every line exactly once, in order, to the job's end."""
    counter = stand_in(tmp_path, "counter", COUNTER)
    worker, _ = room.start_worker("--allow-command", f"count={counter}", working_dir=tmp_path / "w")
    submitted = room.client("run", "--detach", "--non-interactive", "count", "--", "150")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = job_id_of(submitted.stdout)
    follow = room.start_client("logs", job_id, "--follow")
    follow.wait_for(r"line 20\n", timeout=60)
    worker.popen.send_signal(signal.SIGSTOP)
    try:
        follow.wait_for(r"lost the link", timeout=30)
        time.sleep(2)  # it tries while the worker is still frozen
    finally:
        worker.popen.send_signal(signal.SIGCONT)
    assert follow.popen.wait(timeout=120) == 0, follow.output()
    out = follow.output()
    assert "connected to" in out and re.findall(r"^line (\d+)$", out, re.M) == [str(i) for i in range(1, 151)], out
    assert f"job {job_id} completed" in out
