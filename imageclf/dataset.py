"""Finding the labelled images under ``--image_dir`` and splitting them, stably.

Each immediate subfolder of the image folder is a class; every file below it (recursively,
hidden files excepted) is a candidate image, recognised later by its content.

Symlinks that stay inside the image folder work as ever. One that leads outside it (a class
folder or a file) is left out and reported, unless ``follow_symlinks``: the folder may be shared
or uploaded, and a link must not make a retrain read, say, ``/etc/passwd`` or a photo library
elsewhere. Listing is a first filter; the reads themselves are confined again
(image_files.FileRules), so a file swapped for a link after this listing gets no further.
Symlinked folders below a class folder are not entered (they could loop).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from imageclf.errors import BadImageError, OutsideRootError, UserError
from imageclf.image_files import FOLLOW_HINT

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


@dataclass
class Scan:
    labels: list[str]           # sorted
    files: list[ImageFile]      # every candidate file, in order: class folder, then path below it
    skipped: list[BadImageError] = field(default_factory=list)  # symlinks leading outside, not used


def scan_image_dir(image_dir: str | Path, validation_percentage: float = 10,
                   testing_percentage: float = 10) -> tuple[list[str], list[ImageFile]]:
    """The sorted labels and every candidate file, each assigned to a split (see scan_image_folder)."""
    scan = scan_image_folder(image_dir, validation_percentage, testing_percentage)
    return scan.labels, scan.files


def scan_image_folder(image_dir: str | Path, validation_percentage: float = 10, testing_percentage: float = 10,
                      *, follow_symlinks: bool = False) -> Scan:
    """The labels, every candidate file assigned to a split, and what was left out.

    Raises UserError for a missing folder, no class folders, a single class, colliding
    labels, or a class without enough files to train on.
    """
    root = Path(image_dir)
    if not root.is_dir():
        raise UserError(f"--image_dir {image_dir}: no such folder")
    if not 0 <= validation_percentage + testing_percentage < 100:
        raise UserError("--validation_percentage plus --testing_percentage must be below 100")
    folders, skipped = class_folders(root, follow_symlinks)
    left_out = (f" ({len(skipped)} symlinked class folder(s) leading outside it left out; {FOLLOW_HINT})"
                if skipped else "")
    if not folders:
        raise UserError(f"--image_dir {image_dir}: no class folders found; put each class's "
                        f"images in its own subfolder (e.g. dogs/poodle/*.jpg, dogs/pug/*.jpg){left_out}")
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
                        f"a classifier needs at least two{left_out}")
    files = []
    for label, folder in by_label.items():
        found, outside = files_below(folder, root, follow_symlinks)
        files += [ImageFile(path, label, "/".join(parts), split_for("/".join(parts), validation_percentage,
                                                                    testing_percentage))
                  for parts, path in found]
        skipped += outside
    labels = sorted(by_label)
    check_trainable(labels, files, {label: by_label[label].name for label in labels})
    return Scan(labels, files, skipped)


def class_folders(root: Path, follow_symlinks: bool = False) -> tuple[list[Path], list[BadImageError]]:
    """The class folders of ``root`` (its non-hidden subfolders, sorted) and the symlinked ones
    left out because they lead outside it."""
    inside = _inside(root)
    folders, skipped = [], []
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or not path.is_dir():
            continue
        if path.is_symlink() and not follow_symlinks and not inside(path):
            skipped.append(OutsideRootError(f"{path}: class folder is a symlink leading outside --image_dir; "
                                            f"not used ({FOLLOW_HINT})"))
            continue
        folders.append(path)
    return folders, skipped


def files_below(folder: Path, root: Path, follow_symlinks: bool = False
                ) -> tuple[list[tuple[tuple[str, ...], Path]], list[BadImageError]]:
    """(path parts below ``folder``, path) of each candidate file, sorted (as Paths sort: part by
    part), hidden files and folders left out; and the symlinks left out because they lead outside
    ``root``. Linked folders are not entered; a link to a file inside ``root`` is a file."""
    inside = _inside(root)
    found, skipped = [], []
    for directory, subfolders, names in os.walk(folder):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        below = Path(directory).relative_to(folder).parts
        for name in names:
            path = Path(directory, name)
            if name.startswith(".") or not path.is_file():  # is_file: a regular file, or a link to one
                continue
            if path.is_symlink() and not follow_symlinks and not inside(path):
                skipped.append(OutsideRootError(f"{path}: a symlink leads outside --image_dir; not used "
                                                f"({FOLLOW_HINT})"))
                continue
            found.append(((*below, name), path))
    return sorted(found), skipped


def _inside(root: Path):
    """A test: does this path, links resolved, lie strictly below ``root`` (links resolved too)?"""
    prefix = os.path.realpath(root).rstrip(os.sep) + os.sep
    return lambda path: os.path.realpath(path).startswith(prefix)


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
