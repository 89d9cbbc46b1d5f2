"""`CheckpointManager`: when to save, atomic multi-rank saves, resume discovery, resharding loads,
retention and the consolidated safetensors export. See docs/checkpoints.md for the on-disk layout.

Collective contract: `save`, `latest`, `load`, `resume`, `export_consolidated` and (on wall-time
checks) `should_save` must be called by EVERY rank in the same order, as DCP itself requires.
Every failure is agreed on by all ranks before anyone raises, so one rank's full disk turns into
the same `CheckpointSaveError` on every rank instead of a hang in the next collective.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

from tgdp.checkpoint import layout as L
from tgdp.checkpoint import rng as R
from tgdp.checkpoint.comm import Collectives
from tgdp.checkpoint.config import CheckpointConfig
from tgdp.checkpoint.export import gather_full_state_dicts, write_safetensors
from tgdp.checkpoint.files import fsync_dir, read_json, remove_tree, write_json_durably
from tgdp.checkpoint.fingerprint import fingerprint
from tgdp.checkpoint.safety import SafeFileSystemReader, SafeLoadPlanner, read_dcp_metadata
from tgdp.checkpoint.stateful import ModelState
from tgdp.checkpoint.errors import CheckpointError, UnsafeCheckpointError

log = logging.getLogger("tgdp.checkpoint")

RANK_STATE_FORMAT = "tgdp-rank-state"


class CheckpointSaveError(RuntimeError):
    """A save failed (disk full, I/O error, unserialisable state); the message names the folder."""


@dataclass
class LoadResult:
    """What `load` restored besides the app state (which is loaded in place)."""

    path: Path
    step: int
    meta: dict[str, Any]  # the whole meta.json
    extra: dict[str, Any]  # what the trainer passed to save(extra=...): wandb run id, config, ...
    saved_world_size: int
    # This rank's `rank_state` from rank_<r>.json; None if the checkpoint had no rank r (it was
    # written by fewer ranks): then use `rank0_state` and the component's own layout-change
    # policy (ShardLoader.load_state_dict applies data.on_layout_change to a foreign state).
    rank_state: dict[str, Any] | None
    rank0_state: dict[str, Any] | None
    rng_restored: bool
    notes: list[str] = field(default_factory=list)


def _short(exc: BaseException, limit: int = 1500) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + " ..."


def _unwrap(exc: BaseException) -> list[BaseException]:
    """The per-rank causes inside DCP's CheckpointException (a BaseException, not an Exception!)."""
    if isinstance(exc, CheckpointException):
        return [pair[0] for pair in exc.failures.values()]
    return [exc]


