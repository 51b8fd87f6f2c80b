"""The sleap-rtc 0.0.7 dialect: serving unmodified upstream clients on our worker.

An optional capability of the worker: `worker.py` imports this file when it lies beside it
and, without it, refuses links from sleap-rtc 0.0.7 clients with a reason naming it.

Read top to bottom:

1. the codec: the frames of upstream's data channel, as text in and text out;
2. `UpstreamAdapter`: one upstream client's link, mapped onto our own jobs.

The upstream CLI and Python API open a data channel with one of protocol.py's
UPSTREAM_CHANNEL_LABELS and speak bare text: `NAME::{client job id}::{spec}` and
`NAME::{json}` frames, training output as bare lines (`CR::` before a carriage-return
update), files as FILE_META, binary chunks and END_OF_FILE. They send binary KEEP_ALIVE
every 15 s and no heartbeat, so such a link lives as long as its WebRTC connection.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import protocol as P

if TYPE_CHECKING:  # the adapter runs inside worker.py; the codec needs nothing of it
    import worker as W

log = logging.getLogger("sleap_rtc.worker")

# ---------------------------------------------------------------------------------------
# The codec
# ---------------------------------------------------------------------------------------

UP_SEP = "::"
UP_AUTH_CHALLENGE, UP_AUTH_RESPONSE = "AUTH_CHALLENGE", "AUTH_RESPONSE"
UP_AUTH_SUCCESS, UP_AUTH_FAILURE = "AUTH_SUCCESS", "AUTH_FAILURE"
UP_JOB_SUBMIT, UP_JOB_ACCEPTED, UP_JOB_REJECTED = "JOB_SUBMIT", "JOB_ACCEPTED", "JOB_REJECTED"
UP_JOB_PROGRESS, UP_PROGRESS_REPORT = "JOB_PROGRESS", "PROGRESS_REPORT"
UP_JOB_COMPLETE, UP_JOB_FAILED = "JOB_COMPLETE", "JOB_FAILED"
UP_FILE_META, UP_END_OF_FILE = "FILE_META", "END_OF_FILE"
# A track job's output lines (sleap-rtc after 0.0.7; a training's stay bare lines).
UP_JOB_LOG = "JOB_LOG"
# Upstream's worker runs inference after a training whose spec names its labels, and its
# clients (the SLEAP GUI too) wait for the end of it.
UP_INFERENCE_BEGIN, UP_INFERENCE_LOG, UP_INFERENCE_PROGRESS = "INFERENCE_BEGIN", "INFERENCE_LOG", "INFERENCE_PROGRESS"
UP_INFERENCE_COMPLETE, UP_INFERENCE_FAILED = "INFERENCE_COMPLETE", "INFERENCE_FAILED"
UP_INFERENCE_SKIPPED = "INFERENCE_SKIPPED"
UP_CONTROL_COMMAND, UP_JOB_STOP, UP_JOB_CANCEL, UP_ZMQ_CTRL = "CONTROL_COMMAND", "JOB_STOP", "JOB_CANCEL", "ZMQ_CTRL"
UP_CR = "CR::"
# An AUTH_RESPONSE of this many characters is an HMAC-SHA256 (URL-safe base64, unpadded);
# a longer one is an Ed25519 signature, made with a key only upstream's own server knows.
UP_HMAC_CHARS = 43
UP_SESSION_PREFIX = "sleap-session:"
# Upstream spec field -> ours. config_path(s), config_content(s), path_mappings and
# model_types are mapped by parse_upstream_submit itself.
_UP_TRAIN_FIELDS = {"labels_path": "labels", "val_labels_path": "val_labels", "max_epochs": "max_epochs",
                    "batch_size": "batch_size", "learning_rate": "learning_rate", "run_name": "run_name",
                    "resume_ckpt_path": "resume"}
_UP_TRACK_FIELDS = {"data_path": "data_path", "model_paths": "model_paths", "output_path": "output",
                    "batch_size": "batch_size", "peak_threshold": "peak_threshold", "frames": "frames",
                    "only_suggested_frames": "only_suggested_frames", "frame_filter": "frame_filter",
                    "video_index": "video_index", "exclude_user_labeled": "exclude_user_labeled"}
MAX_UPSTREAM_MODELS = 8


@dataclass
class UpstreamSubmit:
    """A JOB_SUBMIT in our terms: one spec per model (a multi-model train runs them in
    order as one job), config texts sent inline (`contents[i]` for specs[i], or None), and
    every problem found before any worker check."""

    client_id: str
    specs: list[dict]
    contents: list[Optional[str]]
    errors: list[dict]


def upstream_session_string(room_id: str, token: str, peer_id: str) -> str:
    """What `sleap-rtc train --session-string` takes to reach this worker."""
    data = json.dumps({"r": room_id, "t": token, "p": peer_id}, separators=(",", ":")).encode()
    return UP_SESSION_PREFIX + base64.urlsafe_b64encode(data).decode()


def upstream_room_secret(token: str) -> str:
    """The room's PSK for upstream AUTH_RESPONSE HMACs: derived from the room token, so
    only its holders know it (`client.py login --sleap-rtc-credentials` stores it)."""
    return P.b64url(hmac.new(token.encode(), b"sleap-rtc 0.0.7 room secret", hashlib.sha256).digest())


def upstream_auth_ok(secret: str, nonce: str, response: str) -> bool:
    """Whether `response` is upstream's HMAC-SHA256 of the nonce under the room secret
    (both URL-safe base64, padding optional)."""
    try:
        digest = hmac.new(P.unb64url(secret), P.unb64url(nonce), hashlib.sha256).digest()
    except ValueError:
        return False
    given = response.strip().rstrip("=")
    return given.isascii() and hmac.compare_digest(P.b64url(digest), given)


def parse_upstream_submit(text: str) -> UpstreamSubmit:
    """`JOB_SUBMIT::{client job id}::{spec json}` with upstream field names, as our specs."""
    _, rest = upstream_split(text)
    client_id, body = upstream_split(rest)
    client_id = client_id[:64] or "unknown"
    submit = UpstreamSubmit(client_id, [], [], [])
    try:
        spec = json.loads(body) if body else None
    except ValueError as exc:
        spec = None
        submit.errors.append(P.spec_error("spec", f"the job spec is not JSON: {str(exc)[:200]}", "BAD_FORMAT"))
    if not isinstance(spec, dict) or P.too_deep(spec):
        if not submit.errors:
            submit.errors.append(P.spec_error("spec", "JOB_SUBMIT needs a job spec object after the job id",
                                            "BAD_FORMAT"))
        return submit
    kind = spec.get("type")
    if kind == P.TRACK:  # upstream leaves out what is unset: None, False, "" or [] (but video_index 0 is set)
        ours = {"type": P.TRACK, **{ours: spec[up] for up, ours in _UP_TRACK_FIELDS.items()
                                  if spec.get(up) is not None and spec[up] is not False and spec[up] not in ("", [])}}
        submit.specs, submit.contents = [ours], [None]
        submit.errors = P.check_spec(ours)
        return submit
    if kind != P.TRAIN:
        submit.errors.append(P.spec_error("type", f"type must be train or track, not {P.echo(kind)}", "BAD_TYPE"))
        return submit
    mappings = spec.get("path_mappings") or {}
    if not isinstance(mappings, dict) or not all(isinstance(k, str) and isinstance(v, str) and k and v
                                                 for k, v in mappings.items()):
        submit.errors.append(P.spec_error("path_mappings", "path_mappings must map paths to paths", "BAD_TYPE"))
        return submit
    configs = spec.get("config_paths") or ([spec["config_path"]] if spec.get("config_path") else [])
    contents = spec.get("config_contents") or ([spec["config_content"]] if spec.get("config_content") else [])
    if not isinstance(configs, list) or not isinstance(contents, list) or \
            not all(isinstance(c, str) and c for c in configs + contents):
        submit.errors.append(P.spec_error("config_paths", "config_paths and config_contents must be lists of text",
                                        "BAD_TYPE"))
        return submit
    if not configs and not contents:
        submit.errors.append(P.spec_error("config_paths", "give config_path(s) or config_content(s)", "MISSING"))
        return submit
    models = [(c, None) for c in configs] + [(None, text) for text in contents]
    if len(models) > MAX_UPSTREAM_MODELS:
        submit.errors.append(P.spec_error("config_paths", f"at most {MAX_UPSTREAM_MODELS} models in one job",
                                        "OUT_OF_RANGE"))
        return submit
    model_types = spec.get("model_types") if isinstance(spec.get("model_types"), list) else []
    base = {ours: spec[up] for up, ours in _UP_TRAIN_FIELDS.items() if spec.get(up) is not None}
    for field in ("labels", "val_labels"):  # upstream maps these two by exact path
        if base.get(field) in mappings:
            base[field] = mappings[base[field]]
    video_map = [[old, new] for old, new in mappings.items() if new not in (base.get("labels"), base.get("val_labels"))]
    if video_map:
        base["path_map"] = video_map
    for index, (config, text) in enumerate(models):
        ours = {"type": P.TRAIN, **base, "config": config or f"config-{index}.yaml"}
        if "run_name" not in base and index < len(model_types) and isinstance(model_types[index], str):
            ours["run_name"] = model_types[index]
        elif len(models) > 1:  # one run directory per model, whatever the configs are called
            ours["run_name"] = f"{base.get('run_name') or Path(ours['config']).stem}-{index}"
        submit.specs.append(ours)
        submit.contents.append(text)
        submit.errors += [e for e in P.check_spec(ours) if e not in submit.errors]
    return submit


def upstream_frame(name: str, *fields: str) -> str:
    """`NAME::field::...`, the shape of every upstream text frame."""
    return UP_SEP.join((name, *fields))


def upstream_split(text: str) -> tuple[str, str]:
    """An upstream text frame's name and the rest after its first separator."""
    name, _, rest = text.partition(UP_SEP)
    return name, rest


