"""The pretraining loop: shards -> TGDPTask (student + teacher + losses) -> optimizer -> EMA ->
metrics and checkpoints. It knows nothing of masking (the task), sharding (tgdp.parallel) or
checkpoint files (tgdp.checkpoint); it orders them and keeps the run resumable.

A step: `grad_accum` micro-batches (forward + backward each), a global gradient-norm clip, the
non-finite guard (skip the update; stop cleanly after `max_nonfinite_steps` in a row), the
optimizer update at the step's LR, the EMA update of the teacher at the step's momentum, logging,
and a checkpoint when due or when Slurm / the user asked the job to stop (SIGTERM, SIGUSR1).
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from tgdp import parallel as P
from tgdp.parallel.backend import build_backend
from tgdp.parallel.host_memory import fix_mmap_threshold
from tgdp.parallel.watchdog import PeerWatch
from tgdp.checkpoint import CheckpointConfig, CheckpointManager
from tgdp.checkpoint.files import read_json
from tgdp.checkpoint.layout import META_FILE
from tgdp.config import ConfigError, config_record, to_dict
from tgdp.data.config import DataConfig
from tgdp.data.loader import DataWaitInterrupted, DataWaitTimeout, ShardLoader
from tgdp.eval.periodic import PeriodicEvalConfig, PeriodicRetrieval
from tgdp.metrics import LoggingConfig, MetricLogger, Throughput, peak_flops
from tgdp.models.cavmae import build_model
from tgdp.models.config import ModelConfig
from tgdp.models.interop import load_mae, load_official
from tgdp.models.masking import num_kept
from tgdp.nonfinite import GUARD_MODES, NonFiniteGuard, NonFiniteStop
from tgdp.optim import OptimConfig, lr_schedule, set_lr
from tgdp.task import TaskConfig, TGDPTask, flops_per_sample
from tgdp.visualize import plot_loss_curves, plot_priority_map, plot_reconstruction

log = logging.getLogger("tgdp.train")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


_DEVICE_GUARD_NEEDS = ("nonfinite_guard=device needs torch's fused AdamW (optim.fused=true; unset means fused on "
                       "CUDA only) and a backend other than zero2 / zero3 (DeepSpeed decides inside its own step); "
                       "use nonfinite_guard=auto or host")


@dataclass
class InitConfig:
    """Where the student's weights come from before step 0 (the teacher starts equal to it)."""

    mae_checkpoint: str = ""  # ImageNet MAE ViT-B with decoder (docs/method.md 4.3)
    official_checkpoint: str = ""  # CAV-MAE / CAV-MAE Sync / TG-DP release (docs/method.md 6)
    strict: bool = False  # raise on missing / unexpected keys instead of reporting them


