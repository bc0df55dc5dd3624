"""Named architectures (policy/arch.py) and the one-dtype rule (policy/precision.py)."""

import pytest
import torch

from config import LoraConfig, load_config
from launcher.memory_plan import learner_state_bytes
from policy.arch import keeps_fp32, transformer_config
from policy.lora import add_lora
from policy.models import (
    ModelPathError,
    build_components,
    build_random_components,
    build_tiny_components,
    build_transformer,
    load_pretrained_components,
    save_pretrained,
)
from policy.precision import dtype_map, set_policy_dtypes


def _params(arch, kind):
    with torch.device("meta"):
        model = build_transformer(kind, transformer_config(arch, kind))
    return sum(p.numel() for p in model.parameters())


def test_published_sizes():
    """The shipped configs build the models their names say (parameter counts on the meta device)."""
    assert 1.3e9 < _params("wan2.1-t2v-1.3b", "t2v") < 1.5e9
    assert 13.5e9 < _params("wan2.1-t2v-14b", "t2v") < 15e9
    assert _params("wan2.1-vace-1.3b", "vace") > _params("wan2.1-t2v-1.3b", "t2v")  # + control blocks
    assert _params("phantom-wan-1.3b", "phantom") == _params("wan2.1-t2v-1.3b", "t2v")


def test_vace_layers_keep_the_real_stride_when_truncated():
    full_small, full_big = transformer_config("wan2.1-vace-1.3b", "vace"), transformer_config("wan2.1-vace-14b", "vace")
    assert full_small["vace_layers"] == list(range(0, 30, 2)) and full_big["vace_layers"] == list(range(0, 40, 5))
    assert transformer_config("wan2.1-vace-1.3b", "vace", num_layers=3)["vace_layers"] == [0, 2]
    assert transformer_config("wan2.1-vace-14b", "vace", num_layers=1)["vace_layers"] == [0]
    cut = transformer_config("wan2.1-vace-1.3b", "vace", num_layers=3)
    assert {k: v for k, v in cut.items() if k not in ("num_layers", "vace_layers")} == \
        {k: v for k, v in full_small.items() if k not in ("num_layers", "vace_layers")}  # widths untouched


def test_random_init_has_the_dtypes_from_pretrained_gives(tmp_path):
    """A random-init model is cast as `from_pretrained(torch_dtype=bf16)` leaves a loaded one: the modules of
    `_keep_in_fp32_modules` (norms, time embedder, modulation tables) stay float32."""
    save_pretrained(build_tiny_components("vace", seed=1), tmp_path / "m")
    loaded = load_pretrained_components(tmp_path / "m", "vace", torch.bfloat16, parts=("transformer",)).transformer
    built = build_random_components("tiny", "vace", 1, torch.bfloat16, parts=("transformer",)).transformer
    assert dtype_map(built) == dtype_map(loaded)
    kinds = set(dtype_map(built).values())
    assert kinds == {"bfloat16", "float32"}  # both: the rule is not vacuous


def test_real_architecture_random_build_is_seeded_per_part_and_keeps_each_inits_scale():
    """Rehearsal builds fill from a random bank (policy/models.py `fast_random_fill`): a learner (transformer only)
    and a rollout worker (text encoder and VAE first) get the same transformer; another seed, other weights; each
    tensor keeps its initialiser's scale (nn.Linear: uniform in +-1/sqrt(fan_in), std 1/sqrt(3 fan_in))."""
    kw = dict(arch="wan2.1-t2v-1.3b", kind="t2v", dtype=torch.bfloat16, num_layers=1, text_encoder_layers=1,
              text_encoder_vocab=512)
    alone = build_random_components(seed=0, parts=("transformer",), **kw).transformer.state_dict()
    after = build_random_components(seed=0, **kw).transformer.state_dict()
    other = build_random_components(seed=1, parts=("transformer",), **kw).transformer.state_dict()
    assert all(torch.equal(alone[k], after[k]) for k in alone)
    weight = alone["blocks.0.ffn.net.2.weight"].float()  # Linear(8960 -> 1536)
    assert not torch.equal(weight, other["blocks.0.ffn.net.2.weight"].float())
    assert weight.abs().max() <= 8960 ** -0.5 and abs(weight.std() / (3 * 8960) ** -0.5 - 1) < 0.01
    assert len({tuple(row[:8].tolist()) for row in weight}) == weight.shape[0] == 1536  # no repeated rows


def test_pretrained_dir_of_another_arch_is_refused(root, tmp_path):
    save_pretrained(build_tiny_components("vace", seed=0), tmp_path / "m")
    cfg = load_config(root / "cluster_configs" / "local_cpu.yaml",
                      ["model.init=pretrained", f"model.path={tmp_path / 'm'}", "model.arch=wan2.1-vace-1.3b"])
    with pytest.raises(ModelPathError, match="num_attention_heads"):
        build_components(cfg.model, parts=("transformer",))


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_rollout_and_learner_rule_gives_one_dtype_per_parameter(lora):
    """Both roles call set_policy_dtypes on the same structure; the learner's DeepSpeed engine must not
    change it (its bf16 mode casts every parameter: the negative control below)."""
    def role():
        m = build_random_components("tiny", "vace", 0, torch.bfloat16, parts=("transformer",)).transformer
        if lora:
            add_lora(m, LoraConfig(enabled=True, rank=4, alpha=4.0))
        return set_policy_dtypes(m, torch.bfloat16, lora=lora)

    rollout, learner = role(), role()
    assert dtype_map(rollout) == dtype_map(learner)
    for name, p in rollout.named_parameters():
        if lora and p.requires_grad:
            assert p.dtype == torch.float32, name  # fp32 adapters = master weights
        elif lora:
            assert p.dtype == (torch.float32 if keeps_fp32(rollout, name) else torch.bfloat16), name
        else:
            assert p.dtype == torch.bfloat16, name
    if lora:
        learner.to(torch.bfloat16)  # what DeepSpeed's bf16 mode would do to the module
        assert dtype_map(rollout) != dtype_map(learner)


def test_learner_state_bytes_by_stage():
    n = 1000  # bytes per trained parameter: grads, bucket, master + Adam, step temporaries (memory_plan.py)
    assert learner_state_bytes(n, 2, 1, mixed=False) == 4 * n + 4 * n + 20 * n // 2
    assert learner_state_bytes(n, 2, 2, mixed=False) == 4 * n // 2 + 4 * n + 20 * n // 2
    assert learner_state_bytes(n, 2, 3, mixed=True) == 4 * n // 2 + 2 * n + 2 * n + 20 * n // 2
    assert learner_state_bytes(10**9, 1, 2, mixed=True) == (4 + 2 + 20) * 10**9 + 2 * 500_000_000  # bucket cap
