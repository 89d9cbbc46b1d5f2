"""Label vocabularies: CAV-MAE's `class_labels_indices.csv` and anything shaped like it.

The file every AudioSet / VGGSound user already has (CAV-MAE, CAV-MAE Sync and TG-DP ship it):

    index,mid,display_name
    0,/m/09x0r,"Speech"
    1,/m/05zppz,"Male speech, man speaking"

A sample's labels (its json `labels`, from the manifest's `labels` / `label` column or the CAV-MAE
datafile's `labels` string) are looked up by mid first, then by display name. Wherever a vocabulary
is given (`data.label_csv` of the loader, `label_csv` of the probes), a label that is not in it is
an error that names the labels, how many clips carry them and the file, before any work starts when
the shard index records its labels (make_shards writes `label_counts`).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from tgdp.config import ConfigError

COLUMNS = ("index", "mid", "display_name")


class LabelVocab:
    """Class names by index and a label -> index lookup (mids and display names)."""

    def __init__(self, names: list[str], lookup: dict[str, int], source: str = ""):
        self.names = names
        self.lookup = lookup
        self.source = source

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @classmethod
    def from_csv(cls, path: str | Path) -> "LabelVocab":
        """Read `index,mid,display_name` (extra columns ignored); every problem names the file and line."""
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                header = [c.strip() for c in reader.fieldnames or []]
                reader.fieldnames = header
                rows = list(reader)
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise ConfigError(f"cannot read label file {path}: {exc}") from exc
        if not set(COLUMNS) <= set(header):
            raise ConfigError(f"label file {path} has columns {header}; expected a header `index,mid,display_name` "
                              "(CAV-MAE's class_labels_indices.csv)")
        if not rows:
            raise ConfigError(f"label file {path} lists no classes")
        by_index: dict[int, tuple[str, str]] = {}
        for line, row in enumerate(rows, start=2):
            raw, mid, name = (str(row.get(c) or "").strip() for c in COLUMNS)
            try:
                index = int(raw)
            except ValueError:
                raise ConfigError(f"label file {path} line {line}: index {raw!r} is not an integer") from None
            if index < 0:
                raise ConfigError(f"label file {path} line {line}: index {index} is negative")
            if not mid:
                raise ConfigError(f"label file {path} line {line}: empty mid")
            if index in by_index:
                raise ConfigError(f"label file {path} line {line}: index {index} appears twice")
            by_index[index] = (mid, name)
        mids = [mid for mid, _ in by_index.values()]
        twice = sorted({m for m in mids if mids.count(m) > 1})
        if twice:
            raise ConfigError(f"label file {path}: mids listed twice: {twice[:5]}")
        names = [""] * (max(by_index) + 1)
        lookup: dict[str, int] = {}
        for index, (mid, name) in sorted(by_index.items()):
            names[index] = name
            if name:
                lookup.setdefault(name, index)
        for index, (mid, _) in by_index.items():  # mids win over a display name that equals some mid
            lookup[mid] = index
        return cls(names, lookup, str(path))

    def targets(self, labels: list[str]) -> tuple[np.ndarray, list[str]]:
        """Multi-hot float32 [C] and the labels that are not in the vocabulary."""
        out = np.zeros(self.num_classes, dtype=np.float32)
        unknown = []
        for label in labels:
            i = self.lookup.get(label)
            if i is None:
                unknown.append(label)
            else:
                out[i] = 1.0
        return out, unknown

    def check(self, label_counts: Mapping[str, int], what: str) -> None:
        """ConfigError unless every label of `label_counts` (label -> clips) is in the vocabulary."""
        unknown = {lab: n for lab, n in label_counts.items() if lab not in self.lookup}
        if not unknown:
            return
        shown = ", ".join(f"{lab!r} ({n} clips)" for lab, n in sorted(unknown.items(), key=lambda x: -x[1])[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise ConfigError(
            f"{len(unknown)} labels of {what} are not in the label file {self.source} ({self.num_classes} classes, "
            f"matched by mid or display name): {shown}{more}. Use the label file the data was labelled with "
            "(AudioSet: class_labels_indices.csv, VGGSound: its own), or fix the labels and shard again"
        )


def count_labels(labels: Iterable[list[str]]) -> dict[str, int]:
    """label -> number of clips carrying it."""
    counts: dict[str, int] = {}
    for labs in labels:
        for lab in set(labs):
            counts[lab] = counts.get(lab, 0) + 1
    return counts


def check_shard_labels(vocab: LabelVocab, shards: str) -> None:
    """`vocab.check` against the labels every shard folder of `shards` (comma-separated) records in
    its index; folders whose index predates `label_counts` are checked sample by sample instead
    (the loader warns once per unknown label)."""
    from tgdp.data.format import read_index

    for part in (p.strip() for p in shards.split(",") if p.strip()):
        content = read_index(Path(part)).content
        if content is not None:
            vocab.check(content.label_counts, f"the shards in {part}")