def upstream_rejected(client_id: str, errors: list[dict]) -> str:
    return upstream_frame(UP_JOB_REJECTED, client_id, json.dumps(
        {"errors": [{"field": e.get("field"), "message": e.get("message"), "code": e.get("code")} for e in errors]}))


def upstream_epoch(epoch: Optional[int], loss: Optional[float], val_loss: Optional[float]) -> str:
    return upstream_frame(UP_JOB_PROGRESS, json.dumps({"epoch": epoch, "loss": loss, "val_loss": val_loss}))


def upstream_complete(job_id: str, job_type: str, duration_s: float, stopped_early: bool,
                      output_path: Optional[str]) -> str:
    return upstream_frame(UP_JOB_COMPLETE, json.dumps({
        "job_id": job_id, "job_type": job_type, "duration_seconds": int(duration_s), "success": True,
        "stopped_early": stopped_early, "output_path": output_path}))


def upstream_failed(job_id: str, job_type: str, exit_code: Optional[int], duration_s: float, message: str) -> str:
    return upstream_frame(UP_JOB_FAILED, json.dumps({
        "job_id": job_id, "job_type": job_type, "exit_code": exit_code, "duration_seconds": int(duration_s),
        "message": message}))


def upstream_file_meta(name: str, size: int) -> str:
    """FILE_META::{name}:{size}:{hint}; upstream splits on ':' and keeps the file under
    `name` in its output directory, so the name holds no ':' or path."""
    return f"{UP_FILE_META}{UP_SEP}{P.safe_file_name(name).replace(':', '_')}:{size}:predictions"


