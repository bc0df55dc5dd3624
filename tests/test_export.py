"""launcher.export: a run's checkpoint -> a folder that stock diffusers loads, checked in a fresh process (what a
user does with it), plus the model card's facts and the errors that name the culprit."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from config import load_config, to_yaml
from launcher.export import main as export_main
from policy.lora import LORA_FILE, save_lora
from policy.models import build_components, save_pretrained
from policy.policy import WanPolicy
from runtime.checkpoint import CheckpointManager
from runtime.metrics import MetricsLogger

PROMPT = "a person waves at the camera"
LOAD_IN_DIFFUSERS = """
import sys, torch
from diffusers import WanVACEPipeline
base, inputs, result, *loras = sys.argv[1:]
x = torch.load(inputs)
outs = []
for lora in loras:
    pipe = WanVACEPipeline.from_pretrained(base)
    pipe.load_lora_weights(lora)
    with torch.no_grad():
        outs.append(pipe.transformer(hidden_states=x["x"], timestep=x["t"], encoder_hidden_states=x["text"],
                                     control_hidden_states=x["control"]).sample)
torch.save(outs, result)
"""

def velocity(policy, x):
    with torch.no_grad():
        return policy.transformer(hidden_states=x["x"], timestep=x["t"], encoder_hidden_states=x["text"],
                                  control_hidden_states=x["control"]).sample


def nudge_lora(transformer, seed):
    """Non-zero adapters (lora_B starts at zero), different per seed: two distinguishable LoRAs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.fixture(scope="module")
def run(root, tmp_path_factory):
    """A run directory as training leaves it: step 3's checkpoint (live LoRA, EMA LoRA, driver state, config) and
    metrics.jsonl with a held-out monitor line; plus the base model and the expected velocities of each LoRA."""
    tmp = tmp_path_factory.mktemp("export")
    cfg = load_config(root / "cluster_configs" / "local_cpu.yaml", [f"trainer.output_dir={tmp / 'run'}",
                                                                     "model.lora.alpha=8.0"])
    policy = WanPolicy(build_components(cfg.model), cfg.model, cfg.sampler)
    save_pretrained(policy.components, tmp / "base")  # adapters not saved: the base weights
    rng = np.random.RandomState(0)
    cond = policy.encode_condition(PROMPT, [rng.randint(0, 255, (40, 28, 3), dtype=np.uint8)])
    x = {"x": torch.randn(1, *cond.latent_shape, generator=torch.Generator().manual_seed(1)),
         "t": torch.tensor([700.0]), "text": cond.prompt_embeds, "control": cond.control}
    torch.save(x, tmp / "inputs.pt")
    expected = {}

    def write_parts(step_dir):
        for weights, seed, sub in (("live", 1, "lora"), ("ema", 2, "lora_ema")):
            nudge_lora(policy.transformer, seed)
            save_lora(policy.transformer, step_dir / sub, cfg.model.kind)
            expected[weights] = velocity(policy, x)

    CheckpointManager(tmp / "run").save(3, write_parts, {"step": 3, "version": 3}, to_yaml(cfg))
    metrics = MetricsLogger(tmp / "run", tensorboard=False)
    for step in (1, 2, 3):
        record = {k: 0.0 for k in ("reward_std", "ratio_mean", "clip_frac", "kl", "policy_loss", "staleness_max",
                                   "rollout_s", "reward_s", "learn_s", "sync_s", "step_s")}
        record.update(step=step, reward_mean=0.25 * step, policy_version=step)
        if step == 2:
            record["heldout_face_mean"] = 0.5
        metrics.log(record)
    metrics.close()
    return tmp, expected


def in_diffusers(tmp, *lora_dirs):
    """Each exported folder loaded by the stock pipeline in a fresh process: the transformer's velocities."""
    result = tmp / "velocities.pt"
    proc = subprocess.run([sys.executable, "-c", LOAD_IN_DIFFUSERS, str(tmp / "base"), str(tmp / "inputs.pt"),
                           str(result), *map(str, lora_dirs)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(result)


def test_exported_ema_and_live_loras_load_in_stock_diffusers(run, capsys):
    tmp, expected = run
    export_main([str(tmp / "run"), "--out", str(tmp / "ema")])
    export_main([str(tmp / "run"), "--out", str(tmp / "live"), "--weights", "live", "--step", "3"])
    assert "pytorch_lora_weights.safetensors (ema weights)" in capsys.readouterr().out
    ema, live = in_diffusers(tmp, tmp / "ema", tmp / "live")
    torch.testing.assert_close(ema, expected["ema"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(live, expected["live"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ema, live, rtol=1e-3, atol=1e-3)


def test_model_card_states_what_the_policy_was_trained_at(run):
    tmp, _ = run
    out = tmp / "card"
    export_main([str(tmp / "run"), "--out", str(out)])
    facts = json.loads((out / "export.json").read_text())
    assert facts["step"] == 3 and facts["weights"] == "ema" and facts["pipeline"] == "WanVACEPipeline"
    assert facts["model"]["lora_alpha"] == 8.0 and facts["sampling"]["guidance_scale"] == 4.5
    assert facts["figures"]["reward_mean_last_steps"] == pytest.approx(0.5)  # mean of 0.25, 0.5, 0.75
    assert facts["figures"]["heldout_step"] == 2 and facts["figures"]["heldout_face_mean"] == 0.5
    card = (out / "README.md").read_text()
    assert "guidance scale 4.5" in card and "WanVACEPipeline.from_pretrained" in card and "step 3" in card
    assert facts["objective"] == "grpo" and "objective: grpo" in card
    assert (out / "training_config.yaml").read_text() == (tmp / "run" / "checkpoints" / "step_000003" /
                                                           "config.yaml").read_text()


@pytest.mark.parametrize("case", ["missing step", "non-empty out", "not a run", "out under a file", "damaged LoRA"])
def test_bad_input_is_one_line_naming_it(run, capsys, case):
    tmp, _ = run
    (tmp / "full").mkdir(exist_ok=True)
    (tmp / "full" / "keep.txt").write_text("mine")
    if not (tmp / "damaged").exists():  # the run, with its EMA LoRA file overwritten (a cut copy, another format)
        shutil.copytree(tmp / "run", tmp / "damaged")
        (tmp / "damaged" / "checkpoints" / "step_000003" / "lora_ema" / LORA_FILE).write_bytes(b"\x00junk" * 64)
    argv, culprit = {
        "missing step": ([str(tmp / "run"), "--out", str(tmp / "y"), "--step", "7"], "--step 7"),
        "non-empty out": ([str(tmp / "run"), "--out", str(tmp / "full")], f"--out {tmp / 'full'}"),
        "not a run": ([str(tmp / "base"), "--out", str(tmp / "y")], "no checkpoint"),
        "out under a file": ([str(tmp / "run"), "--out", str(tmp / "full" / "keep.txt" / "y")], "keep.txt/y"),
        "damaged LoRA": ([str(tmp / "damaged"), "--out", str(tmp / "y")],
                         f"lora_ema/{LORA_FILE}: not a readable safetensors file"),
    }[case]
    with pytest.raises(SystemExit) as exit_:
        export_main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("export: ") and culprit in err[0], err
    assert (tmp / "full" / "keep.txt").read_text() == "mine" and not (tmp / "y").exists()
