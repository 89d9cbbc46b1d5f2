"""Per-sample decoding, normalisation and augmentation (docs/method.md 2.4-2.6), and batch collation.

Decoding happens AFTER the shuffle buffer and touches only what the split needs: for training one
frame JPEG and the fbank rows of its window (sliced straight out of the .npy bytes). Only the known
members are ever read (fbank.npy via the pickle-free codec, frame_XX.jpg, json): nothing from a
shard is unpickled. All randomness comes from the per-sample generator passed in by the caller, so
a sample's output never depends on which samples were decoded before it.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from tgdp.data import audio as A
from tgdp.data import format as shard_format
from tgdp.data import frames as Fr
from tgdp.data.labels import LabelVocab  # noqa: F401  (part of this module's interface)

if TYPE_CHECKING:
    from tgdp.data.config import AugmentConfig, DataConfig

try:  # libjpeg-turbo through torchvision: faster than PIL and no PIL->tensor copy
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover - torchvision built without image support
    decode_jpeg = None
# torchvision 0.29 deprecates its image codecs in favour of torchcodec and warns on EVERY call; the
# codec still works (and PIL is the fallback once it is removed), so keep logs readable.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SCALE = torch.tensor([1.0 / (255.0 * s) for s in IMAGENET_STD]).view(3, 1, 1)
_BIAS = torch.tensor([m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1, 1)

# Exceptions that mean "this sample's bytes are bad" (skip and count it). Anything else (TypeError,
# AttributeError, ...) is a bug in tgdp and must surface.
SAMPLE_ERRORS = (shard_format.SampleFormatError, ValueError, RuntimeError, KeyError, OSError, EOFError)


@dataclass
class Decoded:
    """One decoded sample (train/eval: a single pair; retrieval: all frames)."""

    key: str
    audio: np.ndarray  # float32 [T, 128] or [F, T, 128], normalised
    frames: torch.Tensor  # float32 [3, S, S] or [F, 3, S, S], normalised
    frame_index: int | list[int]
    labels: list[str]
    targets: np.ndarray | None
    unknown_labels: list[str]


# ----------------------------------------------------------------------------- audio


def audio_window(fbank_bytes: bytes, k: int, num_frames: int, full: int, length: int) -> np.ndarray:
    """Un-normalised rows of frame k's window (`audio.window_bounds`), zero-padded past the stored
    end as the reference pads to `full` frames; only the window's rows are read from the bytes."""
    return window_rows(fbank_bytes, *A.window_bounds(k, num_frames, full, length))


def window_rows(fbank_bytes: bytes, start: int, end: int) -> np.ndarray:
    """Un-normalised rows `[start, end)` of a stored fbank, zero-padded past its end."""
    return A.pad_rows(shard_format.decode_fbank(fbank_bytes, start, end, A.NUM_MEL_BINS), 0, end - start)


def spec_augment(fbank: np.ndarray, freqm: int, timem: int, rng: np.random.Generator) -> np.ndarray:
    """torchaudio-style frequency and time masks (width uniform in [0, param)), applied to the raw
    log-mel as CAV-MAE does, so masked cells become 0 and normalise to ~1.1329."""
    if freqm > 0:
        width = int(rng.integers(0, freqm))
        start = int(rng.integers(0, fbank.shape[1] - width + 1))
        fbank[:, start : start + width] = 0.0
    if timem > 0:
        width = int(rng.integers(0, min(timem, fbank.shape[0])))
        start = int(rng.integers(0, fbank.shape[0] - width + 1))
        fbank[start : start + width, :] = 0.0
    return fbank


