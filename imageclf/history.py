"""Kept versions of each graph, and putting an older one back.

Every graph retrain publishes is also kept, as a set, in ``graphs/history/NAME/<version>/``
(``NAME.pb``, ``NAME.labels.txt``, ``NAME.json``, ``NAME.manifest.jsonl``); the newest
``--keep_versions`` (default 5) stay, older ones are deleted (never the version in place).
A graph replaced by its first retrain with history is kept too. The folder is outside the
service's ``graphs/*.pb`` pattern, so it serves only what is in ``graphs/``, unless told to keep
a version loaded (``python -m service --keep_versions NAME=V``, which loads it from here).

    python -m imageclf.history list NAME [--graphs_dir graphs]
    python -m imageclf.history rollback NAME [--to VERSION] [--graphs_dir graphs]

``rollback`` copies a kept version back over ``graphs/NAME.*``: its manifest, then the graph in
one atomic rename, then labels and sidecar (the order retrain writes in), so the running service
reloads it at its next poll, as after a retrain. Without ``--to`` it takes the newest kept version
older than the one in place.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from imageclf.atomic import fsync_dir, fsync_tree, write_bytes_atomic
from imageclf.errors import UserError

HISTORY = "history"
DEFAULT_KEEP = 5


def history_dir(graph: str | os.PathLike) -> Path:
    graph = Path(graph)
    return graph.parent / HISTORY / graph.stem


def version_dir(graphs_dir: str | os.PathLike, name: str, version: int) -> Path:
    """Where version ``version`` of model ``name`` is kept; its graph is ``<that>/<name>.pb``."""
    return Path(graphs_dir) / HISTORY / name / str(version)


def history_versions(graph: str | os.PathLike) -> list[int]:
    """The kept versions of ``graph``, oldest first."""
    folder = history_dir(graph)
    try:
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())
    except OSError:
        return []


def _set_files(graph: Path, labels: Path | None = None) -> dict[str, Path]:
    """The files of one published set, by their name in a history folder."""
    name = graph.stem
    return {f"{name}.pb": graph, f"{name}.labels.txt": labels or graph.with_suffix(".labels.txt"),
            f"{name}.json": graph.with_suffix(".json"), f"{name}.manifest.jsonl": graph.with_name(name +
                                                                                                ".manifest.jsonl")}


def archive(graph: str | os.PathLike, version: int, labels: str | os.PathLike | None = None) -> Path | None:
    """Keep the set published at ``graph`` as ``version``: copied to a staging folder, then renamed
    into place in one step. Nothing is done when that version is kept already or there is no graph."""
    graph = Path(graph)
    final = history_dir(graph) / str(version)
    if final.exists() or not graph.is_file():
        return None
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{version}.{secrets.token_hex(4)}.tmp"
    staging.mkdir()
    try:
        for name, source in _set_files(graph, Path(labels) if labels else None).items():
            if source.is_file():
                shutil.copyfile(source, staging / name)
        fsync_tree(staging)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(final.parent)
    return final


def prune(graph: str | os.PathLike, keep: int, in_place: int | None = None) -> list[int]:
    """Delete all but the newest ``keep`` kept versions (never ``in_place``); returns those deleted."""
    versions = history_versions(graph)
    doomed = [v for v in versions[:max(0, len(versions) - keep)] if v != in_place]
    for version in doomed:
        shutil.rmtree(history_dir(graph) / str(version), ignore_errors=True)
    return doomed


def current_version(graph: str | os.PathLike) -> int | None:
    """The version of the graph in place, from its embedded metadata (None: none, or not ours)."""
    from imageclf.export import embedded_metadata  # TensorFlow: only when asked

    version = (embedded_metadata(graph) or {}).get("version")
    return version if isinstance(version, int) else None


def rollback(graph: str | os.PathLike, to: int | None = None) -> int:
    """Put kept version ``to`` (default: the newest older than the one in place) back at ``graph``."""
    graph = Path(graph)
    versions = history_versions(graph)
    if not versions:
        raise UserError(f"{graph}: no kept versions in {history_dir(graph)}")
    now = current_version(graph)
    if to is None:
        older = [v for v in versions if now is None or v < now]
        if not older:
            raise UserError(f"{graph.stem}: no kept version older than the one in place ({now}); "
                            f"kept: {', '.join(map(str, versions))}")
        to = older[-1]
    if to not in versions:
        raise UserError(f"{graph.stem}: version {to} is not kept; kept: {', '.join(map(str, versions))}")
    source = history_dir(graph) / str(to)
    files = _set_files(graph)
    order = [f"{graph.stem}.manifest.jsonl", f"{graph.stem}.pb", f"{graph.stem}.labels.txt", f"{graph.stem}.json"]
    for name in order:
        kept = source / name
        if kept.is_file():
            write_bytes_atomic(files[name], kept.read_bytes())
        elif name.endswith(".manifest.jsonl"):
            files[name].unlink(missing_ok=True)  # an old version without one: the newer one is not its
    return to


def listing(graph: str | os.PathLike) -> list[str]:
    """One line per kept version: version, created, classes, test accuracy, data fingerprint."""
    graph = Path(graph)
    now = current_version(graph)
    lines = []
    for version in reversed(history_versions(graph)):
        try:
            meta = json.loads((history_dir(graph) / str(version) / f"{graph.stem}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        test = (meta.get("accuracy") or {}).get("test")
        lines.append(f"{version}{'  (in place)' if version == now else ''}  created {meta.get('created', '?')}  "
                     f"{len(meta.get('labels') or [])} classes  test accuracy "
                     f"{'-' if test is None else f'{100 * test:.1f}%'}  "
                     f"data {(meta.get('data') or {}).get('fingerprint', '-')}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    from imageclf.cli_common import OneLineErrorParser

    p = OneLineErrorParser(prog="python -m imageclf.history", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("list", "rollback"))
    p.add_argument("name", help="the model's name: graphs/NAME.pb")
    p.add_argument("--to", type=int, help="rollback: the version to put back (default: the previous one)")
    p.add_argument("--graphs_dir", default="graphs", help="the folder the service serves (default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    graph = Path(args.graphs_dir) / f"{args.name}.pb"
    if args.command == "list":
        lines = listing(graph)
        if not lines:
            raise UserError(f"{graph}: no kept versions in {history_dir(graph)}")
        print("\n".join(lines))
        return 0
    version = rollback(graph, args.to)
    print(f"{graph} is version {version} again (a running service reloads it at its next poll)")
    return 0


def entry_point() -> None:
    from imageclf.cli_common import quiet_tensorflow, run

    quiet_tensorflow()
    sys.exit(run("python -m imageclf.history", main))


if __name__ == "__main__":
    entry_point()
