"""The studies (launcher/study.py): the intervals of the table by hand, and every arm is the config it claims."""

import math
from argparse import Namespace

import pytest
from omegaconf import OmegaConf

from evaluation.metrics import seed_interval
from launcher import study_grpo_design, study_reward_data
from launcher.study_runner import Arm, Metric, markdown_table, plan_runs, summarize

T_975_2 = 4.302652729749464  # Student t quantile 0.975 with 2 degrees of freedom (tables)


def test_the_interval_over_seeds_is_the_hand_computed_t_interval():
    values = [0.5, 0.6, 0.7]  # mean 0.6, sample std 0.1
    got = seed_interval(values)
    half = T_975_2 * 0.1 / math.sqrt(3)
    assert got.n == 3 and got.mean == pytest.approx(0.6) and got.std == pytest.approx(0.1)
    assert got.half_width == pytest.approx(half) and (got.low, got.high) == pytest.approx((0.6 - half, 0.6 + half))
    one = seed_interval([0.7])
    assert one.mean == 0.7 and math.isnan(one.half_width)  # one seed: no interval, not a zero-width one
    with pytest.raises(ValueError, match="finite"):
        seed_interval([0.5, float("nan")])

    arms = [Arm("a", "arm a", ()), Arm("b", "arm b", ())]
    metrics = [Metric("acc", "accuracy")]
    results = [{"arm": "a", "seed": s, "metrics": {"acc": v}} for s, v in zip([2, 0, 1], [0.7, 0.5, 0.6], strict=True)]
    results.append({"arm": "b", "seed": 0, "metrics": {"acc": 0.25}})
    rows = summarize(arms, metrics, results)
    assert rows[0]["seeds"] == [0, 1, 2] and rows[0]["metrics"]["acc"]["values"] == [0.5, 0.6, 0.7]
    assert rows[0]["metrics"]["acc"]["half_width"] == pytest.approx(half)
    table = markdown_table("T", metrics, rows, ["note"])
    assert "| a | arm a | 0.600 [0.352, 0.848] (0.500, 0.600, 0.700) |" in table
    assert "| b | arm b | 0.250 (0.250) |" in table


def _args(out, **extra):
    return Namespace(out=str(out), seeds=[0, 1], arms=None, list=True, overwrite=False, train_set=[], **extra)


def test_reward_data_arms_train_on_the_pairs_they_name_and_all_score_the_human_test_split(tmp_path):
    from reward.train_config import load_reward_config

    shared = {"human_train": "h/train-{000000..000001}.tar", "human_test": "h/test-000000.tar",
              "auto": "a/pairs-000000.tar", "synthetic": "s/synthetic-000000.tar"}
    args = _args(tmp_path, train_config=study_reward_data.TRAIN_CONFIG, data_set=[], demo_clips=4,
                 **{k: v for k, v in shared.items()})
    assert study_reward_data.shared_inputs(args) == shared
    runs = plan_runs(study_reward_data, args, shared, study_reward_data.arms(args))
    trains = {"human": ["human_train"], "synthetic": ["synthetic"], "auto": ["auto"],
              "mixed": ["human_train", "synthetic", "auto"], "mixed_teacher": ["human_train", "synthetic", "auto"]}
    assert [(r.arm.name, r.seed) for r in runs] == [(a, s) for s in (0, 1) for a in trains]
    for run in runs:
        (command,) = run.commands
        assert list(command[:4]) == ["-m", "reward.train", "--config", study_reward_data.TRAIN_CONFIG]
        cfg = load_reward_config(command[3], list(command[4:]))
        wanted = [shared[name] for name in trains[run.arm.name]]
        shards = cfg.data.preference_shards
        assert shards == (wanted[0] if len(wanted) == 1 else "{" + ",".join(wanted) + "}"), run.arm.name
        assert cfg.teacher.enabled == (run.arm.name == "mixed_teacher")
        assert cfg.data.eval_shards == shared["human_test"] and list(cfg.data.eval_sources) == ["human"]
        assert cfg.trainer.seed == cfg.data.seed == cfg.model.tiny_seed == run.seed
        assert cfg.trainer.output_dir == str(run.directory / "model")
    with pytest.raises(ValueError, match="missing --auto"):
        study_reward_data.shared_inputs(_args(tmp_path, human_train="x", human_test="y", auto=None, synthetic="z"))


