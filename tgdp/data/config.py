"""The streaming loader's settings (`data.*`, preset tgdp/configs/data/default.yaml): what is
read, how it is shuffled and decoded, and how a resume treats a changed layout. The loader is
tgdp/data/loader.py; docs/data.md §3 explains every field."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tgdp.config import require

MODES = ("resampled", "epoch")
SPLITS = ("train", "eval", "retrieval")
LAYOUT_POLICIES = ("fast_forward", "restart", "error")
START_METHODS = ("forkserver", "spawn", "fork")


@dataclass
class AugmentConfig:
    """Train-time augmentations (docs/method.md 2.4 step 6, 2.5); all off by default as in pre-training."""

    random_resized_crop: bool = False
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.9, 1.1])
    hflip: bool = False  # with probability 0.5
    freqm: int = 0  # SpecAugment frequency mask width bound (mel bins); CAV-MAE fine-tuning used 48
    timem: int = 0  # SpecAugment time mask width bound (frames); CAV-MAE fine-tuning used 192
    time_shift: float = 0.0  # circular time shift of up to +-fraction of the window


@dataclass
class DataConfig:
    """The streaming loader's settings (preset: tgdp/configs/data/default.yaml)."""

    shards: str = ""  # a shard folder holding index.json, or several joined with ","
    mode: str = "resampled"  # "resampled" (with replacement, virtual epochs) or "epoch" (each shard once)
    split: str = "train"  # "train" (random frame), "eval" (eval_frame), "retrieval" (all frames)
    batch_size: int = 32  # per rank
    num_workers: int = 4  # 0 = decode in the training process
    shuffle_buffer: int = 500  # raw samples per worker, ~0.5-0.8 MB each at 224 px / 998 rows; <=1 = off
    shuffle_initial: int = 100  # start emitting after this many (shorter start-up, as webdataset)
    seed: int = 0
    samples_per_epoch: int = 0  # 0 = the index's total; set to define shorter/longer virtual epochs
    num_frames: int = 16  # audio windows per clip (official total_frame); each takes its time-nearest stored frame
    audio_frames: int = 416  # window length (T); = full_frames for the CAV-MAE whole-clip protocol
    full_frames: int = 1024  # the fbank is zero-padded/truncated to this many frames (reference)
    frame_size: int = 224
    eval_frame: int = 5  # window of split=eval (TG-DP: 5; CAV-MAE Sync: 8); -1 = the frame nearest the clip's centre
    label_csv: str = ""  # index,mid,display_name; adds `label_targets` to batches
    start_method: str = "forkserver"  # decoders in forked workers have deadlocked for others
    prefetch_factor: int = 2
    pin_memory: bool | None = None  # None: pin when the trainer runs on CUDA (async host-to-device copies)
    on_layout_change: str = "fast_forward"  # resume policy, see the module docstring
    # The data watchdog: the longest a rank waits for one batch before it stops the run with an
    # error naming the decoder worker, the shard and the member it is stuck in (docs/reliability.md).
    wait_timeout_s: float = 600.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self) -> None:
        require(bool(self.shards.strip()),
                "data.shards is required: a shard folder holding index.json (or several, comma-separated)")
        require(self.mode in MODES, f"data.mode must be one of {MODES}, got {self.mode!r}")
        require(self.split in SPLITS, f"data.split must be one of {SPLITS}, got {self.split!r}")
        require(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        require(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        require(self.shuffle_buffer >= 0, f"data.shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        require(self.shuffle_initial >= 1, f"data.shuffle_initial must be >= 1, got {self.shuffle_initial}")
        require(self.seed >= 0, f"data.seed must be >= 0, got {self.seed}")
        require(self.samples_per_epoch >= 0,
                f"data.samples_per_epoch must be >= 0 (0 = index total), got {self.samples_per_epoch}")
        require(1 <= self.num_frames <= 99, f"data.num_frames must be in 1..99, got {self.num_frames}")
        require(self.full_frames >= 1, f"data.full_frames must be >= 1, got {self.full_frames}")
        require(1 <= self.audio_frames <= self.full_frames,
                f"data.audio_frames must be in 1..full_frames ({self.full_frames}), got {self.audio_frames}")
        require(self.frame_size >= 1, f"data.frame_size must be >= 1, got {self.frame_size}")
        require(-1 <= self.eval_frame < self.num_frames,
                f"data.eval_frame must be in 0..{self.num_frames - 1} (or -1: the frame nearest the clip's centre), "
                f"got {self.eval_frame}")
        require(not self.label_csv or Path(self.label_csv).is_file(), f"data.label_csv {self.label_csv!r} is not a file")
        require(self.start_method in START_METHODS,
                f"data.start_method must be one of {START_METHODS}, got {self.start_method!r}")
        require(self.prefetch_factor >= 1, f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        require(self.wait_timeout_s > 0, f"data.wait_timeout_s must be > 0 (seconds), got {self.wait_timeout_s}")
        require(self.on_layout_change in LAYOUT_POLICIES,
                f"data.on_layout_change must be one of {LAYOUT_POLICIES}, got {self.on_layout_change!r}")
        a = self.augment
        require(len(a.crop_scale) == 2 and 0 < a.crop_scale[0] <= a.crop_scale[1] <= 1,
                f"data.augment.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {list(a.crop_scale)}")
        require(len(a.crop_ratio) == 2 and 0 < a.crop_ratio[0] <= a.crop_ratio[1],
                f"data.augment.crop_ratio must be [lo, hi] with 0 < lo <= hi, got {list(a.crop_ratio)}")
        require(0 <= a.freqm <= 128, f"data.augment.freqm must be in 0..128, got {a.freqm}")
        require(a.timem >= 0, f"data.augment.timem must be >= 0, got {a.timem}")
        require(0 <= a.time_shift < 1, f"data.augment.time_shift must be in [0, 1), got {a.time_shift}")
