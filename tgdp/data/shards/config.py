"""The make_shards configuration (preset: tgdp/configs/shards/default.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tgdp.config import ConfigError


@dataclass
class FramesConfig:
    # Frames per VIDEO FILE at evenly spaced times over the first `clip_seconds`. Pre-extracted
    # clips (CAV-MAE JSON with frame folders) keep every frame they have, whatever this is.
    count: int = 16
    size: int = 224  # short side in pixels after resizing (aspect kept; the loader crops)
    jpeg_quality: int = 90


@dataclass
class AudioConfig:
    # What to do with a video that has no audio track: "skip" (report it; the default, since a
    # silent clip is a useless contrastive pair) or "silence" (store the fbank of digital silence
    # and mark the sample `has_audio: false`).
    no_audio: str = "skip"


@dataclass
class ShardingConfig:
    input: str = ""  # CSV manifest, a folder of videos, or a CAV-MAE JSON datafile
    # Keep only these clips (eval sets such as the 5-per-class retrieval subsets): a text file with
    # one video id per line, a CAV-MAE JSON datafile (its `video_id`s) or a CSV with a `video_id`
    # or `key` column. Ids match a clip's video id or key. "" = every clip of `input`.
    ids: str = ""
    output: str = ""  # folder for shards, index.json, sizes.json and report.json
    prefix: str = "shard"  # shards are <output>/<prefix>-000000.tar
    clip_seconds: float = 10.0  # only the first 10 s of each clip are used (reference)
    seed: int = 2025  # clip order is shuffled with this seed (TG-DP's packer used 2025)
    shuffle: bool = True
    max_samples_per_shard: int = 5000
    max_bytes_per_shard: int = 1_000_000_000  # ~1 GB shards, the WebDataset recommendation
    workers: int = 0  # 0 = one per CPU core; 1 = in-process (no pool)
    start_method: str = "forkserver"  # decoders in forked workers have deadlocked for others
    progress: bool = True
    # Cluster sharding (slurm/make_shards.sbatch): task `task_index` of `num_tasks` shards its
    # contiguous slice of the (shuffled) clip order into <output>/part-<task>-of-<tasks>/, with its
    # own index, report and resume journal; data_tools/merge_shards.py then writes one index over
    # all parts. num_tasks=1 writes straight into <output> as before.
    task_index: int = 0
    num_tasks: int = 1
    frames: FramesConfig = field(default_factory=FramesConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)

    def validate(self) -> None:
        if not self.input:
            raise ConfigError("input is required: a CSV manifest, a folder of videos or a CAV-MAE JSON datafile")
        if not self.output:
            raise ConfigError("output is required: the folder the shards are written to")
        if Path(self.output).exists() and not Path(self.output).is_dir():
            raise ConfigError(f"output {self.output!r} is a file: expected a folder (created if missing)")
        if not self.prefix or "/" in self.prefix:
            raise ConfigError(f"prefix must be a plain file-name prefix, got {self.prefix!r}")
        if self.clip_seconds <= 0:
            raise ConfigError(f"clip_seconds must be > 0, got {self.clip_seconds}")
        if self.ids and not Path(self.ids).is_file():
            raise ConfigError(f"ids: {self.ids} is not a file (one video id per line, a CAV-MAE JSON or a CSV)")
        if self.max_samples_per_shard < 1:
            raise ConfigError(f"max_samples_per_shard must be >= 1, got {self.max_samples_per_shard}")
        if self.max_bytes_per_shard < 1:
            raise ConfigError(f"max_bytes_per_shard must be >= 1, got {self.max_bytes_per_shard}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0 (0 = one per core), got {self.workers}")
        if self.num_tasks < 1:
            raise ConfigError(f"num_tasks must be >= 1, got {self.num_tasks}")
        if not 0 <= self.task_index < self.num_tasks:
            raise ConfigError(f"task_index must be in 0..num_tasks-1 = 0..{self.num_tasks - 1}, got {self.task_index} "
                              "(Slurm array ids must start at 0: --array=0-N)")
        if self.start_method not in ("forkserver", "spawn", "fork"):
            raise ConfigError(f"start_method must be forkserver, spawn or fork, got {self.start_method!r}")
        if not 1 <= self.frames.count <= 99:
            raise ConfigError(f"frames.count must be in 1..99, got {self.frames.count}")
        if self.frames.size < 16:
            raise ConfigError(f"frames.size must be >= 16 pixels, got {self.frames.size}")
        if not 1 <= self.frames.jpeg_quality <= 100:
            raise ConfigError(f"frames.jpeg_quality must be in 1..100, got {self.frames.jpeg_quality}")
        if self.audio.no_audio not in ("skip", "silence"):
            raise ConfigError(f"audio.no_audio must be 'skip' or 'silence', got {self.audio.no_audio!r}")
