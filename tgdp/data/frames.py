"""The frames of a clip in time, and which stored frame goes with which audio window.

A shard sample stores N >= 1 frames (`num_frames` in its json; 16 from video files, whatever a
pre-extracted dataset holds: CAV-MAE's 10, CAV-MAE Sync's 16, ...) and the time of each in
seconds (`frame_times`). The loader lays out K audio windows per clip (`data.num_frames`, 16: the
official `total_frame`): window k is centred on fbank row round(k * 1024 / K), exactly the official
`map_frame_to_spectrogram`, so its time is that row x 10 ms (0.64 k s for K = 16). Each window
takes a stored frame:

* N == K: frame k, as the official loader (those frames are the K-frame extraction the windows
  were laid out for);
* otherwise the frame nearest in time to the window (ties: the earlier frame). The official loader
  instead takes frame k, or the nearest EARLIER frame that exists, which pairs a 10-frame clip's
  last frame (~9 s) with windows 10-15 (6.4-9.6 s) and window k < 10 with frame k (k s vs 0.64 k s);
  tgdp pairs by time on purpose.

The CAV-MAE protocol's single frame ("the middle frame": official frame 5 of 10, or 8 of 16) is the
frame nearest the centre of the clip's audio.

Samples without recorded times (shards of older tgdp versions, pre-extracted frames converted by
them) are taken to hold frames at i * L / N, L the duration of the stored audio: the times of
CAV-MAE's `extract_video_frame` (frame index int(i * F / N), F the frames in the first 10 s),
which CAV-MAE Sync uses with N = 16. With N == K those times are never needed.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from tgdp.data import audio as A
from tgdp.data.format import SampleFormatError

DEFAULT_FRAMES = 16  # a sample json without `num_frames` holds 16 frames (the only count tgdp once wrote)
MAX_FRAMES = 100  # member names carry two digits: frame_00.jpg ... frame_99.jpg


def audio_span(fbank_rows: int) -> float:
    """Seconds of audio behind `fbank_rows` Kaldi rows (10-ms hop, 25-ms window); 998 rows -> 9.995 s."""
    if fbank_rows <= 0:
        return 0.0
    return (fbank_rows - 1) * A.HOP_SECONDS + A.FRAME_LENGTH_SECONDS


def assumed_times(num_frames: int, span: float) -> list[float]:
    """Frame times when none were recorded: i * span / N (CAV-MAE's frame extraction)."""
    return [i * span / num_frames for i in range(num_frames)]


def window_time(k: int, num_windows: int, full: int = A.FULL_FRAMES) -> float:
    """Time (s) of window k of K: its nominal centre row round(k * full / K) x 10 ms (before clamping)."""
    return round(k * full / num_windows) * A.HOP_SECONDS


def nearest(times: Sequence[float], t: float) -> int:
    """Index of the time nearest to t (the earliest of equally near ones)."""
    return int(np.argmin(np.abs(np.asarray(times, dtype=np.float64) - t)))


def window_frames(times: Sequence[float], num_windows: int, full: int = A.FULL_FRAMES) -> list[int]:
    """The stored frame of each of the K windows (module docstring): identity when N == K, else
    the frame nearest in time to each window."""
    if len(times) == num_windows:
        return list(range(num_windows))
    return [nearest(times, window_time(k, num_windows, full)) for k in range(num_windows)]


def window_frame(times: Sequence[float], k: int, num_windows: int, full: int = A.FULL_FRAMES) -> int:
    """The stored frame of window k alone (what a training sample decodes)."""
    if len(times) == num_windows:
        return k
    return nearest(times, window_time(k, num_windows, full))


def centre_frame(times: Sequence[float], span: float) -> int:
    """The frame nearest the centre of the clip's audio (the CAV-MAE protocol's middle frame)."""
    return nearest(times, span / 2.0)


def centre_row(span: float) -> int:
    """The fbank row at the centre of the clip's audio."""
    return int(round(span / 2.0 / A.HOP_SECONDS))


class FrameMetaError(SampleFormatError):
    """A sample json whose frame count or times are malformed (the loader skips the sample)."""


def frame_count(meta: dict[str, Any]) -> int:
    """`num_frames` of a sample json, validated; 16 when absent (shards of older versions)."""
    n = meta.get("num_frames", DEFAULT_FRAMES)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_FRAMES:
        raise FrameMetaError(f"num_frames {n!r}, expected an integer in 1..{MAX_FRAMES}")
    return n


def frame_times(meta: dict[str, Any], fbank_rows: int) -> list[float]:
    """The times (s) of a sample's frames: recorded ones, else `assumed_times` over its audio."""
    n = frame_count(meta)
    times = meta.get("frame_times")
    if times is None:
        return assumed_times(n, audio_span(fbank_rows))
    if (not isinstance(times, list) or len(times) != n
            or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in times)):
        raise FrameMetaError(f"frame_times must list {n} finite numbers (num_frames), got {times!r}")
    return [float(t) for t in times]
