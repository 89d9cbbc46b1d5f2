"""Eval sets: make_shards keeps only the clips of an id list (e.g. the 5-per-class retrieval subsets)."""

from __future__ import annotations

import json

from tests.conftest import run_tool
from tgdp.data.format import read_index
from tgdp.data.shards.sources import read_id_list


def test_id_list_filter_keeps_listed_clips_and_reports_missing(corpus, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("# retrieval subset\nclip_00001\nclip_00005\nnot_in_the_corpus\n")
    out = tmp_path / "eval_shards"
    proc = run_tool("make_shards.py", "--input", corpus, "--output", out, "--ids", ids, "--workers", "1",
                    "progress=false")
    assert "2 samples" in proc.stdout
    assert read_index(out).total_samples == 2
    report = json.loads((out / "report.json").read_text())
    assert report["missing_ids"] == ["not_in_the_corpus"] and report["clips"] == 2


def test_id_list_formats(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"data": [{"video_id": "x1", "wav": "x1.wav"}, {"video_id": "x2"}]}))
    (tmp_path / "b.csv").write_text("video_id,labels\ny1,a\ny2,b\n")
    assert read_id_list(tmp_path / "a.json") == ["x1", "x2"]
    assert read_id_list(tmp_path / "b.csv") == ["y1", "y2"]


def test_id_list_matching_nothing_is_an_error(corpus, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("nothing_here\n")
    proc = run_tool("make_shards.py", "--input", corpus, "--output", tmp_path / "o", "--ids", ids, check=False)
    assert proc.returncode == 2 and "none of the ids" in proc.stderr
