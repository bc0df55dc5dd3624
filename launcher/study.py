"""The paper's studies as commands: arms x seeds over the existing entry points, resumable, with a table.

    python -m launcher.study reward-data [--out DIR] [--seeds 0,1,2] [--arms a,b] [--list] [--overwrite] [options]
    python -m launcher.study grpo-design [...]

Each arm of a study is a set of overrides on the study's base config, run once per seed through the project's
entry points, each run in `<out>/runs/<arm>/seed<k>/`; finished runs are kept, so an interrupted study resumes
where it stopped; the table (mean and 95% interval over seeds per arm and metric) goes to `<out>/table.md` and
`table.json` and is printed. How: launcher/study_runner.py. The studies: launcher/study_reward_data.py (which
preference pairs train the reward model) and launcher/study_grpo_design.py (group size, shared noise, KL beta,
which rewards).
"""

from __future__ import annotations

import argparse
from typing import Dict, Optional, Sequence


def studies() -> Dict[str, object]:
    from launcher import study_grpo_design, study_reward_data

    return {s.NAME: s for s in (study_reward_data, study_grpo_design)}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    from config.cli import expected_errors
    from launcher.study_runner import run_study

    known = studies()
    parser = argparse.ArgumentParser(prog="python -m launcher.study", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="study", required=True)
    for name, study in known.items():
        sub = commands.add_parser(name, help=study.TITLE, description=study.__doc__.split("\n")[0])
        sub.add_argument("--out", default=f"outputs/studies/{name}", help="everything goes here (default: %(default)s)")
        sub.add_argument("--seeds", default=study.SEEDS, type=lambda s: [int(v) for v in s.split(",")],
                         help="comma-separated seeds, one run of every arm each (default: %(default)s)")
        sub.add_argument("--arms", default=None, type=lambda s: s.split(","),
                         help="comma-separated arm names to run (default: all; see --list)")
        sub.add_argument("--list", action="store_true", help="print the arms and their command lines, run nothing")
        sub.add_argument("--overwrite", action="store_true",
                         help="rerun finished runs whose settings changed (default: refuse)")
        study.add_arguments(sub)
    args = parser.parse_args(argv)
    with expected_errors(f"study {args.study}", ValueError, FileNotFoundError):
        return run_study(known[args.study], args)


if __name__ == "__main__":
    main()
