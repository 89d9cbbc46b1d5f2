"""Audio features exactly as the reference loaders compute them (docs/method.md 2.4).

One home for the Kaldi fbank parameters, the 1024-frame padding rule, the per-frame window
mapping and the dataset normalisation, so that make_shards, the loader and evaluation agree.
"""

from __future__ import annotations

import numpy as np
import torch
from torchaudio.compliance import kaldi

SAMPLE_RATE = 16_000
NUM_MEL_BINS = 128
FRAME_SHIFT_MS = 10.0
HOP_SECONDS = FRAME_SHIFT_MS / 1000.0  # one fbank row every 10 ms
FRAME_LENGTH_SECONDS = 0.025  # each row covers a 25-ms window (torchaudio's default)
CLIP_SECONDS = 10.0
# The reference pads/truncates every clip's fbank to 1024 frames before cutting windows.
FULL_FRAMES = 1024
# TG-DP / CAV-MAE Sync: a 416-frame (4.16 s) window centred on the chosen video frame.
WINDOW_FRAMES = 416
# Dataset statistics used by CAV-MAE, CAV-MAE Sync and TG-DP for AudioSet and VGGSound alike.
FBANK_MEAN = -5.081
FBANK_STD = 4.4849


def kaldi_fbank(waveform: np.ndarray | torch.Tensor, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Log-mel fbank `[frames, 128]` (float32) of a mono waveform, as the reference computes it.

    The waveform's mean is subtracted first (the reference does it before calling kaldi), and
    every kaldi argument the reference leaves at its default stays at torchaudio's default.
    """
    wav = torch.as_tensor(waveform, dtype=torch.float32).reshape(1, -1)
    wav = wav - wav.mean()
    return kaldi.fbank(
        wav,
        htk_compat=True,
        sample_frequency=sample_rate,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=NUM_MEL_BINS,
        dither=0.0,
        frame_shift=FRAME_SHIFT_MS,
    )


def window_bounds(k: int, num_frames: int, total: int = FULL_FRAMES, length: int = WINDOW_FRAMES) -> tuple[int, int]:
    """`[start, end)` of the audio window paired with video frame `k` of `num_frames`.

    The reference's `map_frame_to_spectrogram`: centre at round(k * total / num_frames), clamp the
    window inside `[0, total)`. With 16 frames, 1024 and 416: k<=3 -> [0,416), k=4 -> [48,464),
    k=12 -> [560,976), k>=13 -> [608,1024).
    """
    return window_at(round(k * total / num_frames), total, length)


def window_at(centre: int, total: int = FULL_FRAMES, length: int = WINDOW_FRAMES) -> tuple[int, int]:
    """`[start, end)` of the `length`-row window centred on row `centre`, clamped inside `[0, total)`."""
    if length >= total:
        return 0, total
    start = max(0, centre - length // 2)
    end = start + length
    if end > total:
        end, start = total, total - length
    return start, end


def pad_rows(fbank: np.ndarray, start: int, end: int) -> np.ndarray:
    """Rows `[start, end)` of an un-normalised fbank, zero-padded past its end (as the reference).

    Clips shorter than 10 s have fewer than 998 stored frames; the reference zero-pads the raw
    log-mel to 1024 frames, so padded rows normalise to (0 - mean) / std ~ +1.1329.
    """
    out = np.zeros((end - start, fbank.shape[1]), dtype=np.float32)
    have = max(0, min(end, fbank.shape[0]) - start)
    if have:
        out[:have] = fbank[start : start + have]
    return out


def normalise_fbank(fbank: np.ndarray | torch.Tensor, mean: float = FBANK_MEAN, std: float = FBANK_STD):
    """(fbank - mean) / std with the dataset statistics of the reference."""
    return (fbank - mean) / std
