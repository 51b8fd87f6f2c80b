"""Peers that are slow, stopped or gone: none of them may delay anyone else.

Real signaling server, worker and client processes; sleap-nn is replaced by small
stand-in scripts (worker --sleap-nn) whose output and timing the tests control.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

import protocol as P
import worker as W
from conftest import ledger, stand_in, state_of, wait_until

pytestmark = pytest.mark.slow

LINE = "x" * 90  # with its number, 100 bytes a line


@pytest.fixture
def config(tmp_path):
    """A config the worker accepts (a YAML mapping inside its mount); stand-ins ignore it."""
    data = tmp_path / "data"
    data.mkdir()
    path = data / "config.yaml"
    path.write_text("trainer_config:\n  max_epochs: 1\n")
    return path


BURST_LINES, TAIL_LINES = 80_000, 1_000


def burst_stand_in(tmp_path: Path, lines_per_block: int = 400, block_s: float = 0.01):
    """Prints 'ready' and waits for the first gate file; then prints BURST_LINES numbered
    100-byte lines at a steady pace (400 lines every 10 ms: 4 MB/s) and 'burst done'; then
    waits for the second gate, prints TAIL_LINES more, 'done', and exits 0."""
    gate, gate2 = tmp_path / "gate", tmp_path / "gate2"
    body = f"""import os, sys, time
def wait(path):
    while not os.path.exists(path):
        time.sleep(0.02)
