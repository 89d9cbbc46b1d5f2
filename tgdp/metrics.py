"""Training metrics: peak FLOPs, throughput / MFU / memory, and the one logger the trainer calls.

Every metric name carries its unit (`perf/samples_per_s`, `perf/mfu_pct`, `mem/peak_gib`), and MFU
comes from an explicit peak-FLOPs table (torchtitan's `tools/utils.py::get_peak_flops` values,
bf16 dense) so that "is sharding worth it" is measured, not assumed.

`MetricLogger` writes each record three ways on rank 0: `metrics.jsonl` in the run dir (tests and
the quick-start read losses without wandb), wandb (offline unless WANDB_MODE says otherwise, so no
account is needed), and a tqdm bar. Configs are scrubbed of anything that looks like a secret
before they reach any of them; environment variables are never logged.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import secrets
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, TextIO

import torch

from tgdp.config import ConfigError
from tgdp.redact import scrub_secrets, secret_env_values

GIB = 2**30
# (pattern on torch.cuda.get_device_name, bf16 dense FLOP/s, label). Order matters: variants first.
# A100/H100/H200/B200/L40S/MI3xx: torchtitan tools/utils.py get_peak_flops; others: NVIDIA datasheets
# (the dense figure, i.e. half the "with sparsity" one). V100/T4 have no bf16: fp16 tensor cores.
PEAK_FLOPS_TABLE: tuple[tuple[str, float, str], ...] = (
    (r"H100.*NVL", 835e12, "H100 NVL bf16 dense"),
    (r"H100.*PCIe", 756e12, "H100 PCIe bf16 dense"),
    (r"H100|H800|GH200", 989e12, "H100 SXM bf16 dense"),  # torch names the SXM part "H100 80GB HBM3"
    (r"H200", 989e12, "H200 bf16 dense"),
    (r"\bH20\b", 148e12, "H20 bf16 dense"),
    (r"B200", 2.25e15, "B200 bf16 dense"),
    (r"A100|A800", 312e12, "A100 bf16 dense"),
    (r"\bA10\b", 125e12, "A10 bf16 dense"),  # not A10G (a lower-clocked part): measured instead
    (r"\bA30\b", 165e12, "A30 bf16 dense"),
    (r"\bA40\b", 149.7e12, "A40 bf16 dense"),
    (r"L40S", 362e12, "L40S bf16 dense"),
    (r"\bL40\b", 181e12, "L40 bf16 dense"),
    (r"\bL4\b", 121e12, "L4 bf16 dense"),
    (r"V100", 125e12, "V100 SXM2 fp16 tensor core"),
    (r"\bT4\b", 65e12, "T4 fp16 tensor core"),
    (r"MI300X|MI325X", 1300e12, "MI300X bf16 dense"),
    (r"MI250X", 191.5e12, "MI250X bf16 dense (per GCD)"),
)


def measure_peak_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, size: int = 1024,
                       repeats: int = 5, clock: Callable[[], float] = time.perf_counter) -> float:
    """FLOP/s of a square GEMM (median of `repeats` timed torch.mm calls, after one warm-up).

    For CPUs (no honest datasheet number: it depends on cores, AVX width, threads) and unknown
    accelerators. It is an ACHIEVABLE peak, so CPU MFU reads high compared with a GPU's datasheet MFU.
    """
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.mm(a, b)
    sync()
    times = []
    for _ in range(max(1, repeats)):
        start = clock()
        torch.mm(a, b, out=out)
        sync()
        times.append(clock() - start)
    return 2.0 * size**3 / max(statistics.median(times), 1e-9)


def table_peak_flops(device_name: str) -> tuple[float, str] | None:
    """(bf16 dense FLOP/s, label) of a GPU named like torch.cuda.get_device_name, or None if unknown."""
    for pattern, flops, label in PEAK_FLOPS_TABLE:
        if re.search(pattern, device_name, re.IGNORECASE):
            return flops, label
    return None


def peak_flops(device: torch.device | str, override: float | None = None, cpu_size: int = 1024) -> tuple[float, str]:
    """(peak FLOP/s, where the number came from): a config override, the GPU table, or a measured GEMM."""
    device = torch.device(device)
    if override is not None:
        return float(override), "config override"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = table_peak_flops(name)
        if known is not None:
            return known[0], f"table: {name!r} -> {known[1]} (torchtitan get_peak_flops / datasheet)"
        flops = measure_peak_flops(device, torch.bfloat16, size=8192, repeats=5)
        return flops, f"measured: bf16 torch.mm 8192^3 on unknown GPU {name!r} (median of 5)"
    flops = measure_peak_flops(device, torch.float32, size=cpu_size, repeats=5)
    return flops, f"measured: fp32 torch.mm {cpu_size}^3, {torch.get_num_threads()} threads (median of 5)"


def mfu_pct(flops_per_sample: float, samples_per_s_per_device: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation in percent: analytic FLOPs actually done per second / the device's peak."""
    return 100.0 * flops_per_sample * samples_per_s_per_device / peak_flops_per_s


