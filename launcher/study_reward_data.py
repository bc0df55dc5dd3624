"""Reward-data study: which preference pairs make a better identity reward model (the paper's data ablation).

    python -m launcher.study reward-data [--seeds 0,1,2] [--train-config FILE] [--train-set KEY=VALUE ...]
        [--human-train P --human-test P --auto P --synthetic P]

Five arms train the reward model (`python -m reward.train`, the study's --train-config) on:
  human          the human-labelled pairs of the training prompts;
  synthetic      synthetic distortion pairs (clean clip vs a swap, drift, exchange or degrade of a tracked face);
  auto           the automatically labelled pairs (a vote of scorers);
  mixed          all three (the curriculum moves from the auto pool, auto and synthetic, to the human pool);
  mixed_teacher  all three, the auto pairs filtered by a teacher trained on the human pairs first (Sec. 3.2).
Every arm and seed is scored on the same human test split (`data.eval_shards`, human pairs of prompts no arm
trains on): accuracy on the pairs people did not call equal, and with the ties (a tie right when the model's
score gap is under its tie threshold).

Data: with the four shard patterns given, those (a GPU preset's `--train-config`, unchanged, for the paper's
size: `--train-config cluster_configs/reward_3b_8gpu.yaml`). Without, the demo's (launcher/reward_data_demo.py
`prepare`, under `<out>/data`): 96 demo prompts, candidates from two demo generators, auto labels, half the
prompts' pairs labelled by the scripted annotators through the annotation page and split by prompt into human
train and test, and synthetic pairs from real faces composited into clips (prefdata.distortion_pairs).
"""

from __future__ import annotations

from pathlib import Path

from launcher.study_runner import Arm, Metric

NAME = "reward-data"
TITLE = "Reward data: held-out accuracy on human test pairs"
SEEDS = "0,1,2"
METRICS = (Metric("accuracy_without_ties", "accuracy without ties"),
           Metric("accuracy_with_ties", "accuracy with ties"))
TRAIN_CONFIG = "cluster_configs/reward_data_demo_train.yaml"
INPUTS = ("human_train", "human_test", "auto", "synthetic")


def add_arguments(parser) -> None:
    parser.add_argument("--train-config", default=TRAIN_CONFIG, help="reward.train config (default: %(default)s)")
    parser.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override of the reward.train config for every run (repeatable)")
    parser.add_argument("--data-set", action="append", default=[], metavar="KEY=VALUE",
                        help="demo data only: override of cluster_configs/reward_data_demo.yaml (repeatable)")
    parser.add_argument("--demo-clips", type=int, default=96,
                        help="demo data only: clips of real faces the synthetic pairs come from (default: %(default)s)")
    for name in INPUTS:
        parser.add_argument(f"--{name.replace('_', '-')}", default=None, metavar="PATTERN",
                            help=f"{name} preference shards (brace pattern); all four or none (then the demo's)")


def arms(args) -> list[Arm]:
    # quoted: an override's value is YAML, and a brace pattern may start with '{'
    mixed = "data.preference_shards='{{{human_train},{synthetic},{auto}}}'"
    return [
        Arm("human", "human pairs only", ("data.preference_shards='{human_train}'", "teacher.enabled=false")),
        Arm("synthetic", "synthetic distortion pairs only",
            ("data.preference_shards='{synthetic}'", "teacher.enabled=false")),
        Arm("auto", "auto-labelled pairs only", ("data.preference_shards='{auto}'", "teacher.enabled=false")),
        Arm("mixed", "human + synthetic + auto", (mixed, "teacher.enabled=false")),
        Arm("mixed_teacher", "mixed, auto pairs filtered by the teacher", (mixed, "teacher.enabled=true")),
    ]


def shared_inputs(args, prepare: bool = True) -> dict:
    """The four shard patterns: given, or the demo's (prepared when `prepare`, else only named)."""
    given = {name: getattr(args, name) for name in INPUTS}
    if any(v is not None for v in given.values()):
        missing = [f"--{n.replace('_', '-')}" for n, v in given.items() if v is None]
        if missing:
            raise ValueError(f"reward-data: give all four shard patterns or none; missing {', '.join(missing)}")
        return given
    from launcher.reward_data_demo import demo_patterns, prepare as prepare_demo

    data = Path(args.out) / "data"
    return prepare_demo(data, sets=args.data_set, num_clips=args.demo_clips) if prepare else demo_patterns(data)


def commands(arm: Arm, seed: int, shared: dict, directory: Path, args) -> list[list[str]]:
    return [["-m", "reward.train", "--config", args.train_config, *(o.format(**shared) for o in arm.overrides),
             f"data.eval_shards='{shared['human_test']}'", "data.eval_sources=[human]",
             f"trainer.seed={seed}", f"data.seed={seed}", f"model.tiny_seed={seed}",
             f"trainer.output_dir={directory / 'model'}", *args.train_set]]


def read_result(directory: Path, shared: dict) -> dict:
    import json

    result = json.loads((directory / "model" / "eval.json").read_text())
    return {k: result[k] for k in ("accuracy_without_ties", "accuracy_with_ties", "num_without_ties", "num_pairs")}


def notes(args, shared: dict, rows) -> list[str]:
    from evaluation.metrics import binomial_half_width

    sizes = {(r["metrics"]["accuracy_without_ties"] or {}).get("n") for r in rows}
    first = next((r for r in rows if r["metrics"]["accuracy_without_ties"]), None)
    n_test = None
    if first is not None:
        import json

        run = Path(args.out) / "runs" / first["arm"] / f"seed{first['seeds'][0]}" / "result.json"
        n_test = json.loads(run.read_text())["metrics"]["num_without_ties"]
    lines = [f"Mean over seeds {args.seeds} [95% Student-t interval over seeds] (each seed's value). "
             f"Test: the human test split ({shared['human_test']})"
             + (f", {n_test} pairs without ties" if n_test else "") + "; chance is 0.5 without ties."]
    if n_test:
        lines.append(f"The test set is the same in every run, so the intervals above hold the runs' randomness only; "
                     f"its own sampling error on {n_test} pairs is +-{binomial_half_width(0.5, n_test):.3f} at 0.5 "
                     "(95%, normal approximation).")
    if len(sizes) > 1:
        lines.append("Arms ran with different numbers of seeds (an interrupted study?): rerun it to finish.")
    return lines