def upstream_log(lines: list, progress: Optional[str]) -> list[str]:
    """A JOB_LOG batch as upstream frames: the lines in one frame (each ending in a
    newline, stderr ones marked), then the latest carriage-return update as CR::."""
    frames = []
    text = "".join(("[stderr] " if stream == "e" else "") + line + "\n" for stream, line in lines)
    if text:
        frames.append(text)
    if progress is not None:
        frames.append(UP_CR + progress)
    return frames


def upstream_track_log(lines: list, progress: Optional[str]) -> list[str]:
    """A track job's JOB_LOG batch as upstream frames: JOB_LOG::{line} for each line and
    JOB_LOG::CR::{update} for the latest carriage-return update."""
    frames = [upstream_frame(UP_JOB_LOG, line) for _, line in lines]
    if progress is not None:
        frames.append(upstream_frame(UP_JOB_LOG, UP_CR + progress))
    return frames


def upstream_inference_line(report: dict) -> str:
    """sleap-nn's inference progress as the text upstream clients read it from (their
    GUI takes N/TOTAL, FPS and ETA: H:MM:SS from it)."""
    done, total = int(report.get("n_processed") or 0), int(report.get("n_total") or 0)
    eta = int(report.get("eta") or 0)
    percent = f"{100 * done // total}% " if total else ""
    return (f"Predicting... {percent}{done}/{total} {float(report.get('rate') or 0):.1f} FPS "
            f"ETA: {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")


