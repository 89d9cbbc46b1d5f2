"""One clip -> one shard sample: frames and fbank exactly as the reference preprocessing.

Video files are decoded once, in a single demux pass, with PyAV (FFmpeg): any container and codec
FFmpeg reads, constant or variable frame rate. Only the `frames.count` selected frames are converted to RGB
and resized, and decoding stops as soon as the first `clip_seconds` are covered, so cost does not
grow with the length of the source.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from PIL import Image

from tgdp.data import audio as A
from tgdp.data.format import FBANK_EXT, META_EXT, encode_fbank, frame_ext, make_meta
from tgdp.data.frames import MAX_FRAMES, assumed_times
from tgdp.data.shards.config import ShardingConfig
from tgdp.data.shards.sources import Clip


class ClipError(Exception):
    """This clip cannot be used; the message is the reason written to the report."""


@dataclass
class DecodedClip:
    frames: list[Image.Image]  # RGB, short side = frame size
    frame_times: list[float]
    waveform: np.ndarray | None  # mono float32 at 16 kHz (first channel), None without audio
    duration: float | None
    fps: float | None
    width: int | None
    height: int | None
    sample_rate: int | None
    channels: int | None
    missing: list[int] = field(default_factory=list)  # pre-extracted frame slots k without a file (gaps)


def target_times(duration: float, fps: float, count: int, clip_seconds: float) -> np.ndarray:
    """Times of the `count` frames: the reference's `linspace(0, max_frames - 1, count)` frame
    indices with max_frames = min(frames, clip_seconds * fps), expressed in seconds so the same rule
    works for variable frame rate."""
    max_frames = max(1, min(int(round(duration * fps)), int(clip_seconds * fps)))
    return np.linspace(0, max_frames - 1, count).astype(np.int64) / fps


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    if min(w, h) == size:
        return image
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return image.resize(new, Image.BICUBIC)


def _short_side_dims(width: int, height: int, size: int) -> tuple[int, int]:
    scale = size / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))


def decode_video(path: str, cfg: ShardingConfig) -> DecodedClip:
    """Decode the first `clip_seconds` of a video file: `frames.count` frames and the first channel
    of its audio resampled to 16 kHz."""
    if not os.path.exists(path):
        raise ClipError("missing file")
    if os.path.getsize(path) == 0:
        raise ClipError("empty file (0 bytes)")
    try:
        container = av.open(path, metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError, OSError) as exc:
        raise ClipError(f"not a readable media file ({type(exc).__name__}: {exc})") from exc
    with container:
        if not container.streams.video:
            raise ClipError("no video stream")
        vstream = container.streams.video[0]
        astream = container.streams.audio[0] if container.streams.audio else None
        if astream is None and cfg.audio.no_audio == "skip":
            raise ClipError("no audio track (policy audio.no_audio=skip)")
        fps = float(vstream.average_rate or vstream.guessed_rate or 0) or 30.0  # reference falls back to 30
        duration = _duration(container, vstream)
        times = target_times(duration if duration else cfg.clip_seconds, fps, cfg.frames.count, cfg.clip_seconds)
        width, height = vstream.codec_context.width, vstream.codec_context.height
        try:
            frames, frame_times, wave, last_time = _demux(container, vstream, astream, times, cfg)
        except av.FFmpegError as exc:
            raise ClipError(f"decoding failed ({type(exc).__name__}: {exc})") from exc
        if not frames:
            raise ClipError("no decodable video frames")
        covered = min(duration or 0.0, cfg.clip_seconds)
        if last_time is not None and last_time + 1.0 / fps < covered - 0.5:
            raise ClipError(f"truncated: video data ends at {last_time:.2f} s of a declared {duration:.2f} s")
        if astream is not None and (wave is None or wave.size < 400):
            if cfg.audio.no_audio == "skip":
                raise ClipError("audio track holds no decodable samples (policy audio.no_audio=skip)")
            astream, wave = None, None
        return DecodedClip(
            frames=frames,
            frame_times=frame_times,
            waveform=wave,
            duration=duration,
            fps=fps,
            width=width,
            height=height,
            sample_rate=astream.codec_context.sample_rate if astream is not None else None,
            channels=astream.codec_context.channels if astream is not None else None,
        )


def _duration(container: av.container.InputContainer, vstream: av.video.stream.VideoStream) -> float | None:
    if vstream.duration is not None and vstream.time_base is not None:
        return float(vstream.duration * vstream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _demux(container, vstream, astream, times: np.ndarray, cfg: ShardingConfig):
    """One pass over the packets: pick the frame shown at each target time, collect audio."""
    size = cfg.frames.size
    limit = cfg.clip_seconds
    picked: list[Image.Image] = []
    picked_times: list[float] = []
    prev = None  # (time, frame) of the last decoded frame
    start_v = float(vstream.start_time * vstream.time_base) if vstream.start_time is not None else 0.0
    eps = 0.5 / 1000.0
    resampler = av.AudioResampler(format="fltp", rate=A.SAMPLE_RATE) if astream is not None else None
    chunks: list[np.ndarray] = []
    n_audio, max_audio = 0, int(round(limit * A.SAMPLE_RATE))
    video_done, audio_done = False, astream is None

    converted: dict[int, Image.Image] = {}

    def take(frame: av.VideoFrame, t: float) -> None:
        """Use `frame` for the next target time (converted to RGB and resized once)."""
        image = converted.get(id(frame))
        if image is None:
            w, h = _short_side_dims(frame.width, frame.height, size)
            rgb = frame.reformat(width=w, height=h, format="rgb24", interpolation="BICUBIC").to_ndarray()
            converted.clear()
            image = converted[id(frame)] = Image.fromarray(rgb)
        picked.append(image)
        picked_times.append(round(t, 4))

    streams = [vstream] + ([astream] if astream is not None else [])
    for packet in container.demux(*streams):
        if packet.stream is vstream and not video_done:
            for frame in packet.decode():
                if frame.pts is None:
                    continue
                t = float(frame.pts * frame.time_base) - start_v
                # Targets before this frame's time: the previous frame was the one on screen.
                while len(picked) < len(times) and prev is not None and times[len(picked)] < t - eps:
                    take(prev[1], prev[0])
                # Targets at this frame's time (or before the first frame): this frame.
                while len(picked) < len(times) and times[len(picked)] <= t + eps:
                    take(frame, t)
                prev = (t, frame)
                if len(picked) >= len(times) or t > limit:
                    video_done = True
                    break
        elif astream is not None and packet.stream is astream and not audio_done:
            for frame in packet.decode():
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray()[0])  # planar: row 0 is the FIRST channel
                    n_audio += out.samples
            if n_audio >= max_audio:
                audio_done = True
        if video_done and audio_done:
            break
    while prev is not None and len(picked) < len(times):  # the stream ended before the last targets
        take(prev[1], prev[0])
    if resampler is not None and not audio_done:
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray()[0])
    wave = np.concatenate(chunks)[:max_audio].astype(np.float32) if chunks else None
    return picked, picked_times, wave, (prev[0] if prev is not None else None)


def frame_slots(root: Path) -> list[int]:
    """The k of every `frame_<k>` folder under a CAV-MAE frame root, ascending."""
    slots = []
    try:
        with os.scandir(root) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith("frame_") and name[6:].isdigit() and entry.is_dir():
                    slots.append(int(name[6:]))
    except OSError as exc:
        raise ClipError(f"cannot list frame folder {root} ({exc})") from exc
    return sorted(slots)


def load_preextracted(clip: Clip, cfg: ShardingConfig) -> DecodedClip:
    """CAV-MAE pre-extracted data: `<wav>` and `<frame_root>/frame_<k>/<video_id>.jpg`.

    Every frame the clip has is kept, from frame_0 up to its highest k (CAV-MAE: 10, CAV-MAE Sync:
    16, any other count); a k missing below that is a gap, recorded in `missing` and not fatal.
    Frame i of N slots is placed at i * L / N s (tgdp.data.frames), L = min(audio length, clip_seconds).
    """
    if not os.path.exists(clip.wav):
        raise ClipError(f"missing wav file {clip.wav}")
    try:
        data, sr = sf.read(clip.wav, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise ClipError(f"unreadable audio file {clip.wav} ({exc})") from exc
    if data.shape[0] < 400:
        raise ClipError(f"audio file {clip.wav} holds {data.shape[0]} samples (too short for one fbank frame)")
    wave = data[:, 0]
    if sr != A.SAMPLE_RATE:
        wave = AF.resample(torch.from_numpy(np.ascontiguousarray(wave)), sr, A.SAMPLE_RATE).numpy()
    wave = wave[: int(round(cfg.clip_seconds * A.SAMPLE_RATE))]
    root = Path(clip.frame_root)
    slots = [k for k in frame_slots(root) if k < MAX_FRAMES]
    present = [k for k in slots if (root / f"frame_{k}" / f"{clip.video_id}.jpg").is_file()]
    if not present:
        raise ClipError(f"missing frame files: no {root}/frame_<k>/{clip.video_id}.jpg for any k")
    slot_count = present[-1] + 1
    frames = []
    for k in present:
        file = root / f"frame_{k}" / f"{clip.video_id}.jpg"
        try:
            with Image.open(file) as img:
                img.load()
                frames.append(resize_short_side(img.convert("RGB"), cfg.frames.size))
        except (OSError, SyntaxError) as exc:
            raise ClipError(f"unreadable frame {file} ({exc})") from exc
    span = min(data.shape[0] / sr, cfg.clip_seconds)
    times = [round(t, 4) for t in assumed_times(slot_count, span)]
    return DecodedClip(frames, [times[k] for k in present], wave, data.shape[0] / sr, None,
                       frames[0].width, frames[0].height, sr, data.shape[1],
                       missing=sorted(set(range(slot_count)) - set(present)))


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def silence_fbank(num_samples: int) -> np.ndarray:
    return A.kaldi_fbank(np.zeros(max(num_samples, 400), dtype=np.float32)).numpy()


def extract_clip(clip: Clip, cfg: ShardingConfig) -> dict[str, bytes]:
    """The tar members of one sample (`__key__` plus extensions), or `ClipError` with the reason."""
    if clip.error:
        raise ClipError(clip.error)
    decoded = load_preextracted(clip, cfg) if clip.wav else decode_video(clip.video, cfg)
    if decoded.waveform is not None:
        if decoded.waveform.size < 400:
            raise ClipError("audio shorter than one 25-ms fbank window")
        fbank = A.kaldi_fbank(decoded.waveform).numpy()
        has_audio = True
    else:  # only reached with audio.no_audio=silence
        seconds = min(decoded.duration or cfg.clip_seconds, cfg.clip_seconds)
        fbank = silence_fbank(int(seconds * A.SAMPLE_RATE))
        has_audio = False
    if not np.isfinite(fbank).all():
        raise ClipError("fbank has non-finite values")
    sample = {"__key__": clip.key, FBANK_EXT: encode_fbank(fbank)}
    for k, image in enumerate(decoded.frames):
        sample[frame_ext(k)] = encode_jpeg(image, cfg.frames.jpeg_quality)
    meta = make_meta(
        key=clip.key,
        video_id=clip.video_id,
        labels=clip.labels,
        source=clip.source,
        num_frames=len(decoded.frames),
        fbank_frames=int(fbank.shape[0]),
        has_audio=has_audio,
        duration=None if decoded.duration is None or math.isnan(decoded.duration) else round(decoded.duration, 4),
        fps=None if decoded.fps is None else round(decoded.fps, 4),
        width=decoded.width,
        height=decoded.height,
        sample_rate=decoded.sample_rate,
        channels=decoded.channels,
        frame_times=decoded.frame_times,
        missing_frames=decoded.missing,
    )
    sample[META_EXT] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    return sample
