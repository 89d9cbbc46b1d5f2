"""The non-finite guard: skip an optimizer step whose loss or gradients are not finite, stop the
run after `max_streak` such steps in a row.

Two ways to decide, one bookkeeping:

* **host** (any optimizer, and DeepSpeed engines, which decide inside their own `step()`): the
  all-reduced finiteness flag is read on the host every step, and the trainer applies the update
  or drops the gradients. One read per step drains the CUDA queue: the GPU then idles while the
  host queues the optimizer, the EMA and the next step's first kernels.
* **device** (torch's fused AdamW): the flag never leaves the device on the step's critical path.
  The fused kernel takes it as `found_inf` (the hook `torch.amp.GradScaler` uses) and leaves
  parameters, moments and step counts untouched when it is set; the EMA update takes it as a
  zero weight. The host reads each step's flag one step later, through pinned memory and a CUDA
  event (so the read waits for that step only, not for the one queued behind it), and only then
  logs the skip or raises `NonFiniteStop`. Because the host learns of the `max_streak`-th bad
  step a step late, the device itself stops applying updates once the streak reaches the limit
  ("frozen"): the state the stop checkpoints is the last good one in both modes.

Both modes give bitwise the same parameters, teacher and optimizer state (tests/test_train.py).
The streak is checkpointed; `settle()` before reading it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger("tgdp.train")

GUARD_MODES = ("auto", "host", "device")


class NonFiniteStop(RuntimeError):
    """Training produced non-finite losses or gradients too many steps in a row."""


def supports_device_skip(optimizer: torch.optim.Optimizer) -> bool:
    """True for optimizers whose step honours a device-side `found_inf` (torch's fused kernels)."""
    return bool(optimizer.defaults.get("fused"))


@dataclass
class _Pending:
    step: int  # 1-based, as logged
    flag: torch.Tensor  # host copy of "applied" (0 / 1), pinned on CUDA
    ready: Optional[torch.cuda.Event]  # set once the copy has landed (None: already on the host)


class NonFiniteGuard:
    """Decides apply-or-skip per step, keeps the streak of skipped steps, stops the run."""

    def __init__(self, max_streak: int, device: torch.device, mode: str, hint: str = ""):
        if mode not in ("host", "device"):
            raise ValueError(f"guard mode must be 'host' or 'device' (auto is resolved by the caller), got {mode!r}")
        self.max_streak, self.device, self.mode = max_streak, device, mode
        self.hint = hint  # appended to the stop message: what to do about it
        self.streak = 0  # consecutive skipped steps among the settled ones (checkpointed)
        self._pending: list[_Pending] = []
        self._device_streak: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ deciding
    def _finite(self, values: list[torch.Tensor]) -> torch.Tensor:
        """1.0 when every value is finite on EVERY rank (so all ranks skip or step together), as a
        [1] float tensor on the device; one all-reduce on > 1 rank, no host read."""
        ok = torch.stack([torch.isfinite(v.detach()).all() for v in values]).all().to(self.device, torch.float32)
        ok = ok.reshape(1)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return ok

    def decide_on_host(self, values: list[torch.Tensor]) -> bool:
        """Host mode: the step's one host synchronisation."""
        return bool(self._finite(values).item())

    def decide_on_device(self, values: list[torch.Tensor]) -> torch.Tensor:
        """Device mode: a 0-d float32 flag on the device, 1.0 = apply. 0 when a value is not
        finite on some rank, or when the streak already reached the limit (frozen, see above)."""
        if self._device_streak is None:
            # A run resumed from a non-finite stop holds streak = max_streak: its first step is
            # judged on its own (a good one resets the streak, a bad one stops), not frozen.
            start = min(self.streak, self.max_streak - 1)
            self._device_streak = torch.full((), float(start), device=self.device)
        ok = self._finite(values).reshape(())
        applied = ok * (self._device_streak < self.max_streak).float()
        self._device_streak = torch.where(applied > 0, torch.zeros_like(self._device_streak), self._device_streak + 1)
        return applied

    @staticmethod
    def gate_optimizer(optimizer: torch.optim.Optimizer, applied: torch.Tensor) -> None:
        """Make the optimizer's next step honour a device verdict: torch's fused kernels skip the
        update (parameters, moments, step counts) where `found_inf` is 1, the hook GradScaler sets."""
        if not supports_device_skip(optimizer):
            raise ValueError("the device-side guard needs torch's fused AdamW (optim.fused=true)")
        optimizer.found_inf = 1.0 - applied

    # ------------------------------------------------------------------ bookkeeping
    def record(self, step: int, applied: bool | torch.Tensor) -> None:
        """Note step `step`'s outcome; a device flag is copied to the host without waiting."""
        if isinstance(applied, bool) or applied.device.type == "cpu":
            self._pending.append(_Pending(step, torch.tensor(float(applied)), None))
            return
        host = torch.empty((), dtype=torch.float32, pin_memory=True)
        host.copy_(applied, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        self._pending.append(_Pending(step, host, ready))

    def settle(self, wait: bool = True) -> None:
        """Read the recorded outcomes: log each skip, raise `NonFiniteStop` at the `max_streak`-th
        in a row. `wait=False` (after queuing a step) leaves the newest device flag unread, since
        reading it would wait for the whole step; `wait=True` before a checkpoint or a log record."""
        keep = 1 if (self.mode == "device" and not wait) else 0
        while len(self._pending) > keep:
            p = self._pending.pop(0)
            if p.ready is not None:
                p.ready.synchronize()
            if bool(p.flag.item()):
                self.streak = 0
                continue
            self.streak += 1
            log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", p.step, self.streak)
            if self.streak >= self.max_streak:
                self._pending.clear()  # later steps were frozen on the device: nothing was applied
                raise NonFiniteStop(f"{self.streak} consecutive steps with non-finite loss/gradients "
                                    f"(last: step {p.step}){'; ' + self.hint if self.hint else ''}")
