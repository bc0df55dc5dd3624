import json

import pytest
import torch

from config import load_config
from policy.models import (
    ModelPathError,
    build_components,
    build_tiny_components,
    load_pretrained_components,
    save_pretrained,
)


def _forward_all(c, kind):
    """One forward of every part, with fixed inputs; returns the outputs to compare."""
    torch.manual_seed(123)
    ids = c.tokenizer(["two people talk in a park"], padding="max_length", max_length=12,
                      truncation=True, return_tensors="pt")
    text = c.text_encoder(ids.input_ids, ids.attention_mask).last_hidden_state
    video = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    posterior = c.vae.encode(video).latent_dist
    latents = posterior.mode()
    decoded = c.vae.decode(latents).sample
    x = torch.randn(1, 16, 3, 4, 4)
    kwargs = {}
    if kind == "vace":
        kwargs["control_hidden_states"] = torch.randn(1, 96, 3, 4, 4)
    v = c.transformer(hidden_states=x, timestep=torch.tensor([700.0]), encoder_hidden_states=text,
                      return_dict=False, **kwargs)[0]
    return ids.input_ids, text, latents, decoded, v


@pytest.mark.parametrize("kind", ["t2v", "vace", "phantom"])
def test_tiny_models_run_and_round_trip(tmp_path, kind):
    c = build_tiny_components(kind, seed=0)
    with torch.no_grad():
        before = _forward_all(c, kind)
    ids, text, latents, decoded, v = before
    assert text.shape == (1, 12, 32) and latents.shape == (1, 16, 3, 4, 4)
    assert decoded.shape == (1, 3, 9, 32, 32) and v.shape == (1, 16, 3, 4, 4)
    assert torch.isfinite(v).all()

    save_pretrained(c, tmp_path / "m")
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["transformer"][1] == type(c.transformer).__name__
    loaded = load_pretrained_components(tmp_path / "m", kind)
    with torch.no_grad():
        after = _forward_all(loaded, kind)
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def test_tiny_build_is_seeded():
    a = build_tiny_components("t2v", seed=3).transformer.state_dict()
    b = build_tiny_components("t2v", seed=3).transformer.state_dict()
    c = build_tiny_components("t2v", seed=4).transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_missing_path_names_what_is_missing(tmp_path):
    with pytest.raises(ModelPathError, match="directory not found"):
        load_pretrained_components(tmp_path / "nope", "t2v")
    save_pretrained(build_tiny_components("t2v"), tmp_path / "m")
    for weights in (tmp_path / "m" / "vae").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelPathError, match="vae.*no weight files"):
        load_pretrained_components(tmp_path / "m", "t2v")
    import shutil

    shutil.rmtree(tmp_path / "m" / "text_encoder")
    with pytest.raises(ModelPathError, match="text_encoder"):
        load_pretrained_components(tmp_path / "m", "t2v")


def test_build_from_config_uses_path(root, tmp_path):
    save_pretrained(build_tiny_components("vace", seed=7), tmp_path / "m")
    cfg = load_config(root / "cluster_configs" / "local_cpu.yaml",
                      ["model.init=pretrained", f"model.path={tmp_path / 'm'}"])
    loaded = build_components(cfg.model)
    ref = build_tiny_components("vace", seed=7)
    sd, rd = loaded.transformer.state_dict(), ref.transformer.state_dict()
    assert all(torch.equal(sd[k], rd[k]) for k in rd)
