"""TG-DP pretraining entry point.

    accelerate launch [--config_file ds_configs/X.yaml] tgdp/train.py --config tiny [field=value ...]
    torchrun --nproc_per_node 2 tgdp/train.py --config tiny data.shards=runs/shards
    python -m tgdp.train --config base run_dir=runs/base data.shards=/data/as2m

A run directory holds the resolved config, logs (metrics.jsonl, wandb), checkpoints, pictures and
the final export. Re-running the same command resumes from its newest complete checkpoint.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a file (accelerate / torchrun): make `tgdp` importable
    _repo = str(Path(__file__).resolve().parents[1])
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, _repo)

from tgdp.checkpoint import CheckpointSaveError, find_latest_complete  # noqa: E402
from tgdp.config import ConfigError, parse_cli, to_yaml  # noqa: E402
from tgdp.data.loader import EXIT_DATA_STALL, ShardLoader  # noqa: E402
from tgdp.data.sampling import load_shard_set  # noqa: E402
from tgdp.trainer import STOP_SIGNALS, DataStall, NonFiniteStop, StopRequested, TrainConfig, Trainer  # noqa: E402

log = logging.getLogger("tgdp.train")

# Exit codes besides 0 (done or stopped by a signal with a checkpoint) and 2 (unusable config or
# path, nothing started): see docs/reliability.md. EXIT_DATA_STALL (5): a rank waited past
# data.wait_timeout_s for a batch.
EXIT_NONFINITE = 3
EXIT_SAVE_FAILED = 4
EXIT_PEER_LOST = 6  # a rank stopped answering or died (the peer watchdog, tgdp/parallel/watchdog.py)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

FLAGS = {
    "--run-dir": ("run_dir", "run directory (config, logs, checkpoints, exports)"),
    "--shards": ("data.shards", "shard folder(s) written by make_shards (comma-separated)"),
    "--steps": ("total_steps", "optimizer steps"),
}


def parse_args(argv: Sequence[str] | None = None, prog: str | None = None) -> TrainConfig:
    """The TrainConfig this command line resolves to (exits with a message naming a bad field);
    the Slurm launchers validate a launch with it before anything is queued (tgdp.launch), and
    name themselves in its errors (`prog`)."""
    return parse_cli(TrainConfig, "train", argv, description="TG-DP pretraining.", flags=FLAGS, default_preset="tiny",
                     prog=prog)


def main(argv: Sequence[str] | None = None, stop: StopRequested | None = None) -> int:
    """Train; returns the exit code. SIGTERM / SIGUSR1 only set a flag while it runs: one that
    arrives before the loop stops the run before its first step. `stop`: a flag the caller
    installed and keeps (the `__main__` block does, and then ignores the signals while the process
    tears down); without it, main installs its own and restores the previous handlers on return."""
    own = stop is None
    stop = stop if stop is not None else StopRequested()
    stop.install()
    try:
        return _main(argv, stop)
    finally:
        if own:
            stop.uninstall()


def _main(argv: Sequence[str] | None, stop: StopRequested) -> int:
    cfg = parse_args(argv)
    try:
        check_paths(cfg)
    except ConfigError as exc:  # the same contract as a bad field: exit 2 before any work starts
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        trainer = Trainer(cfg, stop=stop)
    except ConfigError as exc:  # a rule that needs the launched processes (e.g. hsdp's shard group size)
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    agreed_end = False  # every rank ends here together (finished, stopped, or the shared non-finite stop)
    lost = ""  # ranks that stopped answering, when a collective failed
    try:
        if trainer.env.rank == 0:
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.run_dir) / "config.yaml").write_text(to_yaml(cfg))
        summary = trainer.train()
        agreed_end = True
    except NonFiniteStop as exc:
        agreed_end = True
        log.error("%s", exc)
        return EXIT_NONFINITE
    except DataStall as exc:  # every rank stopped together after a checkpoint
        agreed_end = True
        if trainer.env.rank == 0:  # the message holds every stuck rank's report
            log.error("%s", exc)
        return EXIT_DATA_STALL
    except ConfigError as exc:  # found after start-up (e.g. resuming under an incompatible config)
        log.error("%s", exc)
        return 2
    except (CheckpointSaveError, OSError) as exc:  # a save that failed on a peer fails here too
        lost = trainer.lost_peers()
        if lost:
            return _peer_lost(trainer, cfg, exc, lost)
        if isinstance(exc, CheckpointSaveError):
            log.error("%s. %s", exc, _resume_hint(cfg))
            return EXIT_SAVE_FAILED
        if exc.errno not in _DISK_FULL:
            raise
        log.error("writing %s failed: %s. %s", exc.filename or cfg.run_dir, os.strerror(exc.errno), _resume_hint(cfg))
        return EXIT_SAVE_FAILED
    except Exception as exc:  # a failed collective (gloo / NCCL error or timeout), or a bug
        lost = trainer.lost_peers()
        if not lost:
            raise
        return _peer_lost(trainer, cfg, exc, lost)
    finally:  # a group with a lost rank is left as it is: the process ends
        trainer.close(wait_for_peers=agreed_end, leave_group=not lost)
    if summary["stopped_by"] and summary["step"]:
        log.info("stopped at step %d by %s; a checkpoint was written, re-run to resume", summary["step"],
                 summary["stopped_by"])
    elif summary["stopped_by"]:
        log.info("stopped at step 0 by %s, before the first step (nothing to save); re-run to start",
                 summary["stopped_by"])
    return 0


def _peer_lost(trainer: Trainer, cfg: TrainConfig, exc: BaseException, lost: str) -> int:
    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    log.error("rank %d: %s; a collective failed (%s: %s). parallel.timeout_s=%g bounds such a wait. %s",
              trainer.env.rank, lost, type(exc).__name__, first_line, cfg.parallel.timeout_s,
              _resume_hint(cfg, "Check that rank's log and host"))
    return EXIT_PEER_LOST


def check_paths(cfg: TrainConfig) -> None:
    """Every path the run needs, checked before the process group, the model or any file exists,
    so a typo costs seconds and not a queue slot (the config schema itself was checked by
    parse_cli). Raises ConfigError naming the field, the path and what is expected."""
    try:
        load_shard_set(cfg.data.shards)  # reads only the index.json files
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data.shards={cfg.data.shards!r}: {exc}") from exc
    # The epoch's batches per rank and, in epoch mode, enough shards for every rank's decoders:
    # the loader's own checks, for the world size the launcher started (no process starts here).
    world = os.environ.get("WORLD_SIZE", "")
    ShardLoader(cfg.data, 0, int(world) if world.isdigit() and int(world) > 0 else 1)
    for field in ("mae_checkpoint", "official_checkpoint"):
        path = getattr(cfg.init, field)
        if path and not Path(path).is_file():
            raise ConfigError(f"init.{field}={path!r} is not a file: expected a checkpoint (.pth, .pt or .safetensors)")
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir={cfg.run_dir!r} is a file: expected a folder (created if missing)")
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run_dir={cfg.run_dir!r}: {existing} is not a writable folder")


def _resume_hint(cfg: TrainConfig, fix: str = "Free space (or fix the error)") -> str:
    """Where the run stands after a failure: its newest complete checkpoint is untouched."""
    latest = find_latest_complete(Path(cfg.run_dir) / cfg.checkpoint.folder, report=False)
    where = f"the newest complete checkpoint {latest} is intact" if latest else "no complete checkpoint yet"
    return f"Training stopped; {where}. {fix} and re-run the same command to resume"


if __name__ == "__main__":
    _stop = StopRequested()
    _stop.install()
    _code = main(stop=_stop)
    # The run is over: a stop signal during the teardown (a launcher that saw another rank end
    # sends one) has nothing left to stop and must not replace this rank's exit code. Ignored,
    # not caught: Python restores the default action of caught signals while it finalizes.
    for _sig in STOP_SIGNALS:
        signal.signal(_sig, signal.SIG_IGN)
    sys.exit(_code)
