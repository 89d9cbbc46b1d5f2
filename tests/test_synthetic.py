"""tgdp.data.synthetic: the files are real, decodable by both our decoders, and the corpus is learnable."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import av
import decord  # a test extra (.[dev]): an independent second decoder of the files
import numpy as np
import pytest

from tgdp.data.synthetic import (
    ODD_INPUTS,
    SEGMENT_SECONDS,
    class_colour,
    class_frequency,
    max_pitch_offset,
    make_corpus,
    write_broken_inputs,
    write_odd_inputs,
    write_video,
)

REPO = Path(__file__).resolve().parents[1]
NUM_CLIPS, NUM_CLASSES, DURATION, RATE = 8, 4, 4.0, 16000


def decode(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """All RGB frames [T, H, W, 3], audio [C, N] and its rate, with PyAV."""
    with av.open(str(path)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    with av.open(str(path)) as container:
        rate = container.streams.audio[0].rate
        audio = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)
    return frames, audio, rate


def read_manifest(manifest: Path) -> list[dict[str, str]]:
    with open(manifest, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("synthetic corpus ü"), num_clips=NUM_CLIPS, num_classes=NUM_CLASSES,
                       duration=DURATION, sample_rate=RATE, seed=11)


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> dict[str, Path]:
    return write_odd_inputs(tmp_path_factory.mktemp("odd"))


def test_manifest_and_labels_parse(corpus: Path) -> None:
    rows = read_manifest(corpus)
    assert len(rows) == NUM_CLIPS and list(rows[0]) == ["path", "labels", "key"]
    assert len({r["key"] for r in rows}) == NUM_CLIPS
    for row in rows:
        assert (corpus.parent / row["path"]).is_file() and not Path(row["path"]).is_absolute()
        assert [lab.strip() for lab in row["labels"].split(",")] == [row["labels"]]
    assert {r["labels"] for r in rows} == {f"class_{i}" for i in range(NUM_CLASSES)}
    with open(corpus.parent / "labels.csv", newline="", encoding="utf-8") as fh:
        labels = list(csv.DictReader(fh))
    assert [(int(r["index"]), r["mid"]) for r in labels] == [(i, f"class_{i}") for i in range(NUM_CLASSES)]


def test_corpus_decodes_with_pyav_and_decord(corpus: Path) -> None:
    for row in read_manifest(corpus):
        path = corpus.parent / row["path"]
        frames, audio, rate = decode(path)
        assert frames.shape == (DURATION * 25, 120, 160, 3)
        assert rate == RATE and audio.shape[0] == 1
        assert DURATION <= audio.shape[1] / rate <= DURATION + 0.1  # AAC pads to whole 1024-sample frames
        assert audio.std() > 0.05  # not silent
        vr = decord.VideoReader(str(path))
        assert len(vr) == DURATION * 25 and vr.get_avg_fps() == pytest.approx(25.0) and vr[0].shape == (120, 160, 3)
        ar = decord.AudioReader(str(path), sample_rate=16000, mono=True)
        assert ar.shape[0] == 1 and DURATION <= ar.shape[1] / 16000 <= DURATION + 0.1


def test_class_is_in_both_pitch_and_colour(corpus: Path) -> None:
    freqs = np.log2([class_frequency(c, NUM_CLASSES, RATE) for c in range(NUM_CLASSES)])
    colours = np.array([class_colour(c, NUM_CLASSES) for c in range(NUM_CLASSES)], float)
    for row in read_manifest(corpus):
        label = int(row["labels"].split("_")[1])
        frames, audio, rate = decode(corpus.parent / row["path"])
        spectrum = np.abs(np.fft.rfft(audio[0]))
        peak = np.fft.rfftfreq(audio.shape[1], 1 / rate)[spectrum.argmax()]
        assert np.abs(freqs - np.log2(peak)).argmin() == label, (row, peak)
        mean_rgb = frames.reshape(-1, 3).mean(0)
        assert np.linalg.norm(colours - mean_rgb, axis=1).argmin() == label, (row, mean_rgb)
        # Log-mel needs energy everywhere, not just at the tone: every 500 Hz band carries some.
        bands = np.array([b.sum() for b in np.array_split(spectrum[: len(spectrum) // 16 * 16], 16)])
        assert bands.min() > 1e-3 * bands.max()


def _blob(frame: np.ndarray) -> tuple[float, float]:
    """(x centre in [0, 1], brightness) of the grey blob on the saturated background."""
    grey = (frame.max(-1).astype(int) - frame.min(-1)) < 20
    ys, xs = np.nonzero(grey)
    return xs.mean() / (frame.shape[1] - 1), float(frame[grey].mean())


def test_instance_factors_are_shared_over_time(corpus: Path) -> None:
    """Blob x <-> pitch offset per segment, and blink <-> beep per frame (what retrieval must use)."""
    xs, offsets, blink_corr = [], [], []
    for row in read_manifest(corpus):
        label = int(row["labels"].split("_")[1])
        base, span = class_frequency(label, NUM_CLASSES, RATE), max_pitch_offset(NUM_CLASSES, RATE)
        frames, audio, rate = decode(corpus.parent / row["path"])
        for k in range(int(DURATION / SEGMENT_SECONDS)):
            mid = (k + 0.5) * SEGMENT_SECONDS
            xs.append(_blob(frames[int(mid * 25)])[0])
            window = audio[0, int((mid - 0.15) * rate): int((mid + 0.15) * rate)]
            f = np.fft.rfftfreq(window.size, 1 / rate)
            near = (f > base * 2 ** (-1.2 * span)) & (f < base * 2 ** (1.2 * span))
            offsets.append(np.log2(f[near][np.abs(np.fft.rfft(window))[near].argmax()] / base))
        brightness = np.array([_blob(frame)[1] for frame in frames])
        hop = rate // 25  # one audio window per frame; the tone dominates its narrow band
        tone = np.array([np.abs(np.fft.rfft(audio[0, i * hop: (i + 1) * hop] * np.hanning(hop))).max()
                         for i in range(len(frames))])
        blink_corr.append(np.corrcoef(brightness, tone)[0, 1])
    assert np.corrcoef(xs, offsets)[0, 1] > 0.9
    assert min(blink_corr) > 0.7, blink_corr


def test_generation_is_deterministic(tmp_path: Path) -> None:
    kw = dict(num_clips=2, num_classes=2, duration=2.0, seed=5)
    a = read_manifest(make_corpus(tmp_path / "a", **kw))
    b = read_manifest(make_corpus(tmp_path / "b", workers=2, **kw))
    c = read_manifest(make_corpus(tmp_path / "c", **{**kw, "seed": 6}))
    assert a == b == c
    for ra, rb, rc in zip(a, b, c):
        fa, aa, _ = decode(tmp_path / "a" / ra["path"])
        fb, ab, _ = decode(tmp_path / "b" / rb["path"])
        fc, ac, _ = decode(tmp_path / "c" / rc["path"])
        assert (tmp_path / "a" / ra["path"]).read_bytes() == (tmp_path / "b" / rb["path"]).read_bytes()
        np.testing.assert_array_equal(fa, fb)
        np.testing.assert_array_equal(aa, ab)
        assert not np.array_equal(fa, fc) and not np.array_equal(aa, ac)


@pytest.mark.parametrize("name", sorted(ODD_INPUTS))
def test_odd_inputs(odd: dict[str, Path], name: str) -> None:
    path = odd[name]
    spec = ODD_INPUTS[name][1]
    duration, fps = spec.get("duration", 3.0), spec.get("fps", 25.0)
    width, height = spec.get("width", 160), spec.get("height", 120)
    assert path.name == ODD_INPUTS[name][0] and path.is_file()
    with av.open(str(path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        times = np.array([f.time for f in container.decode(video=0)])
        assert (video.codec_context.width, video.codec_context.height) == (width, height)
        assert audio.rate == spec.get("sample_rate", 16000) and audio.channels == spec.get("channels", 1)
    with av.open(str(path)) as container:
        samples = sum(f.samples for f in container.decode(audio=0))
    assert duration <= samples / audio.rate <= duration + 0.1
    assert times[0] == 0 and times[-1] < duration
    gaps = np.diff(times)
    if spec.get("vfr"):
        assert gaps.std() > 0.003 and gaps.min() > 0  # irregular, still increasing
        assert abs(len(times) / duration - fps) < 0.2 * fps
    else:
        assert len(times) == round(duration * fps) and np.allclose(gaps, 1 / fps, atol=1e-3)
    vr = decord.VideoReader(str(path))
    assert len(vr) == len(times) and vr[0].shape == (height, width, 3)
    ar = decord.AudioReader(str(path), sample_rate=16000, mono=True)
    assert duration <= ar.shape[1] / 16000 <= duration + 0.1  # decord keeps mkv's AAC priming (+64 ms)


def test_odd_input_codecs_and_channels(odd: dict[str, Path]) -> None:
    with av.open(str(odd["webm_vp9_opus"])) as c:
        assert (c.streams.video[0].codec_context.name, c.streams.audio[0].codec_context.name) == ("vp9", "opus")
    with av.open(str(odd["mpeg4"])) as c:
        assert c.streams.video[0].codec_context.name == "mpeg4"
    with av.open(str(odd["surround_48k"])) as c:
        assert c.streams.audio[0].layout.name == "5.1"
    for name in ("stereo_44k", "webm_vp9_opus"):  # default audio: channel c carries 440*(c+1) Hz
        _, audio, rate = decode(odd[name])
        peaks = np.fft.rfftfreq(audio.shape[1], 1 / rate)[np.abs(np.fft.rfft(audio, axis=1)).argmax(1)]
        np.testing.assert_allclose(peaks, [440, 880], atol=2)


def test_opus_rate_falls_back_and_decodes_at_48k(tmp_path: Path) -> None:
    path = write_video(tmp_path / "o.webm", duration=1.0, sample_rate=44100, channels=2)
    with av.open(str(path)) as c:
        assert c.streams.audio[0].rate == 48000 and c.streams.audio[0].channels == 2


def test_broken_inputs_fail_as_expected(tmp_path: Path) -> None:
    files = write_broken_inputs(tmp_path)
    assert set(files) == {"truncated", "truncated_midway", "empty", "not_a_video", "no_audio", "audio_only", "missing"}
    assert not files["missing"].exists() and files["empty"].stat().st_size == 0
    for name in ("truncated", "empty", "not_a_video", "missing"):
        with pytest.raises(av.error.FFmpegError):
            with av.open(str(files[name])) as container:
                for _ in container.decode(video=0):
                    pass
        with pytest.raises(Exception):
            decord.VideoReader(str(files[name]))
    with av.open(str(files["truncated_midway"])) as c:  # opens, declares 6 s, holds under half of it
        declared = c.duration / av.time_base
        last = max(float(f.pts * f.time_base) for f in c.decode(video=0))
        assert declared > 5.9 and last < 0.6 * declared
    with av.open(str(files["no_audio"])) as c:
        assert len(c.streams.video) == 1 and not c.streams.audio
    with pytest.raises(Exception):
        decord.AudioReader(str(files["no_audio"]), sample_rate=16000, mono=True)
    with av.open(str(files["audio_only"])) as c:
        assert not c.streams.video and len(c.streams.audio) == 1
    assert decord.AudioReader(str(files["audio_only"]), sample_rate=16000, mono=True).shape[0] == 1


def test_write_video_rejects_bad_requests(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="suffix"):
        write_video(tmp_path / "x.avi")
    with pytest.raises(ValueError, match="channels"):
        write_video(tmp_path / "x.mp4", channels=7)
    with pytest.raises(ValueError, match="frame_fn"):
        write_video(tmp_path / "x.mp4", frame_fn=lambda t: np.zeros((10, 10, 3), np.uint8))


def test_cli_runs_from_a_checkout(tmp_path: Path) -> None:
    out = tmp_path / "cli out"
    proc = subprocess.run([sys.executable, str(REPO / "data_tools" / "make_synthetic.py"), "--output", str(out),
                           "--num-clips", "3", "--seed", "2", "duration=1.0", "workers=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(read_manifest(out / "manifest.csv")) == 3 and len(list((out / "clips").glob("*.mp4"))) == 3
    bad = subprocess.run([sys.executable, str(REPO / "data_tools" / "make_synthetic.py"), "--output", str(out),
                          "num_clips=0"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "num_clips" in bad.stderr
