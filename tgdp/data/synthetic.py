"""Real, tiny video files for tests, benchmarks and the quick-start, written with PyAV (no ffmpeg CLI).

Why real files instead of mocked decoders: the failures that cost us runs live in the containers
and codecs themselves (AAC priming, Opus's fixed 48 kHz output, VFR timestamps, odd frame sizes),
so the loaders must be exercised on bytes that a real encoder produced.

`make_corpus` goes further: its clips are *learnable*. Sound and picture share hidden factors
(class -> tone pitch and background hue; a moving blob's x position -> pitch offset, its size ->
loudness, its height -> the band of a noise layer; beep rhythm == blink rhythm), re-drawn every
`SEGMENT_SECONDS`, so a tiny model can learn instance-level audio-visual retrieval on a CPU and
time-aligned frame/audio-window pairs carry information.
"""

from __future__ import annotations

import colorsys
import csv
import multiprocessing
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import av
import numpy as np
from tqdm import tqdm

from tgdp.config import ConfigError

FrameFn = Callable[[float], np.ndarray]  # t seconds -> uint8 [H, W, 3] RGB
AudioFn = Callable[[np.ndarray], np.ndarray]  # t [n] seconds -> float32 [channels, n] in [-1, 1]

SEGMENT_SECONDS = 2.0  # hidden factors of corpus clips change this often
LAYOUTS = {1: "mono", 2: "stereo", 3: "3.0", 4: "quad", 5: "5.0", 6: "5.1"}  # "2.1"/"4.0" break libopus
_CONTAINERS = {".mp4": ("h264", "aac"), ".mov": ("h264", "aac"), ".mkv": ("h264", "aac"),
               ".webm": ("vp9", "libopus"), ".m4a": (None, "aac")}
_VCODECS = {"h264": "libx264", "libx264": "libx264", "vp9": "libvpx-vp9", "libvpx-vp9": "libvpx-vp9", "mpeg4": "mpeg4"}


@dataclass
class SyntheticConfig:
    """data_tools/make_synthetic.py (preset: tgdp/configs/synthetic/default.yaml)."""

    output: str = ""  # folder for clips/, manifest.csv and labels.csv
    num_clips: int = 32
    num_classes: int = 4
    duration: float = 10.0  # seconds per clip (the reference pipeline uses the first 10 s)
    fps: float = 25.0
    width: int = 160
    height: int = 120
    sample_rate: int = 16000
    seed: int = 0
    workers: int = 0  # 0 = one per CPU core; 1 = in-process (no pool)

    def validate(self) -> None:
        if not self.output:
            raise ConfigError("output is required: the folder the corpus is written to")
        if Path(self.output).exists() and not Path(self.output).is_dir():
            raise ConfigError(f"output {self.output!r} is a file: expected a folder (created if missing)")
        checks = [("num_clips", self.num_clips >= 1, ">= 1"), ("num_classes", self.num_classes >= 1, ">= 1"),
                  ("duration", self.duration > 0, "> 0 seconds"), ("fps", self.fps > 0, "> 0"),
                  ("width", self.width >= 16, ">= 16 pixels"), ("height", self.height >= 16, ">= 16 pixels"),
                  ("workers", self.workers >= 0, ">= 0 (0 = one per core)")]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"{name} must be {expected}, got {getattr(self, name)!r}")
        if self.sample_rate not in av.codec.Codec("aac", "w").audio_rates:
            raise ConfigError(f"sample_rate must be an AAC rate (8000, 16000, 22050, 44100, 48000, ...), "
                              f"got {self.sample_rate}")


