"""Finding the labelled images under ``--image_dir`` and splitting them, stably.

Each immediate subfolder of the image folder is a class; every file below it (recursively,
hidden files excepted) is a candidate image, recognised later by its content.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from imageclf.errors import UserError

TRAIN, VALIDATION, TEST = "train", "validation", "test"
_NOHASH = re.compile(r"_nohash_.*$")


@dataclass(frozen=True)
class ImageFile:
    path: Path
    label: str
    rel: str  # path relative to its class folder, with "/" separators
    split: str


def label_for_folder(name: str) -> str:
    """The label a class folder gets: lower case, runs of other characters become one space."""
    return re.sub(r"[^a-z0-9]+", " ", name.lower()).strip()


def split_for(rel: str, validation_percentage: float, testing_percentage: float) -> str:
    """Which split a file belongs to, from its path alone.

    The hash ignores anything from ``_nohash_`` on in the file name, so variants of one
    picture (``cat_nohash_1.jpg``, ``cat_nohash_2.jpg``) always land together. A file never
    moves between splits when other files are added or removed.
    """
    directory, _, name = rel.rpartition("/")
    key = f"{directory}/{_NOHASH.sub('', name)}"
    bucket = int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % 10_000 / 100.0
    if bucket < validation_percentage:
        return VALIDATION
    if bucket < validation_percentage + testing_percentage:
        return TEST
    return TRAIN


def scan_image_dir(image_dir: str | Path, validation_percentage: float = 10,
                   testing_percentage: float = 10) -> tuple[list[str], list[ImageFile]]:
    """The sorted labels and every candidate file, each assigned to a split.

    Raises UserError for a missing folder, no class folders, a single class, colliding
    labels, or a class without enough files to train on.
    """
    root = Path(image_dir)
    if not root.is_dir():
        raise UserError(f"--image_dir {image_dir}: no such folder")
    if not 0 <= validation_percentage + testing_percentage < 100:
        raise UserError("--validation_percentage plus --testing_percentage must be below 100")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UserError(f"--image_dir {image_dir}: no class folders found; put each class's "
                        "images in its own subfolder (e.g. dogs/poodle/*.jpg, dogs/pug/*.jpg)")
    by_label: dict[str, Path] = {}
    for folder in folders:
        label = label_for_folder(folder.name)
        if not label:
            raise UserError(f"class folder '{folder.name}' has no letters or digits to name a label")
        if label in by_label:
            raise UserError(f"class folders '{by_label[label].name}' and '{folder.name}' both "
                            f"become the label '{label}'; rename one of them")
        by_label[label] = folder
    if len(by_label) < 2:
        raise UserError(f"--image_dir {image_dir}: only one class folder ('{folders[0].name}'); "
                        "a classifier needs at least two")
    files = [ImageFile(path, label, rel, split_for(rel, validation_percentage, testing_percentage))
             for label, folder in by_label.items() for path, rel in _files_below(folder)]
    labels = sorted(by_label)
    check_trainable(labels, files, {label: by_label[label].name for label in labels})
    return labels, files


def check_trainable(labels: list[str], files: list[ImageFile], folder_names: dict[str, str] | None = None) -> None:
    """Every class needs at least two files, one of them in the training split."""
    total = Counter(f.label for f in files)
    train = Counter(f.label for f in files if f.split == TRAIN)
    for label in labels:
        name = (folder_names or {}).get(label, label)
        if total[label] < 2:
            raise UserError(f"class '{name}' has {total[label]} usable image(s); at least 2 are "
                            "needed to split it into training and evaluation sets")
        if train[label] == 0:
            raise UserError(f"class '{name}' has {total[label]} usable images but none fell into "
                            "the training split; add more images or lower the test/validation "
                            "percentages")


def _files_below(folder: Path):
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            yield path, rel.as_posix()
