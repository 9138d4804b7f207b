"""Every relative link in the docs leads to a file that exists and, with a #anchor, to a heading in it.

README.md is an entry point that links into docs/; a page renamed or a heading reworded would
otherwise leave links that go nowhere. Anchors follow GitHub's heading slugs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import unquote

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]

_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:...


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (links and headings in code are not links)."""
    lines, in_fence = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append(line)
    return lines


def _without_code_spans(text: str) -> str:
    return re.sub(r"`[^`]*`", "", text)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation but - and _ dropped,
    spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    result = set()
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def broken_links(path: Path) -> list[str]:
    """One line per relative link in ``path`` whose file or #anchor does not exist. Links may
    wrap across lines, so the prose is searched as a whole."""
    problems = []
    prose = _without_code_spans("\n".join(_prose_lines(path.read_text(encoding="utf-8"))))
    for target in _LINK.findall(prose):
        if _EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / unquote(file_part)).resolve() if file_part else path
        where = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: ({target})"
        if not linked.exists():
            problems.append(f"{where}: no file {file_part}")
        elif anchor and linked.suffix == ".md" and unquote(anchor) not in anchors(linked):
            problems.append(f"{where}: no heading #{anchor} in {linked.name}")
    return problems


def test_every_relative_link_in_the_docs_resolves():
    assert all(doc.exists() for doc in DOCS), [str(doc) for doc in DOCS if not doc.exists()]
    problems = [problem for doc in DOCS for problem in broken_links(doc)]
    assert not problems, "\n".join(problems)


def test_a_broken_file_or_anchor_is_reported(tmp_path):
    (tmp_path / "other.md").write_text("# Under load: `--workers`\n\n## Under load: `--workers`\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#under-load---workers) [ok](other.md#under-load---workers-1) [web](https://x.org/y)\n"
        "[gone](missing.md) [bad anchor](other.md#under-load) [self, wrapped\nacross lines](#nowhere)\n"
        "```\n[in code](missing-too.md)\n```\n"
    )
    problems = broken_links(page)
    assert len(problems) == 3, problems
    assert "no file missing.md" in problems[0]
    assert "#under-load" in problems[1] and "#nowhere" in problems[2]


def test_github_slugs():
    assert github_slug("Quick start (Linux or macOS, Python 3.10–3.12)") == "quick-start-linux-or-macos-python-310312"
    assert github_slug("Runtimes: TensorFlow or LiteRT (`--runtime`)") == "runtimes-tensorflow-or-litert---runtime"
    assert github_slug("`bench_workers.py`: threads or processes") == "bench_workerspy-threads-or-processes"


# -- results files: the folder holds the runs the docs cite, and every cited run is there -------------

RESULTS = REPO / "benchmarks" / "results"
#: Where a results file may be cited: the docs, and deploy/ (which sizes its memory from a soak).
CITING = [*DOCS, *sorted((REPO / "deploy").rglob("*.yaml"))]
_RESULTS_FILE = re.compile(r"\b[a-z][a-z0-9_]*(?:-[A-Za-z0-9_]+)*?-\d{8}(?:-[A-Za-z0-9_.]+)*\.json\b")


def cited_results(paths: list[Path]) -> set[str]:
    """The results file names cited in ``paths``, by their whole name."""
    return {name for path in paths for name in _RESULTS_FILE.findall(path.read_text())}


def test_the_results_folder_holds_exactly_the_runs_the_docs_cite():
    cited, kept = cited_results(CITING), {p.name for p in RESULTS.glob("*.json")}
    assert not cited - kept, f"cited but not in benchmarks/results/: {sorted(cited - kept)}"
    assert not kept - cited, f"in benchmarks/results/ but cited nowhere (prune them): {sorted(kept - cited)}"


def test_a_results_file_is_found_by_its_whole_name(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("measured (`benchmarks/results/bench_v2-vm-20261206-1733.json`, `soak_service-vm-20261125-"
                    "prehardening-fcab4ba-quick.json`) and `profile_service-32c-wait50-vm-20261206-0238.json`; "
                    "not `...-1734.json`\n")
    assert cited_results([page]) == {"bench_v2-vm-20261206-1733.json",
                                     "profile_service-32c-wait50-vm-20261206-0238.json",
                                     "soak_service-vm-20261125-prehardening-fcab4ba-quick.json"}


def test_every_results_file_names_the_code_it_measured():
    """New runs record their commit and whether the tree was clean; older ones the commit that added them."""
    for path in sorted(RESULTS.glob("*.json")):
        machine = json.loads(path.read_text())["machine"]
        assert "commit" in machine and "tree_clean" in machine, path.name
        if machine["commit"] is None:
            assert re.fullmatch(r"[0-9a-f]{40}", machine.get("committed_in", "")), path.name
        else:
            assert re.fullmatch(r"[0-9a-f]{40}", machine["commit"]), path.name
            assert machine["tree_clean"] in (True, False), path.name
