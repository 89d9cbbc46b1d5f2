"""The whole system on a laptop CPU in one command: data -> shards -> sharded pretraining -> retrieval.

    python -m tgdp.quickstart                     # ~10-15 min on 2 cores; everything under runs/quickstart
    python -m tgdp.quickstart --steps 40 --clips 16 --eval-clips 8 --out /tmp/qs   # a short smoke run

Each stage is the real tool a user would run next, as a subprocess with its command printed:

1. `data_tools/make_synthetic.py` writes real h264+aac clips (training corpus, and a HELD-OUT
   evaluation corpus from another seed: retrieval is measured on clips the model never saw);
2. `data_tools/make_shards.py` turns both into WebDataset shards;
3. `accelerate launch --config_file ds_configs/cpu_fsdp2.yaml tgdp/train.py --config tiny`:
   TG-DP with the EMA teacher, student and teacher sharded with FSDP2 over 2 gloo processes;
4. `python -m tgdp.eval.retrieval` on the held-out shards, for the trained run and for an
   untrained model of the same shape (the baseline that tells learning from chance).

It then prints a short report (R@1 / R@5 both directions vs chance and vs the untrained model,
and where the run dir, checkpoints, pictures and the offline wandb run are) and writes it to
`<out>/report.md`. Re-running resumes: finished stages are skipped, training continues from its
newest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
DIRECTIONS = ("audio->video", "video->audio")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
    """Run one stage, its output to `log`; on failure show the log's tail and stop (exit 1)."""
    print(f"$ {' '.join(shlex.quote(str(c)) for c in cmd)}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run([str(c) for c in cmd], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, **(env or {})}).returncode
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise SystemExit(f"quickstart: this stage failed (exit {code}); last lines of {log}:\n" + "\n".join(tail))
    print(f"  done in {time.perf_counter() - start:.0f} s (log: {log})", flush=True)


def _shards(out: Path, name: str, clips: int, seed: int, logs: Path) -> Path:
    corpus, shards = out / f"{name}_corpus", out / f"{name}_shards"
    if not (corpus / "manifest.csv").exists():
        _run([sys.executable, "data_tools/make_synthetic.py", "--output", corpus, "--num-clips", str(clips),
              "--seed", str(seed)], logs / f"make_synthetic_{name}.log")
    if not (shards / "index.json").exists():
        _run([sys.executable, "data_tools/make_shards.py", "--input", corpus / "manifest.csv", "--output", shards,
              "--workers", "2", "max_samples_per_shard=8", "progress=false"], logs / f"make_shards_{name}.log")
    return shards


def _retrieval(checkpoint: str, shards: Path, output: Path, logs: Path, name: str, extra: Sequence[str] = ()) -> dict:
    result = output / "retrieval.json"
    if not result.exists():
        _run([sys.executable, "-m", "tgdp.eval.retrieval", "--checkpoint", checkpoint, "--shards", shards,
              "--output", output, *extra], logs / f"retrieval_{name}.log", env={"WANDB_MODE": "offline"})
    return json.loads(result.read_text())


def _model_overrides(run_config: Path) -> list[str]:
    """`model.<field>=<value>` for every model field of the run: the untrained baseline gets the
    trained model's exact shape (a random checkpoint has no config of its own)."""
    import yaml

    model = yaml.safe_load(run_config.read_text())["model"]
    return [f"model.{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in model.items()
            if v is not None]


def _report(out: Path, run: Path, trained: dict[str, Any], untrained: dict[str, Any], wall_s: float) -> str:
    chance = trained["chance"]
    lines = [f"# tgdp quick-start report ({trained['clips']} held-out clips, protocol {trained['protocol']})", "",
             "| direction | metric | trained | untrained | chance |", "|---|---|---|---|---|"]
    for direction in DIRECTIONS:
        for metric in ("R@1", "R@5"):
            lines.append(f"| {direction} | {metric} | {trained[direction][metric]:.1f} | "
                         f"{untrained[direction][metric]:.1f} | {chance[metric]:.1f} |")
    images = sorted((run / "images").glob("*.png")) if (run / "images").exists() else []
    wandb_runs = sorted((run / "wandb").glob("offline-run-*")) if (run / "wandb").exists() else []
    lines += ["", f"- run directory: {run}", f"- checkpoints: {run / 'checkpoints'}",
              f"- consolidated export: {run / 'export' / 'model.safetensors'}",
              f"- training pictures ({len(images)}): {run / 'images'} (loss curves, reconstructions, teacher priorities)",
              f"- retrieval results and recall@K / example plots: {Path(trained['output'])}",
              f"- untrained baseline: {Path(untrained['output'])}",
              f"- offline wandb run: {wandb_runs[-1] if wandb_runs else '(none)'}"
              + (f" (upload later with `wandb sync {wandb_runs[-1]}`)" if wandb_runs else ""),
              f"- wall time: {wall_s / 60:.1f} min"]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/quickstart", help="folder for corpus, shards, run and report")
    parser.add_argument("--clips", type=int, default=48, help="training clips (synthetic, 10 s each)")
    parser.add_argument("--eval-clips", type=int, default=16, help="held-out clips for retrieval")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps of the tiny preset")
    parser.add_argument("--processes", type=int, default=2, help="training processes (FSDP2 over gloo)")
    parser.add_argument("train_overrides", nargs="*", help="extra trainer overrides, e.g. data.batch_size=4")
    args = parser.parse_args(argv)
    for name in ("clips", "eval_clips", "steps", "processes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eval_clips < 2:
        parser.error("--eval-clips must be >= 2 (retrieval needs candidates to choose from)")

    start = time.perf_counter()
    out = Path(args.out).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"tgdp quick-start: everything goes to {out}", flush=True)
    train_shards = _shards(out, "train", args.clips, 0, logs)
    eval_shards = _shards(out, "eval", args.eval_clips, 1, logs)

    run = out / "run"
    accelerate = Path(sys.executable).parent / "accelerate"
    _run([accelerate, "launch", "--config_file", "ds_configs/cpu_fsdp2.yaml", "--num_processes",
          str(args.processes), "--main_process_port", str(_free_port()), "tgdp/train.py", "--config", "tiny",
          "--run-dir", run, "--shards", train_shards, "--steps", str(args.steps),
          f"logging.image_every={max(1, args.steps // 3)}", *args.train_overrides],
         logs / "train.log", env={"WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "OMP_NUM_THREADS": "1"})

    trained = _retrieval(str(run), eval_shards, run / "eval" / "trained", logs, "trained")
    untrained = _retrieval("random", eval_shards, run / "eval" / "untrained", logs, "untrained",
                           _model_overrides(run / "config.yaml"))
    print()
    print(_report(out, run, trained, untrained, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
