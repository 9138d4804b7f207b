"""The training-data manifest: exactly which images a graph was trained and tested on.

Beside every graph retrain writes ``<name>.manifest.jsonl``, one JSON object a line, sorted by
path: ``{"path": "circle/a.jpg", "sha256": "...", "label": "circle", "split": "train"}`` (the path
relative to --image_dir, the SHA-256 of the file's bytes, as the bottleneck cache keys it). Only
images the run used are listed (skipped files and label conflicts are not).

The *data fingerprint* is the SHA-256 over the sorted ``sha256 label split`` lines: the same
images with the same labels and splits give the same fingerprint, whatever their file names or
the order they were found in. It is stored in the graph's metadata (``data.fingerprint``: the
embedded ``metadata:0``, the ``.json`` sidecar, the service's ``/models``) and the SavedModel, so
a manifest can be checked against the graph it sits beside (see read_for_graph).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from imageclf.dataset import TEST, ImageFile

SUFFIX = ".manifest.jsonl"
#: File paths named per kind of change in a retrain's summary (the counts are always complete).
MAX_NAMED = 10


def manifest_path(graph: str | os.PathLike) -> Path:
    """Where the manifest of ``graph`` (``graphs/NAME.pb``) lives: ``graphs/NAME.manifest.jsonl``."""
    graph = Path(graph)
    return graph.with_name(graph.stem + SUFFIX)


def entries_for(files: Iterable[ImageFile], keys: Mapping[Path, str], image_dir: str | os.PathLike) -> list[dict]:
    """The manifest entries of the images a run used, sorted by path."""
    root = os.path.abspath(image_dir)
    entries = [{"path": Path(os.path.relpath(os.path.abspath(f.path), root)).as_posix(), "sha256": keys[f.path],
                "label": f.label, "split": f.split} for f in files]
    return sorted(entries, key=lambda e: e["path"])


def to_text(entries: list[dict]) -> str:
    return "".join(json.dumps(e, sort_keys=True, ensure_ascii=False) + "\n" for e in entries)


def fingerprint(entries: Iterable[Mapping]) -> str:
    """``sha256:<hex>`` over the sorted ``sha256 label split`` lines (paths left out: see the module doc)."""
    lines = sorted(f"{e['sha256']} {e['label']} {e['split']}\n" for e in entries)
    return "sha256:" + hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def summary(entries: list[dict], manifest_file: str | os.PathLike) -> dict:
    """The ``data`` entry of a graph's metadata."""
    return {"fingerprint": fingerprint(entries), "images": len(entries), "manifest": Path(manifest_file).name}


def parse(text: str) -> list[dict]:
    """Entries from a manifest's text; ValueError if a line is not an entry."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        entry = json.loads(line)
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str)
                                                  for k in ("path", "sha256", "label", "split")):
            raise ValueError(f"line {number} is not a manifest entry")
        entries.append(entry)
    return entries


def read_for_graph(graph: str | os.PathLike, metadata: Mapping | None) -> tuple[list[dict] | None, str | None]:
    """The manifest beside ``graph`` if it is that graph's, else None and why.

    ``metadata`` is the graph's own (embedded) metadata: the manifest counts as the graph's when its
    fingerprint is the one the graph records. Graphs from before manifests (or other scripts) have
    none; that is a note, not an error.
    """
    expected = ((metadata or {}).get("data") or {}).get("fingerprint")
    path = manifest_path(graph)
    if not expected:
        return None, "the previous graph has no training-data manifest (made before manifests existed?)"
    try:
        entries = parse(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"the previous graph's manifest {path.name} is missing"
    except (OSError, ValueError) as e:
        return None, f"the previous graph's manifest {path.name} is unreadable ({e})"
    if fingerprint(entries) != expected:
        return None, f"{path.name} does not match the previous graph (another run's manifest?)"
    return entries, None


@dataclass
class Change:
    """One kind of change (added, removed, relabelled): counts per class and some paths."""

    per_class: dict[str, int] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)  # at most MAX_NAMED
    total: int = 0

    def add(self, key: str, path: str) -> None:
        self.per_class[key] = self.per_class.get(key, 0) + 1
        self.total += 1
        if len(self.paths) < MAX_NAMED:
            self.paths.append(path)

    def to_json(self) -> dict:
        return {"total": self.total, "per_class": dict(sorted(self.per_class.items())), "paths": self.paths}


@dataclass
class DataDiff:
    """What changed in the training data against the graph a retrain replaces, by image content."""

    added: Change = field(default_factory=Change)
    removed: Change = field(default_factory=Change)
    relabelled: Change = field(default_factory=Change)  # per_class keys: "old -> new"

    @property
    def unchanged(self) -> bool:
        return not (self.added.total or self.removed.total or self.relabelled.total)

    def to_json(self) -> dict:
        return {"added": self.added.to_json(), "removed": self.removed.to_json(),
                "relabelled": self.relabelled.to_json()}

    def lines(self) -> list[str]:
        if self.unchanged:
            return ["same images and labels as the previous graph"]
        out = []
        for kind, change in (("added", self.added), ("removed", self.removed), ("relabelled", self.relabelled)):
            if change.total:
                classes = ", ".join(f"{key} {n}" for key, n in sorted(change.per_class.items()))
                more = f" (+{change.total - len(change.paths)} more)" if change.total > len(change.paths) else ""
                out.append(f"{kind} {change.total}: {classes}")
                out.append(f"    {', '.join(change.paths)}{more}")
        return out


def diff(old: list[dict], new: list[dict]) -> DataDiff:
    """Images added, removed and relabelled (same content, another label), file by file.

    Content decides: a renamed or moved file whose bytes and label are unchanged is no change.
    Paths named are the new run's (added, relabelled) or the old one's (removed).
    """
    old_labels = _labels_by_hash(old)
    new_labels = _labels_by_hash(new)
    result = DataDiff()
    for entry in new:
        before = old_labels.get(entry["sha256"])
        if before is None:
            result.added.add(entry["label"], entry["path"])
        elif entry["label"] not in before:
            result.relabelled.add(f"{'/'.join(sorted(before))} -> {entry['label']}", entry["path"])
    for entry in old:
        if entry["sha256"] not in new_labels:
            result.removed.add(entry["label"], entry["path"])
    return result


def _labels_by_hash(entries: list[dict]) -> dict[str, set[str]]:
    labels: dict[str, set[str]] = defaultdict(set)
    for entry in entries:
        labels[entry["sha256"]].add(entry["label"])
    return labels


def learned_hashes(entries: list[dict]) -> set[str]:
    """Contents a graph learned from or was tuned on: its training and validation images."""
    return {e["sha256"] for e in entries if e["split"] != TEST}
