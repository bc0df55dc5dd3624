"""Start and stop real Ray nodes on loopback for tests, touching no other Ray on the machine.

Each node is started by `ray start` with this test's own temp dir and ports; stopping kills exactly
the processes whose command line names that temp dir or the head's port (never `ray stop`, which
would end every Ray instance on the machine, including other tests' and users').
"""

from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

import psutil

RAY = str(Path(sys.executable).with_name("ray"))
ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def ray_env() -> dict:
    env = dict(os.environ, **ENV)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    return env


class LocalRayCluster:
    def __init__(self, port: int, dashboard_port: Optional[int] = None):
        # Ray's unix socket paths must stay under 107 bytes: a short private dir, not pytest's tmp_path.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="igr-ray-", dir="/tmp"))
        self.port, self.dashboard_port = port, dashboard_port
        self.address = f"127.0.0.1:{port}"

    def _start(self, args) -> None:
        proc = subprocess.run([RAY, "start", *args, "--disable-usage-stats"], env=ray_env(),
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")

    def start_head(self, num_cpus: int, resources: Optional[Dict[str, float]] = None,
                   object_store_mb: int = 300) -> "LocalRayCluster":
        args = ["--head", f"--port={self.port}", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
                f"--temp-dir={self.temp_dir}", f"--object-store-memory={object_store_mb * 1024 * 1024}",
                f"--resources={json.dumps(resources or {})}"]
        if self.dashboard_port:
            args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={self.dashboard_port}"]
        else:
            args += ["--include-dashboard=false"]
        self._start(args)
        return self

    def add_node(self, num_cpus: int, resources: Dict[str, float], object_store_mb: int = 200) -> None:
        self._start([f"--address={self.address}", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
                     f"--object-store-memory={object_store_mb * 1024 * 1024}",
                     f"--resources={json.dumps(resources)}"])

    def processes(self):
        marks = (str(self.temp_dir), f":{self.port}", f"--gcs-address=127.0.0.1:{self.port}")
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(proc.info.get("cmdline") or [])
            if any(m in cmdline for m in marks) and proc.pid != os.getpid():
                found.append(proc)
        return found

    def stop(self) -> None:
        procs = self.processes()
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        deadline = time.time() + 10
        while self.processes() and time.time() < deadline:
            time.sleep(0.5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
