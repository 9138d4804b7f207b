"""Honest evaluation: copies of one photo never straddle splits; conflicts and near-copies are reported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from imageclf.dataset import TEST, TRAIN, VALIDATION, ImageFile, split_for
from imageclf.duplicates import near_duplicates
from imageclf.retrain import retrain
from tests.demo_data import make_dataset

from .conftest import quick_options


def _name_in_other_split(original: str) -> str:
    """A file name whose path-based split differs from ``original``'s, so only the content can unite them."""
    target = split_for(original, 10, 10)
    return next(name for name in (f"copy_{i}.jpg" for i in range(1000)) if split_for(name, 10, 10) != target)


def test_identical_copies_share_a_split_and_cross_class_copies_are_left_out(tmp_path, tiny_module):
    data = tmp_path / "data"
    make_dataset(data, per_class=12)
    copy = _name_in_other_split("circle_000.jpg")
    shutil.copy(data / "circle" / "circle_000.jpg", data / "circle" / copy)
    shutil.copy(data / "square" / "square_001.jpg", data / "triangle" / "not_a_triangle.jpg")
    lines = []
    result = retrain(quick_options(data, tmp_path, tfhub_module=str(tiny_module)), log=lines.append)
    report = result.duplicates
    assert report.groups == [["circle/circle_000.jpg", f"circle/{copy}"]] and report.moved >= 1
    assert report.conflicts == [["square/square_001.jpg", "triangle/not_a_triangle.jpg"]]
    assert sum(result.split_counts.values()) == 36 + 1 - 1  # the conflicting original and copy are both out
    assert any(line.startswith("Label conflict, left out") and "not_a_triangle.jpg" in line for line in lines)
    assert any(line.startswith("Duplicates: 1 group(s)") for line in lines)
    meta = json.loads(result.sidecar.read_text())["duplicates"]
    assert meta["identical_groups"] == report.groups and meta["label_conflicts"] == report.conflicts


def _file(name: str, split: str) -> ImageFile:
    return ImageFile(path=Path(name), label="x", rel=name, split=split)


def test_near_duplicates_across_splits_are_listed_above_the_threshold_only():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 64)).astype(np.float32)
    files = [_file(f"t{i}.jpg", TRAIN) for i in range(4)] + [_file("v.jpg", VALIDATION), _file("s.jpg", TEST),
                                                             _file("far.jpg", TEST)]
    vectors = {f.path: base[i % 4] for i, f in enumerate(files[:4])}
    vectors[Path("v.jpg")] = base[1] + 0.05 * rng.normal(size=64).astype(np.float32)  # a re-save of t1
    vectors[Path("s.jpg")] = base[2] + 0.6 * rng.normal(size=64).astype(np.float32)   # merely similar
    vectors[Path("far.jpg")] = base[5]
    pairs = near_duplicates(files, vectors, threshold=0.95)
    assert [(p["a"], p["b"], p["splits"]) for p in pairs] == [("x/v.jpg", "x/t1.jpg", [VALIDATION, TRAIN])]
    assert pairs[0]["cosine"] >= 0.95
    assert near_duplicates(files, vectors, threshold=0.5)[0]["a"] == "x/v.jpg"  # most alike first