class CheckpointManager:
    """Saves and restores one run's checkpoints under `<run_dir>/<cfg.folder>/step_<N>/`.

    app_state: name -> `nn.Module` (wrapped as `ModelState`), any DCP `Stateful` (use
    `OptimizerState(model, optimizer)` for optimizers, the trainer itself for step counters), or
    a dict of tensors / plain Python values. Non-tensor values must be plain Python (None, bool,
    int, float, str, list, tuple, dict): they are read back with `weights_only=True`.
    """

    def __init__(self, run_dir: str | os.PathLike, cfg: CheckpointConfig, rank: int = 0, world_size: int = 1,
                 clock: Callable[[], float] = time.monotonic):
        cfg.validate()
        if dist.is_available() and dist.is_initialized() and (rank, world_size) != (dist.get_rank(), dist.get_world_size()):
            raise CheckpointError(f"CheckpointManager got rank {rank} of {world_size}, but the process group says "
                                  f"{dist.get_rank()} of {dist.get_world_size()}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.root = Path(run_dir) / cfg.folder
        self._comm = Collectives(rank, world_size)
        self._clock = clock  # injected so tests (and rank-skew checks) need no monkeypatching
        self._last_save_time = clock()
        self._last_saved_step = 0

    # ------------------------------------------------------------------ when
    def should_save(self, step: int, now: float | None = None) -> bool:
        """Whether to save after `step` optimizer steps (call on every rank, every step).

        Step rule: `step % every_steps == 0`. Wall rule: `every_minutes` elapsed since the last
        save or since the manager was created, by RANK 0's clock, broadcast - so all ranks agree
        even if their clocks or step timings differ. The broadcast is issued only on steps that
        are multiples of `wall_check_every_steps`, a step-synchronised condition, so every rank
        enters it together. `now` must come from the manager's `clock` (default time.monotonic).
        """
        if step <= self._last_saved_step:
            return False
        if self.cfg.every_steps and step % self.cfg.every_steps == 0:
            return True
        if not self.cfg.every_minutes or step % self.cfg.wall_check_every_steps:
            return False
        now = self._clock() if now is None else now
        due = now - self._last_save_time >= self.cfg.every_minutes * 60.0
        return self._comm.broadcast_flag(due)

    # ------------------------------------------------------------------ save
    def save(self, step: int, app_state: Mapping[str, Any], extra: Mapping[str, Any] | None = None,
             rank_state: Mapping[str, Any] | None = None) -> Path:
        """Write `step_<N>/` atomically; returns its path. Collective.

        `extra` (JSON, rank 0's copy is kept) goes to meta.json - pass the wandb run id and the
        resolved config there. `rank_state` (JSON, one per rank) goes to rank_<r>.json with this
        rank's RNG states - pass `{"data": loader.state_dict()}` there.

        Sequence: rank 0 creates `step_<N>.tmp/` -> every rank writes its DCP shard (fsync'ed by
        DCP), the optional safetensors export, its rank_<r>.json (fsync'ed) -> all-reduce of
        failures (the barrier) -> rank 0 writes meta.json and the COMPLETE manifest, fsyncs and
        renames to `step_<N>/` -> prune. A crash at any point leaves at most a `.tmp` folder,
        which discovery ignores and reports.
        """
        final = self.root / L.step_dir_name(step)
        tmp = final.with_name(final.name + L.TMP_SUFFIX)
        started = time.monotonic()
        err: BaseException | None = None
        if self.rank == 0:
            try:
                if tmp.exists():
                    log.warning("removing %s left by an earlier unfinished save", tmp)
                    remove_tree(tmp)
                tmp.mkdir(parents=True)
            except Exception as exc:
                err = exc
        self._agree(err, "creating", tmp, step)

        err, states = None, {}
        try:
            extra_json = json.loads(json.dumps(dict(extra or {})))  # fail early on non-JSON values
            rank_json = {"format": RANK_STATE_FORMAT, "version": L.FORMAT_VERSION, "rank": self.rank,
                         "world_size": self.world_size, "step": step, "rng": R.capture_rng(),
                         "state": dict(rank_state) if rank_state is not None else None}
            json.dumps(rank_json)
            states = {name: _save_view(name, value) for name, value in app_state.items()}
        except Exception as exc:
            err = exc
        self._agree(err, "collecting the state for", tmp, step)
        fingerprints = self._fingerprint(states) if self.cfg.fingerprint else None

        err = None
        try:
            dcp.save(states, storage_writer=FileSystemWriter(tmp, sync_files=True))
            models = _models(app_state) if self.cfg.export_safetensors else {}
            if models:
                self.export_consolidated(tmp / L.EXPORT_FILE, models, metadata={"step": str(step)})
            write_json_durably(tmp / L.rank_file_name(self.rank), rank_json)
        except (Exception, CheckpointException) as exc:
            err = exc
        self._agree(err, "writing", tmp, step)

        err = None
        if self.rank == 0:
            try:
                self._commit(step, tmp, final, sorted(app_state), extra_json, fingerprints)
            except Exception as exc:
                err = exc
        self._agree(err, "committing", tmp, step)

        self._last_saved_step = step
        self._last_save_time = self._clock()
        if self.rank == 0:
            log.info("saved checkpoint %s in %.1f s", final, time.monotonic() - started)
            try:
                self.prune()
            except Exception as exc:  # retention must never fail a save that succeeded
                log.warning("pruning %s failed: %s", self.root, _short(exc))
        return final

    def _commit(self, step: int, tmp: Path, final: Path, names: list[str], extra: dict[str, Any],
                fingerprints: dict[str, str] | None) -> None:
        now = time.time()
        meta = {"format": L.FORMAT, "version": L.FORMAT_VERSION, "step": step, "world_size": self.world_size,
                "saved_at": now, "saved_at_utc": datetime.fromtimestamp(now, timezone.utc).isoformat(),
                "torch": torch.__version__, "app_state": names,
                "export": L.EXPORT_FILE if (tmp / L.EXPORT_FILE).is_file() else None, "extra": extra}
        if fingerprints is not None:
            meta["fingerprint"] = fingerprints
        write_json_durably(tmp / L.META_FILE, meta)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file() and p.name != L.COMPLETE_FILE}
        write_json_durably(tmp / L.COMPLETE_FILE, {"step": step, "files": files})
        fsync_dir(tmp)
        replaced = None
        if final.exists():  # the same step saved again (e.g. a rerun after resume): swap it
            replaced = final.with_name(final.name + L.DELETING_SUFFIX)
            remove_tree(replaced)
            os.rename(final, replaced)
        try:
            os.rename(tmp, final)
        except OSError:
            if replaced is not None:
                os.rename(replaced, final)
            raise
        fsync_dir(self.root)
        if replaced is not None:
            remove_tree(replaced)

    def _agree(self, err: BaseException | None, stage: str, tmp: Path, step: int) -> None:
        """All ranks learn whether any failed; if so rank 0 removes the .tmp folder and all raise."""
        failed = self._comm.failed_ranks(err is not None)
        if not failed:
            return
        cleanup = "rank 0 removes the unfinished folder"
        if self.rank == 0:
            cleanup = "the unfinished folder was removed" if remove_tree(tmp) else \
                "removing the unfinished folder FAILED (delete it by hand; resume ignores it)"
        cause = f": {_short(_unwrap(err)[0])}" if err is not None else ""  # the OSError, not DCP's traceback dump
        raise CheckpointSaveError(
            f"saving checkpoint step {step} failed while {stage} {tmp} (failed on rank(s) {failed}){cause}; "
            f"{cleanup}; earlier checkpoints in {self.root} are untouched") from err

    # ------------------------------------------------------------------ export
    def export_consolidated(self, path: str | os.PathLike, models: Mapping[str, Any],
                            metadata: Mapping[str, str] | None = None) -> Path:
        """One safetensors file with every model's FULL state dict, keys `<name>.<param>` (e.g.
        `student.blocks_u.0.attn.qkv.weight`, `teacher....`). `models`: modules or model adapters
        (`ModelState`, `ZeroModelState`). Collective: each model is gathered to rank 0's CPU
        (`full_state_dict()`), rank 0 writes `path` atomically (tmp + fsync + rename); a failure
        raises on every rank."""
        path = Path(path)
        tensors = gather_full_state_dicts(models, self.rank)
        err = None
        if self.rank == 0:
            try:
                write_safetensors(path, tensors, {"format": "pt", "producer": "tgdp", **dict(metadata or {})})
            except Exception as exc:
                err = exc
        failed = self._comm.failed_ranks(err is not None)
        if failed:
            raise CheckpointSaveError(f"exporting {path} failed on rank 0" + (f": {_short(err)}" if err else "")) from err
        return path

    # ------------------------------------------------------------------ discovery / retention
    def latest(self) -> Path | None:
        """The newest complete checkpoint of this run (rank 0 scans and reports broken folders,
        then broadcasts, so every rank resumes from the same one). Collective."""
        found = L.find_latest_complete(self.root) if self.rank == 0 else None
        found = self._comm.broadcast_object(None if found is None else str(found))
        return None if found is None else Path(found)

    def prune(self) -> list[Path]:
        """Rank 0: delete complete checkpoints beyond the newest `keep_last` (0 = keep all) and
        `.tmp` leftovers older than the newest complete one. Deletion renames to `.deleting`
        first, so an interrupted prune never leaves a half-deleted folder that looks complete."""
        if self.rank != 0:
            return []
        found = L.scan(self.root)
        doomed = [p for _, p in found.complete[:-self.cfg.keep_last]] if self.cfg.keep_last else []
        newest = found.complete[-1][0] if found.complete else None
        doomed += [p for p, _ in found.broken if p.name.endswith(L.TMP_SUFFIX) and newest is not None
                   and int(p.name[len("step_"):-len(L.TMP_SUFFIX)]) < newest]
        removed = []
        for path in doomed:
            trash = path.with_name(path.name.removesuffix(L.TMP_SUFFIX) + L.DELETING_SUFFIX)
            remove_tree(trash)
            os.rename(path, trash)
            removed.append(path)
            if not remove_tree(trash):
                log.warning("could not fully delete %s", trash)
        for leftover in found.deleting:
            remove_tree(leftover)
        if removed:
            log.info("pruned %s", ", ".join(p.name for p in removed))
        return removed

    # ------------------------------------------------------------------ load
    def resume(self, app_state: Mapping[str, Any], restore_rng: bool = True) -> LoadResult | None:
        """`load(latest(), verify=True)`, or None for a fresh run. Collective."""
        path = self.latest()
        return None if path is None else self.load(path, app_state, restore_rng=restore_rng, verify=True)

    def load(self, path: str | os.PathLike, app_state: Mapping[str, Any], restore_rng: bool = True,
             verify: bool = False) -> LoadResult:
        """Load `path` into `app_state` in place (Modules, Statefuls, dicts of tensors). Collective.

        Models and optimizers reshard: a checkpoint from W ranks loads on any number of ranks,
        sharded or not (DCP reads each rank's slices from the saved chunks). Only the entries
        named in `app_state` are read; a name the checkpoint lacks is an error.
        Per-rank JSON: rank r gets rank_<r>.json's `state` if the checkpoint has rank r, and its
        RNG states are restored (`restore_rng`); otherwise `rank_state` is None and a note says
        so. The .metadata pickle is read with the restricted unpickler, non-tensor values with
        weights_only=True: a tampered checkpoint raises UnsafeCheckpointError, running nothing.
        verify: recompute the fingerprint (tgdp/checkpoint/fingerprint.py) of every loaded entry the
        checkpoint recorded one for, and raise CheckpointError if any differs from the saved one
        (training resumes verify; a partial load into other dtypes, e.g. for eval, need not).
        """
        path = Path(path)
        self._rank0_check(lambda: self._validate(path, app_state))
        meta = read_json(path / L.META_FILE)
        step, saved_world = int(meta["step"]), int(meta["world_size"])
        states = {name: _load_view(name, value) for name, value in app_state.items()}
        try:
            dcp.load(states, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner())
        except (Exception, CheckpointException) as exc:
            causes = _unwrap(exc)
            unsafe = next((c for c in causes if isinstance(c, UnsafeCheckpointError)), None)
            if unsafe is not None:
                raise UnsafeCheckpointError(str(unsafe)) from exc
            raise CheckpointError(f"loading {path} into {sorted(app_state)} failed: {_short(causes[0])}") from exc

        notes: list[str] = []
        if verify and meta.get("fingerprint"):
            verified = self._verify_fingerprint(path, app_state, meta["fingerprint"])
            if self.rank == 0:
                log.info("checkpoint %s: %s", path.name, verified)
        if saved_world != self.world_size:
            notes.append(f"world size changed {saved_world} -> {self.world_size}: models and optimizer were "
                         "resharded; per-rank data state follows the loader's on_layout_change policy")
        rank_file = _read_rank_file(path, self.rank) if self.rank < saved_world else None
        rank0 = rank_file if self.rank == 0 else _read_rank_file(path, 0)
        rng_restored = False
        if rank_file is None:
            notes.append(f"the checkpoint has no state for rank {self.rank} (saved by {saved_world} ranks): "
                         "rank_state is None, RNG not restored; use rank0_state with the layout-change policy")
        elif restore_rng:
            rng_restored, rng_notes = R.restore_rng(rank_file["rng"])
            notes += rng_notes
        self._last_saved_step = step
        self._last_save_time = self._clock()
        if self.rank == 0:
            for note in notes:
                log.info("checkpoint %s: %s", path.name, note)
        return LoadResult(path=path, step=step, meta=meta, extra=dict(meta.get("extra") or {}),
                          saved_world_size=saved_world, rank_state=None if rank_file is None else rank_file["state"],
                          rank0_state=None if rank0 is None else rank0["state"], rng_restored=rng_restored,
                          notes=notes)

    def _fingerprint(self, states: Mapping[str, Any]) -> dict[str, str]:
        return fingerprint(states, self._comm._device() if self._comm.active else None)

    def _verify_fingerprint(self, path: Path, app_state: Mapping[str, Any], saved: Mapping[str, str]) -> str:
        """Collective. The note to log when what was loaded is exactly what was saved; raises otherwise."""
        names = sorted(name for name in app_state if name in saved)
        loaded = self._fingerprint({name: _save_view(name, app_state[name]) for name in names})
        differ = [name for name in names if loaded[name] != saved[name]]
        if differ:
            raise CheckpointError(
                f"{path}: the loaded {differ} differ from what was saved (fingerprints "
                f"{ {n: saved[n] for n in differ} } saved, { {n: loaded[n] for n in differ} } loaded, on "
                f"{self.world_size} rank(s)): resuming would silently continue from other weights; "
                "please report this with the checkpoint's meta.json")
        return (f"loaded state matches the saved fingerprints ({', '.join(f'{n} {loaded[n]}' for n in names)}) "
                f"on {self.world_size} rank(s)")

    @staticmethod
    def saved_entries(path: str | os.PathLike) -> set[str]:
        """The top-level app-state names a checkpoint holds ("student", "optim", ...), read from its
        DCP metadata through the restricted unpickler (so a caller can leave out what is absent)."""
        md = read_dcp_metadata(Path(path))  # restricted unpickler: refuses tampered metadata before DCP sees it
        planner_data = md.planner_data if isinstance(md.planner_data, dict) else {}
        return {v[0] for v in planner_data.values() if isinstance(v, tuple) and v} or \
            {fqn.split(".", 1)[0] for fqn in md.state_dict_metadata}

    def _validate(self, path: Path, app_state: Mapping[str, Any]) -> None:
        reason = L.incompleteness(path)
        if reason is not None:
            raise CheckpointError(f"{path} is not a complete checkpoint: {reason}")
        saved = self.saved_entries(path)
        missing = sorted(set(app_state) - saved)
        if missing:
            raise CheckpointError(f"{path} has no {missing}; it holds {sorted(saved)}")

    def _rank0_check(self, check: Callable[[], None]) -> None:
        """Run `check` on rank 0 and raise its CheckpointError on every rank (so no rank enters
        DCP's collectives while another has given up)."""
        problem = None
        if self.rank == 0:
            try:
                check()
            except CheckpointError as exc:
                problem = (isinstance(exc, UnsafeCheckpointError), str(exc))
            except Exception as exc:  # an unreadable file must not leave the other ranks waiting
                problem = (False, f"cannot use checkpoint: {_short(exc)}")
        problem = self._comm.broadcast_object(problem)
        if problem is not None:
            unsafe, message = problem
            raise (UnsafeCheckpointError if unsafe else CheckpointError)(message)


