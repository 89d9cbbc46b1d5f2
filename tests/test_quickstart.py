"""The README's quick-start command itself, shortened through its options (the default run is
~2.5 min on 2 cores; docs/benchmarks.md has its result)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.conftest import REPO


def test_quickstart_runs_the_whole_pipeline_and_reports(tmp_path):
    out = tmp_path / "qs"
    proc = subprocess.run([sys.executable, "-m", "tgdp.quickstart", "--steps", "20", "--clips", "16",
                           "--eval-clips", "8", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert report in proc.stdout
    # Every cell of the table is a number: R@1 / R@5, both directions, trained / untrained / chance.
    rows = re.findall(r"^\| (audio->video|video->audio) \| (R@1|R@5) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$",
                      report, re.M)
    assert len(rows) == 4, report
    assert {(d, m, float(c)) for d, m, _, _, c in rows} >= {("audio->video", "R@1", 12.5), ("video->audio", "R@5", 62.5)}
    run = out / "run"
    trained = json.loads((run / "eval" / "trained" / "retrieval.json").read_text())
    untrained = json.loads((run / "eval" / "untrained" / "retrieval.json").read_text())
    assert trained["clips"] == untrained["clips"] == 8
    assert trained["checkpoint"]["source"] != untrained["checkpoint"]["source"] == "random"
    # Two sharded ranks really trained (accelerate's CPU launcher can silently start one).
    final = run / "checkpoints" / "step_00000020"
    assert (final / "rank_0.json").is_file() and (final / "rank_1.json").is_file()
    assert (run / "export" / "model.safetensors").is_file()
    pictures = {p.name for p in (run / "images").glob("*.png")}
    assert "loss_curves.png" in pictures
    assert any(n.startswith("reconstruction_") for n in pictures) and any(n.startswith("priority_") for n in pictures)
    assert (run / "eval" / "trained" / "recall_curves.png").is_file()
    assert list((run / "wandb").glob("offline-run-*")), "the offline wandb run is where the report says"
