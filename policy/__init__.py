"""The policy room: Wan2.1 VACE / Phantom / T2V models (named architectures, random or from local directories), the
stochastic flow-matching sampler with exact per-step log-probs, the GRPO loss, LoRA, EMA, the SDE window. Pure
math and models: imports config/, runtime/ and data/ only, never reward/ (its peer), Ray or DeepSpeed."""

