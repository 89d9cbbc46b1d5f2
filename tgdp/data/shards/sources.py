"""Turn what the user has (CSV manifest, folder of videos, CAV-MAE JSON) into a list of clips.

Parsing problems that concern one entry (a missing column value, a duplicate key) are recorded
as that entry's failure so the run can report them and go on; problems with the manifest as a
whole (unreadable, no `path` column) stop the run before any work starts.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from tgdp.data.format import sanitise_key

VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".ts", ".3gp", ".ogv"}


class ManifestError(ValueError):
    """The manifest itself cannot be used (names the file and what to change)."""


@dataclass
class Clip:
    """One input clip: either a video file or CAV-MAE pre-extracted wav + frame folders."""

    key: str
    video_id: str
    labels: list[str]
    source: str  # what the report shows: the path the user gave (or the manifest row)
    video: str | None = None
    wav: str | None = None
    frame_root: str | None = None  # CAV-MAE: <frame_root>/frame_<k>/<video_id>.jpg
    error: str | None = None  # set when the entry is unusable before any decoding
    extra: dict = field(default_factory=dict)


def split_labels(value: str | list | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def read_clips(input_path: str | Path) -> list[Clip]:
    """Read a CSV manifest, a folder of videos or a CAV-MAE JSON datafile; keys made unique."""
    path = Path(input_path)
    if not path.exists():
        raise ManifestError(f"input {path} does not exist: pass a CSV manifest, a folder of videos or a CAV-MAE JSON")
    if path.is_dir():
        clips = _from_folder(path)
    elif path.suffix.lower() == ".json":
        clips = _from_cavmae_json(path)
    elif path.suffix.lower() in (".csv", ".tsv"):
        clips = _from_csv(path)
    else:
        raise ManifestError(f"input {path}: unknown manifest type {path.suffix!r} (expected .csv, .json or a folder)")
    if not clips:
        raise ManifestError(f"input {path} lists no clips")
    _mark_duplicate_keys(clips)
    return clips


def _from_folder(root: Path) -> list[Clip]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    clips = []
    for file in files:
        rel = file.relative_to(root)
        video_id = str(rel.with_suffix(""))
        clips.append(Clip(key=sanitise_key(video_id), video_id=video_id, labels=[], source=str(file), video=str(file)))
    return clips


def _from_csv(csv_path: Path) -> list[Clip]:
    delimiter = "\t" if csv_path.suffix.lower() == ".tsv" else ","
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh, delimiter=delimiter)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(f"cannot read CSV manifest {csv_path}: {exc}") from exc
    label_column = next((c for c in ("labels", "label") if c in columns), None)
    if "path" not in columns or label_column is None:
        raise ManifestError(
            f"CSV manifest {csv_path} has columns {columns}; it needs a header with at least `path,labels` "
            "(or `path,label`; optional `key`); paths are relative to the CSV's folder"
        )
    clips = []
    for line, raw in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        source = f"{csv_path}:{line}"
        if not row.get("path"):
            clips.append(Clip(key=f"line{line}", video_id="", labels=[], source=source, error="empty `path` field"))
            continue
        video = (csv_path.parent / row["path"]).resolve() if not Path(row["path"]).is_absolute() else Path(row["path"])
        video_id = row.get("key") or str(Path(row["path"]).with_suffix(""))
        clips.append(
            Clip(
                key=sanitise_key(video_id),
                video_id=video_id,
                labels=split_labels(row.get(label_column)),
                source=str(video),
                video=str(video),
            )
        )
    return clips


def _from_cavmae_json(json_path: Path) -> list[Clip]:
    """CAV-MAE datafile: {"data": [{"video_id", "wav", "video_path", "labels", ["raw_video_path"]}]}.

    `video_path` is the frame root (frames at <video_path>/frame_<k>/<video_id>.jpg) in CAV-MAE's
    own lists, but some lists point it (or `raw_video_path`) at the video file itself: an entry
    whose wav exists and whose frame root is a folder is converted without decoding the video.
    """
    try:
        with open(json_path, encoding="utf-8") as fh:
            payload = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"cannot read CAV-MAE JSON {json_path}: {exc}") from exc
    entries = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(entries, list):
        raise ManifestError(f"CAV-MAE JSON {json_path} must be an object with a `data` list of entries")
    base = json_path.parent

    def resolve(p: str | None) -> Path | None:
        if not p:
            return None
        q = Path(p)
        return q if q.is_absolute() else (base / q)

    clips = []
    for i, entry in enumerate(entries):
        source = f"{json_path}[data][{i}]"
        if not isinstance(entry, dict):
            clips.append(Clip(key=f"entry{i}", video_id="", labels=[], source=source, error="entry is not an object"))
            continue
        video_id = str(entry.get("video_id") or "")
        wav, frames, raw = resolve(entry.get("wav")), resolve(entry.get("video_path")), resolve(entry.get("raw_video_path"))
        if not video_id:
            stem = (wav or raw or frames)
            video_id = stem.stem if stem is not None else ""
        clip = Clip(key=sanitise_key(video_id) if video_id else f"entry{i}", video_id=video_id,
                    labels=split_labels(entry.get("labels")), source=source)
        if wav is not None and frames is not None and frames.is_dir():
            clip.wav, clip.frame_root, clip.source = str(wav), str(frames), str(wav)
        elif raw is not None:
            clip.video, clip.source = str(raw), str(raw)
        elif frames is not None and frames.suffix.lower() in VIDEO_SUFFIXES:
            clip.video, clip.source = str(frames), str(frames)
        elif wav is not None and frames is not None:
            clip.error = f"frame folder {frames} does not exist (expected {frames}/frame_<k>/{video_id}.jpg)"
        else:
            clip.error = "entry has neither `wav` + `video_path` (frame folder) nor a video file path"
        if not video_id:
            clip.error = clip.error or "entry has no `video_id`"
        clips.append(clip)
    return clips


def _mark_duplicate_keys(clips: list[Clip]) -> None:
    """Keys must be unique inside a shard set; later duplicates are reported, not silently dropped."""
    seen: dict[str, str] = {}
    for clip in clips:
        if clip.error:
            continue
        if clip.key in seen:
            clip.error = f"duplicate key {clip.key!r} (first used by {seen[clip.key]}); give the manifest a unique `key` column"
        else:
            seen[clip.key] = clip.source


def read_id_list(path: str | Path) -> list[str]:
    """Video ids from a text file (one per line, `#` comments), a CAV-MAE JSON datafile (`data[*].video_id`)
    or a CSV/TSV with a `video_id` (or `key`) column, in file order."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".json":
            entries = json.loads(path.read_text(encoding="utf-8")).get("data")
            if not isinstance(entries, list):
                raise ManifestError(f"id list {path}: a JSON id list must be a CAV-MAE datafile with a `data` list")
            return [str(e["video_id"]) for e in entries if isinstance(e, dict) and e.get("video_id")]
        if path.suffix.lower() in (".csv", ".tsv"):
            with open(path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
                column = next((c for c in ("video_id", "key") if c in (reader.fieldnames or [])), None)
                if column is None:
                    raise ManifestError(f"id list {path} has columns {reader.fieldnames}; it needs `video_id` or `key`")
                return [row[column].strip() for row in reader if row.get(column, "").strip()]
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise ManifestError(f"cannot read id list {path}: {exc}") from exc
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def keep_ids(clips: list[Clip], ids: list[str]) -> tuple[list[Clip], list[str]]:
    """(clips whose video id or key is listed, listed ids found in no clip)."""
    wanted = set(ids) | {sanitise_key(i) for i in ids}
    kept = [c for c in clips if c.video_id in wanted or c.key in wanted]
    found = {c.video_id for c in kept} | {c.key for c in kept}
    missing = [i for i in dict.fromkeys(ids) if i not in found and sanitise_key(i) not in found]
    return kept, missing