print('ready', flush=True)
wait({str(gate)!r})
start, n = time.monotonic(), 0
for block in range({BURST_LINES // lines_per_block}):
    sys.stdout.write(''.join(f'{{n + i:08d}} {LINE}\\n' for i in range({lines_per_block})))
    sys.stdout.flush()
    n += {lines_per_block}
    time.sleep(max(0.0, start + (block + 1) * {block_s} - time.monotonic()))
print('burst done', flush=True)
wait({str(gate2)!r})
sys.stdout.write(''.join(f'{{n + i:08d}} {LINE}\\n' for i in range({TAIL_LINES})))
print('done', flush=True)
"""
    return stand_in(tmp_path, "burst-sleap-nn", body), gate, gate2


def ends_with(path: Path, marker: str) -> bool:
    """Whether the last 64 KB of a growing file hold `marker`."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            return marker.encode() in f.read()
    except FileNotFoundError:
        return False


class Throttle:
    """Stops and continues a process in turn (0.15 s each), so that its link runs at
    about half speed; heartbeats still pass, so the link stays up."""

    def __init__(self, pid: int):
        self.pid = pid
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="throttle", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 60  # bounded even if the test forgets to stop it
        while not self.done.is_set() and time.monotonic() < deadline:
            os.kill(self.pid, signal.SIGSTOP)
            time.sleep(0.15)
            os.kill(self.pid, signal.SIGCONT)
            time.sleep(0.15)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()
        os.kill(self.pid, signal.SIGCONT)


def test_a_stopped_and_a_throttled_follower_delay_nobody(room, config, tmp_path):
    """The pass condition depends on no follower's speed. What a follower has waiting at
    the worker (its backlog) is only live output queued since it attached: the part of
    the log that was there already is replayed from the file at the link's pace. So

    - `stopped` is attached through the whole burst and reads none of it: its link takes
      at most SEND_HIGH_WATER and one message, the rest waits, over 3 budgets beyond it;
    - `steady` and `paused` attach once the burst is in the log: their live output is the
      tail, about a tenth of the budget, however slowly they read;
    - `slow` (throttled while the burst runs) may go either way, and each way is checked.

    The only clock is the link timeout: a stopped client must run again within
    PEER_TIMEOUT_S, so each stop covers a bounded stretch of the job's own output."""
    budget = 1 << 20  # --follower-backlog 1 (MB)
    assert BURST_LINES * len(f"{0:08d} {LINE}\n") > P.SEND_HIGH_WATER + 3 * budget
    assert TAIL_LINES * len(f"{0:08d} {LINE}\n") < budget // 8
    burst, gate, gate2 = burst_stand_in(tmp_path)
    worker_dir = room.tmp / "w"
    room.start_worker("--mount", str(config.parent), "--sleap-nn", str(burst), "--follower-backlog", "1",
                      working_dir=worker_dir)
    first = room.submit(config)
    second = room.submit(config)  # queued behind the first
    job_log = worker_dir / "jobs" / first / "job.log"
    stopped, slow = followers = [room.start_client("logs", first, "--follow") for _ in range(2)]
    for follower in followers:
        follower.wait_for(r"(?m)^ready$", timeout=60)

    # 1. While one follower cannot read at all and another only half the time, the job's whole
    # burst goes past them into the log.
    stopped.popen.send_signal(signal.SIGSTOP)
    throttle = Throttle(slow.popen.pid)
    gate.touch()
    begun = time.monotonic()
    try:
        wait_until(lambda: ends_with(job_log, "\nburst done\n"), 4.0, "the burst to reach the job's log")
    finally:
        stopped.popen.send_signal(signal.SIGCONT)
        throttle.stop()
    assert time.monotonic() - begun < 4.5  # the stopped client resumed before its link timed out
    assert state_of(worker_dir, first) == P.RUNNING  # waiting for gate2

    # 2. Two followers attach now; one of them stops. The job ends, and the next one starts, all the same.
    steady, paused = late = [room.start_client("logs", first, "--follow") for _ in range(2)]
    for follower in late:
        follower.wait_for(r"(?m)^ready$", timeout=60)  # attached: the replay has begun
    paused.popen.send_signal(signal.SIGSTOP)
    halted = time.monotonic()
    try:
        gate2.touch()
        wait_until(lambda: state_of(worker_dir, first) == P.COMPLETED, 3.0, "the first job to complete")
        # started_at: its sleap-nn process started (the state says RUNNING a moment before)
        wait_until(lambda: ledger(worker_dir, second).get("started_at"), 1.0, "the second job to start")
    finally:
        paused.popen.send_signal(signal.SIGCONT)
    assert time.monotonic() - halted < 4.5
    one, two = ledger(worker_dir, first), ledger(worker_dir, second)
    assert two["started_at"] - one["finished_at"] < 1.0

    log = job_log.read_text()
    # the worker's start mark, ready, the burst, burst done, the tail, done, its end mark
    assert log.count("\n") == BURST_LINES + TAIL_LINES + 5
    for follower in (steady, paused):  # every line, in order, once; `paused` was stopped within its budget
        assert follower.popen.wait(timeout=60) == 0, follower.output()[-2000:]
        assert follower.output().startswith(log)

    assert stopped.popen.wait(timeout=30) == 1
    out = stopped.output()
    assert "fell" in out and "behind" in out and f"python client.py logs {first} --follow" in out, out[-2000:]
    received = out[:out.index("error: ")]
    assert log.startswith(received)  # a prefix: no gap, nothing twice
    assert "burst done" not in received  # detached during the burst, while it was stopped

    code = slow.popen.wait(timeout=60)
    out = slow.output()
    if code == 0:  # it kept up at half speed
        assert out.startswith(log)
    else:  # or it fell behind and was told so
        assert "fell" in out and log.startswith(out[:out.index("error: ")])


def test_stop_is_sent_at_a_steady_pace_and_sigint_only_once(room, config, tmp_path):
    """A training that never reports train_end: stop every 0.5 s, then one SIGINT after the grace."""
    body = """import json, signal, sys, time, zmq
ports = dict(a.split('=', 1) for a in sys.argv if a.startswith('++trainer_config.zmq.'))
context = zmq.Context()
control = context.socket(zmq.SUB)
control.setsockopt_string(zmq.SUBSCRIBE, '')
control.connect('tcp://127.0.0.1:' + ports['++trainer_config.zmq.controller_port'])
progress = context.socket(zmq.PUB)
progress.connect('tcp://127.0.0.1:' + ports['++trainer_config.zmq.publish_port'])
sigints = []
signal.signal(signal.SIGINT, lambda *_: sigints.append(time.monotonic()))
print('training', flush=True)
stops, first = 0, None
while first is None or time.monotonic() - first < 3.0:
    progress.send_string(json.dumps({'what': '', 'event': 'batch_end', 'epoch': 0, 'batch': 0, 'logs': {}}))
    if control.poll(50):
        if json.loads(control.recv_string()).get('command') == 'stop':
            stops += 1
            first = first or time.monotonic()
print(f'stops={stops} sigints={len(sigints)}', flush=True)
"""
    never_ends = stand_in(tmp_path, "never-ends-sleap-nn", body)
    worker_dir = room.tmp / "w"
    worker, _ = room.start_worker("--mount", str(config.parent), "--sleap-nn", str(never_ends),
                                  "--stop-grace", "1", working_dir=worker_dir)
    job_id = room.submit(config)
    wait_until(lambda: "training" in (worker_dir / "jobs" / job_id / "job.log").read_text()
               if (worker_dir / "jobs" / job_id / "job.log").exists() else False, 30, "the stand-in to start")
    stop = room.client("stop", job_id)
    assert stop.returncode == 0 and "stop sent" in stop.stdout, stop.stdout + stop.stderr
    wait_until(lambda: state_of(worker_dir, job_id) == P.COMPLETED, 30, "the job to end")
    counts = re.search(r"stops=(\d+) sigints=(\d+)", (worker_dir / "jobs" / job_id / "job.log").read_text())
    stops, sigints = int(counts.group(1)), int(counts.group(2))
    assert 4 <= stops <= 9, stops  # 3 s at one stop per 0.5 s
    assert sigints == 1
    # Nobody listens to the outcome over signaling any more: no message to a departed client.
    assert "PEER_NOT_FOUND" not in worker.output()


def test_a_cancel_while_the_job_is_starting_cancels_it(tmp_path, monkeypatch):
    """The window between the scheduler taking a job and sleap-nn starting."""
    ran = tmp_path / "ran"
    exe = stand_in(tmp_path, "marker-sleap-nn", f"open({str(ran)!r}, 'w').write('ran')\n")
    (tmp_path / "data").mkdir()
    config = tmp_path / "data" / "config.yaml"
    config.write_text("trainer_config: {}\n")
    taken, go_on = threading.Event(), threading.Event()
    real_start = W.Job.start

    def start_slowly(job, *args):
        taken.set()
        go_on.wait(10)
        return real_start(job, *args)

    monkeypatch.setattr(W.Job, "start", start_slowly)
    (tmp_path / "worker").mkdir()
    scheduler = W.Scheduler(tmp_path / "worker", 1, str(exe), on_change=lambda job: None)
    scheduler.start()
    try:
        heard = []
        spec = {"type": P.TRAIN, "config": str(config), "gui": False, "_resolved": {"config": str(config)}}
        job, errors = scheduler.submit("j1", spec, "me", lambda name, payload: heard.append(name),
                                       {W.CONFIG_FILE: config.read_text()})
        assert not errors
        assert taken.wait(10)
        ok, message = scheduler.control("j1", "cancel")
        go_on.set()
        assert ok, message
        wait_until(lambda: scheduler.ledger.get("j1")["state"] == P.CANCELLED, 10, "the job to be cancelled")
        record = scheduler.ledger.get("j1")
        assert record["started_at"] is None and "before sleap-nn started" in record["error"]
        assert P.JOB_FAILED in heard
        time.sleep(0.3)
        assert not ran.exists()  # sleap-nn never started
    finally:
        scheduler.stop()



def test_a_scheduler_stopped_between_its_check_and_its_wait_still_stops(tmp_path):
    """The scheduler thread waits without a timeout when idle: a stop that comes after it
    looked at the stop flag, and before it took the lock to wait, must still end it."""
    told = threading.Event()

    class Late(threading.Event):
        first = True

        def is_set(self):  # the thread's first look says "not stopping", after stop() has notified
            if threading.current_thread().name == "scheduler" and self.first:
                self.first = False
                told.wait(10)
                return False
            return super().is_set()

    class Telling(threading.Condition):
        def notify_all(self):
            super().notify_all()
            told.set()

    scheduler = W.Scheduler(tmp_path, 1, "sleap-nn", on_change=lambda job: None)
    scheduler._stopping, scheduler._cond = Late(), Telling()
    scheduler.start()
    scheduler.stop()
    scheduler._thread.join(10)
    assert not scheduler._thread.is_alive()


def test_a_failing_listener_is_dropped_and_the_others_still_hear(tmp_path, caplog):
    job_log = W.JobLog("j1", tmp_path / "job.log")
    heard = []

    def broken(name, payload):
        raise OSError("disk full")

    job_log.subscribe(broken)
    job_log.subscribe(lambda name, payload: heard.append((name, payload["job_id"])))
    with caplog.at_level(logging.ERROR, logger="sleap_rtc.worker"):
        job_log.emit(P.JOB_PROGRESS, {"event": "queued"})
        job_log.emit(P.JOB_PROGRESS, {"event": "queued"})
    assert heard == [(P.JOB_PROGRESS, "j1")] * 2
    assert len([r for r in caplog.records if "a listener failed" in r.message]) == 1  # dropped after one failure
    assert caplog.records[0].exc_info is not None  # with its traceback


def test_logs_and_fetch_end_with_an_error_when_the_worker_is_killed(room, config, tmp_path):
    # A stand-in that leaves a 300 MB model behind, so that a fetch takes several seconds.
    body = """import os, sys
args = dict(a[2:].split('=', 1) for a in sys.argv if a.startswith('++'))
model = os.path.join(args['trainer_config.ckpt_dir'].strip("'"), args['trainer_config.run_name'].strip("'"))
os.makedirs(model)
open(os.path.join(model, 'training_config.yaml'), 'w').write('{}')
with open(os.path.join(model, 'best.ckpt'), 'wb') as f:
    for _ in range(300):
        f.write(os.urandom(1 << 20))
print('saved', flush=True)
"""
    big = stand_in(tmp_path, "big-model-sleap-nn", body)
    worker_dir = room.tmp / "w"
    worker, worker_id = room.start_worker("--mount", str(config.parent), "--sleap-nn", str(big),
                                          working_dir=worker_dir)
    job_id = room.submit(config)
    wait_until(lambda: state_of(worker_dir, job_id) == P.COMPLETED, 60, "the job to complete")

    target = tmp_path / "results"
    fetch = room.start_client("fetch", job_id, "--download", str(target))
    wait_until(lambda: any(f.stat().st_size > 10 << 20 for f in (target / job_id).glob(".*.part"))
               if (target / job_id).is_dir() else False, 60, "the fetch to be under way")
    worker.kill()
    killed = time.monotonic()
    assert fetch.popen.wait(timeout=20) == 1
    assert time.monotonic() - killed < P.PEER_TIMEOUT_S + 3
    assert "stopped answering" in fetch.output(), fetch.output()
    assert list((target / job_id).iterdir()) == []  # no partial file, nothing under a final name

    # logs --follow of a running job, then the worker dies
    gated = stand_in(tmp_path, "gated-sleap-nn", "import time\nprint('working', flush=True)\ntime.sleep(20)\n")
    worker, _ = room.start_worker("--mount", str(config.parent), "--sleap-nn", str(gated), working_dir=worker_dir)
    running = room.submit(config)
    follower = room.start_client("logs", running, "--follow")
    follower.wait_for(r"working", timeout=60)
    worker.kill()
    killed = time.monotonic()
    assert follower.popen.wait(timeout=20) == 1
    assert time.monotonic() - killed < P.PEER_TIMEOUT_S + 3
    assert "stopped answering" in follower.output(), follower.output()


def test_waiting_log_batches_merge_into_one_that_ends_where_the_last_ends():
    """A client that reconnects goes on from the `offset` of the last JOB_LOG it had: a
    merged batch must carry the offset of its newest lines, not of its oldest."""
    outbox = W.Outbox()
    outbox.put(P.job_log("j1", [["o", "one"]], None, 4), "j1", 12)
    outbox.put(P.job_log("j1", [["o", "two"]], "50%", 8), "j1", 12)
    outbox.put(P.job_log("j1", [["e", "three"]], None, 14), "j1", 14)
    name, payload = outbox.take(timeout=1)
    assert name == P.JOB_LOG
    assert payload == {"job_id": "j1", "lines": [["o", "one"], ["o", "two"], ["e", "three"]], "progress": "50%",
                       "offset": 14}
    assert outbox.take(timeout=0.01) is None