@dataclass
class TrainConfig:
    run_dir: str = "runs/tgdp"
    total_steps: int = 1000
    grad_accum: int = 1  # micro-batches per optimizer step (see docs/training.md on negatives)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    max_nonfinite_steps: int = 5  # consecutive non-finite steps before a clean stop
    # How a step decides to skip (tgdp/nonfinite.py): host = read the verdict every step (one
    # sync); device = fused AdamW skips on the device, the host reads the verdict a step later;
    # auto = device when the optimizer is fused (CUDA's default) and no DeepSpeed engine steps.
    nonfinite_guard: str = "auto"
    export_on_finish: bool = True  # write <run_dir>/export/model.safetensors at the end
    # Fault injection for reliability tests and drills: the loss of these steps (numbered as logged:
    # step N is the N-th optimizer step) is made NaN.
    inject_nonfinite_steps: list[int] = field(default_factory=list)
    inject_nonfinite_micro: int = -1  # which micro-batch of those steps (-1: all of them)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: P.ParallelConfig = field(default_factory=P.ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    init: InitConfig = field(default_factory=InitConfig)
    eval: PeriodicEvalConfig = field(default_factory=PeriodicEvalConfig)  # retrieval every N steps (eval/periodic.py)

    def validate(self) -> None:
        for name in ("total_steps", "grad_accum", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.nonfinite_guard not in GUARD_MODES:
            raise ConfigError(f"nonfinite_guard must be one of {list(GUARD_MODES)}, got {self.nonfinite_guard!r}")
        if self.nonfinite_guard == "device" and (self.optim.fused is False or self.parallel.engine_owns_step):
            raise ConfigError(_DEVICE_GUARD_NEEDS)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        for part in (self.model, self.task, self.data, self.parallel, self.optim, self.checkpoint, self.logging):
            part.validate()
        m, d = self.model, self.data
        if d.audio_frames != m.audio_frames:
            raise ConfigError(f"data.audio_frames ({d.audio_frames}) must equal model.audio_frames ({m.audio_frames})")
        if d.frame_size != m.image_size:
            raise ConfigError(f"data.frame_size ({d.frame_size}) must equal model.image_size ({m.image_size})")
        if d.split != "train":
            raise ConfigError(f"data.split must be 'train' for pretraining, got {d.split!r}")
        if not -1 <= self.inject_nonfinite_micro < self.grad_accum:
            raise ConfigError(f"inject_nonfinite_micro must be -1 (all) or a micro-batch index below grad_accum="
                              f"{self.grad_accum}, got {self.inject_nonfinite_micro}")
        if self.init.mae_checkpoint and self.init.official_checkpoint:
            raise ConfigError("set at most one of init.mae_checkpoint and init.official_checkpoint")
        if d.wait_timeout_s >= self.parallel.timeout_s:
            raise ConfigError(f"data.wait_timeout_s ({d.wait_timeout_s:g}) must be below parallel.timeout_s "
                              f"({self.parallel.timeout_s:g}): the other ranks wait for a stalled one in a collective")
        t = self.task
        if t.uses_teacher and not m.cls_token:
            raise ConfigError("task.mode=tgdp needs model.cls_token=true: the teacher ranks patches by their attention to "
                              "the CLS token and distils its CLS vector (or use task.mode=dual / single)")
        ratios = [("task.recon_mask_ratio", t.recon_mask_ratio)]
        if t.mode != "single":  # the schedules run from the first value to the last
            ratios.append(("task.contrastive_mask_ratio", t.contrastive_mask_ratio))
            if t.contrastive_mask_schedule != "constant":
                ratios.append(("task.contrastive_mask_ratio_end", t.contrastive_mask_ratio_end))
        for name, ratio in ratios:
            for modality, patches in (("audio", m.num_patches_a), ("video", m.num_patches_v)):
                if num_kept(patches, ratio) < 1:
                    raise ConfigError(f"{name}={ratio} keeps no {modality} patch of the {patches} the model has "
                                      "(model.audio_frames / image_size / patch_size): lower the ratio")


class StopRequested:
    """SIGTERM / SIGUSR1 set a flag; the loop checkpoints at the next step boundary and exits.

    Slurm sends SIGUSR1 (`--signal`) before the time limit and SIGTERM on preemption. torchrun
    forwards SIGTERM to its workers, SIGUSR1 only when listed in `--signals-to-handle`
    (docs/training.md). Every rank must agree to stop at the same step (a collective
    follows), so the flag is all-reduced once per step (`Trainer._agree`).
    """

    def __init__(self) -> None:
        self.flag = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def install(self) -> bool:
        """Catch the stop signals from now on; False when they already were (nothing changed)."""
        if self._previous:
            return False
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return True

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.flag = True
        self.signal_name = signal.Signals(signum).name


class DataStall(RuntimeError):
    """A rank waited longer than data.wait_timeout_s for its batches; every rank stopped after
    writing a checkpoint. The message names each stuck rank's decoder worker, shard and member."""


@dataclass
class _Fetched:
    """One step's batches as a rank fetched them; `stall` is the loader's report when it could not."""

    batches: list[dict[str, Any]]
    stall: str = ""


@dataclass
class StepResult:
    """What a step leaves for logging, still on the device: read only when the step is logged."""

    sums: dict[str, torch.Tensor]  # each of the task's terms averaged over the step's micro-batches
    norm: torch.Tensor  # global gradient norm before clipping (DeepSpeed's own under ZeRO)
    applied: bool | torch.Tensor  # a device flag under the device-side guard (tgdp/nonfinite.py)

    def terms(self) -> dict[str, float]:
        """Logged names -> floats. One device-to-host copy."""
        if not self.sums:
            return {}
        names = sorted(self.sums)
        values = dict(zip(names, torch.stack([self.sums[n].float() for n in names]).tolist()))
        return {_metric_name(k): v for k, v in values.items()}

    def grad_norm(self) -> float:
        return float(self.norm)


class Trainer:
    """Builds everything from a `TrainConfig` and runs `train()`; itself checkpointable state."""

    def __init__(self, cfg: TrainConfig, init_method: str | None = None, stop: StopRequested | None = None):
        """`stop`: the stop-signal flag, when the caller installed it before building the trainer
        (train.py does, so a signal during model building or resume stops the run before its first
        step instead of killing it)."""
        cfg.validate()
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        device = None if cfg.device == "auto" else cfg.device
        self.env = P.init_distributed(init_method=init_method, device=device, timeout_s=cfg.parallel.timeout_s)
        self.peers = PeerWatch.start(self.env.rank, self.env.world_size, cfg.parallel.timeout_s)
        allocator = fix_mmap_threshold(cfg.parallel.host_mmap_threshold_kib)
        if self.env.is_main:
            log.info("host allocator: mmap threshold %s", allocator)
        self.device = self.env.device
        # The SAME seed on every rank: each rank builds the full student before sharding and keeps
        # its own slice, so all ranks must build identical weights (DDP / DeepSpeed would broadcast
        # rank 0's; FSDP2 does not). Per-rank randomness never comes from the global RNG (masks use
        # generators derived from (seed, step, rank, micro-batch)).
        torch.manual_seed(cfg.seed)
        self.step = 0

        student = _build_student(cfg)
        # The teacher is built once the student is sharded (one full model per rank at a time),
        # from the same seed (the student's initial weights), and then made equal to the
        # initialised student shard-locally (`reset_teacher`: every trained parameter).
        make_teacher = (lambda: _seeded(cfg.seed, build_model, cfg.model)) if cfg.task.uses_teacher else None
        self.backend = build_backend(cfg.parallel, self.env, student, make_teacher, cfg.optim,
                                     micro_batch_size=cfg.data.batch_size, grad_accum=cfg.grad_accum)
        task = TGDPTask(student, cfg.task, cfg.total_steps, teacher=self.backend.teacher)
        task.reset_teacher()
        self.task = task
        self.lrs = lr_schedule(cfg.optim, cfg.total_steps)
        if cfg.data.pin_memory is None:  # pinned host batches make the `non_blocking` copies really async
            cfg.data.pin_memory = self.device.type == "cuda"
        self.stop = stop if stop is not None else StopRequested()
        self.loader = ShardLoader(cfg.data, self.env.rank, self.env.world_size, stop_requested=lambda: self.stop.flag)
        self._data_state: dict[str, Any] | None = None  # the loader's position before a fetch not yet trained on
        self.ckpt = CheckpointManager(self.run_dir, cfg.checkpoint, self.env.rank, self.env.world_size)
        self.flops_per_sample = flops_per_sample(cfg.model, cfg.task)
        self.guard = NonFiniteGuard(
            cfg.max_nonfinite_steps, self.device, self._guard_mode(),
            hint=f"a checkpoint of the last good state is in {self.ckpt.root}. Lower optim.lr, check the data "
                 "(data/skipped), or use parallel.mixed_precision=fp32 to investigate")
        self.run_id: str | None = None
        self._last_saved_step = -1

    def _guard_mode(self) -> str:
        """auto -> device where the optimizer can skip on the device (fused AdamW, not DeepSpeed)."""
        device_ok = self.backend.can_skip_on_device
        mode = self.cfg.nonfinite_guard
        if mode == "device" and not device_ok:  # optim.fused unset and the parameters on the CPU
            raise ConfigError(_DEVICE_GUARD_NEEDS)
        return ("device" if device_ok else "host") if mode == "auto" else mode

    # ------------------------------------------------------------------ state
    def _models(self) -> dict[str, Any]:
        models = {"student": self.task.student}
        if self.task.teacher is not None:
            models["teacher"] = self.task.teacher
        return models

    def app_state(self) -> dict[str, Any]:
        self.guard.settle()  # the streak must count every step taken
        return {**self.backend.checkpoint_state(self._models()),
                "trainer": {"step": self.step, "nonfinite_streak": self.guard.streak}}

    def resume(self) -> bool:
        """Continue from the newest COMPLETE checkpoint of the run dir, if there is one."""
        latest = self.ckpt.latest()
        if latest is None:
            return False
        self._check_resume_config(latest)
        state = self.app_state()
        self.backend.drop_missing_entries(state, self.ckpt.saved_entries(latest), latest.name)
        result = self.ckpt.load(latest, state, verify=True)  # refuses a load that differs from the save
        self.step = int(state["trainer"]["step"])
        self.guard.streak = int(state["trainer"]["nonfinite_streak"])
        data_state = result.rank_state if result.rank_state is not None else result.rank0_state
        if data_state is not None:
            self.loader.load_state_dict(data_state["data"])
        self.run_id = result.extra.get("run_id")
        self._last_saved_step = self.step
        for note in result.notes:
            log.warning(note)
        log.info("resumed from %s at step %d", result.path, self.step)
        return True

    # What a resumed run must share with the run that wrote the checkpoint: the weights' shapes
    # (model) and what the optimizer state and schedules mean (task mode, optimizer). Other
    # changes (total_steps, logging, data paths, checkpoint cadence) are legitimate on resume.
    _RESUME_MUST_MATCH = ("model", "task.mode", "task.seed", "optim.betas", "optim.weight_decay")

    def _check_resume_config(self, path: Path) -> None:
        """Refuse to resume a checkpoint written under an incompatible config; note other changes.

        Why: DCP would either fail deep inside the load with a shape error, or silently continue
        e.g. a `dual` run as `tgdp` with another mask seed. The saved config is meta.json's copy.
        """
        saved = read_json(path / META_FILE).get("extra", {}).get("config")
        if not isinstance(saved, dict):
            log.warning("%s has no saved config: resuming without a compatibility check", path)
            return
        now = config_record(self.cfg)  # scrubbed like the saved copy, so only real changes differ

        def flat(d: Any, prefix: str = "") -> dict[str, Any]:
            if not isinstance(d, dict):
                return {prefix: d}
            return {k: v for key, value in d.items() for k, v in flat(value, f"{prefix}{key}.").items()}

        old, new = {k.rstrip("."): v for k, v in flat(saved).items()}, {k.rstrip("."): v for k, v in flat(now).items()}
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        fatal = [k for k in changed if any(k == m or k.startswith(m + ".") for m in self._RESUME_MUST_MATCH)]
        if fatal:
            details = "; ".join(f"{k}: checkpoint {old.get(k)!r}, now {new.get(k)!r}" for k in fatal)
            raise ConfigError(f"cannot resume {path} with this config ({details}). Use the run's own config "
                              f"({self.run_dir / 'config.yaml'}) or a new run_dir")
        if changed:
            log.warning("resuming %s with changed settings: %s", path.name,
                        ", ".join(f"{k}={old.get(k)!r}->{new.get(k)!r}" for k in changed))

    def save(self) -> Path:
        data = self._data_state if self._data_state is not None else self.loader.state_dict()
        path = self.ckpt.save(self.step, self.app_state(),
                              extra={"run_id": self.run_id, "config": config_record(self.cfg)},
                              rank_state={"data": data})
        self._last_saved_step = self.step
        return path

    def lost_peers(self) -> str:
        """After a failure: the ranks that stopped answering (died, hang, unreachable), or "" when
        every other rank is alive or failing too (tgdp/parallel/watchdog.py)."""
        return self.peers.lost_peers() if self.peers is not None else ""

    def close(self, wait_for_peers: bool = False, leave_group: bool = True) -> None:
        """Stop the heartbeat and leave the process group (after a barrier when every rank is
        known to end together). leave_group=False after a lost rank: the group is left as it is
        and the process ends."""
        if self.peers is not None and not self.peers.stop():
            log.warning("rank %d: the peer heartbeat is still inside a store call (the store may be gone); "
                        "the process may abort while it exits", self.env.rank)
        if leave_group:
            P.destroy_distributed(wait_for_peers=wait_for_peers)

    # ------------------------------------------------------------------ the loop
    def _batches(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self.loader

    def train(self) -> dict[str, Any]:
        """Run to `total_steps` (or to a requested stop); returns a small summary."""
        cfg, env = self.cfg, self.env
        self.resume()
        logger = MetricLogger(cfg.logging, self.run_dir, run_id=self.run_id, config=to_dict(cfg), rank=env.rank,
                              total_steps=cfg.total_steps, start_step=self.step)
        self.run_id = logger.run_id if env.rank == 0 else self.run_id
        override = None if cfg.logging.peak_tflops is None else cfg.logging.peak_tflops * 1e12
        peak, peak_source = peak_flops(self.device, override=override)
        meter = Throughput(self.flops_per_sample, peak, env.world_size, self.device)
        batches = meter.timed(self._batches())
        periodic = PeriodicRetrieval(cfg.eval, cfg.model.audio_frames, cfg.model.image_size, self.task, self.device)
        installed = self.stop.install()
        stopped_by, stalled = "", ""
        try:
            while self.step < cfg.total_steps:
                # The step's batches come before its first collective, and every rank learns
                # whether any rank got a stop signal or could not get its batches: they stop together.
                fetched = self._fetch(batches)
                stopped_by, stalled = self._agree(fetched)
                if stopped_by or stalled:
                    break
                out, result = self._take_step(fetched)
                meter.step_done(cfg.data.batch_size * cfg.grad_accum,
                                self._flops_at(self.step - 1))
                if logger.should_log(self.step) or self.step == cfg.total_steps:
                    self.guard.settle()  # skips are logged (and a stop raised) before the record
                    record = {**_mean_over_ranks(result.terms(), self.device),
                              "train/lr": float(self.lrs[self.step - 1]),
                              "train/ema_momentum": self.task.momentum(self.step - 1),
                              "train/grad_norm": result.grad_norm(), "train/step_applied": float(result.applied),
                              "train/contrastive_mask_ratio": out.contrastive_mask_ratio,
                              "data/skipped": self.loader.skipped,
                              "data/shard_errors": self.loader.shard_errors, **meter.summary()}
                    record["perf/peak_source"] = peak_source
                    logger.log(self.step, record)
                if periodic.maybe_run(self.step, cfg.total_steps, logger):  # all ranks: the work is split
                    meter.reset()  # evaluation time is not training throughput
                if env.rank == 0 and cfg.logging.image_every and self.step % cfg.logging.image_every == 0:
                    logger.log_images(self.step, self._pictures(out))
                if self.ckpt.should_save(self.step):
                    self.save()
            self.guard.settle()
            finished = self.step >= cfg.total_steps and cfg.checkpoint.save_final
            if (stopped_by or stalled or finished) and self._last_saved_step != self.step and self.step > 0:
                self.save()  # (a stop before the first step of a new run has nothing to save)
            if stalled:
                saved = f"A checkpoint of step {self.step} was written" if self.step else "No step was trained yet"
                raise DataStall(f"{stalled}. {saved}; once the data is readable, re-run the same command to resume")
            if self.step >= cfg.total_steps and cfg.export_on_finish:
                self.export()
        except NonFiniteStop:
            self.save()
            raise
        finally:
            if installed:
                self.stop.uninstall()
            logger.close()
        metrics = self.run_dir / "metrics.jsonl"
        if env.rank == 0 and cfg.logging.image_every and metrics.exists():  # the whole run so far, resumes included
            plot_loss_curves(self.run_dir / "images" / "loss_curves.png", metrics, title=f"run {self.run_id}")
        return {"step": self.step, "stopped_by": stopped_by, "run_id": self.run_id}

    def _flops_at(self, step: int) -> float:
        return flops_per_sample(self.cfg.model, self.cfg.task, self.task.contrastive_mask_ratio(step))

    def _fetch(self, batches: Iterator[dict[str, Any]]) -> "_Fetched":
        """The next step's batches, or why this rank has none: a stop was requested first (then
        nothing is fetched, or a wait is given up), or the loader waited past data.wait_timeout_s.
        The loader's position before the fetch is kept: a checkpoint written instead of the step
        must not count its batches."""
        self._data_state = self.loader.state_dict()
        if self.stop.flag:
            return _Fetched([])
        try:
            return _Fetched([next(batches) for _ in range(self.cfg.grad_accum)])
        except DataWaitInterrupted:
            return _Fetched([])
        except DataWaitTimeout as exc:
            return _Fetched([], stall=str(exc))

    def _agree(self, fetched: "_Fetched") -> tuple[str, str]:
        """(stop signal, data stall) as every rank sees them: one small all-reduce per step on the
        CPU (the gloo side of the group, so the CUDA queue keeps running); a stall's messages are
        gathered from the ranks that stalled (rare)."""
        flags = torch.tensor([1.0 if self.stop.flag else 0.0, 1.0 if fetched.stall else 0.0])
        multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if multi:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, stall = bool(flags[0].item()), bool(flags[1].item())
        if stall:
            messages = [fetched.stall]
            if multi:
                messages = [None] * dist.get_world_size()
                dist.all_gather_object(messages, fetched.stall)
            return "", "; ".join(m for m in messages if m)
        if stop:
            return self.stop.signal_name or "another rank's signal", ""
        return "", ""

    def train_step(self, batches: Iterator[dict[str, Any]]):
        """Take the next step's batches from `batches`, queue one optimizer step, count it, and
        read the non-finite verdicts that are ready (benchmarks; `train` fetches first)."""
        self._data_state = None
        return self._take_step(_Fetched([next(batches) for _ in range(self.cfg.grad_accum)]))

    def _take_step(self, fetched: "_Fetched"):
        """Queue one optimizer step on fetched batches, count it, and read the non-finite
        verdicts that are ready (under the device-side guard, the previous step's: this one stays
        in flight)."""
        self._data_state = None  # the loader's live position now includes this step's batches
        out, result = self._one_step(fetched.batches)
        self.step += 1
        if self.peers is not None:
            self.peers.step = self.step
        self.guard.settle(wait=False)
        return out, result

    def _one_step(self, fetched: list[dict[str, Any]]):
        """One optimizer step, queued without reading anything back from the device (device-side
        guard) or with one read, the apply-or-skip decision (host-side guard).

        Why: every `.item()` / `float(tensor)` drains the CUDA queue, and the GPU then idles while
        the CPU launches the next kernels. Loss terms stay on the device (`StepResult.terms` reads
        them only when a step is logged). The non-finite guard needs no read before a backward: a
        NaN loss makes NaN gradients, so the gradient norm decides (tgdp/nonfinite.py); the
        backend takes or skips the update (`TrainingBackend.step`).
        """
        cfg, task = self.cfg, self.task
        step = self.step
        set_lr(self.backend.optimizer, float(self.lrs[step]))
        sums: dict[str, torch.Tensor] = {}
        losses = []
        out = None
        inputs = [(b["audio"].to(self.device, non_blocking=True), b["frames"].to(self.device, non_blocking=True))
                  for b in fetched]
        # Accumulation keeps the WHOLE step's batch as InfoNCE negatives (docs/training.md).
        bank = task.contrastive_bank(inputs, step, self.env.rank) \
            if cfg.grad_accum > 1 and cfg.task.contrastive_loss == "symmetric_gather" else None
        for micro, (audio, frames) in enumerate(inputs):
            out = task(audio, frames, step, self.env.rank, micro, grad_accum=cfg.grad_accum, bank=bank)
            if step + 1 in cfg.inject_nonfinite_steps and cfg.inject_nonfinite_micro in (-1, micro):
                out.loss = out.loss * float("nan")
            losses.append(out.loss.detach())
            for name, value in out.scalars().items():
                sums[name] = sums[name] + value / cfg.grad_accum if name in sums else value / cfg.grad_accum
            self.backend.backward(out.loss, last=micro == cfg.grad_accum - 1)  # this micro-batch's share
        decision = self.backend.step(losses, self.guard, cfg.optim.grad_clip)
        if isinstance(decision.applied, torch.Tensor):  # the device-side guard's flag gates the EMA
            task.update_teacher(step, gate=decision.applied)
        elif decision.applied:
            task.update_teacher(step)
        self.guard.record(step + 1, decision.applied)
        return out, StepResult(sums, decision.norm, decision.applied)

    def _pictures(self, out) -> dict[str, Path]:
        """Reconstruction and teacher priority map of the first sample of the last micro-batch."""
        folder = self.run_dir / "images"
        p = self.cfg.model.patch_size
        audio, frame = out.audio[0].float().cpu(), out.frames[0].float().cpu()
        pics = {"reconstruction": plot_reconstruction(
            folder / f"reconstruction_{self.step:07d}.png", audio, frame,
            out.recon_mask_a.mask[0].cpu(), out.recon_mask_v.mask[0].cpu(), out.pred_a[0].float().cpu(),
            out.pred_v[0].float().cpu(), p, norm_pix=self.cfg.model.norm_pix_loss, title=f"step {self.step}")}
        if out.teacher_scores_a is not None:
            pics["teacher_priority"] = plot_priority_map(
                folder / f"priority_{self.step:07d}.png", audio, frame, out.teacher_scores_a[0].float().cpu(),
                out.teacher_scores_v[0].float().cpu(), 1 - out.contrastive_mask_a.mask[0].cpu(),
                1 - out.contrastive_mask_v.mask[0].cpu(), p, title=f"teacher priorities, step {self.step}")
        return pics

    def export(self) -> Path:
        return self.ckpt.export_consolidated(self.run_dir / "export" / "model.safetensors",
                                             self.backend.model_states(self._models()))


def _mean_over_ranks(terms: dict[str, float], device: torch.device) -> dict[str, float]:
    """Loss terms averaged over ranks: each rank's InfoNCE is the mean over ITS rows, so the mean of
    the ranks' values is the global-batch loss (tgdp.losses.info_nce). One small all-reduce."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not terms:
        return terms
    names = sorted(terms)
    values = torch.tensor([terms[n] for n in names], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    values /= dist.get_world_size()
    return dict(zip(names, values.tolist()))


def _metric_name(term: str) -> str:
    """TaskOutput term -> logged name: `loss` (the total), `loss/<part>`, `train/<other>`."""
    if term == "loss_total":
        return "loss"
    return "loss/" + term[len("loss_"):] if term.startswith("loss_") else "train/" + term


def _seeded(seed: int, build: Callable[..., Any], *args: Any) -> Any:
    torch.manual_seed(seed)
    return build(*args)


def _build_student(cfg: TrainConfig):
    student = build_model(cfg.model)
    if cfg.init.mae_checkpoint:
        report = load_mae(student, cfg.init.mae_checkpoint, strict=cfg.init.strict)
        log.info("initialised from ImageNet MAE %s: %s", cfg.init.mae_checkpoint, report)
    elif cfg.init.official_checkpoint:
        report = load_official(student, cfg.init.official_checkpoint, strict=cfg.init.strict)
        log.info("initialised from %s: %s", cfg.init.official_checkpoint, report)
    return student

