"""GRPO-design study: group size, shared initial noise, KL weight and rewards, scored against the base model.

    python -m launcher.study grpo-design [--config FILE] [--steps N] [--seeds 0,1,2] [--train-set KEY=VALUE ...]
        [--identity-reward NAME] [--held-out-prompts PATTERN] [--eval-prompts N] [--eval-seeds K]

One factor at a time around a baseline (group of 8, each video its own initial noise, KL weight 0.004 as the
official recipe, the identity reward alone): groups of 4 and 16; one initial noise per group
(`sampler.shared_initial_noise`); KL weight 0 and 10x; the identity reward plus the face reward. Each run trains
(`python -m launcher.train`, the study's --config and --steps) and is scored by `python -m launcher.evaluate`
against the base model on held-out prompts (same prompts and seeds, deterministic sampler): the paired deltas of
the identity reward and of the face similarity.

The identity reward is `vlm` (the learned reward model) where the config's `reward.weights` names it, as the GPU
presets do. The CPU demo (the default config, `cluster_configs/demo_cpu.yaml`) has no identity model: the DEMO
reference-colour reward (`demo_reference_color`: do the video's colours match the reference photos?) stands in
for it, and its face reward sees no face in 32x32 videos (a constant), so demo-size numbers show that the study
runs and how far seeds scatter, not how these choices move identity.
"""

from __future__ import annotations

from pathlib import Path

from launcher.study_runner import Arm, Metric

NAME = "grpo-design"
TITLE = "GRPO design: held-out identity metrics, trained minus base"
SEEDS = "0,1,2"
METRICS = (Metric("identity_delta", "identity reward delta"), Metric("face_mean_delta", "face similarity delta"))
CONFIG = "cluster_configs/demo_cpu.yaml"
RECIPE_KL = 0.004  # the official recipe's KL weight (cluster_configs/vace_1.3b_8gpu.yaml, grpo.kl_beta)


