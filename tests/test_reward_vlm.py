"""Identity reward model (reward/vlm.py, reward/vlm_inputs.py): inputs, scoring, trainable parts, save/load.

Everything is a real transformers Qwen2.5-VL class with tiny random weights; the "local base" is a
tiny Qwen2_5_VLForConditionalGeneration written with save_pretrained in the Hugging Face layout.
"""

import json
import logging

import numpy as np
import pytest
import torch

from reward.vlm import IdentityRewardModel, load_reward_model
from reward.vlm_arch import tiny_vlm_config
from data.video import sample_frame_indices
from reward.vlm_inputs import REWARD_TOKEN, RewardInputBuilder, build_image_processor, build_tiny_tokenizer


def _data(n=3, frames=7, seed=0):
    rng = np.random.default_rng(seed)
    videos = [rng.integers(0, 256, (frames, 40 + 8 * i, 64, 3), dtype=np.uint8) for i in range(n)]
    refs = [[rng.integers(0, 256, (50, 50, 3), dtype=np.uint8) for _ in range(1 + i % 3)] for i in range(n)]
    prompts = [f"person {i} walks in a park" for i in range(n)]
    return videos, refs, prompts


def _perturb(model, pattern, scale=0.05):
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if pattern in name:
                p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def tiny():
    return IdentityRewardModel.build_tiny(image_size=56, num_frames=3, seed=0)


def test_sequence_layout_refs_then_frames_then_text_then_reward_token(tiny):
    videos, refs, prompts = _data()
    batch = tiny.inputs(videos, refs, prompts)
    b = tiny.inputs
    assert b.tokens_per_image == 4  # 56 px / patch 14 = 4 x 4 patches, merged 2 x 2
    for i in range(3):
        ids = batch["input_ids"][i, : batch["reward_index"][i] + 1].tolist()
        assert ids[-1] == b.reward_token_id and ids.count(b.reward_token_id) == 1
        text = b.tokenizer.decode(ids)
        # one vision span per reference, then one per sampled frame, then the instruction with the prompt
        assert text.count("<|vision_start|>") == len(refs[i]) + 3
        order = [text.index(x) for x in ("Reference 1:", "Video frames:", prompts[i], REWARD_TOKEN)]
        assert order == sorted(order)
        assert ids.count(b.image_token_id) == 4 * (len(refs[i]) + 3)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * (sum(len(r) for r in refs) + 3 * 3)
    assert torch.equal(batch["mm_token_type_ids"].bool(), batch["input_ids"] == b.image_token_id)
    assert sample_frame_indices(7, 3) == [0, 3, 6] and sample_frame_indices(2, 5) == [0, 0, 0, 1, 1]


