"""The communication-volume benchmark counts what the code really sends (docs/cluster.md §9 is
computed from it), and the scaling prediction runs on the committed measurements."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import comm_predict  # noqa: E402
from comm_volume import DEFAULT_JSON, load_results  # noqa: E402


def test_measured_volume_is_the_gradient_payload_of_the_trained_parameters(tmp_path):
    """2 gloo ranks of the tiny preset: DDP all-reduces exactly one fp32 gradient per trained
    parameter per step; FSDP2 reduce-scatters the same payload (within its padding), and both
    move the same bytes every step."""
    out = tmp_path / "volume.json"
    proc = subprocess.run([sys.executable, "bench/comm_volume.py", "--presets", "tiny", "--variants", "ddp,fsdp2",
                           "--json", str(out), "--margin-gb", "0"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    for variant, kind in (("ddp", "all_reduce"), ("fsdp2", "reduce_scatter")):
        run = runs[f"tiny/{variant}"]
        assert run["steady"], variant
        steps = run["ranks"][0]["steps"][1:]
        payload = [sum(v["bytes"] for k, v in step.items() if k.startswith(f"model|backward|{kind}|")) for step in steps]
        expected = 4 * run["n_trained"]
        assert all(abs(p - expected) <= 0.01 * expected for p in payload), (variant, payload, expected)
    assert payload != [0] * len(payload)


def test_prediction_from_the_committed_measurements_covers_every_backend(capsys):
    vols, checks = comm_predict.volumes(load_results(DEFAULT_JSON))
    for preset in ("base", "large"):
        for backend in comm_predict.BACKENDS:
            assert (preset, backend) in vols, (preset, backend)
    # the depth extrapolation that gives `large` reproduces base's full-depth measurement
    for key, extrapolated in checks.items():
        measured = vols[key]
        for kind in ("all_gather", "reduce_scatter", "all_reduce"):
            a = sum(s for (_, k), (s, _) in extrapolated.model.items() if k == kind)
            b = sum(s for (_, k), (s, _) in measured.model.items() if k == kind)
            assert abs(a - b) <= 0.05 * max(b, 1.0), (key, kind, a, b)
    cluster = comm_predict.CLUSTERS[0]
    for backend in comm_predict.BACKENDS:
        t8, t256 = (comm_predict.step_time(vols[("base", backend)], w, cluster, 128) for w in (8, 256))
        assert t8["compute"] <= t8["overlap"] <= t8["none"] and t256["none"] >= t8["none"], backend
    comm_predict.main([])
    assert "W=256" in capsys.readouterr().out
