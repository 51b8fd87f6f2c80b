"""Replicas: a finished job's model or predictions copied to another worker in the room.

An optional capability of the worker: `worker.py` imports this file for a replicate job,
or when another worker starts sending a replica, and, without it, leaves "replicate" out
of its job types and refuses both with a reason naming this file.

The sending worker runs `worker.py replicate-step` as its replicate job's step: a peer
of its own in the room that opens a link to the receiving worker and sends each file
(SHA-256 checked on arrival, and against the manifest at the end). The receiver keeps
them in a new job directory and records a job of type replica; both ledgers hold it.

Read top to bottom: the sending side (`replicable` at acceptance, `replicate_step_of` at
start, `replicate_step` in its own process, `replica_outputs` at the end), then the
receiving side (`check_replica_manifest`, `ReplicaReceiver`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import protocol as P
import worker as W

log = logging.getLogger("sleap_rtc.worker")

REPLICA_MANIFEST_FILE = "replica-manifest.json"
REPLICA_RESULT_FILE = "replica-result.json"
MAX_REPLICA_FILES = 1000
# The room credentials a replicate step gets from its worker, in its environment (never in ps).
_CREDENTIAL_ENV = (P.ENV_SERVER, P.ENV_ROOM, P.ENV_TOKEN)


def replica_manifest(record: dict) -> list[dict]:
    """The outputs of a finished job as a replica sends them: kind, name and each file
    with its path here, size and SHA-256."""
    outputs = []
    for output in record.get("outputs") or []:
        if output["kind"] == "model":
            files = [{"name": f["name"], "size": f["size"], "sha256": f["sha256"],
                      "path": str(Path(output["path"]) / f["name"])} for f in output.get("files", [])]
            outputs.append({"kind": "model", "name": Path(output["path"]).name, "files": files})
        elif output["kind"] == "predictions":
            outputs.append({"kind": "predictions", "name": Path(output["path"]).name,
                            "files": [{"name": Path(output["path"]).name, "size": output["size"],
                                       "sha256": output["sha256"], "path": output["path"]}]})
    return outputs


def replicate_step(argv: list[str]) -> int:
    """`worker.py replicate-step`: send a manifest's files to another worker as a replica."""
    parser = argparse.ArgumentParser(prog="worker.py replicate-step")
    parser.add_argument("manifest", type=Path)
    parser.add_argument("result", type=Path)
    parser.add_argument("--to", required=True, help="the receiving worker's peer id")
    parser.add_argument("--peer-id", required=True, help="this step's own peer id in the room")
    args = parser.parse_args(argv)
    manifest = json.loads(args.manifest.read_text())
    server, room, token = (os.environ[name] for name in _CREDENTIAL_ENV)
    signaling = P.SignalingClient(server, room, token, args.peer_id, "client")
    link = None
    try:
        signaling.connect()
        link = P.open_link(signaling, args.to, args.manifest.parent)
        request_id = secrets.token_hex(4)
        public = [{**o, "files": [{k: f[k] for k in ("name", "size", "sha256")} for f in o["files"]]}
                  for o in manifest["outputs"]]
        link.send(*P.replica_begin(request_id, manifest["source"], public))
        ready = link.expect(lambda m: isinstance(m, P.Message) and m.name == P.REPLICA_READY
                            and m.payload.get("request_id") == request_id, 30, "REPLICA_READY").payload
        if ready.get("error"):
            print(f"{args.to} refused the replica: {ready['error']}", file=sys.stderr)
            return 1
        for index, output in enumerate(manifest["outputs"]):
            for f in output["files"]:
                started = time.monotonic()
                ack = link.send_file(Path(f["path"]), name=f"{index}-{f['name']}", digest=(f["size"], f["sha256"]))
                seconds = max(1e-6, time.monotonic() - started)
                print(f"sent {f['path']} ({f['size']} bytes, sha256 {f['sha256'][:12]}) over {ack['via']}: "
                      f"{f['size'] / seconds / 1e6:.1f} MB/s", flush=True)
        link.send(*P.replica_end(ready["replica_id"]))
        done = link.expect(lambda m: isinstance(m, P.Message) and m.name == P.REPLICA_DONE, 120,
                           "REPLICA_DONE").payload
    except (P.SleapRTCError, OSError) as exc:
        print(f"replicating to {args.to} failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if link is not None:
            link.close()
        signaling.close()
    if done.get("error"):
        print(f"{args.to} did not keep the replica: {done['error']}", file=sys.stderr)
        return 1
    result = {"worker": args.to, "replica_id": done["replica_id"], "outputs": done["outputs"]}
    args.result.write_text(json.dumps(result))
    for output in done["outputs"]:
        print(f"{output['kind']} on {args.to}: {output['path']} (job {done['replica_id']} there)")
    return 0


def replicable(worker: "W.Worker", spec: dict) -> list[dict]:
    """Why a replicate spec cannot run here ([] when it can)."""
    record = worker.scheduler.record(spec["source_job"])
    if record is None:
        return [P.spec_error("source_job", f"no job {spec['source_job']} on this worker", "NOT_FOUND")]
    if record["state"] != P.COMPLETED or record.get("pruned") or not replica_manifest(record):
        why = "its files were pruned" if record.get("pruned") else \
            f"it is {record['state']}" if record["state"] != P.COMPLETED else "it made no model or predictions"
        return [P.spec_error("source_job", f"job {spec['source_job']} has nothing to replicate: {why}",
                             "NOTHING_TO_REPLICATE")]
    if spec["to"] == worker.peer_id:
        return [P.spec_error("to", "a job's results are on this worker already", "SAME_WORKER")]
    return []


def replicate_step_of(worker: "W.Worker", job: "W.Job") -> "W.Step":
    """The step of a replicate job: its manifest written (each file checked to be in the
    mounts or job directories still), and `worker.py replicate-step` with the room's
    credentials in its environment."""
    record = worker.scheduler.record(job.spec["source_job"])
    outputs = replica_manifest(record) if record and record["state"] == P.COMPLETED else []
    if not outputs or record.get("pruned"):
        raise W.JobSetupError(f"job {job.spec['source_job']} has nothing to replicate any more")
    for output in outputs:
        for f in output["files"]:
            try:
                W.resolve_in_mounts(f["path"], worker.readable_mounts)
            except W.PathRefused as exc:
                raise W.JobSetupError(f"{f['path']} is not sent: {exc}") from None
    manifest = {"source": {"worker": worker.peer_id, "job_id": job.spec["source_job"]}, "outputs": outputs}
    (job.dir / REPLICA_MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    args = [sys.executable, str(Path(W.__file__).resolve()), "replicate-step", str(job.dir / REPLICA_MANIFEST_FILE),
            str(job.dir / REPLICA_RESULT_FILE), "--to", job.spec["to"],
            "--peer-id", f"{worker.peer_id}-replicate-{job.job_id[-6:]}"]
    credentials = dict(zip(_CREDENTIAL_ENV, (worker.server_url, worker.room_id, worker.token)))
    return W.Step(P.REPLICATE, f"replicate to {job.spec['to']}", args, job.dir, env=credentials)


def replica_outputs(job_dir: Path) -> list[dict]:
    """The outputs of a replicate job: where each of its results lies on the other worker."""
    if not (job_dir / REPLICA_RESULT_FILE).is_file():
        return []
    sent = json.loads((job_dir / REPLICA_RESULT_FILE).read_text())
    return [{"kind": "replica", "of": o["kind"], "worker": sent["worker"], "path": o["path"],
             "replica_job": sent["replica_id"]} for o in sent["outputs"]]


def check_replica_manifest(outputs: Any) -> Optional[str]:
    """What is wrong with a REPLICA_BEGIN's outputs, or None."""
    if not isinstance(outputs, list) or not outputs or len(outputs) > 100:
        return "outputs must be a list of 1-100 outputs"
    count = 0
    for output in outputs:
        if not isinstance(output, dict) or output.get("kind") not in ("model", "predictions") \
                or not isinstance(output.get("files"), list) or not output["files"]:
            return "each output needs kind (model or predictions) and files"
        for f in output["files"]:
            count += 1
            if not isinstance(f, dict) or not P.SHA256_RE.fullmatch(str(f.get("sha256"))) \
                    or not P._is_a(f.get("size"), int) or f["size"] < 0:
                return "each file needs a name, a size and a SHA-256"
            try:
                P.safe_file_name(str(f.get("name", "")))
                P.safe_file_name(str(output.get("name", "")))
            except P.TransferError as exc:
                return str(exc)
    return None if count <= MAX_REPLICA_FILES else f"at most {MAX_REPLICA_FILES} files"


class ReplicaReceiver:
    """A replica arriving from another worker over one session's link (at most one at a
    time): REPLICA_BEGIN makes a replica job and a staging directory the link's files go
    to, REPLICA_END checks each file against the manifest and keeps them. Runs on the
    session's reader thread only."""

    def __init__(self, session: "W.Session"):
        self.session = session
        self.worker = session.worker
        self.arriving: Optional[dict] = None  # job, outputs, staging

    def begin(self, payload: dict) -> None:
        """Another worker starts sending a replica: a new job directory takes its files."""
        offer = P.ReplicaOffer.read(payload)
        problem = check_replica_manifest(offer.outputs) or self.worker.status.disk_problem()
        if self.arriving is not None:
            problem = "a replica is arriving on this link already"
        if problem:
            self.session.send(*P.replica_ready(offer.request_id, error=problem))
            return
        spec = {"type": P.REPLICA, "source": offer.source}
        job = self._replica_job(spec)
        staging = job.dir / ".incoming"
        self.arriving = {"job": job, "outputs": offer.outputs, "staging": staging}
        self.session.link.incoming.receive_dir = staging
        log.info("replica %s of %s arriving from %s", job.job_id, spec["source"], self.session.peer_id)
        self.session.send(*P.replica_ready(offer.request_id, job.job_id))

    def end(self, payload: dict) -> None:
        """Every file of the replica was sent: check each against the manifest, keep them, record the job."""
        replica, replica_id = self.arriving, P.replica_id_in(payload)
        if replica is None or replica_id != replica["job"].job_id:
            self.session.send(*P.replica_done(replica_id, [], "no such replica is arriving on this link"))
            return
        self.arriving, self.session.link.incoming.receive_dir = None, None
        job, outputs, problem = replica["job"], [], None
        for index, output in enumerate(replica["outputs"]):
            name = P.safe_file_name(str(output.get("name")))
            target = job.dir / "models" / name if output["kind"] == "model" else job.dir
            target.mkdir(parents=True, exist_ok=True)
            files = []
            for f in output["files"]:
                staged = replica["staging"] / f"{index}-{P.safe_file_name(f['name'])}"
                if not staged.is_file() or P.file_digest(staged) != (f["size"], f["sha256"]):
                    problem = f"{f['name']} did not arrive as the manifest says (missing, or another size or SHA-256)"
                    break
                os.replace(staged, target / P.safe_file_name(f["name"]))
                files.append({"name": f["name"], "size": f["size"], "sha256": f["sha256"]})
            if problem:
                break
            outputs.append({"kind": "model", "name": name, "path": str(target), "files": files}
                           if output["kind"] == "model" else
                           {"kind": "predictions", "path": str(target / files[0]["name"]), "size": files[0]["size"],
                            "sha256": files[0]["sha256"]})
        self._finish(replica, problem, outputs)
        self.session.send(*P.replica_done(job.job_id, outputs, problem))

    def abandon(self) -> None:
        """The link ended: a replica still arriving fails, and its staged files go."""
        if self.arriving is not None:
            replica, self.arriving = self.arriving, None
            self._finish(replica, "the sending worker's link ended before the replica was whole", [])

    def _replica_job(self, spec: dict) -> "W.Job":
        """A job of type REPLICA, recorded as running: the files arriving into its
        directory's staging folder. It takes no slot."""
        scheduler, job_id = self.worker.scheduler, P.new_job_id()
        job = W.Job(job_id, spec, scheduler.jobs_dir / job_id, self.session.peer_id, ledger=scheduler.ledger)
        (job.dir / ".incoming").mkdir(parents=True)
        job.arriving()
        return job

    def _finish(self, replica: dict, problem: Optional[str], outputs: list) -> None:
        shutil.rmtree(replica["staging"], ignore_errors=True)
        replica["job"].arrived(problem, outputs)
        log.info("replica %s from %s: %s", replica["job"].job_id, self.session.peer_id, problem or "kept")
        self.worker.status.changed()


