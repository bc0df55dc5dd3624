"""Official Identity-GRPO reward checkpoints (reward/official.py): a checkpoint in the official layout, written the
way the official code writes one (PEFT on transformers' Qwen2.5-VL, keys under transformers 4.51's module names),
from the tiny Qwen2.5-VL; loaded back, it scores exactly as the model that wrote it."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from config import load_config
from reward.official import OfficialRewardModel, load_official_reward_model
from reward.official_format import checkpoint_dir, official_key_to_ours
from reward.official_inputs import SA_TOKEN, SUBJECT_ALIGNMENT_PROMPT, frame_count, smart_resize
from reward.vlm import reward_model_from_config
from reward.vlm_arch import tiny_vlm_config
from reward.vlm_inputs import build_tiny_tokenizer
from tests.stand_ins import OFFICIAL_MODEL_CONFIG

def as_transformers_451(key: str) -> str:
    """transformers 5's Qwen2.5-VL module names -> 4.51's (the official pin): the language model was `model`, the
    vision tower a sibling `visual`."""
    return key.replace("base_model.model.model.language_model.", "base_model.model.model.").replace(
        "base_model.model.model.visual.", "base_model.model.visual.")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A local 'Qwen2.5-VL' directory in the Hugging Face layout: the tiny config, its tokenizer, Qwen2-VL's
    image processor (CLIP mean and std)."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    d = tmp_path_factory.mktemp("qwen_base")
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(tiny_vlm_config(tokenizer)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    Qwen2VLImageProcessorPil().save_pretrained(d)
    return d


def write_official_checkpoint(base_dir, out, step=21, seed=1, dtype=torch.float32):
    """What the official create_model_and_processor + VideoAlign's save produce: returns the writer's model
    (the PEFT model with its rm_head; get_peft_model keeps the adapters in float32 whatever `dtype`) and tokenizer."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [SA_TOKEN]})
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir, dtype=dtype)
    model.resize_token_embeddings(len(tokenizer))
    model.rm_head = nn.Linear(model.config.text_config.hidden_size, 1, bias=False).to(dtype)
    lora = OFFICIAL_MODEL_CONFIG["peft_lora_config"]
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not any(
        x in n for x in lora["lora_namespan_exclude"])]
    peft_model = get_peft_model(model, LoraConfig(r=lora["lora_r"], lora_alpha=lora["lora_alpha"],
                                                  lora_dropout=lora["lora_dropout"], target_modules=targets,
                                                  task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # "trained": every LoRA B, the head, the vision tower and the embedding move
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "rm_head" in name or "visual" in name or "embed_tokens" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    for name, p in peft_model.named_parameters():  # VideoAlign: vision tower, merger, embeddings, head trainable
        if any(x in name for x in ("visual", "embed_tokens", "rm_head")):
            p.requires_grad_(True)
    ckpt = out / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    adapter = get_peft_model_state_dict(peft_model)
    save_file({as_transformers_451(k): v.contiguous() for k, v in adapter.items()},
              str(ckpt / "adapter_model.safetensors"))
    non_lora = {as_transformers_451(k): v.detach().clone() for k, v in peft_model.named_parameters()
                if "lora_" not in k and v.requires_grad}
    torch.save(non_lora, ckpt / "non_lora_state_dict.pth")
    (out / "model_config.json").write_text(json.dumps(OFFICIAL_MODEL_CONFIG))
    return peft_model.eval(), tokenizer


def inputs(seed=0, count=2):
    rng = np.random.default_rng(seed)
    videos = [rng.integers(0, 256, (9, 40, 64, 3), dtype=np.uint8) for _ in range(count)]
    refs = [[rng.integers(0, 256, (50, 40, 3), dtype=np.uint8) for _ in range(1 + i % 2)] for i in range(count)]
    return videos, refs, ["a prompt the official instruction does not use"] * count


def writer_scores(peft_model, batch):
    """The writer's own forward: its LoRA-wrapped Qwen2.5-VL body, its rm_head at the <|SA_reward|> position."""
    body = peft_model.base_model.model.model
    dtype = peft_model.base_model.model.rm_head.weight.dtype
    inputs = {k: (v.to(dtype) if k.startswith("pixel_values") else v) for k, v in batch.items() if k != "reward_index"}
    out = body(**inputs, use_cache=False)
    rows = torch.arange(batch["input_ids"].shape[0])
    return peft_model.base_model.model.rm_head(out.last_hidden_state[rows, batch["reward_index"]]).squeeze(-1)


def test_official_layout_round_trip_scores_as_the_writer(base_dir, tmp_path):
    writer, tokenizer = write_official_checkpoint(base_dir, tmp_path / "identity_reward")
    adapter_keys = set(load_file(str(tmp_path / "identity_reward" / "checkpoint-21" / "adapter_model.safetensors")))
    # the documented official key names (docs/official_reward_checkpoint.md)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in adapter_keys
    assert len(adapter_keys) == 2 * 7 * 2  # 7 projections x 2 layers, A and B
    non_lora = torch.load(tmp_path / "identity_reward" / "checkpoint-21" / "non_lora_state_dict.pth")
    assert {"base_model.model.rm_head.weight", "base_model.model.model.embed_tokens.weight"} <= set(non_lora)
    assert any(k.startswith("base_model.model.visual.blocks.0.") for k in non_lora)

    model = load_official_reward_model(str(tmp_path / "identity_reward"), str(base_dir), dtype="float32")
    assert model.inputs.num_frames == 4 and model.inputs.max_frame_pixels == 399360
    assert model.inputs.reward_token_id == tokenizer.convert_tokens_to_ids(SA_TOKEN)
    videos, refs, prompts = inputs()
    batch = model.inputs(videos, refs, prompts)
    with torch.no_grad():
        expected = writer_scores(writer, batch)
    got = model.score(videos, refs, prompts)
    assert torch.equal(got, expected.float()), (got, expected)
    # the text prompt is not part of the official input; the references are
    assert torch.equal(model.score(videos, refs, ["another prompt"] * 2), got)
    assert not torch.equal(model.score(videos, [refs[1], refs[0]], prompts), got)
    # the adapter counts: without it (B = 0) the scores change
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()
    assert not torch.allclose(model.score(videos, refs, prompts), got, atol=1e-4)


def test_official_input_layout(base_dir, tmp_path):
    write_official_checkpoint(base_dir, tmp_path / "identity_reward")
    model = load_official_reward_model(str(tmp_path / "identity_reward"), str(base_dir), dtype="float32")
    videos, refs, prompts = inputs(count=2)
    batch = model.inputs([videos[0][:8]], [refs[1]], prompts[:1])  # two references, an 8-frame video
    text = model.inputs.tokenizer.decode(batch["input_ids"][0])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|><|image_pad|>")
    assert text.count("<|vision_start|>") == 3 and "Picture" not in text and "Video 1" not in text
    assert text.endswith(SUBJECT_ALIGNMENT_PROMPT + "<|im_end|>\n<|im_start|>assistant\n")
    # 40x64 video: below 100352 pixels, scaled up (ceil) to multiples of 28; 4 frames = 2 temporal patches
    h, w = smart_resize(40, 64, 128 * 28 * 28, 399360)
    assert (h, w) == (252, 420) and h * w >= 100352
    assert batch["video_grid_thw"].tolist() == [[2, h // 14, w // 14]]
    # 50x40 references: 56x28 is below 3136 pixels, scaled up (ceil) to 84x56: one temporal patch of 6x4
    assert smart_resize(50, 40, 4 * 28 * 28, 399360) == (84, 56)
    assert batch["image_grid_thw"].tolist() == [[1, 6, 4]] * 2
    assert int((batch["mm_token_type_ids"] == 2).sum()) == 2 * (h // 28) * (w // 28)
    # M-RoPE time: 2 frames per patch at 4 frames / 8 frames x 10 fps = 5 fps -> 0.4 s per temporal patch
    assert batch["second_per_grid_ts"].tolist() == pytest.approx([0.4])
    assert int(batch["input_ids"][0, batch["reward_index"][0]]) == model.inputs.reward_token_id


def test_qwen_sizes_and_frame_counts():
    """Worked examples of docs/official_reward_checkpoint.md section 4."""
    assert frame_count(5.0) == 4 and frame_count(6.0) == 6 and frame_count(7.0) == 8
    assert smart_resize(240, 416, 128 * 28 * 28, 399360) == (252, 420)
    assert smart_resize(480, 832, 128 * 28 * 28, 399360) == (476, 812)
    assert smart_resize(512, 512, 4 * 28 * 28, 399360) == (504, 504)
    assert smart_resize(1024, 1024, 4 * 28 * 28, 399360) == (616, 616)
    assert smart_resize(720, 1280, 4 * 28 * 28, 399360) == (448, 840)


def test_steps_keys_and_errors(base_dir, tmp_path):
    root = tmp_path / "identity_reward"
    write_official_checkpoint(base_dir, root, step=21)
    write_official_checkpoint(base_dir, tmp_path / "other", step=42, seed=2)
    (tmp_path / "other" / "checkpoint-42").rename(root / "checkpoint-42")
    assert checkpoint_dir(root).name == "checkpoint-42" and checkpoint_dir(root, 21).name == "checkpoint-21"
    with pytest.raises(FileNotFoundError, match=r"checkpoint_step=7: .* has steps \[21, 42\]"):
        checkpoint_dir(root, 7)
    videos, refs, prompts = inputs(count=1)
    newest = load_official_reward_model(str(root), str(base_dir), "float32").score(videos, refs, prompts)
    first = load_official_reward_model(str(root), str(base_dir), "float32", step=21).score(videos, refs, prompts)
    assert not torch.equal(newest, first)
    assert official_key_to_ours("base_model.model.model.layers.3.mlp.up_proj.lora_B.weight") == \
        "vlm.language_model.layers.3.mlp.up_proj.lora_B.default.weight"
    assert official_key_to_ours("base_model.model.visual.merger.mlp.0.bias") == "vlm.visual.merger.mlp.0.bias"
    # no base given: the error names the key and the hub id the checkpoint was built on
    with pytest.raises(ValueError, match=r"built on .Qwen/Qwen2.5-VL-3B-Instruct.*set reward\.vlm\.base_path"):
        load_official_reward_model(str(root), None)
    # a stray key is named with its file
    extra = torch.load(root / "checkpoint-21" / "non_lora_state_dict.pth")
    extra["base_model.model.model.layers.0.unknown.weight"] = torch.zeros(1)
    torch.save(extra, root / "checkpoint-21" / "non_lora_state_dict.pth")
    with pytest.raises(KeyError, match=r"non_lora_state_dict.pth: key 'base_model.model.model.layers.0.unknown"):
        load_official_reward_model(str(root), str(base_dir), "float32", step=21)
    # a damaged adapter or non-LoRA file is named, with what it should be, before any model is built
    adapter = root / "checkpoint-42" / "adapter_model.safetensors"
    non_lora = root / "checkpoint-42" / "non_lora_state_dict.pth"
    kept = adapter.read_bytes()
    adapter.write_bytes(kept[: len(kept) // 3])  # cut short, as an interrupted download leaves it
    with pytest.raises(ValueError, match=r"checkpoint-42/adapter_model.safetensors is not a readable safetensors"):
        load_official_reward_model(str(root), str(base_dir), "float32")
    adapter.write_bytes(kept)
    non_lora.write_bytes(b"not a torch archive")
    with pytest.raises(ValueError, match=r"checkpoint-42/non_lora_state_dict.pth is not a torch.save archive"):
        load_official_reward_model(str(root), str(base_dir), "float32")
    # a setting this loader does not read is refused by name
    cfg = json.loads((root / "model_config.json").read_text())
    cfg["peft_lora_config"]["vision_lora"] = True
    (root / "model_config.json").write_text(json.dumps(cfg))
    with pytest.raises(NotImplementedError, match=r"peft_lora_config.vision_lora=True"):
        load_official_reward_model(str(root), str(base_dir), "float32")


def test_reward_config_loads_an_official_checkpoint(root, base_dir, tmp_path):
    """`reward.vlm.path` at an official checkpoint with `reward.vlm.base_path`: what a reward worker builds;
    a frame count other than the checkpoint's is refused (the face reward scores the same frames)."""
    write_official_checkpoint(base_dir, tmp_path / "identity_reward")
    keys = [f"reward.vlm.path={tmp_path / 'identity_reward'}", f"reward.vlm.base_path={base_dir}",
            "reward.vlm.init=pretrained", "reward.vlm.dtype=float32", "reward.weights={vlm: 1.0}"]
    cfg = load_config(root / "cluster_configs" / "local_cpu.yaml", keys + ["reward.vlm.num_frames=4"])
    videos, refs, prompts = inputs(count=1)
    model = reward_model_from_config(cfg.reward.vlm)
    assert isinstance(model, OfficialRewardModel) and model.score(videos, refs, prompts).shape == (1,)
    cfg = load_config(root / "cluster_configs" / "local_cpu.yaml", keys + ["reward.vlm.num_frames=5"])
    with pytest.raises(ValueError, match=r"reward.vlm.num_frames=5, but the official checkpoint .* scores 4 frames"):
        reward_model_from_config(cfg.reward.vlm)


def test_inputs_equal_the_official_processor(root):
    """Against tests/data/official_inputs_golden.json, written by transformers 4.51.3's Qwen2_5_VLProcessor (the
    official pin) from the same references and resized video frames (tests/data/make_official_inputs_golden.py):
    the same token ids, the same pixel values bit for bit, the same grids and seconds per temporal patch."""
    import hashlib

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from reward.official_inputs import OfficialInputBuilder
    from tests.data.make_official_inputs_golden import VIDEO_FPS, golden_inputs

    golden = json.loads((root / "tests" / "data" / "official_inputs_golden.json").read_text())
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [SA_TOKEN]})
    proc = Qwen2VLImageProcessorPil()
    builder = OfficialInputBuilder(tokenizer, proc.image_mean, proc.image_std, 4, 399360, VIDEO_FPS)
    video, refs = golden_inputs()
    batch = builder([video], [refs], ["unused"])
    assert batch["input_ids"][0].tolist() == golden["input_ids"]
    assert builder.text(2) == golden["text"]
    digest = lambda t: hashlib.sha256(t.numpy().astype(np.float32).tobytes()).hexdigest()  # noqa: E731
    for key in ("pixel_values", "pixel_values_videos"):
        assert list(batch[key].shape) == golden[key]["shape"], key
        assert digest(batch[key]) == golden[key]["sha256"], key
    assert batch["image_grid_thw"].tolist() == golden["image_grid_thw"]
    assert batch["video_grid_thw"].tolist() == golden["video_grid_thw"]
    assert batch["second_per_grid_ts"].tolist() == pytest.approx(golden["second_per_grid_ts"])


def test_full_model_checkpoint_scores_as_the_writer(base_dir, tmp_path):
    """`save_full_model: true` writes checkpoint-N/model.pth (the PEFT model's whole state dict: base_layer and
    `.default` LoRA names) instead of the pair; it loads to the same scores."""
    writer, _ = write_official_checkpoint(base_dir, tmp_path / "identity_reward")
    ckpt = tmp_path / "identity_reward" / "checkpoint-21"
    (ckpt / "adapter_model.safetensors").unlink()
    (ckpt / "non_lora_state_dict.pth").unlink()
    torch.save({as_transformers_451(k): v for k, v in writer.state_dict().items()}, ckpt / "model.pth")
    model = load_official_reward_model(str(tmp_path / "identity_reward"), str(base_dir), dtype="float32")
    videos, refs, prompts = inputs()
    with torch.no_grad():
        expected = writer_scores(writer, model.inputs(videos, refs, prompts))
    assert torch.equal(model.score(videos, refs, prompts), expected.float())


def test_bf16_checkpoint_scores_as_the_bf16_writer(base_dir, tmp_path):
    """The GPU presets' dtype: bf16 weights with float32 adapters (the official PeftModel's), bf16 pixel values."""
    writer, _ = write_official_checkpoint(base_dir, tmp_path / "identity_reward", dtype=torch.bfloat16)
    assert {p.dtype for n, p in writer.named_parameters() if "lora_" in n} == {torch.float32}
    model = load_official_reward_model(str(tmp_path / "identity_reward"), str(base_dir), dtype="bfloat16")
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    assert model.rm_head.weight.dtype == torch.bfloat16
    videos, refs, prompts = inputs()
    with torch.no_grad():
        expected = writer_scores(writer, model.inputs(videos, refs, prompts))
    assert torch.equal(model.score(videos, refs, prompts), expected.float())


def test_adapter_file_wins_over_the_non_lora_file(base_dir, tmp_path):
    """PEFT may also save the resized embedding in the adapter file (save_embedding_layers="auto"); the official
    loader applies the adapter file last (sd.update), so its copy wins."""
    from safetensors.torch import save_file

    write_official_checkpoint(base_dir, tmp_path / "identity_reward")
    ckpt = tmp_path / "identity_reward" / "checkpoint-21"
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    key = "base_model.model.model.embed_tokens.weight"
    embedding = torch.load(ckpt / "non_lora_state_dict.pth")[key]
    adapter[key] = embedding + 1.0
    save_file(adapter, str(ckpt / "adapter_model.safetensors"))
    model = load_official_reward_model(str(tmp_path / "identity_reward"), str(base_dir), dtype="float32")
    assert torch.equal(model.vlm.language_model.embed_tokens.weight, embedding + 1.0)


def test_transformers_451_key_names_map_onto_this_model(root, base_dir, tmp_path):
    """Every weight name of the tiny Qwen2.5-VL under transformers 4.51 (written by the golden script from 4.51.3
    itself), PEFT-wrapped as the official checkpoint stores it, maps onto a weight of this model of the same shape
    (lm_head aside: tied and unused), and every non-LoRA weight of this model is covered."""
    golden = json.loads((root / "tests" / "data" / "official_inputs_golden.json").read_text())
    write_official_checkpoint(base_dir, tmp_path / "identity_reward")
    model = load_official_reward_model(str(tmp_path / "identity_reward"), str(base_dir), dtype="float32")
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    covered = set()
    for name, shape in golden["model_keys_451"].items():
        if name == "lm_head.weight":
            continue
        wrapped = "base_model.model." + name
        linear = name.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj") and name.startswith("model.layers.")
        if linear:  # PEFT's LoRA layer keeps the original weight as base_layer
            wrapped = wrapped.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        ours = official_key_to_ours(wrapped)
        assert ours in own, (name, ours)
        assert own[ours] == list(shape), (name, own[ours], shape)  # both vocabularies include <|SA_reward|>
        covered.add(ours)
    assert {k for k in own if "lora_" not in k and not k.startswith("rm_head")} == covered


def test_batch_equals_the_official_processor(root):
    """Two samples in one padded batch: a downscaled 480x832 video (476x812, the official eval size) with a
    downscaled 800x600 reference, and an upscaled video with two references; against transformers 4.51.3."""
    import hashlib

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from reward.official_inputs import OfficialInputBuilder
    from tests.data.make_official_inputs_golden import VIDEO_FPS, golden_batch

    golden = json.loads((root / "tests" / "data" / "official_inputs_golden.json").read_text())["batch"]
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [SA_TOKEN]})
    proc = Qwen2VLImageProcessorPil()
    videos, refs = golden_batch()
    batch = OfficialInputBuilder(tokenizer, proc.image_mean, proc.image_std, 4, 399360, VIDEO_FPS)(
        videos, refs, ["unused"] * 2)
    assert batch["input_ids"].tolist() == golden["input_ids"]
    assert batch["attention_mask"].tolist() == golden["attention_mask"]
    for key in ("pixel_values", "pixel_values_videos"):
        assert list(batch[key].shape) == golden[key]["shape"], key
        assert hashlib.sha256(batch[key].numpy().tobytes()).hexdigest() == golden[key]["sha256"], key
    assert batch["image_grid_thw"].tolist() == golden["image_grid_thw"]
    assert batch["video_grid_thw"].tolist() == golden["video_grid_thw"] == [[2, 34, 58], [2, 18, 30]]
    assert batch["second_per_grid_ts"].tolist() == pytest.approx(golden["second_per_grid_ts"])
    ids = batch["input_ids"]
    assert all(int(ids[i, batch["reward_index"][i]]) == tokenizer.convert_tokens_to_ids(SA_TOKEN) for i in range(2))
