"""TG-DP pretraining entry point.

    accelerate launch [--config_file ds_configs/X.yaml] tgdp/train.py --config tiny [field=value ...]
    torchrun --nproc_per_node 2 tgdp/train.py --config tiny data.shards=runs/shards
    python -m tgdp.train --config base run_dir=runs/base data.shards=/data/as2m

A run directory holds the resolved config, logs (metrics.jsonl, wandb), checkpoints, pictures and
the final export. Re-running the same command resumes from its newest complete checkpoint.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a file (accelerate / torchrun): make `tgdp` importable
    _repo = str(Path(__file__).resolve().parents[1])
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, _repo)

from tgdp.config import ConfigError, parse_cli, to_yaml  # noqa: E402
from tgdp.trainer import NonFiniteStop, TrainConfig, Trainer  # noqa: E402

FLAGS = {
    "--run-dir": ("run_dir", "run directory (config, logs, checkpoints, exports)"),
    "--shards": ("data.shards", "shard folder(s) written by make_shards (comma-separated)"),
    "--steps": ("total_steps", "optimizer steps"),
}


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_cli(TrainConfig, "train", argv, description="TG-DP pretraining.", flags=FLAGS,
                    default_preset="tiny")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trainer = Trainer(cfg)
    if trainer.env.rank == 0:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run_dir) / "config.yaml").write_text(to_yaml(cfg))
    agreed_end = False  # every rank ends here together (finished, stopped, or the shared non-finite stop)
    try:
        summary = trainer.train()
        agreed_end = True
    except NonFiniteStop as exc:
        agreed_end = True
        logging.getLogger("tgdp.train").error("%s", exc)
        return 3
    except ConfigError as exc:  # found after start-up (e.g. resuming under an incompatible config)
        logging.getLogger("tgdp.train").error("%s", exc)
        return 2
    finally:
        trainer.close(wait_for_peers=agreed_end)
    if summary["stopped_by"]:
        saved = "a checkpoint was written, re-run to resume" if trainer.checkpointing else \
            "no checkpoint (checkpointing is off for this backend)"
        logging.getLogger("tgdp.train").info("stopped at step %d by %s; %s", summary["step"], summary["stopped_by"],
                                             saved)
    return 0


if __name__ == "__main__":
    sys.exit(main())
