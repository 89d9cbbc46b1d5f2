"""Checkpoint folder names, the completeness test and resume discovery.

    <run_dir>/<cfg.folder>/
        step_00001000/          complete: COMPLETE marker present and consistent
        step_00002000.tmp/      a save in progress or a crashed one: never loaded
        step_00000500.deleting/ a pruned checkpoint being removed: never loaded

A folder named `step_<N>` is complete only if ALL hold: `COMPLETE` (written last, a JSON
manifest {step, files: {name: size}}) parses and names step N; `meta.json` parses and names
step N; DCP's `.metadata` exists; every file the manifest lists exists with the listed size.
The size check is cheap (stat calls, no reads) and catches truncation, a half-finished copy
or a deleted shard; it is not a checksum.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tgdp.checkpoint.files import read_json
from tgdp.checkpoint.safety import METADATA_FILE

log = logging.getLogger("tgdp.checkpoint")

COMPLETE_FILE = "COMPLETE"
META_FILE = "meta.json"
EXPORT_FILE = "model.safetensors"
TMP_SUFFIX = ".tmp"
DELETING_SUFFIX = ".deleting"
FORMAT = "tgdp-checkpoint"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_RE = re.compile(r"^step_(\d+)\.tmp$")


def step_dir_name(step: int) -> str:
    """`step_00001000`: zero-padded so `ls` sorts by step (discovery parses the number anyway)."""
    return f"step_{step:08d}"


def rank_file_name(rank: int) -> str:
    return f"rank_{rank}.json"


def parse_step(path: Path) -> int | None:
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


def incompleteness(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint, or None when it is."""
    step = parse_step(path)
    if step is None:
        return "the folder name is not step_<N>"
    if not path.is_dir():
        return "not a directory"
    marker = path / COMPLETE_FILE
    if not marker.is_file():
        return f"no {COMPLETE_FILE} marker (the save did not finish)"
    try:
        manifest = read_json(marker)
        files = manifest["files"]
        marker_step = manifest["step"]
    except Exception as exc:  # noqa: BLE001 - any parse problem means "broken"
        return f"unreadable {COMPLETE_FILE} marker ({type(exc).__name__}: {exc})"
    if marker_step != step:
        return f"{COMPLETE_FILE} names step {marker_step}, the folder step {step}"
    try:
        meta = read_json(path / META_FILE)
        meta_step = meta["step"]
    except Exception as exc:  # noqa: BLE001
        return f"unreadable {META_FILE} ({type(exc).__name__}: {exc})"
    if meta_step != step:
        return f"{META_FILE} names step {meta_step}, the folder step {step}"
    if not (path / METADATA_FILE).is_file():
        return f"no DCP {METADATA_FILE} file"
    if not isinstance(files, dict):
        return f"malformed {COMPLETE_FILE} manifest"
    for name, size in files.items():
        if not isinstance(name, str) or PurePosixPath(name).name != name or name in (".", ".."):
            return f"{COMPLETE_FILE} lists a file outside the folder ({name!r})"
        try:
            actual = (path / name).stat().st_size
        except OSError:
            return f"file {name} is missing"
        if actual != size:
            return f"file {name} has {actual} bytes, the manifest says {size}"
    return None


@dataclass
class Scan:
    """What a checkpoint folder holds: complete checkpoints (oldest first) and what was skipped."""

    complete: list[tuple[int, Path]] = field(default_factory=list)
    broken: list[tuple[Path, str]] = field(default_factory=list)  # (folder, why it is not usable)
    deleting: list[Path] = field(default_factory=list)  # leftovers of an interrupted prune

    @property
    def latest(self) -> Path | None:
        return self.complete[-1][1] if self.complete else None


def scan(checkpoint_dir: str | Path) -> Scan:
    """Classify every `step_*` entry of `checkpoint_dir` (other names are not ours: ignored)."""
    out = Scan()
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return out
    for entry in sorted(root.iterdir()):
        if not entry.name.startswith("step_"):
            continue
        if entry.name.endswith(DELETING_SUFFIX):
            out.deleting.append(entry)
        elif _TMP_RE.match(entry.name):
            out.broken.append((entry, "an unfinished save (.tmp folder: the run stopped while writing it)"))
        elif (reason := incompleteness(entry)) is not None:
            out.broken.append((entry, reason))
        else:
            out.complete.append((parse_step(entry), entry))  # type: ignore[arg-type]
    out.complete.sort()
    return out


def find_latest_complete(checkpoint_dir: str | Path, report: bool = True) -> Path | None:
    """The newest complete checkpoint in `checkpoint_dir` (`<run_dir>/<cfg.folder>`), or None.

    Incomplete or corrupt folders are skipped and, with `report`, each is logged as a warning
    naming the folder and the reason, so a silently older resume point is never a surprise.
    Pure filesystem function: in a multi-rank job use `CheckpointManager.latest()`, which runs
    this on rank 0 only and broadcasts the answer (ranks that list a network filesystem at
    slightly different moments could otherwise disagree)."""
    result = scan(checkpoint_dir)
    if report:
        for path, reason in result.broken:
            log.warning("ignoring checkpoint folder %s: %s", path, reason)
    return result.latest
