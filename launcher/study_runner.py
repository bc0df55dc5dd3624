"""How a study runs (`python -m launcher.study`): arms x seeds over the existing entry points, resumable, a table.

A study is a set of arms, each a list of `key=value` overrides on the study's base config; every arm runs once
per seed through the project's own entry points (`python -m reward.train`, `python -m launcher.train` then
`python -m launcher.evaluate`), each run in its own folder `<out>/runs/<arm>/seed<k>/`. A run that finished
wrote `result.json` (its command lines and its numbers); a rerun of the study keeps it and runs only what is
missing, so an interrupted study resumes where it stopped (a run cut short resumes through its entry point's own
checkpoints). A finished run whose command lines differ from what the study would run now (other settings) is
refused, naming it, unless `--overwrite` reruns it.

The table (`<out>/table.md` and `table.json`, printed): per arm and metric the mean over seeds with its 95%
Student-t interval (evaluation.metrics.seed_interval) and every seed's value. `--list` prints the arms and the
command lines each would run, and runs nothing.

A study module (launcher/study_reward_data.py, launcher/study_grpo_design.py) names NAME, TITLE, SEEDS, METRICS
and provides add_arguments(parser), arms(args), shared_inputs(args, prepare), commands(arm, seed, shared,
directory, args), read_result(directory, shared) and notes(args, shared, rows).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from config import ExpectedError


@dataclass(frozen=True)
class Arm:
    name: str  # a folder name: letters, digits, '_' and '-'
    what: str  # one line for the table
    overrides: tuple[str, ...]  # key=value on the study's base config


@dataclass(frozen=True)
class Metric:
    key: str  # in a run's result
    label: str  # the table's column


@dataclass(frozen=True)
class Run:
    arm: Arm
    seed: int
    directory: Path
    commands: tuple[tuple[str, ...], ...]  # python -m ... argument lists, run in order


def plan_runs(study, args, shared: dict, arms: Sequence[Arm]) -> List[Run]:
    """Every (arm, seed) run with its command lines, in the order they run (seed by seed, so a study stopped
    early has every arm at its first seeds)."""
    out = Path(args.out)
    return [Run(arm, seed, out / "runs" / arm.name / f"seed{seed}",
                tuple(tuple(c) for c in study.commands(arm, seed, shared, out / "runs" / arm.name / f"seed{seed}",
                                                       args)))
            for seed in args.seeds for arm in arms]


class StudyRunError(ExpectedError, RuntimeError):
    """A run's command failed: its log names what went wrong; the study stops there (rerun it to resume)."""


def finished(run: Run, overwrite: bool) -> Optional[dict]:
    """The run's stored result if it finished with the same command lines; None if it must run (again). A run
    folder made with other command lines, finished or cut short (its commands.json, written when it started), is
    an error unless `overwrite` (then the folder is removed): a cut-short run resumes from its own checkpoints,
    which must be of the same settings."""
    now = [list(c) for c in run.commands]
    for name in ("result.json", "commands.json"):
        path = run.directory / name
        if not path.is_file():
            continue
        stored = json.loads(path.read_text())
        if stored["commands"] == now:
            return stored if name == "result.json" else None
        if not overwrite:
            state = "finished" if name == "result.json" else "started"
            raise ValueError(f"{run.directory} {state} with other settings than this study's arm {run.arm.name!r} "
                             f"would use now (stored {stored['commands']}, now {now}); pass --overwrite to rerun "
                             "it, or another --out")
        shutil.rmtree(run.directory)
        return None
    return None


