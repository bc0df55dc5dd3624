"""Kill Ray worker processes and the driver from outside, with SIGKILL, at moments named by what they are doing.

Ray titles an actor's process `ray::<Class>` while it waits and `ray::<Class>.<method>` while it runs
a call (its command line, as `ps` shows it). A watcher thread polls the processes below this test's
process (the local Ray cluster it started and the driver processes it started, never another Ray on the
machine) and kills when a process enters a title for the n-th time: no hook inside the code under test, so
any moment can be chosen, as an out-of-memory killer or a failing node would choose it. `random_kills`
draws such moments from a seed.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import psutil

NODE = ("RolloutWorker", "RewardWorker", "LearnerWorker")  # what a failing node of the colocated preset takes


@dataclass
class Kill:
    """SIGKILL, `delay_s` after a process enters `title` (e.g. "ray::LearnerWorker.save") for the `nth` time,
    counting only once `metrics` (a metrics.jsonl) holds at least `after_records` lines and the kill `after`
    this one has happened: that process (or the driver instead, with `driver`), and in the same instant one
    process of each class in `with_classes` it is not already (a node failing takes its processes together)."""

    title: str
    nth: int = 1
    after_records: int = 0
    metrics: Optional[Path] = None
    delay_s: float = 0.0
    driver: bool = False
    with_classes: Tuple[str, ...] = ()
    after: Optional["Kill"] = None
    seen: int = 0
    due: Optional[Tuple[float, int]] = None  # (when, the pid that entered the title)
    killed_pids: List[int] = field(default_factory=list)
    killed_at: Optional[float] = None

    @property
    def killed_pid(self) -> Optional[int]:
        return self.killed_pids[0] if self.killed_pids else None

    def armed(self) -> bool:
        if self.killed_at is not None or self.due is not None:
            return False
        if self.after is not None and self.after.killed_at is None:
            return False
        if not self.after_records:
            return True
        lines = self.metrics.read_text().splitlines() if self.metrics and self.metrics.exists() else []
        return len([line for line in lines if line.strip()]) >= self.after_records

    def __str__(self) -> str:
        whom = "the driver" if self.driver else "it"
        if self.with_classes:
            whom += f" and a {', a '.join(self.with_classes)} (those it is not)"
        when = f"{self.title} #{self.nth} + {self.delay_s:.3f} s"
        if self.after_records:
            when += f", once {self.after_records} steps are logged"
        return f"kill {whom} at {when}" + (", after the kill before" if self.after is not None else "")


@dataclass
class ProcessKiller:
    """Context manager: runs the watcher while the block runs; `kills` tells what happened. Set `driver_pid` to
    each driver process the block starts, for the kills with `driver`."""

    kills: List[Kill]
    poll_s: float = 0.005
    driver_pid: Optional[int] = None
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
        while not self._stop.is_set():
            titles = _actor_titles()
            now = time.time()
            for pid, title in titles.items():
                if self._titles.get(pid) == title:
                    continue  # still in the same call (or the same wait)
                for kill in self.kills:
                    if kill.title == title and kill.armed():
                        kill.seen += 1
                        if kill.seen == kill.nth:
                            kill.due = (now + kill.delay_s, pid)
            for kill in self.kills:
                if kill.due is not None and kill.killed_at is None and now >= kill.due[0]:
                    self._fire(kill, titles)
            self._titles = titles
            time.sleep(self.poll_s)

    def _fire(self, kill: Kill, titles: Dict[int, str]) -> None:
        if kill.driver and self.driver_pid is None:
            return  # no driver running yet: at its start
        victims = [self.driver_pid if kill.driver else kill.due[1]]
        for cls in kill.with_classes:
            if not any(_is(titles.get(pid, ""), cls) for pid in victims):
                victims += sorted(pid for pid, title in titles.items() if _is(title, cls))[:1]
        for pid in victims:
            _sigkill(pid)
        kill.killed_pids, kill.killed_at = victims, time.time()


# Titles every step of a sync run enters after its previous step's record ("" is the wait between calls), and those
# only a start (or a restart) enters: a learner's restore from a checkpoint is its `load`.
EVERY_STEP = {"RolloutWorker": ("generate", "set_weights", ""), "RewardWorker": ("score", ""),
              "LearnerWorker": ("update", "publish", "")}
STARTING = {"RolloutWorker": ("__init__", "set_weights"), "RewardWorker": ("__init__",),
            "LearnerWorker": ("__init__", "setup", "load")}
# A step the rerun replays also enters these (every `logging.eval_every` and `trainer.checkpoint_every` steps: the
# held-out monitor and the checkpoint's write, which tests/test_loop.py's runs do at steps 2 and 4).
REPLAYED = {**EVERY_STEP, "RolloutWorker": EVERY_STEP["RolloutWorker"] + ("held_out",),
            "LearnerWorker": EVERY_STEP["LearnerWorker"] + ("save",)}
# What the driver runs only after the previous step's checkpoint is committed (its waits may come before it).
DRIVER_AFTER_COMMIT = {"RolloutWorker": ("generate", "set_weights"), "RewardWorker": ("score",),
                       "LearnerWorker": ("update", "publish")}


def random_kills(seed: int, metrics: Path, steps: int, checkpoint_every: int) -> List[Kill]:
    """Four kills in turn at moments drawn from `seed`, for a sync run of `steps` steps that checkpoints every
    `checkpoint_every`: a worker of a random role, or a node (rollout, reward and a learner rank at once), in one of
    the steps before the first checkpoint; the driver, in a step after it (the rerun resumes from it); a random
    role while the rerun starts and resumes; then the other of worker and node, in a step the rerun replays (also
    while it monitors or checkpoints, which the last step does). Each at a random call or wait of its step, a random
    fraction of a second into it: every kill's moment comes."""
    rng = random.Random(seed)

    def title(cls: str, name: str) -> str:
        return f"ray::{cls}" + (f".{name}" if name else "")

    def pick(table: Dict[str, tuple]) -> str:
        cls = rng.choice(sorted(table))
        return title(cls, rng.choice(table[cls]))

    def delay() -> float:
        return round(rng.uniform(0.0, 0.3), 3)

    first, second = rng.sample([(), NODE], 2)
    before = Kill(pick(EVERY_STEP), after_records=rng.randrange(checkpoint_every), metrics=metrics, delay_s=delay(),
                  with_classes=first)
    driver = Kill(pick(DRIVER_AFTER_COMMIT), after_records=rng.randrange(checkpoint_every, steps), metrics=metrics,
                  delay_s=delay(), driver=True, after=before)
    resume = Kill(pick(STARTING), delay_s=delay(), after=driver)
    replayed = Kill(pick(REPLAYED), after_records=rng.randrange(checkpoint_every, steps), metrics=metrics,
                    delay_s=delay(), with_classes=second, after=resume)
    return [before, driver, resume, replayed]


def _actor_titles() -> Dict[int, str]:
    """pid -> title of each Ray worker process below this one (a process an actor forked carries its title: not
    counted)."""
    found: Dict[int, Tuple[str, int]] = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline, parent = proc.cmdline(), proc.ppid()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if cmdline and cmdline[0].startswith("ray::"):
            found[proc.pid] = (cmdline[0].strip(), parent)
    return {pid: title for pid, (title, parent) in found.items() if parent not in found}


def _is(title: str, cls: str) -> bool:
    return title == f"ray::{cls}" or title.startswith(f"ray::{cls}.")


def _sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