def time_shift(fbank: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Circular shift along time by up to +-fraction of the window (the Sync loader's time_shifting)."""
    limit = int(fraction * fbank.shape[0])
    if limit <= 0:
        return fbank
    return np.roll(fbank, int(rng.integers(-limit, limit + 1)), axis=0)


# ----------------------------------------------------------------------------- frames


def decode_image(data: bytes) -> torch.Tensor:
    """JPEG bytes -> uint8 [3, H, W] RGB (torchvision's libjpeg-turbo; PIL as the fallback)."""
    if decode_jpeg is not None:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    from PIL import Image  # pragma: no cover

    with Image.open(io.BytesIO(data)) as img:  # pragma: no cover
        return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)


def rrc_params(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
               rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params with our generator: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def frame_tensor(data: bytes, size: int, aug: "AugmentConfig | None", rng: np.random.Generator | None) -> torch.Tensor:
    """One frame as float32 [3, size, size] with ImageNet normalisation.

    Default (reference eval path): bicubic resize of the short side to `size` - skipped when the
    stored frame already has that short side, which make_shards guarantees at 224 - then a centre
    crop. With `aug.random_resized_crop`: torchvision's RandomResizedCrop (bilinear, its default),
    then an optional horizontal flip.
    """
    img = decode_image(data)
    _, h, w = img.shape
    if aug is not None and aug.random_resized_crop and rng is not None:
        top, left, ch, cw = rrc_params(h, w, tuple(aug.crop_scale), tuple(aug.crop_ratio), rng)
        crop = img[:, top : top + ch, left : left + cw].float()
        x = TF.resize(crop, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True).clamp_(0, 255)
    else:
        if min(h, w) != size:
            img = TF.resize(img.float(), [size], interpolation=InterpolationMode.BICUBIC, antialias=True).clamp_(0, 255)
        x = TF.center_crop(img, [size, size]).float()
    if aug is not None and aug.hflip and rng is not None and rng.random() < 0.5:
        x = x.flip(-1)
    return x.mul_(_SCALE).sub_(_BIAS)


# ----------------------------------------------------------------------------- samples


class SampleDecoder:
    """Turns one raw sample (member name -> bytes) into a `Decoded`, or raises a SAMPLE_ERRORS."""

    def __init__(self, cfg: "DataConfig", vocab: LabelVocab | None):
        self.cfg = cfg
        self.vocab = vocab

    def __call__(self, raw: dict[str, Any], rng: np.random.Generator) -> Decoded:
        """Windows are those of the official loader; each takes its stored frame by time
        (tgdp.data.frames): the frame itself for a clip of exactly `num_frames` frames."""
        cfg = self.cfg
        meta = self._meta(raw)
        K = cfg.num_frames
        if shard_format.FBANK_EXT not in raw:
            raise shard_format.SampleFormatError(f"missing member {shard_format.FBANK_EXT}")
        fbank_bytes = raw[shard_format.FBANK_EXT]
        full, length = cfg.full_frames, cfg.audio_frames
        centre = cfg.split == "eval" and cfg.eval_frame < 0
        times = None  # the clip holds exactly K frames and window k takes frame k (no times needed)
        if centre or Fr.frame_count(meta) != K:
            times = Fr.frame_times(meta, shard_format.fbank_num_rows(fbank_bytes))
        if cfg.split == "retrieval":
            whole = shard_format.decode_fbank(fbank_bytes, 0, full, A.NUM_MEL_BINS)
            audio = np.stack([A.pad_rows(whole, *A.window_bounds(k, K, full, length)) for k in range(K)])
            js = list(range(K)) if times is None else Fr.window_frames(times, K, full)
            decoded = {j: frame_tensor(self._frame(raw, j), cfg.frame_size, None, None) for j in dict.fromkeys(js)}
            frames = torch.stack([decoded[j] for j in js])
            index: int | list[int] = js
        else:
            train = cfg.split == "train"
            if not centre:
                k = int(rng.integers(0, K)) if train else cfg.eval_frame
                j = k if times is None else Fr.window_frame(times, k, K, full)
                bounds = A.window_bounds(k, K, full, length)
            else:  # the CAV-MAE protocol: the frame nearest the clip's centre, the window centred there
                span = Fr.audio_span(shard_format.fbank_num_rows(fbank_bytes))
                j = Fr.centre_frame(times, span)
                bounds = A.window_at(Fr.centre_row(span), full, length)
            aug = cfg.augment if train else None
            frames = frame_tensor(self._frame(raw, j), cfg.frame_size, aug, rng)
            audio = window_rows(fbank_bytes, *bounds)
            if aug is not None:
                audio = spec_augment(audio, aug.freqm, aug.timem, rng)
            index = j
        audio = A.normalise_fbank(audio).astype(np.float32, copy=False)
        if cfg.split == "train" and cfg.augment.time_shift > 0:
            audio = time_shift(audio, cfg.augment.time_shift, rng)
        labels = meta["labels"]
        targets, unknown = self.vocab.targets(labels) if self.vocab is not None else (None, [])
        return Decoded(raw["__key__"], np.ascontiguousarray(audio), frames, index, labels, targets, unknown)

    def _meta(self, raw: dict[str, Any]) -> dict[str, Any]:
        if shard_format.META_EXT not in raw:
            raise shard_format.SampleFormatError(f"missing member {shard_format.META_EXT}")
        meta = json.loads(raw[shard_format.META_EXT].decode("utf-8"))
        if not isinstance(meta, dict):
            raise shard_format.SampleFormatError("json is not an object")
        labels = meta.get("labels", [])
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise shard_format.SampleFormatError(f"json labels must be a list of strings, got {labels!r}")
        Fr.frame_count(meta)  # validated here: a malformed count is a corrupt sample whatever the split
        return meta

    @staticmethod
    def _frame(raw: dict[str, Any], k: int) -> bytes:
        ext = shard_format.frame_ext(k)
        if ext not in raw:
            raise shard_format.SampleFormatError(f"missing member {ext}")
        return raw[ext]


def collate(samples: list[Decoded], with_targets: bool) -> dict[str, Any]:
    """Stack decoded samples into the batch dict (inside the worker: one IPC transfer per batch)."""
    batch: dict[str, Any] = {
        "audio": torch.from_numpy(np.stack([s.audio for s in samples])),
        "frames": torch.stack([s.frames for s in samples]),
        "frame_index": torch.tensor([s.frame_index for s in samples], dtype=torch.int64),
        "keys": [s.key for s in samples],
        "labels": [s.labels for s in samples],
    }
    if with_targets:
        batch["label_targets"] = torch.from_numpy(np.stack([s.targets for s in samples]))
    return batch