def _read_rank_file(path: Path, rank: int) -> dict[str, Any] | None:
    file = path / L.rank_file_name(rank)
    if not file.is_file():
        return None
    try:
        data = read_json(file)  # JSON only: a pickle payload in its place is never unpickled
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file} is not a readable JSON rank state ({_short(exc, 200)}); nothing in it was "
                              "executed") from exc
    if not isinstance(data, dict) or data.get("format") != RANK_STATE_FORMAT or data.get("rank") != rank:
        raise CheckpointError(f"{file} is not a tgdp rank state for rank {rank}")
    return data


def _check_type(name: str, value: Any) -> None:
    if isinstance(value, torch.optim.Optimizer):
        raise TypeError(f"app_state[{name!r}] is a bare optimizer: pass OptimizerState(model, optimizer) so its "
                        "state is keyed by parameter names (needed to reshard and to load on another world size)")
    if not isinstance(value, (nn.Module, Stateful, Mapping)):
        raise TypeError(f"app_state[{name!r}] is a {type(value).__name__}: expected a Module, a Stateful "
                        "(state_dict/load_state_dict) or a dict")


def _save_view(name: str, value: Any) -> Any:
    """What DCP writes for one app-state entry (state dicts taken here, before DCP's collectives;
    ZeRO adapters gather full tensors here, a collective of their own)."""
    _check_type(name, value)
    if isinstance(value, nn.Module):
        return ModelState(value).state_dict()
    if isinstance(value, Stateful):
        return value.state_dict()
    return dict(value)


def _load_view(name: str, value: Any) -> Any:
    """What DCP loads into: Modules become ModelState, the rest is loaded as given (in place)."""
    _check_type(name, value)
    return ModelState(value) if isinstance(value, nn.Module) else value


def _models(app_state: Mapping[str, Any]) -> dict[str, Any]:
    """The app-state entries that are models (bare modules, ModelState, or any model adapter with
    `full_state_dict()`, such as ZeroModelState), for the export."""
    out = {}
    for name, value in app_state.items():
        if isinstance(value, nn.Module) or callable(getattr(value, "full_state_dict", None)):
            out[name] = value
    return out
