"""SLEAP training packages: the zips SLEAP exports, read as hostile input and never run by a shell.

An optional capability of the worker: `worker.py` imports this file when a package job
comes and, without it, leaves "package" out of its job types and refuses such jobs with a
reason naming this file.

A package holds a labels file (with its frames), each model's config, and either jobs.yaml
or shell scripts that would train and predict. Nothing in it is run: the scripts are read
as lines of words, each must be a sleap training or inference command, and each becomes a
structured step checked as a client's train or track job would be.

Read top to bottom:

1. limits and the words a package script may hold;
2. opening a package: every entry checked before anything is read;
3. reading scripts and jobs.yaml into steps (`_PackageReader`, `plan_package`);
4. at acceptance (`validate_package`) and at start (`prepare`, `unpack_package`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import protocol as P
import worker as W

# ---------------------------------------------------------------------------------------
# Limits and words
# ---------------------------------------------------------------------------------------


PACKAGE_MAX_ENTRIES = 256
PACKAGE_MAX_BYTES = 64 * 2**30  # unpacked; packages embed their frames, so they can be big
PACKAGE_MAX_RATIO = 100  # unpacked / packed of an entry over 1 MiB; a zip bomb is past it (frames pack ~1:1)
PACKAGE_TEXT_BYTES = 1024 * 1024  # most a script or jobs.yaml may hold
JOBS_FILE = "jobs.yaml"
TRAIN_SCRIPT = "train-script.sh"
INFERENCE_SCRIPTS = ("inference-script.sh", "track-script.sh")  # SLEAP 1.6 writes the first, older ones the second
WORKER_DEVICE = "auto"  # sleap-nn takes the worker's GPU when it has one; a package names the laptop's device
# The commands a package script may hold (their first words); each runs as sleap-nn.
_TRAIN_WORDS = (("sleap", "train"), ("sleap-nn", "train"), ("sleap-train",), ("sleap-nn-train",))
_PREDICT_WORDS = (("sleap", "predict"), ("sleap-nn", "predict"), ("sleap", "track"), ("sleap-nn", "track"),
                  ("sleap-track",), ("sleap-nn-track",))
_OVERRIDE_RE = re.compile(r"\+{0,2}((?:data_config|model_config|trainer_config)(?:\.\w+)+)=(.*)", re.S)
_SHELL_OPERATOR_RE = re.compile(r"[();<>|&]+")
_PLAIN_VALUE_RE = re.compile(r"(-?\d+(\.\d*)?([eE][-+]?\d+)?|true|false|null)")
# Options of an inference line: the option each sets, and its type (None: a switch).
_PREDICT_OPTIONS = {"--data_path": ("data_path", str), "-i": ("data_path", str),
                    "--model_paths": ("model_paths", list), "-m": ("model_paths", list),
                    "--output_path": ("output", str), "--output": ("output", str), "-o": ("output", str),
                    "--video_index": ("video_index", int), "--frames": ("frames", str),
                    "--batch_size": ("batch_size", int), "-b": ("batch_size", int),
                    "--peak_threshold": ("peak_threshold", float), "--max_instances": ("max_instances", int),
                    "-n": ("max_instances", int), "--device": ("device", str), "-d": ("device", str),
                    "--only_suggested_frames": ("only_suggested_frames", None),
                    "--only_labeled_frames": ("only_labeled_frames", None),
                    "--exclude_user_labeled": ("exclude_user_labeled", None),
                    "--no_empty_frames": ("no_empty_frames", None),
                    "--tracking": ("tracking", None), "-t": ("tracking", None), "--gui": ("gui", None)}
# jobs.yaml's inference keys and the option each is.
_JOBS_INFERENCE_KEYS = {"data_path": "data_path", "models": "model_paths", "output_path": "output",
                        "only_suggested_frames": "only_suggested_frames",
                        "only_labeled_frames": "only_labeled_frames", "exclude_user_labeled": "exclude_user_labeled",
                        "video_index": "video_index", "frames": "frames", "tracking": "tracking"}


class PackageRefused(Exception):
    """A package the worker will not run; the message says why."""


def _unreadable_zip_errors() -> tuple:
    """What reading a damaged zip raises: bad CRCs and headers, damaged deflate data, short files."""
    import zipfile
    import zlib

    return zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError


@dataclass
class PackagePlan:
    """What a package runs, checked before anything is unpacked: its steps in order, the
    checked text of each model's config, and what the worker decided in the package's
    stead (written into the job's log)."""

    steps: list["W.Step"]
    configs: dict[str, str]
    notes: list[str]
    # Files sleap-nn will unpickle (see worker.py's CHECKPOINT_KEYS).
    checkpoints: list[str] = dataclasses.field(default_factory=list)


def package_dir_for(package: Path, job_id: str, uploaded: bool, job_dir: Path) -> Path:
    """Where a package is unpacked: in the job's directory when it was uploaded, else
    next to the package on shared storage (one directory per job, never reused)."""
    return job_dir / "package" if uploaded else package.parent / f"{package.stem}-{job_id}"


def open_package(path: Path):
    """The zip file and its members by name, once every entry passed the checks of a
    hostile archive; raises PackageRefused, FileNotFoundError."""
    import stat
    import zipfile

    if not path.is_file():
        raise FileNotFoundError(f"FileNotFoundError: package {path} does not exist on the worker")
    try:
        archive = zipfile.ZipFile(path)
        entries = archive.infolist()
    except _unreadable_zip_errors() as exc:  # UnicodeDecodeError (a bad UTF-8 name) is a ValueError
        raise PackageRefused(f"{path.name} is not a readable zip file: {exc}") from None
    try:
        if len(entries) > PACKAGE_MAX_ENTRIES:
            raise PackageRefused(f"{path.name} has {len(entries)} entries; a training package has a handful "
                                 f"(at most {PACKAGE_MAX_ENTRIES} are accepted)")
        members, total = {}, 0
        for info in entries:
            name = info.filename
            shown = repr(name[:100])
            mode = info.external_attr >> 16
            if not info.flag_bits & 0x800 and not name.isascii():
                raise PackageRefused(f"entry {shown} has a name that is not marked UTF-8")
            if info.flag_bits & 0x1:
                raise PackageRefused(f"entry {shown} is encrypted")
            if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
                raise PackageRefused(f"entry {shown} has an absolute name")
            parts = name.rstrip("/").split("/")
            if "\\" in name or any(p in ("", ".", "..") for p in parts) or any(ord(c) < 32 for c in name):
                raise PackageRefused(f"entry {shown} would land outside the package ('..', backslashes or "
                                     "control characters in its name)")
            if mode and stat.S_ISLNK(mode):
                raise PackageRefused(f"entry {shown} is a symbolic link")
            if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise PackageRefused(f"entry {shown} is not a regular file (a device, pipe or socket)")
            if info.is_dir():
                continue
            if info.file_size > 2**20 and info.file_size > PACKAGE_MAX_RATIO * max(1, info.compress_size):
                raise PackageRefused(f"entry {shown} unpacks {info.compress_size} bytes into {info.file_size} "
                                     f"(more than {PACKAGE_MAX_RATIO}:1): refused as a zip bomb")
            total += info.file_size
            if name in members:
                raise PackageRefused(f"entry {shown} appears twice")
            members[name] = info
        if total > PACKAGE_MAX_BYTES:
            raise PackageRefused(f"{path.name} unpacks to {total / 2**30:.1f} GiB, more than the "
                                 f"{PACKAGE_MAX_BYTES // 2**30} GiB accepted")
    except PackageRefused:
        archive.close()
        raise
    return archive, members


def _member_text(archive, info, limit: int = PACKAGE_TEXT_BYTES) -> str:
    if info.file_size > limit:
        raise PackageRefused(f"{info.filename} is {info.file_size} bytes; more than {limit // 1024} KiB")
    try:
        with archive.open(info) as f:
            return f.read(limit + 1)[:limit].decode("utf-8")
    except _unreadable_zip_errors() as exc:
        raise PackageRefused(f"{info.filename} cannot be read from the package: {exc}") from None


def script_commands(text: str, script: str) -> list[tuple[int, list[str]]]:
    """The commands of a package script, as (line number, words): comments, blank lines
    and backslash continuations handled as a shell would, quoting by shlex. Nothing is
    executed; shell operators, substitutions and variables are refused with the line."""
    import shlex

    commands, pending, first = [], "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if not pending:
            first = number
        if (len(line) - len(line.rstrip("\\"))) % 2 == 1:  # an odd number of backslashes continues the line
            pending += line[:-1]
            continue
        full, pending = pending + line, ""
        lexer = shlex.shlex(full, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            words = list(lexer)
        except ValueError as exc:
            raise PackageRefused(f"{script} line {first}: {exc}") from None
        if not words:
            continue
        for word in words:
            if _SHELL_OPERATOR_RE.fullmatch(word):
                raise PackageRefused(f"{script} line {first}: shell operator {word!r}; package scripts are read, "
                                     "never run by a shell, so each line must be one sleap command")
            if "$" in word and "${" not in word or "`" in word:
                raise PackageRefused(f"{script} line {first}: {word[:80]!r} asks for shell expansion; package "
                                     "scripts are read, never run by a shell")
        commands.append((first, words))
    if pending:
        raise PackageRefused(f"{script} line {first}: the last line ends in a continuation")
    return commands


def _command_kind(words: list[str]) -> tuple[Optional[str], list[str]]:
    """(P.TRAIN or P.TRACK, the arguments after the command), or (None, words)."""
    for kind, forms in ((P.TRAIN, _TRAIN_WORDS), (P.TRACK, _PREDICT_WORDS)):
        for form in forms:
            if tuple(words[:len(form)]) == form:
                return kind, words[len(form):]
    return None, words


def _unquote(value: str):
    """A Hydra override's value as the package meant it: quotes taken off, [a,b] a list."""
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    if value.startswith("[") and value.endswith("]"):
        return [_unquote(v) for v in value[1:-1].split(",") if v.strip()]
    return value


def _override_value(value) -> str:
    """A checked override's value for the sleap-nn command line: numbers, booleans and
    null as they are, everything else a literal string."""
    if isinstance(value, list):
        return f"[{','.join(_override_value(v) for v in value)}]"
    return value if _PLAIN_VALUE_RE.fullmatch(value) else W.hydra_value(value)


def _train_arguments(args: list[str], where: str) -> tuple[str, dict]:
    """The config (a package path) and the overrides of a training line."""
    config_name = config_dir = config = None
    overrides: dict = {}
    i = 0
    while i < len(args):
        arg, i = args[i], i + 1
        option, _, attached = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if option in ("--config-name", "-cn", "--config-dir", "-cd", "--config", "-c"):
            if not attached:
                if i >= len(args):
                    raise PackageRefused(f"{where}: {option} needs a value")
                attached, i = args[i], i + 1
            if option in ("--config-name", "-cn"):
                config_name = attached
            elif option in ("--config-dir", "-cd"):
                config_dir = attached
            else:
                config = attached
        elif match := _OVERRIDE_RE.fullmatch(arg):
            overrides[match.group(1)] = _unquote(match.group(2))
        elif arg.startswith("-"):
            raise PackageRefused(f"{where}: {arg[:60]!r} is not an option the worker passes to sleap-nn train")
        elif arg.endswith((".yaml", ".yml", ".json")) and config is None and config_name is None:
            config = arg
        elif arg.endswith(".slp"):
            overrides.setdefault("data_config.train_labels_path", []).append(arg)
        else:
            raise PackageRefused(f"{where}: {arg[:60]!r} is neither an option of sleap-nn train nor a "
                                 "key=value override")
    if config_name is not None:
        if not config_name.endswith((".yaml", ".yml", ".json")):
            config_name += ".yaml"
        config = f"{config_dir or '.'}/{config_name}"
    if config is None:
        raise PackageRefused(f"{where}: no config (--config-name NAME --config-dir DIR)")
    return config, overrides


def _predict_arguments(args: list[str], where: str) -> dict:
    """The options of an inference line, by the names in _PREDICT_OPTIONS."""
    options: dict = {}
    i = 0
    while i < len(args):
        arg, i = args[i], i + 1
        option, has_value, attached = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if not arg.startswith("-"):
            if "data_path" in options:
                raise PackageRefused(f"{where}: {arg[:60]!r} is a second data path")
            options["data_path"] = arg
            continue
        if option not in _PREDICT_OPTIONS:
            raise PackageRefused(f"{where}: {option[:60]!r} is not an inference option this worker passes on")
        name, kind = _PREDICT_OPTIONS[option]
        if kind is None:
            options[name] = True
            continue
        if not has_value:
            if i >= len(args):
                raise PackageRefused(f"{where}: {option} needs a value")
            attached, i = args[i], i + 1
        if kind is list:
            options.setdefault(name, []).append(attached)
            continue
        try:
            options[name] = kind(attached)
        except ValueError:
            raise PackageRefused(f"{where}: {option} takes a {kind.__name__}, not {attached[:40]!r}") from None
    return options


def sleap_frames(text: str) -> Optional[str]:
    """SLEAP's --frames (a list "0,5,9", or a range "0-39" also written "0,-39") in
    sleap-nn's syntax, or None when it is neither."""
    text = str(text).replace(" ", "")
    if "-" in text:
        start, _, end = text.partition("-")
        start = start.rstrip(",")
        if start.isdigit() and end.isdigit() and int(end) >= int(start):
            return f"{int(start)}-{int(end)}"
        return None
    return text if text and all(part.isdigit() for part in text.split(",")) else None


class _PackageReader:
    """Turns a package's jobs.yaml or scripts into checked steps, resolving every path:
    a relative one inside the unpacked package (reads must be in the package or made by
    an earlier step), an absolute one inside the worker's mounts."""

    def __init__(self, archive, members: dict, unpack_dir: Path, mounts: list[W.Mount], write_mounts: list[W.Mount],
                 executable: str, config_dir: Path, progress: bool):
        self.archive = archive
        self.members = members
        self.unpack_dir = unpack_dir
        self.mounts = mounts
        self.writable = write_mounts + [W.Mount(unpack_dir, "package")]
        self.executable = executable
        self.config_dir = config_dir
        self.progress = progress
        self.produced: list[str] = []  # package paths of the models trained so far
        self.plan = PackagePlan([], {}, [])

    # -- paths ----------------------------------------------------------------------------

    def path(self, text, what: str, writes: bool = False) -> str:
        if not isinstance(text, str) or not text:
            raise W.PathRefused(f"{what}: expected a path, not {P.echo(text)}")
        if "${" in text:
            raise W.PathRefused(f"{what}: {text[:80]} uses an interpolation; write the path out")
        if text.startswith(("/", "~", "\\")) or re.match(r"^[A-Za-z]:[\\/]", text):
            return W.resolve_path(text, self.writable if writes else self.mounts, must_exist=not writes)
        relative = os.path.normpath(text.replace("\\", "/"))
        if relative == ".." or relative.startswith("../"):
            raise W.PathRefused(f"{what}: {text[:80]} climbs out of the package", "ACCESS_DENIED")
        if not writes and not self._known(relative):
            raise W.PathRefused(f"{what}: {text[:80]} is not in the package", "NOT_FOUND")
        return str(self.unpack_dir / relative) if relative != "." else str(self.unpack_dir)

    def _known(self, relative: str) -> bool:
        inside = relative + "/"
        return any(name == relative or name.startswith(inside) for name in self.members) or any(
            relative == made or relative.startswith(made + "/") for made in self.produced)

    def labels(self) -> list[str]:
        return sorted(name for name in self.members if name.endswith(".slp") and "/" not in name)

    # -- training -------------------------------------------------------------------------

    def train(self, config: str, overrides: dict, where: str) -> None:
        name_in_package = os.path.normpath(config.replace("\\", "/"))
        info = self.members.get(name_in_package)
        if info is None:
            raise PackageRefused(f"{where}: config {config} is not in the package")
        if name_in_package.endswith(".json"):
            raise PackageRefused(f"{where}: {config} is a SLEAP 1.x (TensorFlow) config; sleap-nn trains from "
                                 "YAML configs (export the package from SLEAP 1.5 or later)")
        text = _member_text(self.archive, info, W.MAX_CONFIG_BYTES)
        settings, text, problem = W.parse_config(text.encode("utf-8"), config)
        if problem:
            raise PackageRefused(f"{where}: {problem}")
        for key, value in overrides.items():
            if any(W.RESOLVER_RE.search(v) or "${" in v for v in (value if isinstance(value, list) else [value])):
                raise PackageRefused(f"{where}: the override {key} uses an interpolation or resolver "
                                     "(${...}); write the value out")
        problem = W.internet_problem(overrides)
        if problem:
            raise PackageRefused(f"{where}: {problem}")
        model = Path(name_in_package).stem
        paths = {}
        try:
            for key in W.CONFIG_READS + W.CONFIG_WRITES:
                value = overrides.pop(key, W.config_value(settings, key))
                if value in (None, "", []) or (key in W.CONFIG_WRITES and value == "."):
                    continue
                resolved = [self.path(v, f"{where}: {key}", writes=key in W.CONFIG_WRITES)
                            for v in (value if isinstance(value, list) else [value])]
                paths[key] = resolved if isinstance(value, list) else resolved[0]
                if key in W.CHECKPOINT_KEYS:
                    self.plan.checkpoints += resolved
            ckpt = paths.pop("trainer_config.ckpt_dir", str(self.unpack_dir))
        except W.PathRefused as exc:
            raise PackageRefused(str(exc)) from None
        run_name = W.safe_run_name(str(overrides.pop("trainer_config.run_name", None)
                                     or W.config_value(settings, "trainer_config.run_name") or model))
        accelerator = overrides.pop("trainer_config.trainer_accelerator", None) or \
            W.config_value(settings, "trainer_config.trainer_accelerator")
        if accelerator not in (None, WORKER_DEVICE):
            self.note(f"{model}: the package asks for trainer_accelerator {accelerator} (the exporting machine's); "
                      f"this worker uses {WORKER_DEVICE}")
        for key in [k for k in overrides if k.startswith("trainer_config.zmq.") or k == "trainer_config.save_ckpt"]:
            self.note(f"{model}: the override {key} is the worker's to set; ignored")
            del overrides[key]
        settings_overrides = {"trainer_config.save_ckpt": "true", "trainer_config.ckpt_dir": W.hydra_value(ckpt),
                              "trainer_config.run_name": W.hydra_value(run_name),
                              "trainer_config.trainer_accelerator": WORKER_DEVICE,
                              **{k: _override_value(v) for k, v in overrides.items()},
                              **{k: W.hydra_paths(v) for k, v in paths.items()}}
        if model in self.plan.configs:
            raise PackageRefused(f"{where}: the model {model} is trained twice")
        self.plan.configs[model] = text
        args = [self.executable, "train", "--config-dir", str(self.config_dir), "--config-name", model]
        args += [f"++{key}={value}" for key, value in settings_overrides.items()]
        epochs = overrides.get("trainer_config.max_epochs") or W.config_value(settings, "trainer_config.max_epochs")
        self.plan.steps.append(W.Step(P.TRAIN, model, args, self.unpack_dir, Path(ckpt), run_name,
                                    int(epochs) if str(epochs).isdigit() else None))
        made = Path(ckpt) / run_name
        if made.is_relative_to(self.unpack_dir):
            self.produced.append(str(made.relative_to(self.unpack_dir)))

    # -- inference ------------------------------------------------------------------------

    def inference(self, options: dict, where: str) -> None:
        try:
            data = self._data_path(options.get("data_path"), where)
            models = options.get("model_paths") or []
            if not models:
                raise PackageRefused(f"{where}: no --model_paths")
            models = [self.path(m, f"{where}: model") for m in models]
            self.plan.checkpoints += models
            output = self.path(options.get("output") or f"{Path(data).name}.predictions.slp", f"{where}: output",
                               writes=True)
        except W.PathRefused as exc:
            raise PackageRefused(str(exc)) from None
        if options.get("device") not in (None, WORKER_DEVICE):
            self.note(f"inference: the package asks for device {options['device']} (the exporting machine's); "
                      f"this worker uses {WORKER_DEVICE}")
        args = [self.executable, "predict", "--data_path", data]
        for model in models:
            args += ["--model_paths", model]
        args += ["--output_path", output, "--device", WORKER_DEVICE]
        if options.get("frames") is not None:
            frames = sleap_frames(options["frames"])
            if frames is None:
                raise PackageRefused(f"{where}: --frames {str(options['frames'])[:40]!r} is neither a list "
                                     "(0,5,9) nor a range (0-39)")
            if frames != str(options["frames"]):
                self.note(f"inference: frames {options['frames']} (SLEAP's syntax) passed as {frames}")
            args += ["--frames", frames]
        for name in ("video_index", "batch_size", "max_instances", "peak_threshold"):
            if options.get(name) is not None:
                args += [f"--{name}", str(options[name])]
        for name in ("only_suggested_frames", "only_labeled_frames", "exclude_user_labeled", "no_empty_frames",
                     "tracking"):
            if options.get(name):
                args.append(f"--{name}")
        if self.progress:
            args.append("--gui")
        self.plan.steps.append(W.Step(P.TRACK, "inference", args, self.unpack_dir, output=Path(output)))

    def _data_path(self, text, where: str) -> str:
        """The data to predict on. A path from the exporting machine that this worker does
        not have becomes the package's own labels when the names match (synth.slp and
        synth.pkg.slp)."""
        if not isinstance(text, str) or not text:
            raise PackageRefused(f"{where}: no --data_path")
        try:
            return self.path(text, f"{where}: data_path")
        except W.PathRefused as exc:
            name = re.split(r"[\\/]", text)[-1]
            stem = name[:-len(".slp")] if name.endswith(".slp") else name
            match = [m for m in self.labels() if m in (name, f"{stem}.pkg.slp")]
            if not match:
                raise PackageRefused(str(exc)) from None
            self.note(f"inference: data_path {text[:200]} is not on this worker; using the package's {match[0]}")
            return str(self.unpack_dir / match[0])

    def note(self, text: str) -> None:
        self.plan.notes.append(text)


def plan_package(path: Path, job_type: str, unpack_dir: Path, mounts: list[W.Mount], write_mounts: list[W.Mount],
                 executable: str, config_dir: Path, progress: bool) -> PackagePlan:
    """Read a package without unpacking it and say what it will run: every model to
    train (for a train job), then every inference, each checked like a structured job.
    jobs.yaml describes the package when present, else its scripts do. Raises
    PackageRefused or FileNotFoundError."""
    import yaml

    archive, members = open_package(path)
    with archive:
        reader = _PackageReader(archive, members, unpack_dir, mounts, write_mounts, executable, config_dir, progress)
        if JOBS_FILE in members:
            try:
                jobs = yaml.safe_load(_member_text(archive, members[JOBS_FILE]))
            except yaml.YAMLError as exc:
                raise PackageRefused(f"{JOBS_FILE} is not readable YAML: {str(exc)[:200]}") from None
            if not isinstance(jobs, dict):
                raise PackageRefused(f"{JOBS_FILE} is not a mapping with training and inference lists")
            training, inference = jobs.get("training") or [], jobs.get("inference") or []
            if not isinstance(training, list) or not isinstance(inference, list):
                raise PackageRefused(f"{JOBS_FILE}: training and inference must be lists")
            for number, entry in enumerate(training if job_type == P.TRAIN else [], 1):
                where = f"{JOBS_FILE} training {number}"
                if not isinstance(entry, dict) or not isinstance(entry.get("cfg"), str):
                    raise PackageRefused(f"{where}: needs cfg, the model's config in the package")
                overrides: dict = {}
                run_path = entry.get("run_path")
                if isinstance(run_path, str) and run_path:
                    folder, _, run_name = run_path.replace("\\", "/").rpartition("/")
                    overrides["trainer_config.ckpt_dir"] = folder or "."
                    overrides["trainer_config.run_name"] = run_name
                if isinstance(entry.get("train_labels"), str):
                    overrides["data_config.train_labels_path"] = [entry["train_labels"]]
                reader.train(entry["cfg"], overrides, where)
            for number, entry in enumerate(inference, 1):
                where = f"{JOBS_FILE} inference {number}"
                if not isinstance(entry, dict):
                    raise PackageRefused(f"{where}: not a mapping")
                options = {_JOBS_INFERENCE_KEYS[k]: v for k, v in entry.items() if k in _JOBS_INFERENCE_KEYS}
                if isinstance(options.get("model_paths"), str):
                    options["model_paths"] = [options["model_paths"]]
                options["tracking"] = bool(options.get("tracking"))
                ignored = sorted(set(entry) - set(_JOBS_INFERENCE_KEYS) - {"type"})
                if ignored:
                    reader.note(f"{where}: ignored {', '.join(map(str, ignored))}")
                reader.inference(options, where)
        else:
            scripts = ([TRAIN_SCRIPT] if job_type == P.TRAIN else []) + list(INFERENCE_SCRIPTS)
            for script in (s for s in scripts if s in members):
                for number, words in script_commands(_member_text(archive, members[script]), script):
                    kind, args = _command_kind(words)
                    where = f"{script} line {number}"
                    if kind is None or (kind == P.TRAIN) != (script == TRAIN_SCRIPT):
                        shown = " ".join(words)[:80]
                        raise PackageRefused(f"{where}: {shown!r} is not a sleap "
                                             f"{'training' if script == TRAIN_SCRIPT else 'inference'} command; "
                                             "package scripts are read, never run")
                    if kind == P.TRAIN:
                        reader.train(*_train_arguments(args, where), where)
                    else:
                        reader.inference(_predict_arguments(args, where), where)
    plan = reader.plan
    if job_type == P.TRAIN and not any(s.kind == P.TRAIN for s in plan.steps):
        raise PackageRefused(f"{path.name} trains no model: it has neither {JOBS_FILE} with training entries "
                             f"nor {TRAIN_SCRIPT}")
    if not plan.steps:
        raise PackageRefused(f"{path.name} runs no inference: it has neither {JOBS_FILE} with inference entries "
                             f"nor {' or '.join(INFERENCE_SCRIPTS)}")
    return plan


def validate_package(spec: dict, mounts: list[W.Mount], write_mounts: list[W.Mount], job_dir: Path,
                     store_dir: Optional[Path], trusted: Callable[[], set[str]] = set) -> tuple[list[dict], dict]:
    """The errors of a package job, and its plan: {"paths": {}, "package": {path, dir,
    uploaded}}. The package must lie inside the mounts; an uploaded one is unpacked in
    the job's directory, one on shared storage next to itself, which must be writable.
    A package that exists is read and planned now, so that a bad one is refused before
    anything is written; a missing one is accepted and fails when it would start, as
    SLEAP's workers always did."""
    try:
        path = Path(W.resolve_path(spec["package"], mounts, must_exist=False))
    except W.PathRefused as exc:
        return [P.spec_error("package", str(exc), exc.code)], {}
    uploaded = store_dir is not None and path.is_relative_to(store_dir)
    unpack_dir = package_dir_for(path, job_dir.name, uploaded, job_dir)
    if not uploaded:
        try:
            W.resolve_in_mounts(str(path.parent), write_mounts)
        except W.PathRefused:
            return [P.spec_error("package", f"{path.parent} is not writable for this worker, and a package on "
                                 "shared storage is unpacked next to itself; send it from your machine with "
                                 "--pkg-path instead", "ACCESS_DENIED")], {}
    if path.exists():
        try:
            planned = plan_package(path, spec["type"], unpack_dir, mounts, write_mounts, "sleap-nn",
                                   job_dir / "configs", spec.get("gui", True))
        except PackageRefused as exc:
            return [P.spec_error("package", str(exc), "BAD_PACKAGE")], {}
        except FileNotFoundError:
            pass  # gone since: the job fails when it would start, as for a package missing now
        else:  # checkpoints on shared storage now; those inside the package once it is unpacked
            problem = package_checkpoint_problem([c for c in planned.checkpoints if not
                                                  Path(c).is_relative_to(unpack_dir)], trusted)
            if problem:
                return [P.spec_error("package", problem, "UNSAFE_CHECKPOINT")], {}
    return [], {"paths": {}, "package": {"path": str(path), "dir": str(unpack_dir), "uploaded": uploaded}}


def package_checkpoint_problem(paths: list[str], trusted: Callable[[], set[str]]) -> Optional[str]:
    """Why one of a package's checkpoints is refused (see W.check_checkpoint), or None."""
    known = None
    for path in paths:
        try:
            files = W.checkpoint_files(path)
        except W.PathRefused as exc:
            return str(exc)
        for file in files:
            known = trusted() if known is None else known
            _, why = W.check_checkpoint(file, known) if file.exists() else (None, None)
            if why:
                return why
    return None


def unpack_package(path: Path, destination: Path) -> None:
    """Unpack a package into `destination` (which must not exist yet), through a hidden
    directory beside it renamed at the end: never half a package under its final name.
    Every entry is checked again, and one that unpacks to more than its header says is
    refused."""
    if destination.exists():
        raise PackageRefused(f"{destination} exists already")
    archive, members = open_package(path)
    partial = destination.with_name(f".{destination.name}.unpacking")
    try:
        with archive:
            free = shutil.disk_usage(destination.parent).free
            need = sum(info.file_size for info in members.values())
            if need > free:
                raise PackageRefused(f"unpacking needs {need} bytes; {free} are free in {destination.parent}")
            for name, info in members.items():
                target = partial / name
                target.parent.mkdir(parents=True, exist_ok=True)
                written = 0
                with archive.open(info) as source, open(target, "wb") as sink:
                    while chunk := source.read(1024 * 1024):
                        written += len(chunk)
                        if written > info.file_size:
                            raise PackageRefused(f"entry {name[:100]!r} unpacks to more than its header says")
                        sink.write(chunk)
        os.rename(partial, destination)
    except _unreadable_zip_errors() as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise PackageRefused(f"unpacking {path.name} failed: {exc}") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise




def prepare(job: "W.Job", readable_mounts: list, mounts: list, executable: str,
            trusted: Callable[[], set[str]]) -> tuple[list, list[str]]:
    """A starting package job's steps: the package's path checked again, then read again
    and unpacked; W.JobSetupError says why it cannot run. Runs on the job's thread."""
    package = job.spec["_package"]
    path, unpack_dir = Path(package["path"]), Path(package["dir"])
    try:
        if W.resolve_path(str(path), readable_mounts, must_exist=False) != str(path):
            raise W.PathRefused(f"{path} now leads elsewhere (a link changed after the job was accepted)")
        if not package["uploaded"]:
            W.resolve_in_mounts(str(unpack_dir.parent), mounts)
    except W.PathRefused as exc:
        raise W.JobSetupError(f"package: {exc}") from None
    try:
        plan = plan_package(path, job.kind, unpack_dir, readable_mounts, mounts,
                            executable, job.dir / "configs", job.spec.get("gui", True))
        unpack_package(path, unpack_dir)
    except FileNotFoundError as exc:
        raise W.JobSetupError(str(exc)) from None
    except PackageRefused as exc:
        raise W.JobSetupError(f"package: {exc}") from None
    problem = package_checkpoint_problem(plan.checkpoints, trusted)
    if problem:
        raise W.JobSetupError(f"package: {problem}")
    (job.dir / "configs").mkdir(exist_ok=True)
    for model, text in plan.configs.items():
        (job.dir / "configs" / f"{model}.yaml").write_text(text, encoding="utf-8")
    return plan.steps, [f"unpacked {path.name} into {unpack_dir}", *plan.notes]
