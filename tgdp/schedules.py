"""Per-step schedules as plain arrays indexed by the step (the dinov3 way).

A schedule is a NumPy array with one value per optimizer step, computed once from the config and
the run length. Nothing about it is stateful, so nothing has to be checkpointed: a resumed run
rebuilds the same array and reads `schedule[step]`. The same helper serves the EMA momentum, the
contrastive mask ratio and (in the trainer) the learning rate.

Endpoint convention (tests rely on it): after the warm-up, the first value is exactly `start`
and the LAST value (index total_steps - 1) is exactly `end`. (dinov3's scheduler stops one cosine
step short of `end`; for an EMA momentum that should reach 1.0 on the last step that matters.)
Reading past the end returns the last value (`value_at`), so a run that overshoots its planned
length keeps the final value instead of crashing.
"""

from __future__ import annotations

import math

import numpy as np

SCHEDULE_KINDS = ("constant", "linear", "cosine")


def _check(total_steps: int, warmup_steps: int) -> None:
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in 0..total_steps ({total_steps}), got {warmup_steps}")


def _warmup(warmup_start: float, start: float, warmup_steps: int) -> np.ndarray:
    """Linear from warmup_start (step 0) towards start; `start` itself is the first post-warm-up value."""
    return np.linspace(warmup_start, start, warmup_steps, endpoint=False, dtype=np.float64)


def cosine_schedule(start: float, end: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """[total_steps] float64: linear warm-up warmup_start -> start, then half a cosine start -> end.

    value[w + i] = end + (start - end) * (1 + cos(pi * i / (n - 1))) / 2 for i = 0..n-1, where
    w = warmup_steps and n = total_steps - w; so value[w] = start and value[-1] = end exactly.
    Works in either direction (start < end for the EMA momentum, start > end for a decaying LR).
    """
    _check(total_steps, warmup_steps)
    n = total_steps - warmup_steps
    if n == 0:
        return _warmup(warmup_start, start, warmup_steps)
    phase = np.linspace(0.0, math.pi, n) if n > 1 else np.zeros(1)
    body = end + (start - end) * 0.5 * (1.0 + np.cos(phase))
    return np.concatenate([_warmup(warmup_start, start, warmup_steps), body])


def linear_schedule(start: float, end: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """[total_steps] float64: linear warm-up, then a straight line start -> end (same endpoints)."""
    _check(total_steps, warmup_steps)
    n = total_steps - warmup_steps
    body = np.linspace(start, end, n, dtype=np.float64) if n > 1 else np.full(n, start, dtype=np.float64)
    return np.concatenate([_warmup(warmup_start, start, warmup_steps), body])


def make_schedule(kind: str, start: float, end: float, total_steps: int, warmup_steps: int = 0,
                  warmup_start: float = 0.0) -> np.ndarray:
    """Dispatch on `kind` in SCHEDULE_KINDS ('constant' ignores `end`)."""
    if kind == "constant":
        _check(total_steps, warmup_steps)
        return np.concatenate([_warmup(warmup_start, start, warmup_steps),
                               np.full(total_steps - warmup_steps, start, dtype=np.float64)])
    if kind == "linear":
        return linear_schedule(start, end, total_steps, warmup_steps, warmup_start)
    if kind == "cosine":
        return cosine_schedule(start, end, total_steps, warmup_steps, warmup_start)
    raise ValueError(f"schedule kind must be one of {SCHEDULE_KINDS}, got {kind!r}")


def value_at(schedule: np.ndarray, step: int) -> float:
    """schedule[step] as a Python float; steps past the end read the last value."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return float(schedule[min(step, len(schedule) - 1)])


__all__ = ["SCHEDULE_KINDS", "cosine_schedule", "linear_schedule", "make_schedule", "value_at"]
