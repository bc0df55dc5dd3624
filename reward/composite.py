"""Composite reward: a weighted sum of named reward components, each also reported on its own.

Why (DESIGN.md section 4): the policy is trained on one scalar per sample, but which part of the
reward moved must stay visible, so `score` returns every component's raw score next to "total".

Failure policy: a component that raises, or returns a non-finite score for a sample, is a *failed*
score. It is counted (`self.failures[name]`), logged with the sample index, and that sample's total
becomes NaN, which GRPO masks out of the loss (policy/grpo.py group_advantages); it is never silently
replaced by 0, which would look like a real, very bad or very good score. With `on_nan="raise"` the
first failure raises RewardError naming the component and the sample. When a component raises on a
batch, it is re-run one sample at a time to find which samples fail (the others keep their scores).
A component whose output has the wrong shape is a programming error and always raises.

Zero-weight components are still built and scored, for monitoring (e.g. watch the face reward while
training on the VLM reward); they never make the total NaN. `build_zero_weight=False` skips them
(e.g. to avoid loading a VLM only to log it).

Components follow the `RewardFn` protocol and are built by name from `REWARD_BUILDERS`. The `vlm`
component is imported lazily from reward/vlm.py, and only when it is built: `reward_model_from_config(
cfg.reward.vlm)` then its `score(videos, references, prompts)` method. A caller that places or
shares models itself passes them as `prebuilt` components.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]
log = logging.getLogger(__name__)


class RewardFn(Protocol):
    """videos: B uint8 (F, H, W, 3) videos; references: per video, one uint8 (H, W, 3) image per person;
    prompts: B strings. Returns (B,) float scores, higher = better."""

    def __call__(self, videos: Sequence[ArrayLike], references: Sequence[Sequence[ArrayLike]],
                 prompts: Sequence[str]) -> torch.Tensor: ...


class RewardError(RuntimeError):
    """A reward component failed (on_nan=raise) or broke its output contract."""


def _build_face(reward_cfg) -> RewardFn:
    from reward.face import FaceIdentityReward

    return FaceIdentityReward.from_config(reward_cfg.face)


def _build_vlm(reward_cfg) -> RewardFn:
    """The identity reward model of reward/vlm.py (tiny random init when reward.vlm.path is None),
    on the GPU when this process has one; its `score` method is the RewardFn."""
    from reward.vlm import reward_model_from_config

    model = reward_model_from_config(reward_cfg.vlm)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").score


def _build_demo(name: str) -> Callable[[Any], RewardFn]:
    def build(reward_cfg) -> RewardFn:
        from reward import demo

        return getattr(demo, name)
    return build


# name -> builder(cfg.reward) -> RewardFn: the one list of known rewards (reward/checks.py accepts these names).
REWARD_BUILDERS: Dict[str, Callable[[Any], RewardFn]] = {
    "face": _build_face,
    "vlm": _build_vlm,
    "demo_brightness": _build_demo("demo_brightness"),
    "demo_reference_color": _build_demo("demo_reference_color"),
}


class CompositeReward:
    """Weighted sum of named components (see module doc for the failure policy)."""

    def __init__(self, components: Mapping[str, RewardFn], weights: Mapping[str, float], on_nan: str = "mask"):
        if on_nan not in ("mask", "raise"):
            raise ValueError(f"reward.on_nan must be 'mask' or 'raise', got {on_nan!r}")
        weights = {str(k): float(v) for k, v in weights.items()}
        bad = [k for k, w in weights.items() if not math.isfinite(w)]
        if bad:
            raise ValueError(f"reward.weights.{bad[0]} must be finite, got {weights[bad[0]]}")
        unknown = [k for k in components if k not in weights]
        if unknown:
            raise ValueError(f"reward component {unknown[0]!r} has no entry in reward.weights")
        unbuilt = [k for k, w in weights.items() if k not in components and w != 0]
        if unbuilt:
            raise ValueError(f"reward.weights.{unbuilt[0]} = {weights[unbuilt[0]]} but no such component was built")
        if not any(w != 0 for k, w in weights.items() if k in components):
            raise ValueError(f"reward.weights {weights} give no built component a non-zero weight")
        self.components: Dict[str, RewardFn] = dict(components)
        self.weights = {k: weights[k] for k in self.components}
        self.on_nan = on_nan
        self.failures: Dict[str, int] = {k: 0 for k in self.components}
        self.last_errors: List[str] = []  # messages of the failures of the latest `score` call

    @classmethod
    def from_config(cls, reward_cfg, build_zero_weight: bool = True,
                    prebuilt: Optional[Mapping[str, RewardFn]] = None) -> "CompositeReward":
        """Build every component named in `reward_cfg.weights` (cfg.reward), in that order.

        prebuilt: components already built by the caller (e.g. a VLM loaded on this worker's GPU),
        used instead of building them by name.
        """
        prebuilt = dict(prebuilt or {})
        components: Dict[str, RewardFn] = {}
        for name, weight in reward_cfg.weights.items():
            if name not in REWARD_BUILDERS and name not in prebuilt:
                raise ValueError(f"reward.weights.{name}: unknown reward (known: {sorted(REWARD_BUILDERS)})")
            if float(weight) == 0 and not build_zero_weight:
                continue
            components[name] = prebuilt[name] if name in prebuilt else REWARD_BUILDERS[name](reward_cfg)
        weights = {k: v for k, v in reward_cfg.weights.items() if k in components}
        return cls(components, weights, on_nan=reward_cfg.on_nan)

    # ------------------------------------------------------------------ scoring

    def _fail(self, name: str, index: int, why: str, err: Optional[BaseException] = None) -> None:
        msg = f"reward component {name!r} failed on sample {index}: {why}"
        if self.on_nan == "raise":
            raise RewardError(msg) from err
        self.failures[name] += 1
        self.last_errors.append(msg)
        log.warning("%s (sample masked; %d failure(s) of %r so far)", msg, self.failures[name], name)

    def _call(self, name: str, fn: RewardFn, videos, references, prompts) -> torch.Tensor:
        out = fn(videos, references, prompts)
        t = torch.as_tensor(out).detach().cpu().to(torch.float64)
        if t.shape != (len(videos),):
            raise RewardError(f"reward component {name!r} returned shape {tuple(t.shape)} for a batch of "
                              f"{len(videos)}; it must return one score per sample, shape ({len(videos)},)")
        return t

    def _component(self, name: str, fn: RewardFn, videos, references, prompts) -> torch.Tensor:
        """(B,) float64 scores of one component, NaN where the score failed (counted and logged)."""
        raised = torch.zeros(len(videos), dtype=torch.bool)
        try:
            scores = self._call(name, fn, videos, references, prompts)
        except RewardError:
            raise
        except Exception as batch_err:  # find the failing samples; the others keep their score
            if len(videos) == 1:
                self._fail(name, 0, f"{type(batch_err).__name__}: {batch_err}", batch_err)
                return torch.full((1,), float("nan"), dtype=torch.float64)
            scores = torch.empty(len(videos), dtype=torch.float64)
            for i in range(len(videos)):
                try:
                    scores[i] = self._call(name, fn, videos[i:i + 1], references[i:i + 1], prompts[i:i + 1])[0]
                except RewardError:
                    raise
                except Exception as err:  # the error's own sample indices refer to this batch of one
                    self._fail(name, i, f"(re-run alone as batch index 0) {type(err).__name__}: {err}", err)
                    scores[i], raised[i] = float("nan"), True
        for i in torch.nonzero(~torch.isfinite(scores) & ~raised).flatten().tolist():
            self._fail(name, i, f"non-finite score {scores[i].item()}")
            scores[i] = float("nan")  # +-inf -> NaN: one marker for a failed score
        return scores

    def score(self, videos: Sequence[ArrayLike], references: Sequence[Sequence[ArrayLike]],
              prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """{component: (B,) raw scores, ..., "total": (B,) weighted sum}, float64; NaN marks failures."""
        videos, references, prompts = list(videos), list(references), list(prompts)
        if not (len(videos) == len(references) == len(prompts)):
            raise ValueError(f"reward: {len(videos)} videos, {len(references)} reference lists and "
                             f"{len(prompts)} prompts; need one of each per sample")
        self.last_errors = []
        out: Dict[str, torch.Tensor] = {}
        total = torch.zeros(len(videos), dtype=torch.float64)
        for name, fn in self.components.items():
            out[name] = self._component(name, fn, videos, references, prompts)
            if self.weights[name] != 0:  # 0 * NaN would mask samples for a monitoring-only component
                total = total + self.weights[name] * out[name]
        out["total"] = total
        return out
