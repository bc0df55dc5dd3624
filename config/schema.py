"""The config tree: every knob of the training system, as dataclasses (config/load.py loads them).

Every knob lives in a dataclass below; OmegaConf turns the tree into a *structured* config, so a
YAML file or a `key.sub=value` override that names an unknown key, or gives a value of the wrong type,
fails at load time with a message naming the key (and the file). Defaults here are the tiny CPU
preset (`cluster_configs/local_cpu.yaml` only restates the important ones); the GPU presets override
them with the paper's settings.

Usage:
    cfg = load_config("cluster_configs/local_cpu.yaml", ["trainer.steps=3"])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

# A key's allowed values stand beside its field, in the field's metadata (config/checks.py `check_field_rules`
# reads them on every load): one of a few choices, > 0 (None allowed where the field is Optional), >= 0, or >= a
# bound.


def one_of(*choices, default):
    return field(default=default, metadata={"choices": choices})


def positive(default):
    return field(default=default, metadata={"min": 0, "exclusive": True})


def non_negative(default):
    return field(default=default, metadata={"min": 0, "exclusive": False})


def at_least(low, default):
    return field(default=default, metadata={"min": low, "exclusive": False})


# ----------------------------------------------------------------------------- model


@dataclass
class LoraConfig:
    enabled: bool = True
    rank: int = positive(4)
    alpha: float = non_negative(4.0)
    # Attention projections of diffusers' Wan blocks (attn1 = self, attn2 = cross).
    target_modules: List[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    # peft init of A: "default" (Kaiming) or "gaussian"; B starts at zero either way, so a fresh
    # adapter is an exact no-op (policy == reference at step 0).
    init: str = one_of("default", "gaussian", default="default")


@dataclass
class ContextParallelConfig:
    """One video's token sequence split across `ulysses x ring` GPUs, in rollout and learner alike
    (policy/context_parallel.py, diffusers' Ulysses and ring attention). 1 x 1 = off. A rollout worker with degree N
    is N actors sampling one video together; the learner's ranks form context groups of N inside DeepSpeed's world.
    `workers.rollout.num_workers` and `workers.learner.num_workers` count GPUs (actors) and must be multiples of N."""

    ulysses: int = positive(1)  # all-to-all of heads: must divide the attention heads
    ring: int = positive(1)  # key/value blocks passed around the ring: needs a GPU (cuDNN attention, bf16)


@dataclass
class ModelConfig:
    # t2v: Wan2.1 text-to-video; vace: Wan2.1 VACE (refs as control); phantom: refs concatenated.
    kind: str = one_of("t2v", "vace", "phantom", default="vace")
    # pretrained: load `path`. random: build `arch` with random weights, nothing read or downloaded (the
    # tiny CPU models, or a real architecture for a rehearsal: launcher/rehearse.py).
    init: str = one_of("pretrained", "random", default="pretrained")
    # A named architecture (policy/arch.py): tiny | wan2.1-vace-1.3b | wan2.1-vace-14b | wan2.1-t2v-1.3b |
    # wan2.1-t2v-14b | phantom-wan-1.3b. With init=pretrained it is checked against `path`'s transformer.
    arch: Optional[str] = None
    # Local diffusers-format directory (model_index.json, transformer/, vae/, text_encoder/, tokenizer/).
    path: Optional[str] = None
    # Phantom's released transformer checkpoint (original Wan key format), converted on load.
    phantom_checkpoint: Optional[str] = None
    tiny_seed: int = 0  # seed of random init (any arch): every role builds the same weights
    # float16 would need loss scaling in the learner: not offered
    dtype: str = one_of("float32", "bfloat16", default="float32")
    # Rehearsal only (init=random): fewer transformer blocks (VACE control blocks kept at the architecture's
    # stride), text-encoder layers and vocabulary. Widths, heads and patch sizes stay the architecture's.
    num_layers: Optional[int] = positive(None)
    text_encoder_layers: Optional[int] = positive(None)
    text_encoder_vocab: Optional[int] = positive(None)
    vae_decode_batch: int = positive(1)  # videos the VAE decodes at once (its activations dominate a rollout's peak)
    height: int = positive(32)
    width: int = positive(32)
    num_frames: int = positive(9)
    max_references: int = 3
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    context_parallel: ContextParallelConfig = field(default_factory=ContextParallelConfig)


# ----------------------------------------------------------------------------- sampler


@dataclass
class SdeWindowConfig:
    """MixGRPO's SDE window (policy/window.py): only `size` consecutive steps are stochastic, recorded and trained;
    the others take the deterministic ODE step. 0 = every step (Flow-GRPO / the official Identity-GRPO code)."""

    size: int = non_negative(0)
    start: int = non_negative(0)  # the window's first step at training step 1
    strategy: str = one_of("progressive", "random", "fixed", default="progressive")
    shift_every: int = positive(25)  # progressive: training steps between moves (MixGRPO's iters_per_group default)
    stride: int = non_negative(0)  # progressive: steps per move; 0 = the window's size (MixGRPO without prog_overlap)
    roll_back: bool = False  # progressive: past the last position, start again (else stay at the end)


@dataclass
class SamplerConfig:
    num_steps: int = positive(4)
    # Classifier-free guidance (text): 1 = none, one transformer pass per step in rollout and learner alike (CFG-free
    # training, Flow-GRPO's; policy/policy.py guided_passes). The official recipe: 4.5.
    guidance_scale: float = at_least(1.0, 4.5)
    shift: float = 3.0  # Wan's flow shift of the sigma schedule
    # Sigmas and transformer timesteps (policy/schedule.py): "unipc" = Wan's shipped UniPC flow schedule
    # (official Identity-GRPO), "euler" = FlowMatchEulerDiscreteScheduler's (Flow-GRPO).
    schedule: str = one_of("unipc", "euler", default="unipc")
    # "linear": std = std_min + (std_max - std_min) * s (official Identity-GRPO code);
    # "eta": std = eta * sqrt(s / (1 - s)) (Flow-GRPO).
    noise_rule: str = one_of("linear", "eta", default="linear")
    eta: float = 0.7
    # Numbers, or "schedule": std_max = the schedule's sigmas[1], std_min = its last sigma (official).
    std_min: Any = "schedule"
    std_max: Any = "schedule"
    # Phantom's image guidance (its CFG has text and image terms; guidance_scale is the text one). Phantom runs
    # one pass per step only with both at 1.
    image_guidance_scale: float = at_least(1.0, 5.0)
    # true: every video of a prompt group starts from one initial noise (its first member's), so they differ by the
    # SDE's step noise alone and the advantage compares what the policy did from the same start; false (official):
    # each member its own. Training rollouts only (evaluation and candidates draw one noise per seed); needs SDE steps.
    shared_initial_noise: bool = False
    negative_prompt: str = ""
    max_sequence_length: int = 32
    sde_window: SdeWindowConfig = field(default_factory=SdeWindowConfig)
    # The deterministic steps outside the SDE window (policy/ode.py; training rollouts only, evaluation keeps
    # Euler on every step): "euler" (official) or "dpm2m" (DPM-Solver++(2M), MixGRPO-Flash's), and the fraction of
    # each ODE stretch's steps kept (1 = all; MixGRPO-Flash: 0.4).
    ode_solver: str = one_of("euler", "dpm2m", default="euler")
    ode_steps_ratio: float = positive(1.0)


# ----------------------------------------------------------------------------- GRPO


@dataclass
class GrpoConfig:
    group_size: int = positive(4)
    prompts_per_step: int = positive(2)
    clip_range: float = non_negative(1e-3)
    kl_beta: float = non_negative(0.004)
    adv_clip: float = 5.0
    adv_eps: float = 1e-4
    std_mode: str = one_of("group", "global", default="group")
    std_ddof: int = one_of(0, 1, default=0)  # 0: population std (official np.std), 1: sample std
    # Which sampled steps are trained: a fraction of them, in "fixed" (first ones) or "random" order.
    timestep_fraction: float = 1.0
    timestep_order: str = one_of("random", "fixed", default="random")
    num_inner_epochs: int = positive(1)
    # Optimizer steps per update, each over an equal share of every learner rank's groups (official: 2 per
    # epoch of 32 prompts). 1 = one step over all groups (on-policy: every ratio starts at exactly 1).
    optimizer_steps_per_update: int = positive(1)
    # "grpo": the clipped-ratio loss on the sampler's recorded steps (official). "nft": DiffusionNFT's loss on the
    # forward process (policy/nft.py): deterministic rollouts (sampler.ode_solver), only their final latents and
    # rewards, trained at `timestep_fraction` of the sampler's grid with fresh noise; clip_range unused, kl_beta
    # weighs the velocity-space KL (DiffusionNFT: 1e-4).
    objective: str = one_of("grpo", "nft", default="grpo")
    nft_beta: float = positive(1.0)  # the implicit policies' step b (DiffusionNFT: 1; 0.1 for its OCR task)
    # DiffusionNFT moves its sampling policy slowly (old <- d old + (1 - d) theta, d = min(rate * step, 0.5));
    # here the sampling policy is the last update's weights (d = 0). Other values: not implemented.
    nft_old_decay_rate: float = non_negative(0.0)


@dataclass
class EmaConfig:
    """EMA of the trainable weights (policy/ema.py): evaluated and saved beside the live weights."""

    enabled: bool = False
    decay: float = 0.9
    update_interval: int = positive(8)  # optimizer steps between updates
    repeats: int = positive(1)  # applications per update (official loop: 4, see policy/ema.py)


@dataclass
class OptimConfig:
    lr: float = non_negative(1e-4)
    weight_decay: float = 1e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = non_negative(1.0)
    warmup_steps: int = non_negative(0)
    ema: EmaConfig = field(default_factory=EmaConfig)


# ----------------------------------------------------------------------------- reward


@dataclass
class VlmRewardConfig:
    # pretrained: `path` (a trained reward-model directory, or a Qwen2.5-VL base); random: `arch` with random
    # weights (tiny | qwen2.5-vl-3b), for CPU tests and rehearsals.
    init: str = one_of("pretrained", "random", default="pretrained")
    arch: Optional[str] = None
    path: Optional[str] = None
    num_frames: int = positive(5)
    tie_theta: float = 5.0
    image_size: int = positive(448)  # multiple of 28; the CPU presets use 56
    dtype: str = one_of("float32", "bfloat16", default="float32")  # the VLM's weights (the GPU presets: bfloat16)
    # A `path` that is a Qwen2.5-VL base (no trained head) is an error unless this is set (its scores are noise).
    allow_untrained_head: bool = False
    # A `path` that is an official Identity-GRPO reward checkpoint (model_config.json + checkpoint-<step>/,
    # reward/official.py): the local Qwen2.5-VL-3B-Instruct directory it was trained from, the step to load
    # (None = the highest), and the frame rate its M-RoPE time assumes (official: 10, the fps of the mp4 files
    # the official trainer writes and its scorer reads back).
    base_path: Optional[str] = None
    checkpoint_step: Optional[int] = None
    video_fps: float = positive(10.0)
    # Rehearsal only (init=random, arch qwen2.5-vl-3b): fewer language / vision layers and a smaller vocabulary.
    text_layers: Optional[int] = positive(None)
    vision_layers: Optional[int] = positive(None)
    vocab: Optional[int] = positive(None)


@dataclass
class FaceRewardConfig:
    # dlib: weights from the face-recognition-models package; arcface: a local ONNX file (model_path)
    backend: str = one_of("dlib", "arcface", default="dlib")
    model_path: Optional[str] = None
    num_frames: int = 5
    aggregate: str = one_of("mean", "min", default="mean")  # over identities
    missing_penalty: float = 0.0
    upsample: int = 1  # dlib HOG upsampling passes: 0 finds faces >= ~80 px, 1 >= ~40 px (about 4x slower)
    max_extra_faces: int = 2  # embed at most (people + this) largest faces per frame; bounds cost on crowds


@dataclass
class RewardConfig:
    # Named components and their weights; the composite reward is their weighted sum.
    weights: Dict[str, float] = field(default_factory=lambda: {"face": 1.0})
    on_nan: str = one_of("mask", "raise", default="mask")  # mask: the sample is left out (counted)
    vlm: VlmRewardConfig = field(default_factory=VlmRewardConfig)
    face: FaceRewardConfig = field(default_factory=FaceRewardConfig)


# ----------------------------------------------------------------------------- data


@dataclass
class DataConfig:
    prompt_shards: str = MISSING  # required: local paths or a brace pattern of prompt shards
    preference_shards: Optional[str] = None  # reward-model training only
    eval_prompt_shards: Optional[str] = None  # held-out prompts: launcher.evaluate's default and the training monitor
    shuffle_buffer: int = 16
    seed: int = 0
    on_error: str = one_of("raise", "skip", default="raise")
    num_loader_workers: int = 0


# ----------------------------------------------------------------------------- workers


@dataclass
class PoolConfig:
    num_workers: int = positive(1)
    num_gpus_per_worker: float = 0.0
    num_cpus_per_worker: float = 1.0
    # Ray custom resource a node must offer to host this pool (e.g. "reward_node"); None = any.
    node_resource: Optional[str] = None


@dataclass
class LearnerConfig:
    zero_stage: int = one_of(0, 1, 2, 3, default=2)
    precision: str = one_of("fp32", "bf16", default="fp32")
    # Samples of one group per learner forward/backward and per rollout transformer forward (the same cut, so
    # the learner's recompute runs the rollout's shapes and the first ratio is exactly 1 under any kernel);
    # 0 = the whole group. Large models split a group (e.g. 14B: 4).
    micro_batch_size: int = 0


@dataclass
class WorkersConfig:
    colocate: bool = True
    ray_address: Optional[str] = None  # attach to this cluster; None starts a local one
    rollout: PoolConfig = field(default_factory=PoolConfig)
    reward: PoolConfig = field(default_factory=PoolConfig)
    learner: PoolConfig = field(default_factory=lambda: PoolConfig(num_workers=2))
    learner_engine: LearnerConfig = field(default_factory=LearnerConfig)
    # How a new policy version reaches the rollout workers: "broadcast" = a process group of learner
    # rank 0 + the rollout workers (workers/weight_sync.py), "object_store" = a Ray object ref each
    # worker fetches, "auto" = broadcast for full fine-tuning, the object store for (small) LoRA.
    weight_sync: str = one_of("auto", "broadcast", "object_store", default="auto")
    weight_sync_timeout_s: float = positive(600.0)  # a broadcast (or group build) slower than this raises


# ----------------------------------------------------------------------------- trainer / logging


@dataclass
class TrainerConfig:
    steps: int = positive(10)
    seed: int = 0
    device: str = "cpu"
    output_dir: str = MISSING  # required
    resume: str = "auto"  # auto | never | <checkpoint path>
    checkpoint_every: int = positive(5)
    keep_last: int = positive(3)
    mode: str = one_of("sync", "async", default="sync")
    max_staleness: int = non_negative(1)
    # A dead learner rank restarts the learner group from the last checkpoint; more restarts than this in
    # one run stop it (a rank that dies every time: out of memory, a bad node).
    max_learner_restarts: int = non_negative(10)


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    video_every: int = non_negative(5)
    progress_bar: bool = True
    eval_every: int = 0  # held-out over-optimisation monitor every N steps (0 = off); needs data.eval_prompt_shards
    eval_num_prompts: int = positive(4)
    eval_seeds_per_prompt: int = positive(1)


@dataclass
class FaultsConfig:
    """Deliberate failures for tests and demos: each entry of `kills`, "role:rank:step", kills that process once
    (config/checks.py `parse_kill`). Several in one run test recoveries in sequence."""

    # role: rollout | reward | learner (in the update of step `step`; step 0: while the group starts) | publish (a
    # learner rank, while publishing policy version `step`) | checkpoint (the driver, mid-commit of that step's
    # checkpoint; rank 0) | eval (a `launcher.evaluate --num-workers` worker, on the prompt of index `step`, of the
    # first policy evaluated)
    kills: List[str] = field(default_factory=list)


@dataclass
class PathsConfig:
    """Where models and data live on this cluster. The GPU presets name every file under these
    (`${paths.models}/Wan2.1-VACE-1.3B-diffusers`, `${paths.data}/identity_prompts/...`), so one override
    (`paths.models=/lustre/models`) or environment variable points them all elsewhere. Resolved once, where the
    config is loaded: stored and shipped configs hold the resulting paths (config/load.py `to_yaml`)."""

    models: str = "${oc.env:IDENTITY_GRPO_MODELS,/models}"
    data: str = "${oc.env:IDENTITY_GRPO_DATA,/data}"


@dataclass
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