def _write_json(path: Path, data) -> None:
    """Whole or absent (a run killed while writing leaves the old file or none)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def execute(run: Run, study, shared: dict) -> dict:
    """Run the command lines in order (output to the run's log.txt and the console), then store the result."""
    run.directory.mkdir(parents=True, exist_ok=True)
    _write_json(run.directory / "commands.json", {"commands": [list(c) for c in run.commands]})
    with open(run.directory / "log.txt", "a") as log:
        for command in run.commands:
            print(f"[study] {run.arm.name} seed {run.seed}: python {' '.join(command)}", flush=True)
            log.write(f"$ python {' '.join(command)}\n")
            log.flush()
            done = subprocess.run([sys.executable, *command], stdout=log, stderr=subprocess.STDOUT)
            if done.returncode != 0:
                raise StudyRunError(f"study run {run.arm.name} seed {run.seed} failed (exit {done.returncode}): "
                                    f"python {' '.join(command)}; its output: {run.directory / 'log.txt'}")
    result = {"arm": run.arm.name, "seed": run.seed, "commands": [list(c) for c in run.commands],
              "metrics": study.read_result(run.directory, shared)}
    _write_json(run.directory / "result.json", result)  # a run killed before this line reruns
    return result


def summarize(arms: Sequence[Arm], metrics: Sequence[Metric], results: Sequence[dict]) -> List[dict]:
    """Per arm: its seeds and, per metric, every seed's value and the seed interval (evaluation.metrics)."""
    from dataclasses import asdict

    from evaluation.files import json_clean
    from evaluation.metrics import seed_interval

    rows = []
    for arm in arms:
        mine = sorted((r for r in results if r["arm"] == arm.name), key=lambda r: r["seed"])
        row = {"arm": arm.name, "what": arm.what, "overrides": list(arm.overrides),
               "seeds": [r["seed"] for r in mine], "metrics": {}}
        for metric in metrics:
            values = [r["metrics"][metric.key] for r in mine]
            measured = [v for v in values if v is not None and math.isfinite(v)]  # a run may have no value
            if not measured:
                row["metrics"][metric.key] = None if not values else {"values": values, "n": 0}
                continue
            # one seed: no interval (NaN), null in JSON
            row["metrics"][metric.key] = json_clean({"values": values, **asdict(seed_interval(measured))})
        rows.append(row)
    return rows


def markdown_table(title: str, metrics: Sequence[Metric], rows: Sequence[dict], notes: Sequence[str]) -> str:
    """The study's table: mean [95% interval over seeds] per metric, the seeds' values after it."""

    def cell(m):
        if m is None:
            return "not run"
        each = ", ".join("n/a" if v is None or not math.isfinite(v) else f"{v:.3f}" for v in m["values"])
        if m["n"] == 0:
            return f"n/a ({each})"
        spread = "" if m["n"] < 2 else f" [{m['low']:.3f}, {m['high']:.3f}]"
        return f"{m['mean']:.3f}{spread} ({each})"

    lines = [f"### {title}", "", "| arm | what | " + " | ".join(m.label for m in metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for row in rows:
        lines.append(f"| {row['arm']} | {row['what']} | " + " | ".join(cell(row["metrics"][m.key]) for m in metrics)
                     + " |")
    return "\n".join([*lines, "", *notes, ""])


def run_study(study, args) -> dict:
    """Prepare, run what is missing, write and print the table; returns the table's JSON."""
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds: each seed once (a seed's runs share a folder), got {args.seeds}")
    args.out = str(Path(args.out).resolve())  # the runs' command lines hold it: one spelling of one place
    arms = study.arms(args)
    if args.arms:
        names = {a.name for a in arms}
        unknown = sorted(set(args.arms) - names)
        if unknown:
            raise ValueError(f"--arms: unknown arm(s) {unknown} of study {study.NAME} (arms: {sorted(names)})")
        arms = [a for a in arms if a.name in args.arms]
    out = Path(args.out)
    shared = study.shared_inputs(args, prepare=not args.list)
    runs = plan_runs(study, args, shared, arms)
    if args.list:
        for run in runs:
            print(f"{run.arm.name} seed {run.seed}: {run.arm.what}")
            for command in run.commands:
                print(f"    python {' '.join(command)}")
        return {"arms": [a.name for a in arms], "runs": [[list(c) for c in r.commands] for r in runs]}
    results = []
    for run in runs:
        stored = finished(run, args.overwrite)
        if stored is not None:
            print(f"[study] {run.arm.name} seed {run.seed}: finished before, kept ({run.directory / 'result.json'})")
        results.append(stored if stored is not None else execute(run, study, shared))
    rows = summarize(arms, study.METRICS, results)
    table = {"study": study.NAME, "title": study.TITLE, "seeds": list(args.seeds), "shared": shared, "arms": rows}
    (out / "table.json").write_text(json.dumps(table, indent=1) + "\n")
    text = markdown_table(study.TITLE, study.METRICS, rows, study.notes(args, shared, rows))
    (out / "table.md").write_text(text)
    print(text)
    return table