def memory_metrics(device: torch.device | str) -> dict[str, float]:
    """Peak memory since the process started: CUDA allocator peaks, or this process's max RSS on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        peak = torch.cuda.max_memory_allocated(device)
        return {"mem/peak_gib": peak / GIB, "mem/peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
                "mem/peak_pct": 100.0 * peak / total}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"mem/peak_gib": rss * (1 if sys.platform == "darwin" else 1024) / GIB}


class Throughput:
    """Step time, data-wait %, samples/s and MFU over a window (the steps since the last `summary`).

    Data wait is wall time blocked on the loader (`data_wait()` / `timed(loader)`). On a GPU the
    window totals are exact once the step's results are synchronised (logging the loss does that,
    or pass `synchronize`); single steps are not, because CUDA kernels run asynchronously. Samples
    are per rank: equal batches per rank make the global rate `world_size` x the local one, and rank
    0's window stands for all (as torchtitan). The clock is injectable so the arithmetic is testable.
    """

    def __init__(self, flops_per_sample: float = 0.0, peak_flops_per_s: float | None = None, world_size: int = 1,
                 device: torch.device | str | None = None, clock: Callable[[], float] = time.perf_counter,
                 synchronize: Callable[[], None] | None = None) -> None:
        self.flops_per_sample, self.peak, self.world_size = flops_per_sample, peak_flops_per_s, world_size
        self.device, self.clock, self.synchronize = device, clock, synchronize
        self.reset()

    def reset(self) -> None:
        """Start a new window now (call after compile / warm-up so they do not count)."""
        self._start, self._data_s, self._steps, self._samples, self._flops = self.clock(), 0.0, 0, 0, 0.0

    @contextlib.contextmanager
    def data_wait(self) -> Iterator[None]:
        """Count the time inside the `with` block as waiting for data."""
        start = self.clock()
        try:
            yield
        finally:
            self._data_s += self.clock() - start

    def timed(self, iterable: Iterable[Any]) -> Iterator[Any]:
        """Iterate `iterable`, counting the time spent inside its `next` as data wait."""
        it = iter(iterable)
        while True:
            with self.data_wait():
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item

    def step_done(self, samples: int, flops_per_sample: float | None = None) -> None:
        """One optimizer step of `samples` samples on this rank (FLOPs vary if the mask ratio is scheduled)."""
        self._steps += 1
        self._samples += samples
        self._flops += samples * (self.flops_per_sample if flops_per_sample is None else flops_per_sample)

    def summary(self) -> dict[str, float]:
        """The window's metrics (empty if no step finished); starts the next window."""
        if self._steps == 0:
            return {}
        if self.synchronize is not None:
            self.synchronize()
        elapsed = max(self.clock() - self._start, 1e-12)
        per_device = self._samples / elapsed
        out = {
            "perf/step_time_s": elapsed / self._steps,
            "perf/data_wait_s": self._data_s / self._steps,
            "perf/data_wait_pct": min(100.0, max(0.0, 100.0 * self._data_s / elapsed)),
            "perf/samples_per_s": per_device * self.world_size,
            "perf/samples_per_s_per_device": per_device,
        }
        if self._flops > 0:
            out["perf/tflops_per_s_per_device"] = self._flops / elapsed / 1e12
            if self.peak:
                out["perf/mfu_pct"] = 100.0 * self._flops / elapsed / self.peak
        if self.device is not None:
            out.update(memory_metrics(self.device))
        self.reset()
        return out


