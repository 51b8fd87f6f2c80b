"""A real single-node SLURM cluster for the tests: munged, slurmctld and slurmd started in
the foreground from a slurm.conf in a temporary directory, stopped at the end.

    with SlurmCluster(tmp_dir) as cluster:
        env = {**os.environ, **cluster.env}   # SLURM_CONF for sbatch, squeue, ...

Needs Debian's slurm-wlm and munge (`.ci/run` installs them) and root, as the CI user is.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

PARTITION = "debug"
# More CPUs than this machine has (config_overrides): jobs queue only where the worker
# holds them back, never for lack of cores on a small test machine.
CPUS = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.dir / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []

    @staticmethod
    def available() -> str:
        """Why no cluster can start here, or "" when one can."""
        missing = [p for p in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(p) is None]
        if missing:
            return f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)"
        if os.geteuid() != 0:
            return "the test cluster runs its daemons as root"
        return ""

    def __enter__(self) -> "SlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        d = self.dir
        for sub in ("state", "spool", "munge"):
            (d / sub).mkdir(exist_ok=True)
        (d / "munge").chmod(0o700)
        key = d / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket_path = d / "munge" / "munge.socket"
        self.conf.write_text(f"""\
ClusterName=sleaprtc-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={socket_path}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=3600
KillWait=5
StateSaveLocation={d / "state"}
SlurmdSpoolDir={d / "spool"}
SlurmctldPidFile={d / "slurmctld.pid"}
SlurmdPidFile={d / "slurmd.pid"}
SlurmctldLogFile={d / "slurmctld.log"}
SlurmdLogFile={d / "slurmd.log"}
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={CPUS} RealMemory=4000 State=UNKNOWN
PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")
        env = {**os.environ, **self.env}
        log = open(d / "daemons.log", "ab")
        self.procs.append(subprocess.Popen(
            ["munged", "-F", "--force", f"--socket={socket_path}", f"--key-file={key}",
             f"--pid-file={d / 'munge' / 'munged.pid'}", f"--log-file={d / 'munge' / 'munged.log'}",
             f"--seed-file={d / 'munge' / 'munged.seed'}"], stdout=log, stderr=log, env=env))
        self._wait(lambda: socket_path.exists(), "munged's socket")
        self.procs.append(subprocess.Popen(["slurmctld", "-D", "-c", "-i"], stdout=log, stderr=log, env=env))
        self.procs.append(subprocess.Popen(["slurmd", "-D"], stdout=log, stderr=log, env=env))
        self._wait(self._node_ready, f"node {self.node} idle in sinfo")

    def _node_ready(self) -> bool:
        result = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True,
                                env={**os.environ, **self.env}, timeout=10)
        return result.returncode == 0 and result.stdout.strip() in ("idle", "mixed", "allocated")

    def _wait(self, ready, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a SLURM daemon exited while waiting for {what}: "
                                   f"{(self.dir / 'daemons.log').read_text(errors='replace')[-2000:]}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"no {what} within {timeout} s; see {self.dir}")

    def squeue(self) -> list[str]:
        """The ids of the jobs SLURM holds (pending or running)."""
        result = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True,
                                env={**os.environ, **self.env}, timeout=10, check=True)
        return result.stdout.split()

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "-u", "root"], env={**os.environ, **self.env},
                       capture_output=True, timeout=10)
        for proc in reversed(self.procs):  # slurmd and slurmctld before munged
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
