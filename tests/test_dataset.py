"""Finding classes, stable splits, and the errors a user gets for unusable folders."""

from __future__ import annotations

import pytest

from imageclf.dataset import TEST, TRAIN, VALIDATION, scan_image_dir, split_for
from imageclf.demo_data import make_dataset
from imageclf.errors import UserError

from .conftest import run_tool


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


def test_split_depends_on_relative_path_only():
    assert split_for("a/b.jpg", 10, 10) == split_for("a/b.jpg", 10, 10)
    names = [f"img_{i}.jpg" for i in range(2000)]
    shares = [sum(split_for(n, 10, 20) == s for n in names) / len(names) for s in (VALIDATION, TEST)]
    assert shares[0] == pytest.approx(0.10, abs=0.025) and shares[1] == pytest.approx(0.20, abs=0.03)


def test_nohash_variants_share_a_split():
    for i in range(50):
        assert len({split_for(f"pic{i}_nohash_{k}.jpg", 30, 30) for k in range(5)}) == 1


def test_labels_come_from_folder_names(tmp_path):
    make_dataset(tmp_path, per_class=10, classes=("Golden_Retriever", "pug"))
    labels, files = scan_image_dir(tmp_path)
    assert labels == ["golden retriever", "pug"]
    assert {f.label for f in files} == {"golden retriever", "pug"}


@pytest.mark.parametrize("setup, message", [
    (lambda root: None, "no such folder"),
    (lambda root: (root.mkdir(), (root / "loose.jpg").write_bytes(b"x")), "no class folders"),
    (lambda root: make_dataset(root, per_class=5, classes=("pug",)), "only one class folder ('pug')"),
    (lambda root: make_dataset(root, per_class=5, classes=("Pug", "pug!", "husky")),
     "'Pug' and 'pug!' both become the label 'pug'"),
    (lambda root: (make_dataset(root, per_class=8, classes=("pug", "husky")),
                   make_dataset(root, per_class=1, classes=("tiny",))), "class 'tiny' has 1 usable image"),
])
def test_unusable_folders(tmp_path, setup, message):
    root = tmp_path / "dogs"
    setup(root)
    with pytest.raises(UserError) as info:
        scan_image_dir(root)
    assert message in str(info.value)


def test_cli_reports_folder_errors_without_traceback(tmp_path):
    make_dataset(tmp_path / "dogs", per_class=5, classes=("pug",))
    for image_dir, message in [(tmp_path / "nowhere", "no such folder"), (tmp_path / "dogs", "only one class")]:
        result = run_tool("retrain.py", "--image_dir", str(image_dir), "--quiet")
        assert result.returncode == 2
        assert message in result.stderr and "Traceback" not in result.stderr
        assert result.stderr.startswith("retrain.py: error: ")


def test_cli_rejects_bad_flag_values():
    result = run_tool("retrain.py", "--image_dir", "x", "--learning_rate", "-1")
    assert result.returncode == 2 and "--learning_rate must be positive" in result.stderr