def upstream_control(text: str) -> Optional[str]:
    """The action (P.ZMQ_CTRL: stop early, P.JOB_CANCEL: cancel) an upstream control frame
    asks for, or None when `text` is not one. The sleap-app desktop client names its job:
    JOB_CANCEL::{its job id}, which UpstreamAdapter._control matches."""
    if text == UP_JOB_STOP or text == f"{UP_ZMQ_CTRL}{UP_SEP}STOP" or text.startswith(UP_JOB_STOP + UP_SEP):
        return P.ZMQ_CTRL
    if text == UP_JOB_CANCEL or text == f"{UP_ZMQ_CTRL}{UP_SEP}CANCEL" or text.startswith(UP_JOB_CANCEL + UP_SEP):
        return P.JOB_CANCEL
    if text.startswith(UP_CONTROL_COMMAND + UP_SEP):
        try:
            command = json.loads(text[len(UP_CONTROL_COMMAND) + 2:])
        except ValueError:
            return None
        command = command.get("command") if isinstance(command, dict) else None
        return {"stop": P.ZMQ_CTRL, "cancel": P.JOB_CANCEL}.get(command)
    return None




# ---------------------------------------------------------------------------------------
# The adapter: one upstream client's link over our scheduler and ledger
# ---------------------------------------------------------------------------------------
# An unmodified sleap-rtc 0.0.7 CLI or Python API opens an upstream link (see the dialect
# section of protocol.py). Its session gets an UpstreamAdapter: the reader hands it each
# text frame, it turns JOB_SUBMIT into our specs, checks them with validate_job and admits
# the job through the session like any other; the writer hands it our messages and it
# writes them as upstream frames. The job runs on if the client goes away.

# JOB_SUBMITs kept while the client has not answered AUTH_CHALLENGE.
MAX_HELD_SUBMITS = 8
# After a job's last frame, the client gets `quit` over signaling (sleap-rtc 0.0.7's CLI
# waits for it to exit) once the data channel has drained, plus this margin.
UPSTREAM_QUIT_MARGIN_S = 0.5