# ---------------------------------------------------------------------------------------------- logger
@dataclass
class LoggingConfig:
    project: str = "tgdp"  # wandb project
    wandb: bool = True  # False: metrics.jsonl + console only (wandb is not even imported)
    log_every: int = 10  # steps between scalar records
    image_every: int = 1000  # steps between reconstruction / priority pictures; 0 = never
    console: bool = True  # rank 0 progress: a tqdm bar on a terminal, one line per record in a log file
    group: Optional[str] = None  # wandb group; offline job segments of one run are grouped by run id
    peak_tflops: Optional[float] = None  # MFU denominator override, TFLOP/s per device (peak_flops(override=))

    def validate(self) -> None:
        if not self.project or "/" in self.project:
            raise ConfigError(f"logging.project must be a non-empty name without '/', got {self.project!r}")
        if self.log_every < 1:
            raise ConfigError(f"logging.log_every must be >= 1, got {self.log_every}")
        if self.image_every < 0:
            raise ConfigError(f"logging.image_every must be >= 0 (0 = never), got {self.image_every}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError(f"logging.peak_tflops must be > 0 when set, got {self.peak_tflops}")


WANDB_MODES = ("offline", "online", "disabled", "shared")
POSTFIX = (("loss", ("loss/total", "loss")), ("samples/s", ("perf/samples_per_s",)))


def _number(v: Any) -> Any:
    """Tensors and numpy values -> Python numbers / lists, which json and wandb both take."""
    if isinstance(v, torch.Tensor):
        v = v.detach().float().cpu()
        return v.item() if v.numel() == 1 else v.tolist()
    return v.tolist() if hasattr(v, "tolist") and not isinstance(v, (list, tuple)) else v  # numpy


class MetricLogger:
    """The trainer's only sink: `log(step, {...})`, `log_images(step, {name: png})`, `close()`.

    Ranks other than 0 get a no-op logger. `run_id` is the id of the LOGICAL run: store it in the
    checkpoint and pass it back on resume. Online, wandb resumes that run (`resume="allow"`).
    Offline runs cannot be resumed as one run (wandb#2423), so a resumed offline job writes a new
    run `<run_id>-seg<k>` in the group `<run_id>`. `start_step` is the step of the checkpoint
    resumed from: `read_metrics` drops the records the previous job wrote after it.
    wandb runs with console capture, git and code saving off: they can carry secrets (a token in a
    remote URL, a library printing one). It still records `sys.argv`: never pass secrets as arguments.
    """

    def __init__(self, cfg: LoggingConfig, run_dir: str | Path, *, run_name: str | None = None,
                 run_id: str | None = None, config: Mapping[str, Any] | None = None, rank: int = 0,
                 total_steps: int | None = None, start_step: int = 0, console_file: TextIO | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        cfg.validate()
        self.cfg, self.run_dir, self.rank = cfg, Path(run_dir), rank
        self.enabled = rank == 0
        self.run_id: str | None = run_id or (secrets.token_hex(4) if self.enabled else None)
        self.wandb_id: str | None = None
        self._run: Any = None
        self._bar: Any = None
        self._console: TextIO | None = None
        self._jsonl: TextIO | None = None
        if not self.enabled:  # only rank 0 logs
            return
        env = os.environ if env is None else env
        mode = env.get("WANDB_MODE") or "offline"  # offline by default: no account, no network
        mode = "offline" if mode == "dryrun" else mode
        if mode not in WANDB_MODES:
            raise ConfigError(f"WANDB_MODE must be one of {list(WANDB_MODES)}, got {mode!r}")
        self._secrets = secret_env_values(env)
        safe_config = scrub_secrets(dict(config or {}), self._secrets)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._write({"event": "start", "step": start_step, "time": time.time(), "run_id": self.run_id,
                     "config": safe_config})
        if cfg.wandb and mode != "disabled":
            try:
                self._run = self._init_wandb(mode, run_name, safe_config)
            except BaseException:
                self.close(exit_code=1)
                raise
        self._console = (console_file or sys.stderr) if cfg.console else None
        self._total = total_steps
        if self._console is not None and self._console.isatty():  # a bar on a terminal; lines in a log file
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, file=self._console, dynamic_ncols=True,
                             unit="step")

    def _init_wandb(self, mode: str, run_name: str | None, config: dict[str, Any]) -> Any:
        import wandb

        wandb_dir = self.run_dir / "wandb"
        self.wandb_id, group = self.run_id, self.cfg.group
        if mode == "offline":
            done = list(wandb_dir.glob(f"offline-run-*-{self.run_id}")) + \
                list(wandb_dir.glob(f"offline-run-*-{self.run_id}-seg*"))
            if done:
                self.wandb_id = f"{self.run_id}-seg{len(done)}"
            group = group or self.run_id
        settings = wandb.Settings(silent=True, console="off", disable_git=True, save_code=False)
        try:
            return wandb.init(project=self.cfg.project, name=run_name, dir=str(self.run_dir), id=self.wandb_id,
                              resume="allow", config=config, group=group, mode=mode, settings=settings,
                              reinit="create_new")
        except Exception as exc:  # wandb raises several types; all mean "no logging backend"
            raise RuntimeError(f"wandb.init failed in mode {mode!r} ({exc}). Without an account set "
                               "WANDB_MODE=offline (the default) or logging.wandb=false.") from exc

    def _write(self, record: dict[str, Any]) -> None:
        if self._jsonl is None:  # closed
            return
        self._jsonl.write(json.dumps(record, default=str) + "\n")  # NaN stays NaN (Python's json reads it)
        self._jsonl.flush()

    def should_log(self, step: int) -> bool:
        return step % self.cfg.log_every == 0

    def should_log_images(self, step: int) -> bool:
        return self.cfg.image_every > 0 and step % self.cfg.image_every == 0

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record scalars (tensors are read with .item(): call at log steps only, it synchronises)."""
        if not self.enabled:
            return
        values = scrub_secrets({k: _number(v) for k, v in metrics.items()}, self._secrets)
        self._write({"step": step, "time": time.time(), **values})
        if self._run is not None:
            self._run.log(values, step=step)
        if self._console is not None:
            postfix = {}
            for label, names in POSTFIX:
                found = [values[n] for n in names if isinstance(values.get(n), (int, float))]
                if found:
                    postfix[label] = f"{found[0]:.4g}"
            if self._bar is not None:
                self._bar.update(max(0, step - self._bar.n))
                self._bar.set_postfix(postfix, refresh=True)
            else:
                total = f"/{self._total}" if self._total else ""
                fields = "".join(f" {k}={v}" for k, v in postfix.items())
                self._console.write(f"{time.strftime('%H:%M:%S')} step {step}{total}{fields}\n")
                self._console.flush()

    def log_images(self, step: int, images: Mapping[str, str | Path]) -> None:
        """Record PNG files (kept where they are; their paths go to metrics.jsonl, the pictures to wandb)."""
        if not self.enabled:
            return
        self._write({"step": step, "time": time.time(), "images": {k: str(v) for k, v in images.items()}})
        if self._run is not None:
            import wandb

            self._run.log({name: wandb.Image(str(path)) for name, path in images.items()}, step=step)

    def close(self, exit_code: int = 0) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._run is not None:
            self._run.finish(exit_code=exit_code)
            self._run = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close(exit_code=0 if exc_type is None else 1)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Metric records of a metrics.jsonl, one per step in step order, as the resumed run saw them.

    A "start" record at step s (a job began from a checkpoint at s) drops the earlier job's records
    after s; records of one step are merged, later ones winning. A torn last line (a crash mid-write)
    is skipped.
    """
    by_step: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = int(record.get("step", 0))
        if record.get("event") == "start":
            by_step = {s: r for s, r in by_step.items() if s <= step}
        elif record.get("event") is None:
            by_step.setdefault(step, {}).update(record)
    return [by_step[s] for s in sorted(by_step)]


__all__ = ["LoggingConfig", "MetricLogger", "PEAK_FLOPS_TABLE", "Throughput", "measure_peak_flops", "memory_metrics",
           "mfu_pct", "peak_flops", "read_metrics", "table_peak_flops"]
