"""The checkpoint section of the training config (`checkpoint.*` overrides)."""

from __future__ import annotations

from dataclasses import dataclass

from tgdp.config import require


@dataclass
class CheckpointConfig:
    # Sub-folder of the run dir that holds step_<N>/ checkpoints. A plain name so that every run
    # keeps its checkpoints beside its logs and auto-resume never looks anywhere else.
    folder: str = "checkpoints"
    # Save every N optimizer steps (0 = off). Step-based saves need no communication: every rank
    # sees the same step.
    every_steps: int = 1000
    # ... and whenever this many wall-clock minutes passed since the last save (0 = off): one
    # Slurm segment can be shorter than N steps, and a preempted job loses at most this much work.
    every_minutes: float = 30.0
    # The wall-time test is rank 0's clock broadcast to all ranks (one tiny collective, a host
    # sync under NCCL); doing it every step is pointless for a ~30 min interval, so it runs on
    # steps that are multiples of this. Overshoot is at most this many steps.
    wall_check_every_steps: int = 10
    # Keep the newest K complete checkpoints (0 = keep all). The newest complete one is never
    # deleted, whatever K says.
    keep_last: int = 3
    # Save when the run reaches total_steps (a stop by signal or the non-finite guard always saves).
    # Off only for throw-away runs such as benchmarks: a base checkpoint is ~4 GB.
    save_final: bool = True
    # Also write step_<N>/model.safetensors: the gathered student + teacher weights (keys
    # `student.` / `teacher.`), readable without torch.distributed, for eval and for sharing.
    export_safetensors: bool = True
    # Record an exact, sharding-independent fingerprint of every saved entry in meta.json and check
    # it when a run resumes (tgdp/checkpoint/fingerprint.py): a resume on another world size or
    # backend that would load different values stops with an error instead. One pass over the
    # state per save and per resume.
    fingerprint: bool = True

    def validate(self) -> None:
        require(bool(self.folder) and "/" not in self.folder and self.folder not in (".", ".."),
                f"checkpoint.folder must be a plain folder name inside the run dir, got {self.folder!r}")
        require(self.every_steps >= 0, f"checkpoint.every_steps must be >= 0 (0 = off), got {self.every_steps}")
        require(self.every_minutes >= 0, f"checkpoint.every_minutes must be >= 0 (0 = off), got {self.every_minutes}")
        require(self.wall_check_every_steps >= 1,
                f"checkpoint.wall_check_every_steps must be >= 1, got {self.wall_check_every_steps}")
        require(self.keep_last >= 0, f"checkpoint.keep_last must be >= 0 (0 = keep all), got {self.keep_last}")
