"""Sharding on a cluster: one manifest split over many tasks, then one index over their parts.

Task k of T (`task_index=k num_tasks=T`, one Slurm array task each) takes the contiguous slice
[k*n//T, (k+1)*n//T) of the SHUFFLED clip order of all n clips and writes it with the ordinary
make_shards run into `<output>/part-<k>-of-<T>/` (its own shards, index.json, report.json and
resume journal, so a failed task is simply run again). Slicing after the shuffle makes the union
of the parts exactly the single-task plan: every clip lands in exactly one part, whatever T is.

`merge_parts(output)` then writes `<output>/index.json`, `sizes.json` and `report.json` naming
every part's shards by their path relative to `<output>` (`part-00003-of-00016/shard-000000.tar`),
so the loader reads `data.shards=<output>` like any shard folder. It refuses to merge while a part
is missing or unfinished, or when parts come from different runs (seed, parameters, task count).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tgdp.data.format import FORMAT_VERSION, INDEX_NAME, REPORT_NAME, ContentSummary, ShardInfo, read_index, \
    write_index, write_json_atomic

PART_RE = re.compile(r"^part-(\d{5})-of-(\d{5})$")
# Parameters that may legitimately differ between the parts of one shard set.
_PER_TASK = ("task_index", "workers", "progress", "start_method", "output")


class MergeError(RuntimeError):
    """The parts cannot be merged yet (or at all); the message names the parts and what to do.
    `pending` lists the parts not finished yet (empty when merging is impossible for another reason)."""

    def __init__(self, message: str, pending: Sequence[str] = ()):
        super().__init__(message)
        self.pending = list(pending)


def part_name(task_index: int, num_tasks: int) -> str:
    return f"part-{task_index:05d}-of-{num_tasks:05d}"


def task_slice(num_clips: int, task_index: int, num_tasks: int) -> slice:
    """The contiguous slice of the shuffled plan that task `task_index` of `num_tasks` shards."""
    return slice(task_index * num_clips // num_tasks, (task_index + 1) * num_clips // num_tasks)


@dataclass
class MergeResult:
    output: Path
    parts: int
    shards: list[ShardInfo]
    clips: int
    failures: list[dict[str, str]] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def merge_parts(output: str | Path, expect_tasks: int | None = None) -> MergeResult:
    """Write one index over `<output>/part-*-of-*/` (see the module docstring)."""
    out = Path(output)
    found: dict[int, Path] = {}
    totals: set[int] = set()
    for entry in sorted(out.glob("part-*-of-*")) if out.is_dir() else []:
        m = PART_RE.match(entry.name)
        if m and entry.is_dir():
            found[int(m.group(1))] = entry
            totals.add(int(m.group(2)))
    if not found:
        raise MergeError(f"{out} holds no part-<k>-of-<n>/ folders: run make_shards with task_index / num_tasks "
                         "(slurm/make_shards.sbatch) first")
    if len(totals) > 1:
        raise MergeError(f"{out} mixes parts of runs with different task counts {sorted(totals)}: "
                         "delete the parts of the old run, or shard into a new --output folder")
    num_tasks = totals.pop()
    if expect_tasks is not None and expect_tasks != num_tasks:
        raise MergeError(f"{out} holds parts of a {num_tasks}-task run, expected {expect_tasks}")
    missing = [part_name(k, num_tasks) for k in range(num_tasks) if k not in found]
    unfinished = [found[k].name for k in sorted(found) if not (found[k] / REPORT_NAME).is_file()]
    if missing or unfinished:
        raise MergeError(f"{out}: {len(missing) + len(unfinished)} of {num_tasks} parts are not finished "
                         f"(missing: {_names(missing)}; started but unfinished: {_names(unfinished)}); "
                         "re-run those array tasks (e.g. sbatch --array=<k,...>), then merge again",
                         pending=missing + unfinished)

    shards: list[ShardInfo] = []
    failures: list[dict[str, str]] = []
    frame_gaps: list[dict[str, Any]] = []
    content: ContentSummary | None = ContentSummary()  # None once a part's index lacks the counts
    clips = 0
    reference: dict[str, Any] | None = None
    for k in range(num_tasks):
        part = found[k]
        report = _read_json(part / REPORT_NAME)
        clips += int(report.get("clips", 0))
        failures.extend(report.get("failures", []))
        frame_gaps.extend(report.get("frame_gaps", []))
        if not (part / INDEX_NAME).is_file():
            if report.get("samples", 0):
                raise MergeError(f"{part} reports {report['samples']} samples but has no {INDEX_NAME}; re-run task {k}")
            continue  # a part whose clips were all unusable
        index = read_index(part)
        params = {k2: v for k2, v in index.params.items() if k2 not in _PER_TASK}
        if reference is None:
            reference = params
        elif params != reference:
            diff = sorted(n for n in set(params) | set(reference) if params.get(n) != reference.get(n))
            raise MergeError(f"{part} was made with other parameters than the first part ({diff}): all tasks of one "
                             "shard set must run the same command; re-run that task with it")
        shards.extend(ShardInfo(f"{part.name}/{s.name}", s.samples, s.bytes) for s in index.shards)
        if content is not None and index.content is not None:
            content.merge(index.content)
        else:
            content = None
    if shards:
        write_index(out, shards, {"format": FORMAT_VERSION, **(reference or {}), "num_tasks": num_tasks,
                                  "merged_parts": num_tasks}, content)
    write_json_atomic(out / REPORT_NAME, {"input": (reference or {}).get("input", ""), "clips": clips,
                                          "samples": sum(s.samples for s in shards), "shards": len(shards),
                                          "parts": num_tasks, "failed": len(failures), "failures": failures,
                                          **({"frame_counts": content.to_json()["frame_counts"]} if content else {}),
                                          "frame_gaps": frame_gaps})
    return MergeResult(out, num_tasks, shards, clips, failures)


def _names(names: Sequence[str], limit: int = 8) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        description="Merge the per-task indexes of a cluster sharding run (<output>/part-*-of-*/) into one "
        "index.json / sizes.json / report.json in <output>. Safe to run again; refuses while parts are missing.")
    parser.add_argument("output", help="the --output folder all tasks wrote their part-<k>-of-<n>/ folders into")
    parser.add_argument("--expect-tasks", type=int, default=None, help="fail unless the run had this many tasks")
    args = parser.parse_args(argv)
    try:
        result = merge_parts(args.output, args.expect_tasks)
    except MergeError as exc:
        print(f"merge_shards: error: {exc}")
        return 2
    print(f"merged {result.parts} parts: {result.samples} samples in {len(result.shards)} shards from "
          f"{result.clips} clips ({len(result.failures)} unusable) -> {result.output / INDEX_NAME}")
    return 0