def test_score_shape_determinism_and_batch_independence(tiny):
    videos, refs, prompts = _data()
    s = tiny.score(videos, refs, prompts)
    assert s.shape == (3,) and s.dtype == torch.float32 and torch.isfinite(s).all()
    again = IdentityRewardModel.build_tiny(image_size=56, num_frames=3, seed=0).score(videos, refs, prompts)
    assert torch.equal(s, again)
    one_by_one = torch.cat([tiny.score(videos[i:i + 1], refs[i:i + 1], prompts[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(s, one_by_one, atol=1e-5, rtol=0)  # padding does not leak into the score
    as_tensors = tiny.score([torch.from_numpy(v) for v in videos], [[torch.from_numpy(r) for r in rs] for rs in refs],
                            prompts)
    assert torch.equal(s, as_tensors)
    # the score depends on the video and on the references
    assert not torch.equal(s, tiny.score(videos[::-1], refs, prompts))
    assert not torch.equal(s, tiny.score(videos, [[255 - r for r in rs] for rs in refs], prompts))
    assert IdentityRewardModel.build_tiny(56, 3, seed=1).score(videos, refs, prompts).ne(s).any()


def test_input_errors(tiny):
    videos, refs, prompts = _data()
    with pytest.raises(ValueError, match="image_size must be a positive multiple of 28"):
        RewardInputBuilder(tiny.inputs.tokenizer, build_image_processor(56), 50, 3)
    with pytest.raises(ValueError, match="sample 1: video must be uint8"):
        tiny.score([videos[0], videos[1].astype(np.float32)], refs[:2], prompts[:2])
    with pytest.raises(ValueError, match="at least one reference"):
        tiny.score(videos[:1], [[]], prompts[:1])
    with pytest.raises(ValueError, match="equally many"):
        tiny.score(videos, refs[:2], prompts)


def test_trainable_parts():
    m = IdentityRewardModel.build_tiny(56, 2, seed=0)
    m.configure_training({"rank": 4, "alpha": 8.0}, language_model=False, vision=False, merger=True)
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("head.", "vlm.visual.merger.")) or ".lora_" in n for n in names)
    assert all("language_model" in n for n in names if ".lora_" in n)  # LoRA on the LLM only
    assert any(n.startswith("vlm.visual.merger.") for n in names) and "head.weight" in names
    m.configure_training({"rank": 4, "alpha": 8.0}, vision=True, merger=False)
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert any(n.startswith("vlm.visual.blocks.") for n in names) and not any("merger" in n for n in names)
    full = IdentityRewardModel.build_tiny(56, 2, seed=0)
    full.configure_training(None, language_model=True)
    assert full.vlm.language_model.embed_tokens.weight.requires_grad
    with pytest.raises(ValueError, match="exclude each other"):
        full.configure_training({"rank": 4, "alpha": 8.0}, language_model=True)


def test_save_load_round_trip_tiny_with_lora(tmp_path):
    videos, refs, prompts = _data()
    m = IdentityRewardModel.build_tiny(56, 3, seed=0, instruction="Prompt: {prompt}")
    m.configure_training({"rank": 4, "alpha": 8.0})
    for part in ("lora_B", "visual.blocks.0", "head"):
        _perturb(m, part)  # as if trained: the saved model must carry all of it
    before = m.score(videos, refs, prompts)
    m.save_pretrained(tmp_path / "rm")
    assert {p.name for p in (tmp_path / "rm").iterdir()} == {"reward_model.json", "base_config.json",
                                                            "model.safetensors", "processor"}
    loaded = IdentityRewardModel.from_pretrained(str(tmp_path / "rm"))
    assert torch.equal(before, loaded.score(videos, refs, prompts))
    assert loaded.lora["rank"] == 4 and loaded.inputs.instruction == "Prompt: {prompt}"
    assert torch.equal(before, load_reward_model(str(tmp_path / "rm"), num_frames=3).score(videos, refs, prompts))


def test_local_base_partial_save_round_trip(tmp_path, caplog):
    """A Qwen2.5-VL directory in the HF layout is the base; only trained weights are saved."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    tok = build_tiny_tokenizer(with_reward_token=False)  # like Qwen's: from_base must add <|reward|>
    torch.manual_seed(3)
    Qwen2_5_VLForConditionalGeneration(tiny_vlm_config(tok)).save_pretrained(tmp_path / "qwen")
    tok.save_pretrained(tmp_path / "qwen")
    build_image_processor(56).save_pretrained(tmp_path / "qwen")

    with caplog.at_level(logging.WARNING, logger="reward.vlm"):
        m = IdentityRewardModel.from_base(str(tmp_path / "qwen"), image_size=56, num_frames=2, dtype="float32")
    assert "created the reward token <|reward|>" in caplog.text and "a new embedding row" in caplog.text
    assert m.inputs.reward_token_id == len(tok)  # added, and the embedding matrix grew to hold it
    # scoring with a base (untrained head) is an error naming the directory, unless explicitly allowed
    with pytest.raises(ValueError, match=r"reward\.vlm\.path: .*qwen has no trained reward head.*allow_untrained"):
        load_reward_model(str(tmp_path / "qwen"), image_size=56, num_frames=2)
    allowed = load_reward_model(str(tmp_path / "qwen"), image_size=56, num_frames=2, allow_untrained_head=True)
    assert torch.equal(allowed.head.weight, m.head.weight)  # the same seeded new head
    assert m.vlm.get_input_embeddings().weight.shape[0] == len(tok) + 1
    m.configure_training({"rank": 4, "alpha": 8.0}, vision=True, merger=True)
    for part in ("lora_B", "visual.merger", "head"):
        _perturb(m, part)
    videos, refs, prompts = _data()
    before = m.score(videos, refs, prompts)
    m.save_pretrained(tmp_path / "rm")
    saved = {p.name for p in (tmp_path / "rm").iterdir()}
    assert "trained.safetensors" in saved and "model.safetensors" not in saved
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "rm" / "trained.safetensors")))
    assert "reward_token_embedding" in keys and not any("base_layer" in k for k in keys)
    loaded = load_reward_model(str(tmp_path / "rm"), image_size=56, num_frames=2)
    assert torch.equal(before, loaded.score(videos, refs, prompts))


def test_missing_base_path_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"reward\.vlm\.path.*does not exist"):
        load_reward_model(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"reward\.vlm\.path.*has no config.json"):
        IdentityRewardModel.from_base(str(tmp_path / "empty"))


def test_official_checkpoint_layout_is_named_not_misread(tmp_path):
    """The official layout (outputs/identity_reward: model_config.json + checkpoint-N/) goes to reward/official.py,
    never loaded as a base with a random head: a broken model_config.json or a missing base is named."""
    (tmp_path / "identity_reward" / "checkpoint-21").mkdir(parents=True)
    (tmp_path / "identity_reward" / "model_config.json").write_text("{}")
    (tmp_path / "identity_reward" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"reward\.vlm\.path: .*model_config.json is not an official reward"):
        load_reward_model(str(tmp_path / "identity_reward"), allow_untrained_head=True)
    from tests.test_reward_official import OFFICIAL_MODEL_CONFIG

    (tmp_path / "identity_reward" / "model_config.json").write_text(json.dumps(OFFICIAL_MODEL_CONFIG))
    with pytest.raises(ValueError, match=r"set reward\.vlm\.base_path"):
        load_reward_model(str(tmp_path / "identity_reward"), num_frames=4, allow_untrained_head=True)


@pytest.mark.parametrize("vision_layers, full_attention", [(None, [7, 15, 23, 31]), (8, [7]), (2, [1]), (1, [0])])
def test_reduced_vision_stack_keeps_a_full_attention_block(vision_layers, full_attention):
    """A rehearsal's reduced Qwen2.5-VL-3B vision tower runs both attention kinds: the published full-attention
    indexes below its depth, else its last block (reward.vlm.published_vlm_config)."""
    from reward.vlm_arch import published_vlm_config

    config = published_vlm_config("qwen2.5-vl-3b", build_tiny_tokenizer(), text_layers=1, vision_layers=vision_layers)
    assert config.vision_config.fullatt_block_indexes == full_attention
    assert config.vision_config.depth == (vision_layers or 32) and config.vision_config.hidden_size == 1280
    assert config.text_config.num_hidden_layers == 1 and config.text_config.hidden_size == 2048
