"""Kill Ray worker processes from outside, with SIGKILL, at moments named by what they are doing.

Ray titles an actor's process `ray::<Class>` while it waits and `ray::<Class>.<method>` while it runs
a call (its command line, as `ps` shows it). A watcher thread polls the processes below this test's
process (the local Ray cluster it started, never another Ray on the machine) and kills the one that
enters a title for the n-th time: no hook inside the code under test, so any moment can be chosen,
as an out-of-memory killer or a failing node would choose it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import psutil


@dataclass
class Kill:
    """SIGKILL the process that enters `title` (e.g. "ray::LearnerWorker.save") for the `nth` time, counting
    only once `metrics` (a metrics.jsonl) holds at least `after_records` lines."""

    title: str
    nth: int = 1
    after_records: int = 0
    metrics: Optional[Path] = None
    seen: int = 0
    killed_pid: Optional[int] = None
    killed_at: Optional[float] = None

    def armed(self) -> bool:
        if self.killed_pid is not None:
            return False
        if not self.after_records:
            return True
        lines = self.metrics.read_text().splitlines() if self.metrics and self.metrics.exists() else []
        return len([line for line in lines if line.strip()]) >= self.after_records


@dataclass
class ProcessKiller:
    """Context manager: runs the watcher while the block runs; `kills` tells what happened."""

    kills: List[Kill]
    poll_s: float = 0.005
    _titles: Dict[int, str] = field(default_factory=dict)

    def __enter__(self) -> "ProcessKiller":
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="process-killer", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _watch(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            titles: Dict[int, str] = {}
            for proc in me.children(recursive=True):
                try:
                    cmdline = proc.cmdline()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                if cmdline and cmdline[0].startswith("ray::"):
                    titles[proc.pid] = cmdline[0].strip()
            for pid, title in titles.items():
                if self._titles.get(pid) == title:
                    continue  # still in the same call (or the same wait)
                for kill in self.kills:
                    if kill.title == title and kill.armed():
                        kill.seen += 1
                        if kill.seen == kill.nth:
                            _sigkill(pid)
                            kill.killed_pid, kill.killed_at = pid, time.time()
                        break
            self._titles = titles
            time.sleep(self.poll_s)


def _sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
