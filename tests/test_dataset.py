"""Finding classes, stable splits, and the errors a user gets for unusable folders."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from imageclf import retrain_cli
from imageclf.dataset import TEST, TRAIN, VALIDATION, scan_image_dir, split_for
from imageclf.errors import UserError
from tests.demo_data import ALL_SHAPES, draw_shape, make_dataset

from .conftest import run_in_process, run_tool


def splits(image_dir):
    return {f.path: f.split for f in scan_image_dir(image_dir, 10, 10)[1]}


def test_adding_images_never_moves_existing_ones(tmp_path):
    make_dataset(tmp_path, per_class=30)
    before = splits(tmp_path)
    make_dataset(tmp_path, per_class=40, start=30)  # 120 new files in the same classes
    make_dataset(tmp_path, per_class=5, classes=("star",))
    after = splits(tmp_path)
    assert len(after) == len(before) + 125
    assert {p: after[p] for p in before} == before
    assert set(after.values()) == {TRAIN, VALIDATION, TEST}


def test_split_depends_on_relative_path_only(tmp_path):
    """The same pictures at another absolute place, under renamed class folders, keep their splits."""
    make_dataset(tmp_path / "home" / "ann" / "photos", per_class=20)
    moved = tmp_path / "srv" / "data" / "copy"
    shutil.copytree(tmp_path / "home" / "ann" / "photos", moved)
    (moved / "circle").rename(moved / "Round_Things")
    original = {(f.label, f.rel): f.split for f in scan_image_dir(tmp_path / "home" / "ann" / "photos", 30, 30)[1]}
    renamed = {("circle" if f.label == "round things" else f.label, f.rel): f.split
               for f in scan_image_dir(moved, 30, 30)[1]}
    assert renamed == original and len(original) == 60
    assert set(original.values()) == {TRAIN, VALIDATION, TEST}  # not a match by being all "train"


# Splits users' folders already have: changing the hash would move pictures between the
# training and the test set of every existing data set.
PINNED_SPLITS = {"b.jpg": VALIDATION, "sub/b.jpg": TRAIN, "rex_nohash_1.jpg": VALIDATION,
                 "IMG_0001.JPG": TEST, "photo 7.jpeg": TRAIN}


def test_split_is_a_stable_hash_of_the_path_inside_the_class_folder(tmp_path):
    assert {rel: split_for(rel, 30, 30) for rel in PINNED_SPLITS} == PINNED_SPLITS
    for rel in PINNED_SPLITS:  # scan_image_dir hashes the path below the class folder, subfolders included
        for label in ("pug", "husky"):
            (tmp_path / label / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / label / rel).write_bytes(b"x")
    assert {(f.label, f.rel): f.split for f in scan_image_dir(tmp_path, 30, 30)[1]} == \
        {(label, rel): split for rel, split in PINNED_SPLITS.items() for label in ("husky", "pug")}
    names = [f"img_{i}.jpg" for i in range(2000)]
    shares = [sum(split_for(n, 10, 20) == s for n in names) / len(names) for s in (VALIDATION, TEST)]
    assert shares[0] == pytest.approx(0.10, abs=0.025) and shares[1] == pytest.approx(0.20, abs=0.03)
    # A subfolder is part of the path: the same names one level down are split independently.
    same = sum(split_for(n, 30, 30) == split_for(f"sub/{n}", 30, 30) for n in names) / len(names)
    assert same == pytest.approx(0.3 ** 2 + 0.3 ** 2 + 0.4 ** 2, abs=0.05)


def test_nohash_variants_share_a_split():
    for i in range(50):
        assert len({split_for(f"pic{i}_nohash_{k}.jpg", 30, 30) for k in range(5)}) == 1


def test_labels_come_from_folder_names(tmp_path):
    make_dataset(tmp_path, per_class=10, classes={"Golden_Retriever": "circle", "pug": "square"})
    labels, files = scan_image_dir(tmp_path)
    assert labels == ["golden retriever", "pug"]
    assert {f.label for f in files} == {"golden retriever", "pug"}


@pytest.mark.parametrize("setup, message", [
    (lambda root: None, "no such folder"),
    (lambda root: (root.mkdir(), (root / "loose.jpg").write_bytes(b"x")), "no class folders"),
    (lambda root: make_dataset(root, per_class=5, classes={"pug": "circle"}), "only one class folder ('pug')"),
    (lambda root: make_dataset(root, per_class=5, classes={"Pug": "circle", "pug!": "square", "husky": "star"}),
     "'Pug' and 'pug!' both become the label 'pug'"),
    (lambda root: (make_dataset(root, per_class=8, classes={"pug": "circle", "husky": "square"}),
                   make_dataset(root, per_class=1, classes={"tiny": "star"})), "class 'tiny' has 1 usable image"),
])
def test_unusable_folders(tmp_path, setup, message):
    root = tmp_path / "dogs"
    setup(root)
    with pytest.raises(UserError) as info:
        scan_image_dir(root)
    assert message in str(info.value)


def test_cli_reports_folder_errors_without_traceback(tmp_path):
    make_dataset(tmp_path / "dogs", per_class=5, classes={"pug": "circle"})
    for image_dir, message in [(tmp_path / "nowhere", "no such folder"), (tmp_path / "dogs", "only one class")]:
        result = run_in_process("retrain.py", retrain_cli.main, "--image_dir", str(image_dir), "--quiet")
        assert result.returncode == 2
        assert message in result.stderr and "Traceback" not in result.stderr
        assert result.stderr.startswith("retrain.py: error: ")


@pytest.mark.parametrize("flag, value, message", [
    ("--learning_rate", "-1", "--learning_rate must be positive"),
    ("--fine_tune_learning_rate", "0", "--fine_tune_learning_rate must be positive"),
    ("--fine_tune_epochs", "0", "--fine_tune_epochs must be positive"),
    ("--fine_tune_blocks", "22", "--fine_tune_blocks must be from 1 to the base"),
])
def test_cli_rejects_bad_flag_values(flag, value, message):
    result = run_tool("retrain.py", "--image_dir", "x", flag, value)
    assert result.returncode == 2 and message in result.stderr


def test_demo_shapes_are_real_and_unknown_names_are_refused(tmp_path):
    for seed in range(4):
        assert {kind: points_of(draw_shape(kind, np.random.default_rng(seed))) for kind in ALL_SHAPES} == \
            {"circle": 0, "square": 4, "triangle": 3, "star": 5}
    for name in ("pug", "Star", ""):
        with pytest.raises(ValueError, match="unknown shape"):
            draw_shape(name, np.random.default_rng(0))
        with pytest.raises(ValueError, match="unknown shape"):
            make_dataset(tmp_path / "refused", per_class=1, classes=("circle", name))
    assert not (tmp_path / "refused").exists()  # refused before writing anything
    written = make_dataset(tmp_path / "ok", per_class=1, classes={"pug": "star", "husky": "circle"})
    assert [p.relative_to(tmp_path / "ok").as_posix() for p in written] == ["pug/pug_000.jpg", "husky/husky_000.jpg"]


def points_of(img) -> int:
    """How many points the drawn shape has: peaks of its outline's distance from its centre."""
    pixels = np.asarray(img)
    colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    ys, xs = np.nonzero((pixels == colours[counts.argmax()]).all(axis=2))  # the flat fill colour
    angle, distance = np.arctan2(ys - ys.mean(), xs - xs.mean()), np.hypot(ys - ys.mean(), xs - xs.mean())
    outline = np.zeros(72)  # farthest filled pixel in each 5-degree sector
    np.maximum.at(outline, ((angle + np.pi) / (2 * np.pi) * 72).astype(int) % 72, distance)
    if outline.min() > 0.9 * outline.max():
        return 0  # round
    neighbourhood = np.max([np.roll(outline, k) for k in range(-4, 5)], axis=0)
    return int(((outline == neighbourhood) & (outline > (outline.min() + outline.max()) / 2)).sum())
