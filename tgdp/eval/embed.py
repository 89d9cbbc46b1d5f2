"""Embeddings of an eval shard set under a retrieval protocol, split across ranks (docs/method.md 5.1).

Protocols (`EmbedConfig.protocol`):

* `tgdp` (TG-DP / CAV-MAE Sync): every clip gives all 16 (audio window k, its frame) pairs, each
  encoded independently by the unmasked modality-specific stream; the feature is the CLS token
  after `norm_a` / `norm_v`. Output [N, 16, D] per modality. A clip of 16 frames pairs window k
  with frame k; a clip of another count pairs each window with its time-nearest frame
  (tgdp.data.frames), so every clip gives 16 pairs.
* `cavmae` (original CAV-MAE): one frame (`frame`; -1, the default: the frame nearest the clip's
  centre, which is CAV-MAE's frame 5 of 10) and the whole clip's audio (the model's `audio_frames`;
  1024 for the CAV-MAE geometry); the feature is the MEAN of the modality stream's output tokens.
  Output [N, 1, D].

`pooling` overrides the protocol's feature (`cls` / `mean`). Features are stored UN-normalised
(the probes want them raw); retrieval L2-normalises each pair itself.

Splitting: clip i of the shard set (index order) goes to rank i % W and, within the rank, to loader
worker (i // W) % n_workers; every rank reads the (small) eval tars, decodes only its clips, and the
results are all-gathered and put back in index order. The output is therefore the same for any
world size or worker count (tested: 2 gloo ranks == 1 process). With `equal_forwards` every rank
runs the same number of forward calls, padding with a dummy batch, which sharded (FSDP2) models
need because each forward is a collective.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tgdp.config import ConfigError, require
from tgdp.data import sampling as S
from tgdp.data.config import DataConfig
from tgdp.data.loader import follow_rank_worker_init
from tgdp.data.transforms import SAMPLE_ERRORS, SampleDecoder, collate

log = logging.getLogger("tgdp.eval")

PROTOCOLS = ("tgdp", "cavmae")
POOLINGS = ("auto", "cls", "mean")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class EmbedConfig:
    shards: str = ""  # eval shard folder(s) written by make_shards (comma-separated)
    protocol: str = "tgdp"  # tgdp (= CAV-MAE Sync: 16 pairs, CLS) | cavmae (centre frame, whole audio, mean pool)
    pooling: str = "auto"  # auto (the protocol's) | cls | mean
    frame: int = -1  # the cavmae protocol's frame: -1 = nearest the clip's centre, k = the frame of window k
    num_frames: int = 16  # audio windows (pairs) per clip under the tgdp protocol, whatever the clip stores
    full_frames: int = 1024  # fbank padded / cut to this many frames before windows are cut (reference)
    batch_size: int = 8  # clips per forward (x16 pairs under the tgdp protocol)
    num_workers: int = 2  # decoding processes per rank (0 = in the main process)
    max_clips: int = 0  # 0 = every clip of the shard set; else the first N in index order
    precision: str = "fp32"  # fp32 | bf16 | fp16 autocast on the model (the official script: fp16 on GPU)

    def validate(self) -> None:
        require(bool(self.shards.strip()), "data.shards is required: the eval shard folder(s) holding index.json")
        for part in (p.strip() for p in self.shards.split(",") if p.strip()):
            require(Path(part).is_dir() and (Path(part) / "index.json").is_file(),
                    f"data.shards: {part} is not a shard folder (no index.json); build one with "
                    "data_tools/make_shards.py")
        require(self.protocol in PROTOCOLS, f"data.protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        require(self.pooling in POOLINGS, f"data.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        require(-1 <= self.frame < self.num_frames,
                f"data.frame must be -1 (the frame nearest the clip's centre) or in 0..{self.num_frames - 1}, "
                f"got {self.frame}")
        require(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        require(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        require(self.max_clips >= 0, f"data.max_clips must be >= 0 (0 = all), got {self.max_clips}")
        require(self.precision in PRECISIONS,
                f"data.precision must be one of {list(PRECISIONS)}, got {self.precision!r}")

    @property
    def feature(self) -> str:
        if self.pooling != "auto":
            return self.pooling
        return "cls" if self.protocol == "tgdp" else "mean"


@dataclass
class Embeddings:
    """Per-clip features in shard-index order. audio / video: float32 [N, F, D], not normalised."""

    keys: list[str]
    labels: list[list[str]]
    audio: torch.Tensor
    video: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    def save(self, path: str | Path) -> Path:
        """`<path>` (.safetensors: audio, video) + `<path>.json` (keys, labels, meta). No pickle."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"audio": self.audio.contiguous(), "video": self.video.contiguous()}, str(path))
        Path(str(path) + ".json").write_text(json.dumps({"keys": self.keys, "labels": self.labels,
                                                         "meta": self.meta}, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Embeddings":
        from safetensors.torch import load_file

        path = Path(path)
        side = Path(str(path) + ".json")
        if not path.is_file() or not side.is_file():
            raise FileNotFoundError(f"embedding cache {path} (+ {side.name}) not found; write one with "
                                    "`python -m tgdp.eval.retrieval ... save_embeddings=true`")
        tensors = load_file(str(path))
        info = json.loads(side.read_text())
        return cls(info["keys"], info["labels"], tensors["audio"], tensors["video"], info.get("meta", {}))


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def data_config(cfg: EmbedConfig, audio_frames: int, frame_size: int) -> DataConfig:
    """The loader settings of the protocol for a model taking `audio_frames` x 128 and `frame_size`^2."""
    return DataConfig(shards=cfg.shards, split="retrieval" if cfg.protocol == "tgdp" else "eval",
                      batch_size=cfg.batch_size, num_workers=cfg.num_workers, num_frames=cfg.num_frames,
                      audio_frames=audio_frames, full_frames=max(cfg.full_frames, audio_frames),
                      frame_size=frame_size, eval_frame=cfg.frame, mode="epoch")


def _streams_plan(total: int, world: int, workers: int, batch: int) -> int:
    """Batches the busiest rank produces (all ranks agree: it depends on the index alone)."""
    worst = 0
    for r in range(world):
        mine = len(range(r, total, world))
        worst = max(worst, sum(math.ceil(len(range(w, mine, workers)) / batch) for w in range(workers)))
    return worst


class _EvalStream(IterableDataset):
    """This rank's clips, decoded by worker (i // W) % n, as collated batches carrying their indices."""

    def __init__(self, data: DataConfig, shards: list[S.ShardEntry], total: int, rank: int, world: int):
        self.data, self.shards, self.total, self.rank, self.world = data, shards, total, rank, world

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        decoder = SampleDecoder(self.data, None)
        stats = S.StreamStats(S.WorkerResume())
        rng = np.random.default_rng(0)  # unused by the eval splits (no augmentation)
        items, indices, events = [], [], []
        i = -1
        for shard in self.shards:
            for raw in S.read_shard(shard.url, shard.samples, stats):
                i += 1
                if i >= self.total:
                    break
                if i % self.world != self.rank or (i // self.world) % workers != worker:
                    continue
                try:
                    items.append(decoder(raw, rng))
                    indices.append(i)
                except SAMPLE_ERRORS as exc:
                    events.append((raw.get("__url__", "?"), raw.get("__key__", "?"), f"{type(exc).__name__}: {exc}"))
                if len(items) == self.data.batch_size:
                    yield self._batch(items, indices, events, stats)
                    items, indices, events = [], [], []
            if i >= self.total:
                break
        if items or events or stats.events:
            yield self._batch(items, indices, events, stats)

    @staticmethod
    def _batch(items: list, indices: list[int], events: list, stats: S.StreamStats) -> dict[str, Any]:
        batch = collate(items, False) if items else {"keys": [], "labels": []}
        batch["index"] = torch.tensor(indices, dtype=torch.int64)
        batch["events"] = events + stats.events
        stats.events = []
        return batch


def _autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def encode_batch(model: torch.nn.Module, audio: torch.Tensor, frames: torch.Tensor, feature: str,
                 device: torch.device, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """audio [B, (F,) T, 128], frames [B, (F,) 3, S, S] -> features [B, F, D] per modality (float32)."""
    if audio.dim() == 3:
        audio, frames = audio.unsqueeze(1), frames.unsqueeze(1)
    B, F = audio.shape[:2]
    with _autocast(device, precision):
        out = model.forward_features(audio.flatten(0, 1).to(device), frames.flatten(0, 1).to(device))
    if feature == "cls":
        a, v = out.cls_a, out.cls_v
    else:
        a, v = out.local_a.mean(1), out.local_v.mean(1)
    return a.float().reshape(B, F, -1), v.float().reshape(B, F, -1)


def extract(model: torch.nn.Module, cfg: EmbedConfig, audio_frames: int, frame_size: int,
            device: torch.device | str = "cpu", equal_forwards: bool = False) -> Embeddings:
    """Embed the eval shards on every rank's share and all-gather (every rank returns all of it)."""
    cfg.validate()
    mel_bins = getattr(getattr(model, "cfg", None), "mel_bins", 128)
    if mel_bins != 128:
        raise ConfigError(f"model.mel_bins is {mel_bins}, but shards store 128-bin fbanks (make_shards)")
    device = torch.device(device)
    rank, world = dist_info()
    data = data_config(cfg, audio_frames, frame_size)
    shards = S.load_shard_set(cfg.shards)
    total = sum(s.samples for s in shards)
    total = min(total, cfg.max_clips) if cfg.max_clips else total
    workers = cfg.num_workers
    stream = _EvalStream(data, shards, total, rank, world)
    kwargs: dict[str, Any] = {}
    if workers > 0:
        import multiprocessing as mp

        # Decoders that end with this process, as the training loader's do (its forkserver may be
        # this one: they must not depend on the parent, the forkserver, to notice the rank is gone).
        kwargs = {"multiprocessing_context": mp.get_context("forkserver"), "prefetch_factor": 2,
                  "worker_init_fn": functools.partial(follow_rank_worker_init, os.getpid())}
    loader = DataLoader(stream, batch_size=None, num_workers=workers, **kwargs)
    feature = cfg.feature
    started = time.perf_counter()
    idx, a_parts, v_parts, keys, labels, skipped, forwards = [], [], [], [], [], 0, 0
    sample_shape = None
    for batch in loader:
        for url, key, reason in batch["events"]:
            skipped += bool(key)
            log.warning("eval: skipped %s (shard %s): %s", key or "shard", url, reason)
        if not batch["keys"]:
            continue
        a, v = encode_batch(model, batch["audio"], batch["frames"], feature, device, cfg.precision)
        forwards += 1
        sample_shape = (batch["audio"][:1], batch["frames"][:1])
        idx.append(batch["index"])
        a_parts.append(a.cpu())
        v_parts.append(v.cpu())
        keys += batch["keys"]
        labels += batch["labels"]
    if equal_forwards:
        for _ in range(_streams_plan(total, world, max(1, workers), cfg.batch_size) - forwards):
            if sample_shape is None:  # this rank got nothing: a zero batch of the right shape
                F = cfg.num_frames if cfg.protocol == "tgdp" else 1
                shape_a = (1, F, audio_frames, 128) if F > 1 else (1, audio_frames, 128)
                shape_v = (1, F, 3, frame_size, frame_size) if F > 1 else (1, 3, frame_size, frame_size)
                sample_shape = (torch.zeros(shape_a), torch.zeros(shape_v))
            encode_batch(model, *sample_shape, feature, device, cfg.precision)
    local = (torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64),
             torch.cat(a_parts) if a_parts else None, torch.cat(v_parts) if v_parts else None)
    index, audio, video, keys, labels, skipped = _gather(local, keys, labels, skipped, device)
    order = torch.argsort(index)
    seconds = time.perf_counter() - started
    meta = {"protocol": cfg.protocol, "feature": feature, "frames_per_clip": int(audio.shape[1]),
            "clips": int(index.numel()), "skipped": skipped, "world_size": world, "seconds": seconds,
            "clips_per_s": index.numel() / max(seconds, 1e-9), "shards": cfg.shards}
    return Embeddings([keys[i] for i in order.tolist()], [labels[i] for i in order.tolist()],
                      audio[order], video[order], meta)


def _gather(local: tuple, keys: list[str], labels: list[list[str]], skipped: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list, list, int]:
    """All ranks' (index, audio, video, keys, labels) on every rank; tensors go through all_gather
    (padded to the largest share) on the process group's device, the small lists as objects."""
    index, audio, video = local
    rank, world = dist_info()
    if world == 1:
        if audio is None:
            raise RuntimeError("no clip of the eval shards could be decoded (see the warnings above)")
        return index, audio, video, keys, labels, skipped
    objs: list[Any] = [None] * world
    shape = None if audio is None else tuple(audio.shape[1:])
    dist.all_gather_object(objs, (index.numel(), shape, keys, labels, skipped))
    counts = [o[0] for o in objs]
    shape = next((o[1] for o in objs if o[1] is not None), None)
    if shape is None:
        raise RuntimeError("no clip of the eval shards could be decoded on any rank (see the warnings above)")
    comm = device if str(dist.get_backend()) not in ("gloo",) and device.type != "cpu" else torch.device("cpu")
    most = max(counts)

    def gather(t: torch.Tensor | None, fill_shape: tuple, dtype: torch.dtype) -> list[torch.Tensor]:
        buf = torch.zeros((most, *fill_shape), dtype=dtype, device=comm)
        if t is not None and t.numel():
            buf[: t.shape[0]] = t.to(comm)
        out = [torch.empty_like(buf) for _ in range(world)]
        dist.all_gather(out, buf)
        return [o[:c].cpu() for o, c in zip(out, counts)]

    all_index = torch.cat(gather(index, (), torch.int64))
    all_audio = torch.cat(gather(audio, shape, torch.float32))
    all_video = torch.cat(gather(video, shape, torch.float32))
    all_keys = [k for o in objs for k in o[2]]
    all_labels = [lab for o in objs for lab in o[3]]
    return all_index, all_audio, all_video, all_keys, all_labels, sum(o[4] for o in objs)