def test_grpo_design_arms_change_one_setting_each_from_the_baseline(tmp_path):
    from config import load_config

    args = _args(tmp_path, config=study_grpo_design.CONFIG, steps=40, identity_reward=None,
                 held_out_prompts="held/prompts-000000.tar", eval_prompts=8, eval_seeds=2)
    shared = study_grpo_design.shared_inputs(args)
    assert shared["identity_reward"] == "demo_reference_color"  # the demo has no identity model: its stand-in
    runs = [r for r in plan_runs(study_grpo_design, args, shared, study_grpo_design.arms(args)) if r.seed == 0]

    def flat(run):
        train, evaluate = run.commands
        assert list(train[:2]) == ["-m", "launcher.train"] and list(evaluate[:2]) == ["-m", "launcher.evaluate"]
        assert evaluate[evaluate.index("--compare") + 1] == "base"
        assert evaluate[evaluate.index("--prompt-shards") + 1] == "held/prompts-000000.tar"
        cfg = load_config(train[3], [a for a in train[4:] if "=" in a])
        assert cfg.trainer.steps == 40 and cfg.trainer.seed == 0
        container = OmegaConf.to_container(cfg)
        return {f"{section}.{key}": value for section, values in container.items() if isinstance(values, dict)
                for key, value in values.items() if key != "output_dir"}

    configs = {r.arm.name: flat(r) for r in runs}
    base = configs.pop("baseline")
    assert base["grpo.group_size"] == 8 and base["sampler.shared_initial_noise"] is False
    assert base["grpo.kl_beta"] == study_grpo_design.RECIPE_KL
    assert base["reward.weights"] == {"demo_brightness": 0.0, "demo_reference_color": 1.0, "face": 0.0}
    expected = {"group4": {"grpo.group_size": 4}, "group16": {"grpo.group_size": 16},
                "shared_noise": {"sampler.shared_initial_noise": True}, "kl0": {"grpo.kl_beta": 0.0},
                "kl10x": {"grpo.kl_beta": 10 * study_grpo_design.RECIPE_KL},
                "with_face": {"reward.weights": {**base["reward.weights"], "face": 1.0}}}
    assert set(configs) == set(expected)
    for name, cfg in configs.items():
        changed = {k: v for k, v in cfg.items() if base.get(k) != v}
        assert changed == expected[name], name


class CountingStudy:
    """A study whose runs are `python -c` one-liners writing their seed's square: the runner's bookkeeping alone."""

    NAME, TITLE = "counting", "Counting"
    METRICS = (Metric("square", "seed squared"),)
    version = "1"

    @staticmethod
    def arms(args):
        return [Arm("only", "one arm", ("x=1",))]

    @staticmethod
    def shared_inputs(args, prepare=True):
        return {}

    @classmethod
    def commands(cls, arm, seed, shared, directory, args):
        code = f"import pathlib; pathlib.Path(r'{directory}', 'out.txt').write_text(str({seed} ** 2))  # v{cls.version}"
        return [["-c", code]]

    @staticmethod
    def read_result(directory, shared):
        return {"square": float((directory / "out.txt").read_text())}

    @staticmethod
    def notes(args, shared, rows):
        return []


