"""Evaluation: zero-shot retrieval and frozen-encoder probes, standalone and during training.

    ranking.py         diagonal-mean similarity in row chunks, ranks of the true match, R@K / MR, tie policies
    classification.py  average precision / mAP (sklearn's definition), top-1
    encoder.py         the frozen encoder from a run dir, checkpoint, export, official file (or random)
    embed.py           protocol-exact embeddings of eval shards, split over ranks and gathered
    retrieval.py       `python -m tgdp.eval.retrieval`: JSON + recall curves + example grid
    report.py          the pictures (reads the shown clips back from the shards)
    heads.py           attention probe (the paper's) and a true linear probe
    probe.py           `python -m tgdp.eval.probe`: recipe, LR sweep, mAP / top-1, JSON
    periodic.py        the trainer's every-N-steps retrieval hook

docs/evaluation.md describes the protocols, tie handling, the probe recipe and the eval-set lists.
"""