class UpstreamAdapter:
    """Serves one sleap-rtc 0.0.7 client's link for its Session.

    `handle` runs on the session's reader thread, `deliver` and `files_then`'s actions on
    its writer; they share only `_jobs`.
    """

    def __init__(self, session: W.Session):
        self.session = session
        self.worker = session.worker
        self.nonce = P.b64url(secrets.token_bytes(32))
        self.authenticated = False
        self.held: list[str] = []  # reader thread only
        # Guards _jobs (our job id -> what the client knows of it: its own id, type, model
        # count, models finished, when the current one started, whether its inference after
        # training runs, the last model's TRAIN_JOB_END) and each job's "ended"; "done",
        # "started", "inferring" and "last_model" change on the writer thread only.
        self._lock = threading.Lock()
        self._jobs: dict[str, dict] = {}
        self._say(upstream_frame(UP_AUTH_CHALLENGE, self.nonce))  # the first frame the client reads

    # -- reader side ----------------------------------------------------------------------

    def _say(self, *frames) -> None:
        def action(link: P.Link) -> None:
            for frame in frames:
                link.send_raw(frame)

        self.session.outbox.put(action)

    def handle(self, text) -> None:
        """One frame from the client: by its name, else as a control frame, else refused."""
        if not isinstance(text, str):
            return
        name, rest = upstream_split(text)
        if name == UP_AUTH_RESPONSE:
            if not self.authenticated:  # one answer per challenge
                self._authenticate(rest)
        elif name == UP_JOB_SUBMIT:
            self._on_submit(text)
        elif (action := upstream_control(text)) is not None:
            self._control(action, rest if name in (UP_JOB_CANCEL, UP_JOB_STOP) else "")
        else:
            name = name[:40]
            log.info("%s (sleap-rtc 0.0.7) sent %s, which this worker does not serve", self.session.peer_id, name)
            self._say(f"this worker does not serve {name}: it takes JOB_SUBMIT, CONTROL_COMMAND, JOB_STOP and "
                      "JOB_CANCEL from sleap-rtc 0.0.7 clients\n")

    def _on_submit(self, text: str) -> None:
        if self.authenticated:
            self._submit(text)
        elif len(self.held) < MAX_HELD_SUBMITS:
            self.held.append(text)  # the client submits as its channel opens, before it answers
        else:
            self._say(upstream_rejected(parse_upstream_submit(text).client_id, [P.spec_error(
                "auth", "answer AUTH_CHALLENGE before submitting more jobs", "NOT_AUTHENTICATED")]))

    def _authenticate(self, response: str) -> None:
        """An HMAC passes when it is the room secret's. Any other answer (`missing`, or an
        Ed25519 signature this worker has no key to check) passes unless the worker wants
        the room secret: entering the room took its token or membership already."""
        if len(response.rstrip("=")) != UP_HMAC_CHARS:
            ok = not self.worker.require_room_secret
            reason = "this worker requires the room secret (client.py login --sleap-rtc-credentials stores it)"
        else:
            ok = upstream_auth_ok(upstream_room_secret(self.worker.token), self.nonce, response)
            reason = "the response is not the room secret's HMAC of the challenge"
        if not ok:  # said, then the link is closed and the client told to go
            log.warning("%s (sleap-rtc 0.0.7) failed authentication: %s", self.session.peer_id, reason)
            self._say(upstream_frame(UP_AUTH_FAILURE, reason),
                      *(upstream_rejected(parse_upstream_submit(t).client_id, [P.spec_error(
                          "auth", f"authentication failed: {reason}", "NOT_AUTHENTICATED")]) for t in self.held))
            self.held.clear()
            self.session.outbox.put(self._quit)
            self.session.end()
            return
        self.authenticated = True
        self._say(UP_AUTH_SUCCESS)
        held, self.held = self.held, []
        for text in held:
            self._submit(text)

    def _submit(self, text: str) -> None:
        submit = parse_upstream_submit(text)
        job_id = f"job_{secrets.token_hex(4)}"
        job_dir = self.worker.scheduler.jobs_dir / job_id
        kind = submit.specs[0]["type"] if submit.specs else P.TRAIN
        infer = kind == P.TRAIN and bool(submit.specs and submit.specs[0].get("labels"))
        with self._lock:
            self._jobs[job_id] = {"client_id": submit.client_id, "kind": kind, "models": len(submit.specs),
                                  "done": 0, "started": time.time(), "ended": False, "inferring": False}
        errors, plans, made_dir = list(submit.errors), [], False
        if not errors:
            for index, (spec, content) in enumerate(zip(submit.specs, submit.contents)):
                if content is not None:  # a config sent inline is read from the job's directory
                    job_dir.mkdir(parents=True, exist_ok=True)
                    spec["config"] = str(job_dir / f"sent-{spec['config']}")
                    Path(spec["config"]).write_text(content, encoding="utf-8")
                    made_dir = True
                if spec.get("output") and not Path(spec["output"]).is_absolute():
                    job_dir.mkdir(parents=True, exist_ok=True)  # upstream's default is a bare file name
                    spec["output"] = str(job_dir / spec["output"])
                    made_dir = True
                problems, plan = self.worker.validate(spec, job_dir)
                model = f"model {index + 1}: " if len(submit.specs) > 1 else ""
                errors += [{**e, "message": model + e["message"]} for e in problems]
                plans.append(plan)
        accepted, files = {}, {}
        if not errors:
            relabels = {r["copy"]: r for plan in plans for r in plan.get("relabel", [])}
            checkpoints = {path: c for plan in plans for path, c in plan.get("checkpoints", {}).items()}
            accepted = {**submit.specs[0], "_resolved": plans[0]["paths"], "_upstream": submit.client_id,
                        **({"_epochs": plans[0]["epochs"]} if "epochs" in plans[0] else {}),
                        # Inference after training, on the labels as the training reads them.
                        **({"_infer_after": plans[0]["paths"]["data_config.train_labels_path"][0]} if infer else {}),
                        **({"_relabel": list(relabels.values())} if relabels else {}),
                        **({"_checkpoints": checkpoints} if checkpoints else {})}
            files = {self.worker.config_file: plans[0]["config_text"]} if kind == P.TRAIN else {}
            more = []
            for index, (spec, plan) in enumerate(zip(submit.specs[1:], plans[1:]), start=1):
                config_file = f"config-{index}.yaml"
                files[config_file] = plan["config_text"]
                more.append({"config": spec["config"], "run_name": spec.get("run_name"), "_resolved": plan["paths"],
                             "_config_file": config_file, "_epochs": plan.get("epochs")})
            if more:
                accepted["_more"] = more
        if not self.session.admit(job_id, errors, accepted, files) and made_dir:
            shutil.rmtree(job_dir, ignore_errors=True)  # nothing of a refused job stays behind

    def _control(self, action: str, named: str = "") -> None:
        """Stop early or cancel the job the client named (by its own id or ours), else its
        latest job that has not ended. A name that is none of its live jobs touches none."""
        with self._lock:
            live = [job_id for job_id, job in self._jobs.items() if not job["ended"]]
            chosen = [job_id for job_id in live if named in (job_id, self._jobs[job_id]["client_id"])] \
                if named else live[-1:]
        if not chosen:
            self._say(f"no job {P.echo(named)} of this connection is running on this worker\n" if named else
                      "no job of this connection is running on this worker\n")
            return
        self.session.control(action, {"job_id": chosen[-1]})

    # -- writer side ----------------------------------------------------------------------

    def deliver(self, link: P.Link, name: str, payload: dict) -> None:
        """Write one of our messages as the frames a sleap-rtc 0.0.7 client understands;
        after a job's last frame, tell the client it may go."""
        job_id = str(payload.get("job_id", ""))
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            if name in (P.LINK_ERROR, P.JOB_DETACHED):
                link.send_raw(f"{payload.get('message') or payload.get('reason')}\n")
            return
        frames, final = [], name in (P.JOB_COMPLETE, P.JOB_FAILED, P.JOB_REJECTED)
        if name == P.JOB_ACCEPTED:
            frames.append(upstream_frame(UP_JOB_ACCEPTED, job_id))
            if payload.get("queue_position"):
                frames.append(f"job {job_id} queued at position {payload['queue_position']} on this worker\n")
        elif name == P.JOB_REJECTED:
            frames.append(upstream_rejected(job["client_id"], payload["errors"]))
        elif name == P.JOB_LOG:
            batch = P.LogBatch.read(payload)
            if job["kind"] == P.TRACK:
                frames += upstream_track_log(batch.lines, batch.progress)
            elif job["inferring"]:
                frames += [upstream_frame(UP_INFERENCE_LOG, line) for _, line in batch.lines]
            else:
                frames += upstream_log(batch.lines, batch.progress)
        elif name == P.PROGRESS_REPORT:
            frames.append(upstream_frame(UP_PROGRESS_REPORT, payload["report"]))
        elif name == P.JOB_PROGRESS and payload.get("event") == "epoch_end":
            frames.append(upstream_epoch(payload.get("epoch"), payload.get("loss"), payload.get("val_loss")))
        elif name == P.JOB_PROGRESS and payload.get("event") == "inference":
            report = {k: v for k, v in payload.items() if k not in ("job_id", "event")}
            frames.append(upstream_frame(UP_INFERENCE_PROGRESS, json.dumps(report)) if job["inferring"] else
                          upstream_frame(UP_JOB_LOG, UP_CR + upstream_inference_line(report)))
        elif name == P.INFERENCE_START:  # the last model trained: its JOB_COMPLETE, then inference
            last = job.get("last_model", {})
            frames += [self._completion(job_id, job, bool(last.get("stopped_early")), last.get("model_dir")),
                       upstream_frame(UP_INFERENCE_BEGIN, "{}")]
            job["inferring"] = True
        elif name == P.JOB_PROGRESS and payload.get("event") == "queued":
            frames.append(f"job {job_id} is at position {payload['queue_position']} in the queue\n")
        elif name == P.TRAIN_JOB_START:
            job["started"] = time.time()
            if job["models"] > 1:
                frames.append(f"Training model {job['done'] + 1}/{job['models']}: {payload.get('name')}\n")
        elif name == P.TRAIN_JOB_END:
            if job["done"] + 1 < job["models"]:
                frames.append(self._completion(job_id, job, bool(payload.get("stopped_early")),
                                               payload.get("model_dir")))
                job["done"] += 1
            else:  # the last model's JOB_COMPLETE goes with the job's end, or before its inference
                job["last_model"] = payload
        elif name == P.JOB_CONTROL:
            frames.append(f"{payload.get('message')}\n")
        elif name == P.JOB_DETACHED:
            frames.append(f"{payload.get('reason')}\n")
        elif name == P.JOB_COMPLETE:
            outcome = P.Outcome.read(payload)
            if outcome.warning:
                frames.append(f"warning: {outcome.warning}\n")
            predictions = [o["path"] for o in outcome.outputs if o["kind"] == "predictions"]
            if job["inferring"] and predictions:  # they went just before this (Session._listener)
                frames.append(upstream_frame(UP_INFERENCE_COMPLETE, json.dumps({"predictions_path": predictions[-1]})))
            elif job["inferring"]:  # the models trained (the job completed); their inference failed
                frames.append(upstream_frame(UP_INFERENCE_FAILED, json.dumps(
                    {"error": outcome.warning or "no predictions"})))
            else:
                frames.append(self._completion(job_id, job, outcome.stopped_early,
                                               outcome.outputs[-1]["path"] if outcome.outputs else None))
                if job["kind"] == P.TRAIN:  # the GUI waits for the end of an inference
                    frames.append(upstream_frame(UP_INFERENCE_SKIPPED, json.dumps({"reason": "no_labels_path"})))
        elif name == P.JOB_FAILED:
            outcome = P.Outcome.read(payload)
            error = outcome.error or f"the job ended {outcome.state}"
            if job["inferring"]:  # cancelled during its inference: upstream says {"error": "cancelled"}
                cancelled = outcome.state == P.CANCELLED
                frames.append(upstream_frame(UP_INFERENCE_FAILED, json.dumps({"error": "cancelled" if cancelled
                                                                                else error})))
            else:
                frames.append(upstream_failed(self._model_job_id(job_id, job), job["kind"], outcome.exit_code,
                                              outcome.duration_s, error))
                if job["kind"] == P.TRAIN:
                    reason = "cancelled" if outcome.state == P.CANCELLED else "training_failed"
                    frames.append(upstream_frame(UP_INFERENCE_SKIPPED, json.dumps({"reason": reason})))
        for frame in frames:
            link.send_raw(frame)
        if final:
            with self._lock:
                job["ended"] = True
                live = any(not j["ended"] for j in self._jobs.values())
            if not live:  # upstream's path correction needs its file browser, which is not served here
                self._quit(link)

    @staticmethod
    def _model_job_id(job_id: str, job: dict) -> str:
        """Upstream numbers the models of a multi-model job as JOB_0, JOB_1, ..."""
        return f"{job_id}_{job['done']}" if job["models"] > 1 else job_id

    def _completion(self, job_id: str, job: dict, stopped_early: bool, output: Optional[str]) -> str:
        """JOB_COMPLETE for the model that just ended (each model of a multi-model job has one)."""
        return upstream_complete(self._model_job_id(job_id, job), job["kind"], time.time() - job["started"],
                                 stopped_early, output)

    def _quit(self, link: P.Link) -> None:
        link.drain(timeout=10)
        time.sleep(UPSTREAM_QUIT_MARGIN_S)
        try:
            self.worker.signaling.send(P.quit_frame(self.worker.peer_id, link.peer_id))
        except P.SleapRTCError as exc:
            log.info("could not tell %s its job is over: %s", link.peer_id, exc)

    def files_then(self, paths: list[Path], then: tuple[str, dict]) -> Callable[[P.Link], None]:
        """A writer action: each file as FILE_META, binary chunks and END_OF_FILE (upstream
        keeps them in its output directory), then the message `then`."""

        def action(link: P.Link) -> None:
            for path in paths:
                try:
                    with open(path, "rb") as f:
                        P.check_opened(f, path)
                        link.send_raw(upstream_file_meta(path.name, os.fstat(f.fileno()).st_size))
                        while chunk := f.read(P.CHUNK_BYTES):
                            link.send_raw(chunk)
                    link.send_raw(UP_END_OF_FILE)
                    log.info("sent %s to %s (sleap-rtc 0.0.7)", path, link.peer_id)
                except (OSError, P.TransferError) as exc:
                    log.warning("sending %s to %s failed: %s", path, link.peer_id, exc)
                    link.send_raw(f"{path.name} could not be sent: {exc}\n")
            self.deliver(link, *then)

        return action