def test_finished_runs_are_kept_and_changed_ones_refused_unless_overwritten(tmp_path, capsys):
    from launcher.study_runner import run_study

    args = Namespace(out=str(tmp_path), seeds=[1, 2, 3], arms=None, list=False, overwrite=False)
    table = run_study(CountingStudy, args)
    assert table["arms"][0]["metrics"]["square"]["values"] == [1.0, 4.0, 9.0]
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/only/seed*/result.json")}
    (tmp_path / "runs" / "only" / "seed2" / "result.json").unlink()  # as if killed before seed 2 finished
    again = run_study(CountingStudy, args)
    out = capsys.readouterr().out
    assert "only seed 1: finished before, kept" in out and "only seed 3: finished before, kept" in out
    assert again["arms"] == table["arms"] and (tmp_path / "table.md").read_text().count("| only |") == 1
    for path, stamp in stamps.items():
        assert path.stat().st_mtime_ns == stamp or path.parent.name == "seed2"
    CountingStudy.version = "2"  # the arm's command line changed: its finished runs no longer match
    try:
        with pytest.raises(ValueError, match="seed1 finished with other settings than this study's arm 'only'"):
            run_study(CountingStudy, args)
        args.overwrite = True
        assert run_study(CountingStudy, args)["arms"][0]["metrics"]["square"]["values"] == [1.0, 4.0, 9.0]
    finally:
        CountingStudy.version = "1"


def test_list_prints_every_arm_and_its_command_lines_and_runs_nothing(tmp_path, capsys):
    from launcher.study import main

    table = main(["grpo-design", "--list", "--out", str(tmp_path / "g"), "--seeds", "0",
                  "--config", "cluster_configs/vace_1.3b_8gpu.yaml", "--held-out-prompts", "held/p-000000.tar"])
    out = capsys.readouterr().out
    assert table["arms"] == ["baseline", "group4", "group16", "shared_noise", "kl0", "kl10x", "with_face"]
    for arm, (train, evaluate) in zip(table["arms"], table["runs"], strict=True):
        assert f"{arm} seed 0: " in out and f"    python {' '.join(train)}" in out
        assert "reward.weights.vlm=1.0" in train and "--compare" in evaluate  # the preset's identity reward: vlm
    assert not (tmp_path / "g").exists()
    with pytest.raises(SystemExit):  # a GPU preset without held-out prompts: refused, nothing written for it
        main(["grpo-design", "--list", "--out", str(tmp_path / "g"), "--config", "cluster_configs/vace_1.3b_8gpu.yaml"])
    assert "--held-out-prompts is needed with --config" in capsys.readouterr().err


class GappyStudy(CountingStudy):
    """Seed 2's run measures nothing (e.g. no face in any held-out video): a gap in the table, not a stop."""

    @staticmethod
    def read_result(directory, shared):
        value = float((directory / "out.txt").read_text())
        return {"square": None if value == 4.0 else value}


def test_cut_short_runs_with_other_settings_duplicate_seeds_and_missing_values(tmp_path):
    from launcher.study_runner import run_study

    args = Namespace(out=str(tmp_path / "gap"), seeds=[1, 2, 3], arms=None, list=False, overwrite=False)
    row = run_study(GappyStudy, args)["arms"][0]["metrics"]["square"]
    assert row["values"] == [1.0, None, 9.0] and row["n"] == 2 and row["mean"] == 5.0
    assert "| only | one arm | 5.000 [" in (tmp_path / "gap" / "table.md").read_text()
    assert "n/a" in (tmp_path / "gap" / "table.md").read_text()

    (tmp_path / "gap" / "runs" / "only" / "seed3" / "result.json").unlink()  # killed after it started
    CountingStudy.version = "2"
    try:
        with pytest.raises(ValueError, match="seed3 started with other settings"):
            run_study(GappyStudy, Namespace(**{**vars(args), "seeds": [3]}))
    finally:
        CountingStudy.version = "1"
    with pytest.raises(ValueError, match="each seed once"):
        run_study(GappyStudy, Namespace(**{**vars(args), "seeds": [1, 1]}))
