"""Retrieval on a held-out shard set every N training steps, logged through the trainer's
MetricLogger (metrics.jsonl + wandb) as `eval/a2v_R@1`, `eval/v2a_MR`, ... and `eval/seconds`.

Cost to the run: every rank embeds 1/W of the clips with the model it already holds (sharded or
not: with `equal_forwards` every rank makes the same number of forward calls, which FSDP2's
per-block all-gathers require) and ranks 1/W of the queries; nobody waits for a single rank doing
the whole evaluation. A 1,545-clip VGGSound subset is ~25k (frame, window) pairs, i.e. about
25k / (W x pairs-per-second-per-GPU) seconds; set `every_steps` so that this is a few percent of
the time between evaluations. The model goes to eval mode for the pass (TG-DP has no dropout, so
this changes nothing numerically) and back, and an FSDP2 model is resharded afterwards.

Enable with `eval.shards=<folder> eval.every_steps=N` on the training command line.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tgdp.config import ConfigError
from tgdp.eval.embed import PROTOCOLS, EmbedConfig, dist_info, extract
from tgdp.eval.ranking import DEFAULT_KS, TIE_POLICIES

log = logging.getLogger("tgdp.eval")

SHORT = {"audio->video": "a2v", "video->audio": "v2a"}


@dataclass
class PeriodicEvalConfig:
    shards: str = ""  # held-out eval shard folder(s); "" = no periodic evaluation
    every_steps: int = 0  # 0 = off
    at_end: bool = True  # also evaluate after the last step
    protocol: str = "tgdp"  # tgdp (16 pairs, CLS, diagonal mean) | cavmae
    weights: str = "student"  # student | teacher (the EMA model)
    batch_size: int = 8  # clips per forward per rank
    num_workers: int = 0  # decoding processes per rank during evaluation (0 = in the training process)
    max_clips: int = 0  # 0 = all clips of the shard set
    ks: list[int] = field(default_factory=lambda: list(DEFAULT_KS))
    ties: str = "pessimistic"
    tile: int = 2048  # similarity tile side (memory ~ tile^2 x 4 bytes)

    @property
    def enabled(self) -> bool:
        return bool(self.shards) and self.every_steps > 0

    def validate(self) -> None:
        if self.every_steps < 0:
            raise ConfigError(f"eval.every_steps must be >= 0 (0 = off), got {self.every_steps}")
        if self.every_steps > 0 and not self.shards:
            raise ConfigError("eval.every_steps is set but eval.shards is empty: give a held-out shard folder")
        if self.shards:
            for part in (p.strip() for p in self.shards.split(",") if p.strip()):
                if not (Path(part) / "index.json").is_file():
                    raise ConfigError(f"eval.shards: {part} is not a shard folder (no index.json)")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"eval.protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.weights not in ("student", "teacher"):
            raise ConfigError(f"eval.weights must be student or teacher, got {self.weights!r}")
        if self.ties not in TIE_POLICIES:
            raise ConfigError(f"eval.ties must be one of {TIE_POLICIES}, got {self.ties!r}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ConfigError(f"eval.ks must be integers >= 1, got {list(self.ks)}")

    def embed_config(self) -> EmbedConfig:
        return EmbedConfig(shards=self.shards, protocol=self.protocol, batch_size=self.batch_size,
                           num_workers=self.num_workers, max_clips=self.max_clips)


class PeriodicRetrieval:
    """The trainer's hook: `maybe_run(step, total_steps, logger)` after every optimizer step (all ranks)."""

    def __init__(self, cfg: PeriodicEvalConfig, audio_frames: int, image_size: int, task: Any,
                 device: torch.device) -> None:
        cfg.validate()
        self.cfg, self.task, self.device = cfg, task, device
        self.audio_frames, self.image_size = audio_frames, image_size

    def due(self, step: int, total_steps: int) -> bool:
        c = self.cfg
        return c.enabled and (step % c.every_steps == 0 or (c.at_end and step == total_steps))

    def maybe_run(self, step: int, total_steps: int, logger: Any) -> dict[str, float] | None:
        if not self.due(step, total_steps):
            return None
        from tgdp.eval.retrieval import retrieval_metrics
        from tgdp.parallel import reshard

        c = self.cfg
        model = self.task.student if c.weights == "student" or self.task.teacher is None else self.task.teacher
        was_training = model.training
        started = time.perf_counter()
        model.eval()
        try:
            emb = extract(model, c.embed_config(), self.audio_frames, self.image_size, self.device,
                          equal_forwards=True)
            metrics, _ = retrieval_metrics(emb, c.ks, c.ties, c.tile, self.device)
        finally:
            reshard(model)
            model.train(was_training)
        record: dict[str, float] = {"eval/clips": float(len(emb)), "eval/seconds": time.perf_counter() - started}
        for direction, values in metrics.items():
            for name, value in values.items():
                if name != "queries":
                    record[f"eval/{SHORT[direction]}_{name}"] = value
        logger.log(step, record)
        if dist_info()[0] == 0:
                log.info("step %d retrieval on %d clips: A->V R@1 %.1f, V->A R@1 %.1f (%.1f s)", step, len(emb),
                     record["eval/a2v_R@1"], record["eval/v2a_R@1"], record["eval/seconds"])
        return record
