"""Step caching for many-step (base) models: reuse the transformer's work across steps that change little.

Two ways of deciding, both off unless asked for:

- ``first-block``: every step runs the first double-stream block; when its output moved (relative mean absolute
  change of the image tokens' first-block residual, against the last fully computed step) by less than the
  threshold, the remaining blocks are skipped and the residual they added at that step is added again.
- ``teacache``: no block runs to decide. The first block's modulated input (the image tokens after the step's
  timestep modulation) is compared with the previous step's; the relative changes add up over skipped steps, and
  while the sum stays under the threshold every block is skipped and the whole stack's residual is reused.

A threshold of 0 never reuses anything, and the computation is then the uncached one, bit for bit: the probes are
read beside the ordinary forward pass and never feed back into it. The first step is always computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import Tensor

CACHE_MODES = ("first-block", "teacache")
# Thresholds used when a request names a mode only; `kleinbild bench --step-cache` measures speed against quality per
# threshold on nano-base.
DEFAULT_THRESHOLDS = {"first-block": 0.08, "teacache": 0.15}


@dataclass(frozen=True)
class CacheSpec:
    """What a request asks of the step cache (validated here, once)."""

    mode: str
    threshold: float

    def __post_init__(self) -> None:
        if self.mode not in CACHE_MODES:
            raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)} (or none), got {self.mode!r}")
        if not (isinstance(self.threshold, int | float) and math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"cache threshold must be a finite number >= 0, got {self.threshold!r}")

    def summary(self) -> dict[str, object]:
        return {"mode": self.mode, "threshold": self.threshold}


def relative_change(now: Tensor, before: Tensor) -> float:
    """Mean absolute change relative to the mean magnitude (the measure TeaCache and first-block caches use)."""
    scale = before.float().abs().mean()
    return float((now.float() - before.float()).abs().mean() / scale.clamp_min(1e-12))


@dataclass
class StepCache:
    """One generation's cache state: what the last computed step left, and how many steps reused it."""

    spec: CacheSpec
    probe: Tensor | None = field(default=None, repr=False)
    residual: Tensor | None = field(default=None, repr=False)
    accumulated: float = 0.0
    computed: int = 0
    reused: int = 0

    def reuse(self, probe: Tensor) -> bool:
        """Whether this step may reuse the stored residual; remembers the probe as the mode needs it."""
        fits = self.residual is not None and self.probe is not None and self.probe.shape == probe.shape
        change = relative_change(probe, self.probe) if fits else math.inf  # type: ignore[arg-type]
        if self.spec.mode == "teacache":
            self.accumulated += change
            ok = self.accumulated < self.spec.threshold
            self.probe = probe  # teacache compares consecutive steps
            if not ok:
                self.accumulated = 0.0
        else:
            ok = change < self.spec.threshold
            if not ok:
                self.probe = probe  # first-block compares with the last computed step
        if ok:
            self.reused += 1
        else:
            self.computed += 1
        return ok

    def store(self, residual: Tensor) -> None:
        self.residual = residual

    def summary(self) -> dict[str, object]:
        return {**self.spec.summary(), "computed_steps": self.computed, "reused_steps": self.reused}


__all__ = ["CACHE_MODES", "DEFAULT_THRESHOLDS", "CacheSpec", "StepCache", "relative_change"]
