"""Honest evaluation: the same photo must not sit in training and in test under two names.

Splits follow file paths, so a picture saved twice (``IMG_1234.jpg``, ``IMG_1234 (1).jpg``) could
be trained on and then "tested". Exact copies (same bytes) of one class are kept in one split,
chosen from their content, so every copy goes wherever the picture goes. Copies filed under
two classes contradict each other: they are left out and reported. Near-duplicates (a re-save,
a resize: bottleneck cosine at or above NEAR_DUPLICATE_COSINE) across splits are listed, not
moved, since how alike is "the same" is the user's call.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imageclf.dataset import TEST, TRAIN, VALIDATION, ImageFile, split_for

#: Bottleneck cosine similarity from which two images across splits are listed as near-duplicates.
#: Measured on the dev data (9 dog breeds, built-in base): distinct photos in different splits
#: reached at most 0.941 (99th percentile 0.866); one photo re-saved at JPEG quality 60, or
#: resized to 180 px, scored 0.969 and 0.973 against itself. Other bases may need another value.
NEAR_DUPLICATE_COSINE = 0.95
_MAX_LISTED = 50  # pairs or groups kept in the summary and metadata


@dataclass
class DuplicateReport:
    groups: list[list[str]] = field(default_factory=list)     # identical files of one class
    moved: int = 0                                             # files whose split changed to join their copies
    conflicts: list[list[str]] = field(default_factory=list)  # identical files under different classes
    near: list[dict] = field(default_factory=list)             # {"a", "b", "splits", "cosine"}, most alike first

    def lines(self) -> list[str]:
        """The summary lines retrain prints (none when there is nothing to say)."""
        out = []
        if self.groups:
            out.append(f"Duplicates: {len(self.groups)} group(s) of identical files kept in one split "
                       f"({self.moved} file(s) moved to join their copies)")
        for group in self.conflicts[:_MAX_LISTED]:
            out.append(f"Label conflict, left out: the same image is filed as {' and '.join(group)}")
        if self.near:
            out.append(f"Near-duplicates across splits (bottleneck cosine >= {NEAR_DUPLICATE_COSINE}): "
                       f"{len(self.near)} pair(s)")
            out += [f"  {p['a']} ({p['splits'][0]}) ~ {p['b']} ({p['splits'][1]}): {p['cosine']:.4f}"
                    for p in self.near[:10]]
        return out

    def metadata(self) -> dict:
        return {"identical_groups": self.groups[:_MAX_LISTED], "identical_groups_total": len(self.groups),
                "moved": self.moved, "label_conflicts": self.conflicts[:_MAX_LISTED],
                "near_duplicates": self.near[:_MAX_LISTED], "near_duplicates_total": len(self.near),
                "near_duplicate_cosine": NEAR_DUPLICATE_COSINE}


def unify_identical(files: list[ImageFile], keys: dict[Path, str], validation_percentage: float,
                    testing_percentage: float) -> tuple[list[ImageFile], DuplicateReport]:
    """Files with identical copies in one split (from their content); conflicting copies left out."""
    by_key: dict[str, list[ImageFile]] = defaultdict(list)
    for f in files:
        by_key[keys[f.path]].append(f)
    report, kept = DuplicateReport(), []
    for key, copies in by_key.items():
        if len(copies) == 1:
            kept.append(copies[0])
            continue
        names = [f"{f.label}/{f.rel}" for f in copies]
        if len({f.label for f in copies}) > 1:
            report.conflicts.append(names)
            continue
        split = split_for(f"content/{key}", validation_percentage, testing_percentage)
        report.groups.append(names)
        report.moved += sum(f.split != split for f in copies)
        kept += [dataclasses.replace(f, split=split) for f in copies]
    order = {f.path: i for i, f in enumerate(files)}
    return sorted(kept, key=lambda f: order[f.path]), report


def near_duplicates(files: list[ImageFile], vectors: dict[Path, np.ndarray],
                    threshold: float = NEAR_DUPLICATE_COSINE) -> list[dict]:
    """Pairs of different files in different splits whose bottlenecks are at least ``threshold`` alike."""
    held_out = [f for f in files if f.split in (VALIDATION, TEST)]
    train = [f for f in files if f.split == TRAIN]
    if not held_out or not train:
        return []
    unit_train = _unit(np.stack([vectors[f.path] for f in train]))
    pairs = []
    for start in range(0, len(held_out), 256):  # bounded memory: 256 x N_train similarities at a time
        chunk = held_out[start:start + 256]
        similarity = _unit(np.stack([vectors[f.path] for f in chunk])) @ unit_train.T
        for i, j in zip(*np.nonzero(similarity >= threshold), strict=True):
            pairs.append({"a": f"{chunk[i].label}/{chunk[i].rel}", "b": f"{train[j].label}/{train[j].rel}",
                          "splits": [chunk[i].split, TRAIN], "cosine": round(float(similarity[i, j]), 4)})
    return sorted(pairs, key=lambda p: -p["cosine"])


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
