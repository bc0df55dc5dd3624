"""A real one-node Slurm cluster on localhost, from Debian's packages, for the sbatch tests.

    cluster = SlurmCluster(tmp_dir)   # nothing runs yet
    reason = cluster.unavailable()    # None, or why this machine cannot run it (the test skips with it)
    cluster.start()                   # slurm.conf in tmp_dir, slurmctld + slurmd, waits for the node
    job = cluster.sbatch(["script.sbatch"], env={...})
    cluster.wait_done(job, timeout=300)
    cluster.stop()                    # cancels its jobs, kills the two daemons it started (pid files)

Settings (../shared/CPU_STACK.md, "Slurm"): auth/none + cred/none (no munge), proctrack/linuxproc,
task/none, select/cons_tres with CR_CPU, every state/spool/pid/log file under the temporary folder,
the node named by `hostname -s`, and ports picked free so a system Slurm is not disturbed. No
slurmdbd, so there is no sacct: job state comes from `scontrol show job`, which keeps finished jobs
for MinJobAge seconds. cred_expire is short because a requeued job waits that long before it may
start again (120 s by default).

Also a command line, to poke at a cluster by hand:
    python tests/slurm_cluster.py start /tmp/slurm   # prints `export SLURM_CONF=...`
    python tests/slurm_cluster.py stop /tmp/slurm
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

PACKAGES = ["slurmctld", "slurmd", "slurm-client"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel"]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _have_binaries() -> bool:
    return all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in BINARIES)


def _bin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def install_packages() -> Optional[str]:
    """apt-get the Slurm packages when missing. Returns None when they are there, else the reason."""
    if _have_binaries():
        return None
    if os.geteuid() != 0:
        return f"Slurm is not installed and installing it needs root (apt-get install {' '.join(PACKAGES)})"
    if not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"`{' '.join(cmd)}` failed: {exc}"
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return f"`{' '.join(cmd)}` exited {proc.returncode}: {' | '.join(tail)}"
    if not _have_binaries():
        return f"apt-get installed {PACKAGES} but these are still missing: " + \
            ", ".join(b for b in BINARIES if not (shutil.which(b) or Path('/usr/sbin', b).exists()))
    return None


class SlurmCluster:
    def __init__(self, root: Path, cpus: Optional[int] = None, cluster_name: str = "igrpotest",
                 first_job_id: int = 1):
        self.root = Path(root).resolve()
        self.first_job_id = first_job_id  # distinct ids keep concurrent test clusters' jobs apart
        self.cpus = cpus or os.cpu_count() or 1
        self.name = cluster_name
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.pidfiles = {"slurmctld": self.root / "slurmctld.pid", "slurmd": self.root / "slurmd.pid"}
        self.procs: Dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ setup

    def unavailable(self) -> Optional[str]:
        """Why this machine cannot run the cluster (None: it can). Installs the packages if needed."""
        if sys.platform != "linux":
            return f"Slurm test cluster needs Linux, not {sys.platform}"
        if os.geteuid() != 0:
            return "slurmd must run as root to launch jobs (SlurmUser=root); run the Slurm tests as root"
        return install_packages()

    @property
    def env(self) -> Dict[str, str]:
        """Environment for the client commands (and for tests that call them)."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def write_conf(self) -> None:
        r = self.root
        for sub in ("state", "spool", "log"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        memory_mb = 1024  # what the node advertises; the jobs do not ask for memory
        lines = [
            f"ClusterName={self.name}",
            f"SlurmctldHost={self.node}",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/none",
            "CredType=cred/none",
            "AuthInfo=cred_expire=10",  # a requeued job may start again after this many seconds
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "MpiDefault=none",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={self.pidfiles['slurmctld']}",
            f"SlurmdPidFile={self.pidfiles['slurmd']}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ReturnToService=2",
            "JobRequeue=1",
            f"FirstJobId={self.first_job_id}",
            "MinJobAge=600",  # finished jobs stay visible to `scontrol show job` (no slurmdbd/sacct)
            "KillWait=15",
            "InactiveLimit=0",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={memory_mb} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 60) -> None:
        self.write_conf()
        logs = self.root / "log"
        # -D: stay in the foreground (we own the process); -i: ignore stale state; -f: this config.
        for name, args in (("slurmctld", ["-D", "-i", "-f", str(self.conf)]),
                           ("slurmd", ["-D", "-f", str(self.conf)])):
            out = open(logs / f"{name}.stdout", "ab")
            self.procs[name] = subprocess.Popen([_bin(name), *args], env=self.env, stdout=out,
                                                stderr=subprocess.STDOUT, start_new_session=True)
            out.close()
            self.pidfiles[name].write_text(f"{self.procs[name].pid}\n")
            if name == "slurmctld":
                self._wait(lambda: self.run(["scontrol", "ping"], check=False).returncode == 0, timeout,
                           "slurmctld did not answer `scontrol ping`")
        self._wait(self._node_idle, timeout, "node did not become idle in `sinfo`")

    def _node_idle(self) -> bool:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.root / 'log'}:\n"
                                   + self.log_tail(name))
        out = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False).stdout.strip()
        return out.startswith("idle")

    def log_tail(self, name: str, lines: int = 20) -> str:
        text = ""
        for f in (self.root / "log" / f"{name}.log", self.root / "log" / f"{name}.stdout"):
            if f.exists():
                text += "\n".join(f.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text

    # ------------------------------------------------------------------ jobs

    def run(self, cmd: List[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([_bin(cmd[0]), *cmd[1:]], env=kw.pop("env", self.env), capture_output=True,
                              text=True, check=check, timeout=kw.pop("timeout", 30), **kw)

    def sbatch(self, args: List[str], env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None) -> int:
        full_env = dict(self.env, **(env or {}))
        proc = self.run(["sbatch", "--parsable", *args], env=full_env, cwd=cwd)
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> Dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, ExitCode, Restarts, StdOut, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout.strip()
        fields: Dict[str, str] = {}
        for token in out.split():
            if "=" in token:
                key, value = token.split("=", 1)
                fields[key] = value
        return fields

    def wait_done(self, job_id: int, timeout: float) -> Dict[str, str]:
        """Wait until the job is in a final state; returns its fields."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in FINAL_STATES:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout:.0f}s: {info.get('JobState')}")
            time.sleep(1)

    def job_ids(self) -> List[int]:
        return [int(j) for j in self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()]

    def cancel_all(self, timeout: float = 60) -> None:
        """Cancel every job of this cluster (all are ours) and wait until the queue is empty."""
        ids = self.job_ids()
        if ids:
            self.run(["scancel", *map(str, ids)], check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.job_ids():
                return
            time.sleep(1)

    @staticmethod
    def _wait(cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise TimeoutError(what)
            time.sleep(0.5)

    # ------------------------------------------------------------------ teardown

    def stop(self) -> None:
        """Cancel our jobs, then kill the two daemons this cluster started, by their pid files."""
        if self.conf.exists() and self.pidfiles["slurmctld"].exists():
            try:
                self.cancel_all()
            except Exception:  # noqa: BLE001 - the daemons go regardless
                pass
        for name in ("slurmd", "slurmctld"):
            pidfile = self.pidfiles[name]
            if not pidfile.exists():
                continue
            try:
                pid = int(pidfile.read_text().split()[0])
            except (ValueError, IndexError):
                continue
            proc = self.procs.pop(name, None)
            if proc is not None and proc.poll() is not None:
                continue  # already exited (and now reaped)
            if not _is_our_daemon(pid, name, self.conf):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            if proc is not None and proc.pid == pid:  # our child: reap it, or it lingers as a zombie
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            else:
                _wait_gone(pid, 15)


def _is_our_daemon(pid: int, name: str, conf: Path) -> bool:
    """Only a live `<name> ... -f <our conf>` process: never somebody else's Slurm."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(argv) and os.path.basename(argv[0].decode()) == name and str(conf).encode() in argv


def _alive(pid: int) -> bool:
    try:
        return " Z " not in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:3]
    except (OSError, IndexError):
        return False


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__)
        return 2
    cluster = SlurmCluster(Path(argv[1]))
    if argv[0] == "stop":
        cluster.stop()
        return 0
    reason = cluster.unavailable()
    if reason:
        print(f"cannot start Slurm: {reason}", file=sys.stderr)
        return 1
    cluster.root.mkdir(parents=True, exist_ok=True)
    cluster.start()
    # The daemons were started in their own sessions; detach so they outlive this command.
    print(f"export SLURM_CONF={cluster.conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