# ----------------------------------------------------------------------------- writing one file
def write_video(path: str | Path, *, duration: float = 3.0, fps: float = 25.0, width: int = 160, height: int = 120,
                vcodec: str | None = None, audio: bool = True, sample_rate: int = 16000, channels: int = 1,
                vfr: bool = False, frame_fn: FrameFn | None = None, audio_fn: AudioFn | None = None,
                seed: int = 0) -> Path:
    """Encode a real video file; container from the suffix (.mp4/.mov/.mkv: h264+aac, .webm: vp9+opus).

    Quirks handled here rather than in every caller:
    - odd width/height: libx264 refuses yuv420p, so h264 switches to yuv444p (High 4:4:4 profile);
      vp9 and mpeg4 accept odd sizes in yuv420p.
    - sample rates the audio codec lacks (Opus: 8/12/16/24/48 kHz only) are replaced by the nearest
      higher supported rate; `audio_fn` is simply evaluated at that rate, so nothing is resampled.
      Opus always *decodes* at 48 kHz whatever was encoded.
    - vfr=True: frames at irregular times (gaps uniform in [0.5, 1.5]/fps) with a 1/1000 time base.
    - libx264 runs single-threaded so the same seed gives the same bytes on any machine.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _CONTAINERS:
        raise ValueError(f"{path}: unsupported suffix {suffix!r}; use one of {sorted(_CONTAINERS)}")
    default_v, acodec = _CONTAINERS[suffix]
    vname = _VCODECS.get(vcodec or default_v or "")
    if default_v is not None and vname is None:
        raise ValueError(f"unknown vcodec {vcodec!r}; use one of {sorted(_VCODECS)}")
    if channels not in LAYOUTS:
        raise ValueError(f"channels must be 1..6, got {channels}")
    rng = np.random.default_rng(seed)
    frame_fn = frame_fn or default_frame_fn(width, height, seed)
    audio_fn = audio_fn or default_audio_fn(channels, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        vstream = _add_video_stream(out, vname, width, height, fps, vfr) if default_v is not None else None
        feed = _AudioFeed(out, acodec, sample_rate, channels, duration, audio_fn) if audio else None
        if vstream is not None:
            for i, t in enumerate(_frame_times(duration, fps, vfr, rng)):
                if feed is not None:  # interleave like a real file: audio up to this frame's time first
                    feed.push_until(float(t))
                image = np.ascontiguousarray(frame_fn(float(t)), dtype=np.uint8)
                if image.shape != (height, width, 3):
                    raise ValueError(f"frame_fn returned shape {image.shape}, expected {(height, width, 3)}")
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = int(round(t * 1000)) if vfr else i
                out.mux(vstream.encode(frame))
            out.mux(vstream.encode(None))
        if feed is not None:
            feed.push_until(duration)
            out.mux(feed.stream.encode(None))
    return path


def _add_video_stream(out: av.container.OutputContainer, vname: str, width: int, height: int, fps: float,
                      vfr: bool) -> av.VideoStream:
    rate = Fraction(fps).limit_denominator(1001)
    stream = out.add_stream(vname, rate=rate)
    stream.width, stream.height = width, height
    odd = width % 2 or height % 2
    stream.pix_fmt = "yuv444p" if (odd and vname == "libx264") else "yuv420p"
    stream.options = {"libx264": {"preset": "ultrafast", "crf": "20"}, "mpeg4": {},
                      "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0", "crf": "30",
                                     "b": "0"}}[vname]
    stream.codec_context.thread_count = 1  # fast enough at these sizes, and reproducible bytes
    stream.codec_context.time_base = Fraction(1, 1000) if vfr else 1 / rate
    if vfr:
        stream.time_base = Fraction(1, 1000)
    return stream


def _frame_times(duration: float, fps: float, vfr: bool, rng: np.random.Generator) -> np.ndarray:
    if not vfr:
        return np.arange(int(round(duration * fps))) / fps
    gaps = rng.uniform(0.5, 1.5, int(duration * fps * 2) + 2) / fps
    times = np.round(np.concatenate([[0.0], np.cumsum(gaps)]), 3)
    return times[times < duration]


class _AudioFeed:
    """The whole track from `audio_fn`, handed to the encoder a piece at a time (for interleaving)."""

    def __init__(self, out: av.container.OutputContainer, codec: str, sample_rate: int, channels: int,
                 duration: float, audio_fn: AudioFn) -> None:
        rates = av.codec.Codec(codec, "w").audio_rates or [sample_rate]
        self.rate = sample_rate if sample_rate in rates else min([r for r in rates if r >= sample_rate] or [max(rates)])
        self.out, self.layout, self.pos = out, LAYOUTS[channels], 0
        self.stream = out.add_stream(codec, rate=self.rate, layout=self.layout)
        n = int(round(duration * self.rate))
        samples = np.asarray(audio_fn(np.arange(n) / self.rate), dtype=np.float32)
        samples = samples[None] if samples.ndim == 1 else samples
        if samples.shape != (channels, n):
            raise ValueError(f"audio_fn returned shape {samples.shape}, expected {(channels, n)}")
        self.samples = np.clip(samples, -1.0, 1.0)  # planar; PyAV converts to the codec's format (opus: flt)

    def push_until(self, t: float) -> None:
        """Encode samples up to time `t` (PyAV re-chunks to the codec's 1024/960-sample frames)."""
        end = min(int(round(t * self.rate)), self.samples.shape[1])
        if end <= self.pos:
            return
        chunk = np.ascontiguousarray(self.samples[:, self.pos:end])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=self.layout)
        frame.sample_rate, frame.pts, frame.time_base = self.rate, self.pos, Fraction(1, self.rate)
        self.out.mux(self.stream.encode(frame))
        self.pos = end


