"""`launcher.evaluate --num-workers`: a policy's prompts spread over Ray evaluation workers (one per GPU on a
node) give the files of the in-process run, byte for byte, even when a worker is killed mid-evaluation."""

import json
from functools import partial

import pytest

from config import load_config, to_yaml
from launcher.evaluate import main
from runtime.checkpoint import CheckpointManager
from tests.stand_ins import policy_with_visible_lora

# The tools lane (`make test-tools`), CI's shortest: Ray workers, a minute.
pytestmark = [pytest.mark.tools, pytest.mark.usefixtures("one_thread")]
FAST = ["sampler.num_steps=2", "reward.face.num_frames=2", "reward.vlm.num_frames=2", "logging.progress_bar=false",
        "reward.weights.vlm=0.0"]  # vlm in the weights: the identity model scores on the workers too


def save_lora_in(transformer, kind, step_dir):
    from policy.lora import save_lora

    save_lora(transformer, step_dir / "lora", kind)


def test_workers_write_the_in_process_files_and_survive_a_killed_worker(root, tmp_path):
    from data.demo import build_demo

    shards, _ = build_demo(tmp_path / "data", num_prompts=3, num_pairs=1, samples_per_shard=4)
    config = root / "cluster_configs" / "local_cpu.yaml"
    runs = {}
    for name, extra in [("in_process", []), ("workers", ["--num-workers", "2", "faults.kills=[eval:1:1]"])]:
        out = tmp_path / name
        overrides = [f"data.prompt_shards={shards}", f"trainer.output_dir={out}", *FAST]
        cfg = load_config(config, overrides)
        transformer = policy_with_visible_lora(cfg).transformer
        CheckpointManager(out).save(2, partial(save_lora_in, transformer, cfg.model.kind), {"step": 2}, to_yaml(cfg))
        # prompt 1 goes to worker 1, which dies there (evaluating the checkpoint, the first policy); Ray restarts it
        # and re-runs the call, the new process fetching the LoRA again
        runs[name] = main(["--config", str(config), "--checkpoint", "latest", "--compare", "base", "--num-prompts",
                           "3", "--seeds-per-prompt", "2", "--grid-prompts", "2", "--save-videos",
                           "--no-tensorboard", *overrides, *extra])
    local, spread = tmp_path / "in_process" / "eval", tmp_path / "workers" / "eval"
    assert (tmp_path / "workers" / "faults" / "eval_1_step1.done").is_file()  # the kill happened
    for policy in ("step_000002", "base"):
        records = (local / policy / "samples.jsonl").read_text()
        assert records == (spread / policy / "samples.jsonl").read_text(), policy
        assert len(records.splitlines()) == 6
        summaries = [json.loads((d / policy / "summary.json").read_text()) for d in (local, spread)]
        for summary, run in zip(summaries, ("in_process", "workers")):  # the checkpoint's path names its run
            assert summary.pop("lora_file").startswith(str(tmp_path / run)) or policy == "base"
        assert (summaries[0].pop("workers"), summaries[1].pop("workers")) == (0, 2) and summaries[0] == summaries[1]
        videos = sorted(p.name for p in (local / policy / "videos").iterdir())
        assert len(videos) == 6 and videos == sorted(p.name for p in (spread / policy / "videos").iterdir())
        for video in videos:
            assert (local / policy / "videos" / video).read_bytes() == (spread / policy / "videos" / video).read_bytes()
    # the LoRA was applied on the workers (its videos differ from the base model's), and the grid is the same
    assert (local / "step_000002" / "samples.jsonl").read_text() != (local / "base" / "samples.jsonl").read_text()
    assert (local / "comparison.json").read_text() == (spread / "comparison.json").read_text()
    assert (local / "video_grid.mp4").read_bytes() == (spread / "video_grid.mp4").read_bytes()
    assert runs["workers"]["comparison"]["pairs"] == 6