def add_arguments(parser) -> None:
    parser.add_argument("--config", default=CONFIG, help="training config or GPU preset (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=40, help="training steps of every run (default: %(default)s)")
    parser.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override of the training config for every run (repeatable)")
    parser.add_argument("--identity-reward", default=None,
                        help="the reward the arms train on: default vlm where the config weighs it, else "
                             "demo_reference_color (the CPU demo's stand-in)")
    parser.add_argument("--held-out-prompts", default=None, metavar="PATTERN",
                        help="prompt shards to score on (default: 8 demo prompts no run trains on, under <out>/data)")
    parser.add_argument("--eval-prompts", type=int, default=8, help="held-out prompts scored (default: %(default)s)")
    parser.add_argument("--eval-seeds", type=int, default=2, help="videos per held-out prompt (default: %(default)s)")


def _weights(args) -> dict:
    from config import load_config

    return dict(load_config(args.config, list(args.train_set)).reward.weights)


def identity_reward(args) -> str:
    return args.identity_reward or ("vlm" if "vlm" in _weights(args) else "demo_reference_color")


def arms(args) -> list[Arm]:
    identity = identity_reward(args)

    def rewards(*names):
        weights = {**{k: 0.0 for k in _weights(args)}, **{n: 1.0 for n in names}}
        return tuple(f"reward.weights.{k}={v}" for k, v in sorted(weights.items()))

    base = {"grpo.group_size": 8, "sampler.shared_initial_noise": "false", "grpo.kl_beta": RECIPE_KL}

    def arm(name, what, change=None, names=(identity,)):
        settings = {**base, **(change or {})}
        return Arm(name, what, (*(f"{k}={v}" for k, v in settings.items()), *rewards(*names)))

    return [
        arm("baseline", f"group 8, own noise, KL {RECIPE_KL}, {identity} alone"),
        arm("group4", "group of 4", {"grpo.group_size": 4}),
        arm("group16", "group of 16", {"grpo.group_size": 16}),
        arm("shared_noise", "one initial noise per group", {"sampler.shared_initial_noise": "true"}),
        arm("kl0", "KL weight 0", {"grpo.kl_beta": 0.0}),
        arm("kl10x", f"KL weight {10 * RECIPE_KL:g}", {"grpo.kl_beta": 10 * RECIPE_KL}),
        arm("with_face", f"{identity} + face rewards", names=(identity, "face")),
    ]


def shared_inputs(args, prepare: bool = True) -> dict:
    """The held-out prompts: given, or for the CPU demo 8 demo prompts drawn with another seed than the training's
    (the demo's shards and base model are written first when missing, as `make demo` does)."""
    if args.held_out_prompts:
        return {"held_out_prompts": args.held_out_prompts, "identity_reward": identity_reward(args)}
    from data.write_shards import existing_pattern

    if Path(args.config).resolve() != Path(CONFIG).resolve():
        raise ValueError(f"grpo-design: --held-out-prompts is needed with --config {args.config} (prompt shards none "
                         f"of its runs trains on); the study makes its own only for the CPU demo ({CONFIG})")
    folder = Path(args.out) / "data" / "held_out"
    if prepare:
        from data.demo import build_demo
        from launcher.demo import ensure_demo_model, ensure_demo_shards
        from workers.run_config import load_run_config

        cfg = load_run_config(args.config, list(args.train_set))
        ensure_demo_shards(cfg.data.prompt_shards)
        ensure_demo_model(cfg.model)
        done = folder / "done"  # holds the prompt count; a build cut short or of another count is made again
        if not done.is_file() or done.read_text().strip() != str(args.eval_prompts):
            build_demo(folder, num_prompts=args.eval_prompts, num_pairs=1, seed=1)
            done.write_text(f"{args.eval_prompts}\n")
    return {"held_out_prompts": existing_pattern(folder, "prompts"), "identity_reward": identity_reward(args)}


def commands(arm: Arm, seed: int, shared: dict, directory: Path, args) -> list[list[str]]:
    train = directory / "train"
    settings = [*arm.overrides, f"trainer.seed={seed}", f"trainer.output_dir={train}", f"trainer.steps={args.steps}",
                f"trainer.checkpoint_every={args.steps}", "trainer.resume=auto", *args.train_set]
    return [["-m", "launcher.train", "--config", args.config, *settings],
            ["-m", "launcher.evaluate", "--config", args.config, *settings, "--checkpoint", "latest",
             "--compare", "base", "--prompt-shards", shared["held_out_prompts"], "--num-prompts",
             str(args.eval_prompts), "--seeds-per-prompt", str(args.eval_seeds), "--out", str(directory / "eval"),
             "--no-tensorboard"]]


def read_result(directory: Path, shared: dict) -> dict:
    """The paired deltas of launcher.evaluate's comparison: the identity reward's (the evaluation's `vlm` metric, or
    the stand-in's `reward_<name>`) and the face similarity's."""
    import json

    comparison = json.loads((directory / "eval" / "comparison.json").read_text())
    deltas = comparison["deltas"]
    identity = "vlm" if shared["identity_reward"] == "vlm" else f"reward_{shared['identity_reward']}"
    if identity not in deltas or "face_mean" not in deltas:
        raise ValueError(f"{directory / 'eval' / 'comparison.json'}: no {identity} or face_mean delta (has "
                         f"{sorted(deltas)})")
    return {"identity_delta": deltas[identity]["delta"], "face_mean_delta": deltas["face_mean"]["delta"],
            "identity_metric": identity, "pairs": comparison["pairs"]}


def notes(args, shared: dict, rows) -> list[str]:
    return [f"Mean over seeds {args.seeds} [95% Student-t interval over seeds] (each seed's value) of the paired "
            f"delta trained minus base on {args.eval_prompts} held-out prompts x {args.eval_seeds} seeds "
            f"({shared['held_out_prompts']}), after {args.steps} training steps of {args.config}; identity reward: "
            f"{shared['identity_reward']}."]