def default_frame_fn(width: int, height: int, seed: int = 0) -> FrameFn:
    """A static gradient with a white square sweeping right at width/2 px/s (so time is visible)."""
    yy, xx = np.mgrid[0:height, 0:width]
    blue = np.full_like(xx, int(np.random.default_rng(seed).integers(40, 200)))
    base = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), blue], -1).astype(np.uint8)
    side, y0 = max(4, min(width, height) // 5), (height - max(4, min(width, height) // 5)) // 2

    def frame(t: float) -> np.ndarray:
        image, x0 = base.copy(), int(t * width / 2) % max(width - side, 1)
        image[y0:y0 + side, x0:x0 + side] = 255
        return image

    return frame


def default_audio_fn(channels: int = 1, seed: int = 0) -> AudioFn:
    """Channel c carries a 440*(c+1) Hz tone plus white noise, so channel mapping is checkable."""
    def audio(t: np.ndarray) -> np.ndarray:
        noise = np.random.default_rng(seed).standard_normal((channels, t.size))
        tones = np.stack([np.sin(2 * np.pi * 440.0 * (c + 1) * t) for c in range(channels)])
        return (0.4 * tones + 0.05 * noise).astype(np.float32)

    return audio


# ----------------------------------------------------------------------------- the learnable corpus
def class_frequency(label: int, num_classes: int, sample_rate: int) -> float:
    """Base tone pitch of a class: log-spaced between 200 Hz and min(3 kHz, 0.3*rate)."""
    lo, hi = 200.0, min(3000.0, 0.3 * sample_rate)
    return float(lo * (hi / lo) ** (label / max(num_classes - 1, 1)))


def max_pitch_offset(num_classes: int, sample_rate: int) -> float:
    """Largest pitch offset (octaves) from blob x: 30% of the class spacing, so classes never overlap,
    and at most a quarter octave, so glides stay narrow-band and the tone dominates the spectrum."""
    if num_classes < 2:
        return 0.25
    spacing = np.log2(class_frequency(1, num_classes, sample_rate) / class_frequency(0, num_classes, sample_rate))
    return float(min(0.3 * spacing, 0.25))


def class_colour(label: int, num_classes: int) -> tuple[int, int, int]:
    """Background RGB of a class: evenly spaced hues."""
    r, g, b = colorsys.hsv_to_rgb(label / num_classes, 0.75, 0.8)
    return int(r * 255), int(g * 255), int(b * 255)


@dataclass
class ClipFactors:
    """The hidden factors of one corpus clip (one value per `SEGMENT_SECONDS` segment)."""

    label: int
    x: np.ndarray  # blob x in [0,1] at segment boundaries (interpolated) <-> pitch offset
    y: np.ndarray  # blob y in [0,1] per segment <-> noise band centre (top = high)
    rate: np.ndarray  # blink == beep rate, Hz, per segment
    size: np.ndarray  # blob radius / min(H, W) per segment <-> tone loudness
    harmonics: np.ndarray  # per-clip timbre (nuisance)
    noise: float  # per-clip noise level (nuisance)


def clip_factors(index: int, num_classes: int, duration: float, seed: int) -> ClipFactors:
    """Draw clip `index`'s factors from its own stream so workers and order never change them."""
    rng = np.random.default_rng([seed, index])
    segments = int(np.ceil(duration / SEGMENT_SECONDS))
    return ClipFactors(label=index % num_classes, x=rng.uniform(0.1, 0.9, segments + 1),
                       y=rng.uniform(0.15, 0.85, segments), rate=rng.uniform(1.0, 4.0, segments),
                       size=rng.uniform(0.08, 0.2, segments), harmonics=rng.uniform(0.0, 0.5, 2),
                       noise=float(rng.uniform(0.05, 0.15)))


def _envelope(phase: np.ndarray) -> np.ndarray:
    """Soft on/off square wave shared by the blink and the beeps (no clicks, same timing)."""
    return 0.5 + 0.5 * np.tanh(4.0 * np.sin(2 * np.pi * phase))


def _corpus_fns(f: ClipFactors, num_classes: int, duration: float, width: int, height: int,
                sample_rate: int, seed: int, index: int) -> tuple[FrameFn, AudioFn]:
    rng = np.random.default_rng([seed, index, 1])
    n = int(round(duration * sample_rate))
    t = np.arange(n) / sample_rate
    seg = np.minimum((t / SEGMENT_SECONDS).astype(int), len(f.y) - 1)
    knots = np.arange(len(f.x)) * SEGMENT_SECONDS
    x_t = np.interp(t, knots, f.x)
    phase = np.cumsum(f.rate[seg]) / sample_rate
    env = _envelope(phase).astype(np.float32)

    # Audio: class pitch shifted by blob x, beeping with the blink, louder for bigger blobs,
    # over band-limited noise centred by blob y and a white-noise floor (non-degenerate log-mel).
    span = max_pitch_offset(num_classes, sample_rate)
    pitch = class_frequency(f.label, num_classes, sample_rate) * 2.0 ** ((x_t - 0.5) * 2 * span)
    tone_phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    tone = np.sin(tone_phase) + f.harmonics[0] * np.sin(2 * tone_phase) + f.harmonics[1] * np.sin(3 * tone_phase)
    loud = 0.4 + 3.0 * f.size[seg]
    band = np.empty(n)
    for k in range(len(f.y)):
        sl = seg == k
        spec = np.fft.rfft(rng.standard_normal(int(sl.sum())))
        freqs = np.fft.rfftfreq(int(sl.sum()), 1 / sample_rate)
        centre = 300.0 * (0.4 * sample_rate / 300.0) ** (1.0 - f.y[k])
        spec *= np.exp(-0.5 * (np.log2(np.maximum(freqs, 1.0) / centre) / 0.6) ** 2)
        part = np.fft.irfft(spec, int(sl.sum()))
        band[sl] = part / (part.std() + 1e-8)
    mix = loud * (0.1 + 0.9 * env) * tone / (1 + f.harmonics.sum()) + 0.15 * band + f.noise * rng.standard_normal(n)
    mix = (0.8 * mix / np.abs(mix).max()).astype(np.float32)

    # Picture: class hue x per-clip low-resolution texture, and the blob.
    texture = rng.uniform(0.8, 1.2, (height // 16 + 2, width // 16 + 2, 1))
    texture = np.repeat(np.repeat(texture, 16, 0), 16, 1)[:height, :width]
    background = np.clip(np.array(class_colour(f.label, num_classes), float) * texture, 0, 255).astype(np.uint8)
    radii = [max(2, int(size * min(width, height))) for size in f.size]
    discs = [(r, np.add.outer(np.arange(-r, r + 1) ** 2, np.arange(-r, r + 1) ** 2) <= r * r) for r in radii]

    def frame_fn(time: float) -> np.ndarray:
        image = background.copy()
        i = min(int(time * sample_rate), n - 1)
        r, disc = discs[seg[i]]
        cx, cy = int(x_t[i] * (width - 1)), int(f.y[seg[i]] * (height - 1))
        y0, y1, x0, x1 = max(cy - r, 0), min(cy + r + 1, height), max(cx - r, 0), min(cx + r + 1, width)
        mask = disc[y0 - (cy - r):y1 - (cy - r), x0 - (cx - r):x1 - (cx - r)]
        image[y0:y1, x0:x1][mask] = int(60 + 195 * env[i])
        return image

    return frame_fn, lambda _t: mix[None]


def write_corpus_clip(out_dir: str | Path, index: int, *, num_classes: int = 4, duration: float = 10.0,
                      fps: float = 25.0, width: int = 160, height: int = 120, sample_rate: int = 16000,
                      seed: int = 0) -> tuple[str, str, str]:
    """Write clip `index` of a corpus; returns its manifest row (relative path, labels, key)."""
    key = f"clip_{index:05d}"
    factors = clip_factors(index, num_classes, duration, seed)
    frame_fn, audio_fn = _corpus_fns(factors, num_classes, duration, width, height, sample_rate, seed, index)
    write_video(Path(out_dir) / "clips" / f"{key}.mp4", duration=duration, fps=fps, width=width, height=height,
                sample_rate=sample_rate, frame_fn=frame_fn, audio_fn=audio_fn, seed=seed)
    return f"clips/{key}.mp4", f"class_{factors.label}", key


def _write_clip_star(args: tuple) -> tuple[str, str, str]:
    return write_corpus_clip(args[0], args[1], **args[2])


def _write_csv(path: Path, header: list[str], rows: list) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:  # csv quotes labels holding commas
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def make_corpus(out_dir: str | Path, *, num_clips: int = 32, num_classes: int = 4, duration: float = 10.0,
                fps: float = 25.0, width: int = 160, height: int = 120, sample_rate: int = 16000,
                seed: int = 0, workers: int = 1, progress: bool = False) -> Path:
    """Write `num_clips` h264+aac mp4 clips plus manifest.csv and labels.csv; returns the manifest.

    Deterministic given `seed` (each clip has its own random stream), whatever `workers` is
    (0 = one per core). Clips are independent, so workers run in `spawn` processes: no decoder
    or encoder state is ever forked.
    """
    if sample_rate not in av.codec.Codec("aac", "w").audio_rates:
        raise ValueError(f"sample_rate must be an AAC rate (8000, 16000, 22050, 44100, 48000, ...), got {sample_rate}")
    out_dir = Path(out_dir)
    (out_dir / "clips").mkdir(parents=True, exist_ok=True)
    kwargs = dict(num_classes=num_classes, duration=duration, fps=fps, width=width, height=height,
                  sample_rate=sample_rate, seed=seed)
    jobs = [(str(out_dir), i, kwargs) for i in range(num_clips)]
    workers = min(workers or os.cpu_count() or 1, num_clips)
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    rows = []
    try:
        with tqdm(total=num_clips, unit="clip", desc="synthetic corpus", disable=not progress) as bar:
            for row in pool.imap(_write_clip_star, jobs) if pool else map(_write_clip_star, jobs):
                rows.append(row)
                bar.update()
    finally:
        if pool is not None:
            pool.terminate()  # every job has returned (or one failed): nothing is lost
            pool.join()
    manifest = out_dir / "manifest.csv"
    _write_csv(manifest, ["path", "labels", "key"], rows)
    _write_csv(out_dir / "labels.csv", ["index", "mid", "display_name"],
               [(i, f"class_{i}", f"Class {i}") for i in range(num_classes)])
    return manifest


# ----------------------------------------------------------------------------- robustness inputs
def write_broken_inputs(out_dir: str | Path) -> dict[str, Path]:
    """Unusable inputs a loader must report, not crash on. "missing" is a path that is never created."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"truncated": out_dir / "truncated.mp4", "truncated_midway": out_dir / "truncated_midway.mkv", "empty": out_dir / "empty.mp4",
             "not_a_video": out_dir / "not_a_video.mp4", "no_audio": out_dir / "no_audio.mp4",
             "audio_only": out_dir / "audio_only.m4a", "missing": out_dir / "missing.mp4"}
    write_video(files["truncated"], duration=3.0)
    data = files["truncated"].read_bytes()
    files["truncated"].write_bytes(data[: int(len(data) * 0.4)])  # the moov index is at the end: now gone
    # Matroska keeps its header (and declared duration) at the front: the cut file opens and then
    # runs out of data half-way, the harder case for a decoder loop.
    write_video(files["truncated_midway"], duration=6.0)
    data = files["truncated_midway"].read_bytes()
    files["truncated_midway"].write_bytes(data[: int(len(data) * 0.5)])
    files["empty"].write_bytes(b"")
    files["not_a_video"].write_text("this is not a video, just text in a .mp4 name\n" * 20, encoding="utf-8")
    write_video(files["no_audio"], duration=3.0, audio=False)
    write_video(files["audio_only"], duration=3.0)  # .m4a: the container has no video codec
    files["missing"].unlink(missing_ok=True)
    return files


# name -> (file name, write_video keyword arguments); tests read the expectations from here.
ODD_INPUTS: dict[str, tuple[str, dict]] = {
    "mkv_h264": ("mkv_h264.mkv", {}), "mpeg4": ("mpeg4.mp4", {"vcodec": "mpeg4"}),
    "webm_vp9_opus": ("webm_vp9_opus.webm", {"sample_rate": 48000, "channels": 2}),
    "fps24": ("fps24.mp4", {"fps": 24.0}), "fps60": ("fps60.mp4", {"fps": 60.0}), "vfr": ("vfr.mp4", {"vfr": True}),
    "portrait": ("portrait.mp4", {"width": 120, "height": 200}),
    "odd_size": ("odd_size.mp4", {"width": 161, "height": 121}),  # h264 in yuv444p
    "odd_size_mpeg4": ("odd_size_mpeg4.mp4", {"width": 161, "height": 121, "vcodec": "mpeg4"}),
    "mono_8k": ("mono_8k.mp4", {"sample_rate": 8000}),
    "stereo_44k": ("stereo_44k.mp4", {"sample_rate": 44100, "channels": 2}),
    "surround_48k": ("surround_48k.mp4", {"sample_rate": 48000, "channels": 6}),
    "short": ("short.mp4", {"duration": 2.5}), "long": ("long.mp4", {"duration": 12.0}),
    "unicode_path": ("clip ü 音.mp4", {}),
}


def write_odd_inputs(out_dir: str | Path) -> dict[str, Path]:
    """Valid but unusual inputs (containers, codecs, rates, sizes, names); 3-s clips unless stated."""
    out_dir = Path(out_dir)
    return {name: write_video(out_dir / file, seed=i, **{"duration": 3.0, **kw})
            for i, (name, (file, kw)) in enumerate(ODD_INPUTS.items())}
