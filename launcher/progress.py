"""A terminal progress bar with ETA and the step's headline numbers."""

from __future__ import annotations

from typing import Dict

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, done: int, enabled: bool = True):
        self.bar = tqdm(total=total, initial=done, unit="step", dynamic_ncols=True, disable=not enabled)

    def update(self, step: int, record: Dict[str, float]) -> None:
        self.bar.n = step
        # GRPO's mean importance ratio, or (NFT) the velocity's deviation from the sampling policy's
        last = {"ratio": f"{record['ratio_mean']:.4f}"} if "ratio_mean" in record else {
            "old_dev": f"{record.get('old_deviation', 0.0):.2e}"}
        self.bar.set_postfix(reward=f"{record['reward_mean']:.4f}", kl=f"{record['kl']:.2e}", **last, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
