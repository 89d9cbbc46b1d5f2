"""Classification metrics of the frozen-encoder probes: AudioSet-style mAP and top-1 accuracy.

`average_precision` is scikit-learn's definition (not installed here; re-implemented and tested
against a hand computation): scores sorted in decreasing order, one operating point per DISTINCT
score (tied scores enter together), AP = sum_n (R_n - R_{n-1}) * P_n. This is the step-wise
area that CAV-MAE's `calculate_stats` (sklearn `average_precision_score` per class) reports;
no interpolation.

`mean_average_precision` averages AP over the classes that have at least one positive in the
evaluated set (AP is undefined without positives); how many classes were skipped is returned.
"""

from __future__ import annotations

import numpy as np
import torch


def average_precision(scores: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor) -> float:
    """AP of one class. scores [N] (any real values, higher = more positive), targets [N] in {0, 1}."""
    s = np.asarray(torch.as_tensor(scores).double().cpu(), dtype=np.float64).reshape(-1)
    y = np.asarray(torch.as_tensor(targets).double().cpu(), dtype=np.float64).reshape(-1) > 0.5
    positives = int(y.sum())
    if positives == 0:
        raise ValueError("average precision is undefined for a class without positives")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_group = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # end of each run of equal scores
    tps = np.cumsum(y)[last_of_group]
    fps = (last_of_group + 1) - tps
    precision = tps / (tps + fps)
    recall = tps / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(scores: np.ndarray | torch.Tensor,
                           targets: np.ndarray | torch.Tensor) -> tuple[float, int]:
    """(mAP in percent over classes with >= 1 positive, number of classes skipped). [N, C] inputs."""
    s = torch.as_tensor(scores).double().cpu().numpy()
    y = torch.as_tensor(targets).double().cpu().numpy()
    if s.shape != y.shape or s.ndim != 2:
        raise ValueError(f"scores {s.shape} and targets {y.shape} must both be [N, C]")
    aps = [average_precision(s[:, c], y[:, c]) for c in range(s.shape[1]) if y[:, c].sum() > 0]
    if not aps:
        raise ValueError("no class has a positive example: mAP is undefined")
    return 100.0 * float(np.mean(aps)), s.shape[1] - len(aps)


def top1_accuracy(logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """Percent of rows whose arg-max (lowest index among equal maxima) is the label (int [N] or one-hot [N, C])."""
    logits = torch.as_tensor(logits)
    labels = torch.as_tensor(labels)
    if labels.dim() == 2:
        labels = labels.argmax(1)
    return 100.0 * float((logits.argmax(1) == labels).double().mean())
