"""Phantom's released format (original Wan keys) -> diffusers, on a tiny synthetic checkpoint."""

import pytest
import torch

from policy.models import build_tiny_transformer
from policy.phantom_convert import convert_state_dict, load_phantom_checkpoint, to_original_format


def original_wan_keys(num_layers: int) -> set:
    """The stock Wan2.1 T2V key set, written out from the original model's module names."""
    keys = {"patch_embedding.weight", "patch_embedding.bias", "head.head.weight", "head.head.bias",
            "head.modulation"}
    for name in ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
                 "time_projection.1"):
        keys |= {f"{name}.weight", f"{name}.bias"}
    for i in range(num_layers):
        b = f"blocks.{i}"
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                keys |= {f"{b}.{attn}.{proj}.weight", f"{b}.{attn}.{proj}.bias"}
            keys |= {f"{b}.{attn}.norm_q.weight", f"{b}.{attn}.norm_k.weight"}
        keys |= {f"{b}.norm3.weight", f"{b}.norm3.bias", f"{b}.ffn.0.weight", f"{b}.ffn.0.bias",
                 f"{b}.ffn.2.weight", f"{b}.ffn.2.bias", f"{b}.modulation"}
    return keys


def test_original_format_has_exactly_the_stock_keys():
    model = build_tiny_transformer("phantom", seed=0)
    original = to_original_format(model.state_dict())
    assert set(original) == original_wan_keys(2)
    assert len(original) == 15 + 27 * 2  # 825 for the 30-layer 1.3B model


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_synthetic_phantom_checkpoint_loads_exactly(tmp_path, suffix):
    source = build_tiny_transformer("phantom", seed=11)
    original = to_original_format({k: v.clone() for k, v in source.state_dict().items()})
    path = tmp_path / f"Phantom-Wan-tiny{suffix}"
    if suffix == ".pth":
        torch.save(original, path)
    else:
        from safetensors.torch import save_file

        save_file(original, path)
    target = build_tiny_transformer("phantom", seed=0)
    load_phantom_checkpoint(target, path)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    x = torch.randn(1, 16, 3, 4, 4)
    text = torch.randn(1, 5, 32)
    with torch.no_grad():
        a = source(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text).sample
        b = target(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text).sample
    assert torch.equal(a, b)


def test_norm_swap_and_head_modulation():
    converted = convert_state_dict({"blocks.3.norm3.weight": torch.zeros(1), "head.modulation": torch.zeros(1),
                                    "blocks.3.modulation": torch.zeros(1), "model.head.head.bias": torch.zeros(1)})
    assert set(converted) == {"blocks.3.norm2.weight", "scale_shift_table", "blocks.3.scale_shift_table",
                              "proj_out.bias"}


def test_incomplete_checkpoint_names_missing_keys(tmp_path):
    model = build_tiny_transformer("phantom")
    original = to_original_format(model.state_dict())
    del original["blocks.1.cross_attn.o.weight"]
    torch.save(original, tmp_path / "bad.pth")
    with pytest.raises(KeyError, match=r"blocks\.1\.attn2\.to_out\.0\.weight"):
        load_phantom_checkpoint(model, tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="phantom_checkpoint"):
        load_phantom_checkpoint(model, tmp_path / "nope.pth")
