"""A terminal progress bar with ETA and the step's headline numbers."""

from __future__ import annotations

from typing import Dict

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, done: int, enabled: bool = True):
        self.bar = tqdm(total=total, initial=done, unit="step", dynamic_ncols=True, disable=not enabled)

    def update(self, step: int, record: Dict[str, float]) -> None:
        self.bar.n = step
        self.bar.set_postfix(reward=f"{record['reward_mean']:.4f}", kl=f"{record['kl']:.2e}",
                             ratio=f"{record['ratio_mean']:.4f}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
