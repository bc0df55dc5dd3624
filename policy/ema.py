"""Exponential moving average of the trainable weights, as the official Identity-GRPO recipe keeps it.

Official (flow_grpo/ema.py, EMAModuleWrapper; train_wan2_1_vace.py): decay_n = min((1 + n) / (10 + n),
decay), and an update ema <- ema + (1 - decay_n) (w - ema) when (n + 1) % update_step_interval == 0,
n being the optimizer-step counter (`global_step`). Evaluation and saved checkpoints use the EMA weights
(`copy_ema_to` ... `copy_temp_to` around them).

One quirk is reproduced as an option: the official loop calls `ema.step(params, global_step)` once per
training micro-batch, not once per optimizer step, so an update whose condition holds runs once for each
micro-batch that sees the same counter. With its batch settings (8 micro-batches, an optimizer step after
the 4th and the 8th) the qualifying counters (7, 15, ...) are each seen by 4 consecutive micro-batches with
unchanged weights: the update is applied 4 times (decay_n ** 4 in effect). `repeats` is that count.

Pure torch: no DeepSpeed, no Ray. The EMA copy is fp32 on the weights' device, keyed by parameter name.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Iterator, Tuple

import torch

NamedParams = Iterable[Tuple[str, torch.Tensor]]


class Ema:
    def __init__(self, named_params: NamedParams, decay: float = 0.9, update_interval: int = 8, repeats: int = 1):
        if not 0.0 <= decay < 1.0 or update_interval < 1 or repeats < 1:
            raise ValueError(f"optim.ema: need 0 <= decay < 1, update_interval >= 1, repeats >= 1; got decay={decay}, "
                             f"update_interval={update_interval}, repeats={repeats}")
        self.decay, self.update_interval, self.repeats = float(decay), int(update_interval), int(repeats)
        self.shadow: Dict[str, torch.Tensor] = {name: p.detach().float().clone() for name, p in named_params}
        self.num_updates = 0  # updates applied (each counts `repeats` applications)

    def decay_at(self, step: int) -> float:
        """The official warm-up: min((1 + n) / (10 + n), decay)."""
        return min((1.0 + step) / (10.0 + step), self.decay)

    def due(self, step: int) -> bool:
        return (step + 1) % self.update_interval == 0

    @torch.no_grad()
    def step(self, named_params: NamedParams, step: int) -> bool:
        """After optimizer step `step` (the count of optimizer steps so far); returns whether it updated."""
        if not self.due(step):
            return False
        one_minus = 1.0 - self.decay_at(step)
        params = dict(named_params)
        self._check_names(params)
        for name, shadow in self.shadow.items():
            w = params[name].detach().to(shadow.device, torch.float32)
            for _ in range(self.repeats):
                shadow.add_(one_minus * (w - shadow))
        self.num_updates += 1
        return True

    @contextlib.contextmanager
    def swapped_in(self, named_params: NamedParams) -> Iterator[None]:
        """The EMA values in the live parameters for the duration (evaluation, export), then the live ones back."""
        params = dict(named_params)
        self._check_names(params)
        live = {name: params[name].detach().clone() for name in self.shadow}
        try:
            with torch.no_grad():
                for name, shadow in self.shadow.items():
                    params[name].copy_(shadow.to(params[name].device, params[name].dtype))
            yield
        finally:
            with torch.no_grad():
                for name, value in live.items():
                    params[name].copy_(value)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "update_interval": self.update_interval, "repeats": self.repeats,
                "num_updates": self.num_updates, "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the trainable parameters: {sorted(missing)[:5]} differ")
        for name, value in state["shadow"].items():
            self.shadow[name] = value.to(self.shadow[name].device, torch.float32).clone()
        self.num_updates = int(state["num_updates"])

    def _check_names(self, params: Dict[str, torch.Tensor]) -> None:
        missing = [name for name in self.shadow if name not in params]
        if missing:
            raise ValueError(f"EMA: {len(missing)} tracked parameters are gone, e.g. {missing[:3]}")
