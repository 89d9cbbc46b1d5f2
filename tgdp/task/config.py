"""`TaskConfig`: how the backbone is DRIVEN in training (passes, masks, losses, teacher).

Everything the paper ablates is a field here, so swapping TG-DP for CAV-MAE is a preset, not a
branch in the trainer. Presets in `tgdp/configs/task/`: `tgdp` (the defaults), `dual` (two
student passes, no teacher) and `cavmae` (CAV-MAE's single pass and loss). docs/model.md explains
every field and why its default is what it is; the short version is in the comments below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tgdp.config import require
from tgdp.models.masking import RANK_MODES, STRUCTURED_MODES
from tgdp.schedules import SCHEDULE_KINDS

MODES = ("tgdp", "dual", "single")
CONTRASTIVE_LOSSES = ("symmetric_gather", "local_single_direction")


@dataclass
class TaskConfig:
    # --- passes --------------------------------------------------------------------------------
    # tgdp: teacher (full view) + reconstruction pass + teacher-guided contrastive pass.
    # dual: reconstruction pass + a contrastive pass with RANDOM masks; no teacher at all.
    # single: CAV-MAE, one masked pass at recon_mask_ratio; the contrastive loss uses that pass's
    #         global vectors (same masks). No teacher.
    mode: str = "tgdp"
    # Contrastive-pass patch choice in mode tgdp: deterministic top-k of the teacher priorities
    # (paper default), gumbel (Gumbel-top-k, paper ablation), random (paper ablation; the teacher
    # then only provides distillation targets and is skipped when distillation is off).
    ranking: str = "deterministic"
    # tau of the Gumbel ranking, argsort(s / tau + g). 1.0 = the released code (near-uniform
    # ranking, since s ~ 1/N; see masking.rank_patches); ~1e-3 keeps the teacher's preference.
    gumbel_temperature: float = 1.0
    # --- masking -------------------------------------------------------------------------------
    recon_mask_ratio: float = 0.75  # MAE / CAV-MAE / TG-DP reconstruction branch
    contrastive_mask_ratio: float = 0.5  # paper's chosen value (Table 7 sweep 0 .. 0.75)
    # Beyond the paper (its stated future work): vary the contrastive ratio over training from
    # contrastive_mask_ratio (step 0) to contrastive_mask_ratio_end (last step).
    contrastive_mask_schedule: str = "constant"  # constant | linear | cosine
    contrastive_mask_ratio_end: Optional[float] = None  # required unless the schedule is constant
    # Audio masking of the RANDOM passes (reconstruction; the contrastive pass in mode dual).
    # Video is always unstructured. 'time' / 'freq' / 'tf' are CAV-MAE's structured variants.
    audio_mask_mode: str = "unstructured"
    # --- losses --------------------------------------------------------------------------------
    recon_weight: float = 1.0  # lambda_r on (L_rec_a + L_rec_v), the official default
    contrastive_weight: float = 0.01  # lambda_c, official code / CAV-MAE default
    distill_weight: float = 1.0  # lambda_d; the paper gives no value
    distill: bool = True  # student CLS (contrastive pass) vs teacher CLS (full view); tgdp only
    distill_normalize: bool = False  # L2-normalise both first (= 2 - 2cos); paper: plain MSE
    # symmetric_gather: symmetric InfoNCE, negatives gathered from all ranks (TG-DP's released
    # all-gather loss). local_single_direction: CAV-MAE's local video->audio loss.
    contrastive_loss: str = "symmetric_gather"
    temperature: float = 0.05  # fixed, as every released config
    # --- teacher -------------------------------------------------------------------------------
    # OUR choice (the paper reports no momentum): cosine from start to end over the run (DINO).
    ema_momentum_start: float = 0.996
    ema_momentum_end: float = 1.0
    # --- execution (results are the same either way, up to float summation order) -------------
    # Modes tgdp / dual: run the reconstruction and contrastive views through the modality-specific
    # blocks as one packed sequence per modality (`CAVMAE.encode_dual`): bigger GEMMs, one gather of
    # each sharded block per step instead of two. false = two separate passes (for comparison).
    pack_passes: bool = True
    # --- randomness ----------------------------------------------------------------------------
    seed: int = 0  # masks are a function of (seed, step, rank, micro_batch) only

    @property
    def uses_teacher(self) -> bool:
        """Whether a teacher pass runs at all (so whether a teacher must be built and updated)."""
        return self.mode == "tgdp" and (self.ranking != "random" or self.distill)

    @property
    def distill_active(self) -> bool:
        """Distillation needs the teacher's full-view targets: only in mode tgdp."""
        return self.mode == "tgdp" and self.distill

    def validate(self) -> None:
        def one_of(name: str, choices: tuple[str, ...]) -> None:
            value = getattr(self, name)
            require(value in choices, f"task.{name} must be one of {list(choices)}, got {value!r}")

        one_of("mode", MODES)
        one_of("ranking", RANK_MODES)
        one_of("contrastive_mask_schedule", SCHEDULE_KINDS)
        one_of("audio_mask_mode", STRUCTURED_MODES)
        one_of("contrastive_loss", CONTRASTIVE_LOSSES)
        ratios = ["recon_mask_ratio", "contrastive_mask_ratio"]
        if self.contrastive_mask_schedule != "constant":
            require(self.contrastive_mask_ratio_end is not None,
                    f"task.contrastive_mask_ratio_end is required with contrastive_mask_schedule="
                    f"{self.contrastive_mask_schedule!r}")
            ratios.append("contrastive_mask_ratio_end")
        for name in ratios:  # a ratio of 1 would leave no visible token for the encoder
            value = getattr(self, name)
            require(0.0 <= value < 1.0, f"task.{name} must be in [0, 1), got {value}")
        for name in ("recon_weight", "contrastive_weight", "distill_weight"):
            require(getattr(self, name) >= 0.0, f"task.{name} must be >= 0, got {getattr(self, name)}")
        require(self.temperature > 0.0, f"task.temperature must be > 0, got {self.temperature}")
        require(self.gumbel_temperature > 0.0, f"task.gumbel_temperature must be > 0, got {self.gumbel_temperature}")
        for name in ("ema_momentum_start", "ema_momentum_end"):
            value = getattr(self, name)
            require(0.0 <= value <= 1.0, f"task.{name} must be in [0, 1], got {value}")
        require(self.seed >= 0, f"task.seed must be >= 0, got {self.seed}")
