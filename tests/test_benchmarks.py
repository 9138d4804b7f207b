"""The benchmarks' shared harness: every script starts, the service helper runs a real service, dirty trees refuse."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from .conftest import REPO, tiny_graphs_dir

BENCHMARKS = REPO / "benchmarks"


def _load_harness():
    """benchmarks/harness.py as the scripts import it (a top-level module), without putting benchmarks/ on sys.path."""
    spec = importlib.util.spec_from_file_location("harness", BENCHMARKS / "harness.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["harness"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


harness = _load_harness()
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name != "harness.py")


def test_every_benchmark_is_found():
    assert len(SCRIPTS) >= 12 and "bench_service.py" in SCRIPTS and "soak_service.py" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_answers_help_with_the_harness_flag(script):
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=120, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--allow_dirty" in done.stdout  # given by harness.add_run_flags, not copied


# ---------------------------------------------------------------- the service-process helper

def test_service_process_starts_a_real_service_reads_its_memory_and_stops_it(tmp_path, shapes_dir, tiny_module):
    graphs = tiny_graphs_dir(shapes_dir, tiny_module, tmp_path / "model", "tiny")
    procs = harness.Processes(tmp_path)
    service = procs.start_service("service", ["--graphs_dir", str(graphs), "--image_root", str(shapes_dir),
                                              "--grpc_port", "0", "--threads", "2"])
    try:
        assert service.wait_ready(timeout=180) is service and service.ready_seconds is not None
        assert service.log == tmp_path / "service.log" and service.log.is_file()  # a file, never a pipe
        with urllib.request.urlopen(f"http://127.0.0.1:{service.port}/models", timeout=30) as answer:
            assert [m["name"] for m in json.loads(answer.read())["models"]] == ["tiny"]
        memory = service.memory()
        assert memory is not None and memory["rss_mib"] > 10 and memory["peak_rss_mib"] >= memory["rss_mib"]
        pid = service.proc.pid
        service.stop()
        assert service.proc.poll() is not None and not Path(f"/proc/{pid}").exists()  # gone, and reaped
        assert service.memory() is None
    finally:
        if service.proc.poll() is None:  # the helper failed to stop it: never leave a service behind
            service.proc.kill()
            service.proc.wait(30)


def test_wait_ready_fails_at_once_with_the_log_tail_when_the_process_exits(tmp_path):
    with harness.Processes(tmp_path) as procs:
        broken = procs.start("broken", [sys.executable, "-c", "import sys; print('no model here'); sys.exit(3)"],
                             port=harness.free_port())
        with pytest.raises(harness.NotReady, match=r"(?s)broken exited \(3\).*no model here"):
            broken.wait_ready(timeout=60)


def test_leaving_the_with_block_stops_every_process_it_started(tmp_path):
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    with harness.Processes(tmp_path) as procs:
        started = [procs.start(f"sleeper-{i}", sleeper) for i in range(2)]
        assert all(p.alive() for p in started)
    try:
        assert [p.proc.poll() for p in started] == [-15, -15]  # terminated by the harness, not finished
    finally:
        for p in started:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait(30)


# ---------------------------------------------------------------- clean tree or --allow_dirty

def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args], cwd=repo,
                   check=True, capture_output=True, timeout=30)


@pytest.fixture
def repo(tmp_path) -> Path:
    """A real git repository with one committed file and a benchmarks/results/ folder."""
    root = tmp_path / "clone"
    (root / "benchmarks" / "results").mkdir(parents=True)
    (root / "tracked.py").write_text("x = 1\n")
    _git(root, "init", "-q")
    _git(root, "add", "tracked.py")
    _git(root, "commit", "-q", "-m", "one")
    return root


def test_a_clean_tree_may_write_into_results(repo):
    (repo / "untracked.txt").write_text("scratch\n")  # untracked files do not count
    assert harness.dirty_refusal(None, False, repo) is None
    assert harness.source_state(repo)["tree_clean"] is True


def test_a_dirty_tree_refuses_results_unless_allowed_or_written_elsewhere(repo, tmp_path):
    (repo / "tracked.py").write_text("x = 2\n")
    refusal = harness.dirty_refusal(None, False, repo)
    assert refusal and "\n" not in refusal and "--allow_dirty" in refusal
    assert harness.dirty_refusal(repo / "benchmarks" / "results" / "mine.json", False, repo) == refusal
    assert harness.dirty_refusal(None, True, repo) is None
    assert harness.dirty_refusal(tmp_path / "elsewhere.json", False, repo) is None


def test_run_refuses_in_one_line_and_with_allow_dirty_writes_a_dirty_file(repo):
    (repo / "tracked.py").write_text("x = 2\n")
    with pytest.raises(SystemExit, match=r"^bench_x: the tree has uncommitted changes[^\n]*$"):
        harness.Run("bench_x", argparse.Namespace(output=None, allow_dirty=False), light=True, repo_root=repo)
    run = harness.Run("bench_x", argparse.Namespace(output=None, allow_dirty=True), light=True, repo_root=repo)
    path = run.write({"machine": run.end(), "value": 1})
    assert path.parent == repo / "benchmarks" / "results" and path.name.endswith("-dirty.json")
    written = json.loads(path.read_text())
    assert written["machine"]["tree_clean"] is False and "load_average_end" in written["machine"]
