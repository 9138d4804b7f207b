"""The one harness every benchmark shares.

- where things are (the clone, the data, results/), and the clone first on ``sys.path``, so that a
  run measures the checked-out code;
- machine details, the commit and whether the tree is clean;
- ``free_port``, ``Processes`` and ``ServiceProcess``: ``python -m service`` (or any command) as a
  subprocess logging to a file, ready on ``/readyz``, its memory, stopped for sure;
- ``percentiles`` and ``latency_ms``;
- ``Run``: machine details at the start, load average at the end, the results file; it refuses to
  write into results/ from a tree with uncommitted changes unless ``--allow_dirty`` is given.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_IMAGE_DIR = REPO_ROOT.parent / "shared" / "data" / "stanford_dogs_9"
FALLBACK_IMAGE_DIR = REPO_ROOT / "sample_images"
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
HOST = "127.0.0.1"  # never anything else: the benchmarks only talk to their own processes
READY_TIMEOUT_S = 180


def clone_first(root: Path = REPO_ROOT) -> None:
    """Put ``root`` first on ``sys.path``: a run measures the checked-out code, never an installed copy."""
    if str(root) in sys.path:
        sys.path.remove(str(root))
    sys.path.insert(0, str(root))


def prepare_imports() -> None:
    """Make ``import imageclf`` find this clone from any working directory and keep TensorFlow quiet."""
    clone_first()
    # Must be set before TensorFlow is imported; its C++ logging reads it once.
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    from imageclf.cli_common import quiet_tensorflow

    # Also hides the CUDA probing lines that TensorFlow prints before honouring the variable.
    quiet_tensorflow()


def resolve_image_dir(requested: Path | None) -> tuple[Path, str | None]:
    """The image folder to use, and a note when the default data set is missing."""
    if requested is not None:
        return requested, None
    if DEFAULT_IMAGE_DIR.is_dir():
        return DEFAULT_IMAGE_DIR, None
    note = (f"{DEFAULT_IMAGE_DIR} not found; using the small generated set {FALLBACK_IMAGE_DIR} "
            "instead, so the numbers are not comparable with benchmarks/README.md's")
    return FALLBACK_IMAGE_DIR, note


def spread_sample(paths: list[Path], n: int) -> list[Path]:
    """At most ``n`` paths taken evenly across the list, so every class is represented."""
    step = max(1, len(paths) // n)
    return paths[::step][:n]


# ---------------------------------------------------------------- machine and source

def machine_info(repo_root: Path = REPO_ROOT) -> dict:
    """Host, date, CPUs, memory, versions and the load average now (the start of a run)."""
    import numpy as np
    import tensorflow as tf

    return {**_host(), "tensorflow": tf.__version__, "numpy": np.__version__, "platform": platform.platform(),
            "load_average_start": load_average(), **source_state(repo_root)}


def machine_info_light(repo_root: Path = REPO_ROOT) -> dict:
    """``machine_info()`` without importing TensorFlow or NumPy: versions from package metadata.

    For drivers that only talk to other processes and should stay small and quiet themselves.
    """
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    return {**_host(), "tensorflow": installed("tensorflow"), "numpy": installed("numpy"),
            "platform": platform.platform(), "load_average_start": load_average(), **source_state(repo_root)}


def _host() -> dict:
    return {"hostname": socket.gethostname(),
            "date": datetime.now().astimezone().isoformat(timespec="seconds"),
            "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu_model": _proc_field("/proc/cpuinfo", "model name") or platform.processor(),
            "memory_total_gib": _memory_gib(), "python": platform.python_version()}


def source_state(repo_root: Path = REPO_ROOT) -> dict:
    """The commit measured and whether the tree had changes (a run of uncommitted code says so)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=repo_root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "tree_clean": None if status is None else status == ""}


def machine_line(m: dict) -> str:
    return (f"{m['nproc']} CPUs ({m['cpu_model']}), {m['memory_total_gib']} GiB, Python {m['python']}, "
            f"TensorFlow {m['tensorflow']}, {m['date']}, load {m['load_average_start']}"
            f" -> {m['load_average_end']}")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _proc_field(path: str, key: str) -> str | None:
    """The first ``key: value`` line of a /proc file, or None off Linux."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, value = line.partition(":")
        if name.strip() == key:
            return value.strip()
    return None


def _memory_gib() -> float | None:
    total = _proc_field("/proc/meminfo", "MemTotal")  # "24576000 kB"
    return round(int(total.split()[0]) / 2**20, 1) if total else None


def memory_available_mib() -> float | None:
    """MemAvailable of the whole machine, in MiB (None off Linux)."""
    available = _proc_field("/proc/meminfo", "MemAvailable")  # "23000000 kB"
    return round(int(available.split()[0]) / 1024, 1) if available else None


def process_memory_mib(pid: int | str) -> dict | None:
    """VmRSS (now) and VmHWM (peak) of process ``pid`` ("self" too) from /proc, in MiB; None once it is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])  # kB
    if "VmRSS" not in fields:
        return None  # a zombie has no memory lines
    return {"rss_mib": round(fields["VmRSS"] / 1024, 1), "peak_rss_mib": round(fields.get("VmHWM", 0) / 1024, 1)}


# ---------------------------------------------------------------- statistics

def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 99)) -> dict[float, float]:
    """Each percentile ``q`` of ``values``: linear interpolation between closest ranks (numpy's default)."""
    s = sorted(values)
    out = {}
    for q in qs:
        pos = (len(s) - 1) * q / 100
        lo = math.floor(pos)
        hi = min(lo + 1, len(s) - 1)
        out[q] = s[lo] + (s[hi] - s[lo]) * (pos - lo)
    return out


def percentile(values: Sequence[float], q: float) -> float:
    return percentiles(values, (q,))[q]


def latency_ms(seconds: Sequence[float], qs: Sequence[float] = (50, 99), digits: int = 2, mean: bool = True,
               maximum: bool = False) -> dict:
    """``n``, ``p<q>_ms`` for each q, and optionally ``mean_ms`` and ``max_ms`` of durations given in seconds."""
    ms = [1000.0 * s for s in seconds]
    out: dict = {"n": len(ms), **{f"p{q:g}_ms": round(v, digits) for q, v in percentiles(ms, qs).items()}}
    if mean:
        out["mean_ms"] = round(sum(ms) / len(ms), digits)
    if maximum:
        out["max_ms"] = round(max(ms), digits)
    return out


# ---------------------------------------------------------------- processes

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class NotReady(RuntimeError):
    """A process exited, or did not answer ``/readyz`` with 200, before its deadline; holds its log's tail."""


@dataclass
class ServiceProcess:
    """One subprocess a benchmark started, with its port (if it serves) and its log file."""

    name: str
    proc: subprocess.Popen
    port: int | None
    log: Path
    ready_seconds: float | None = None  # how long wait_ready waited

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> ServiceProcess:
        """Poll ``/readyz`` until 200 (the model is loaded and warmed up); raise early if the process exits."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if not self.alive():
                raise NotReady(f"{self.name} exited ({self.proc.returncode}) before it was ready:\n{self.tail()}")
            if _status(self.port, "/readyz") == 200:
                self.ready_seconds = time.monotonic() - started
                return self
            time.sleep(0.2)
        raise NotReady(f"{self.name} not ready after {timeout:.0f} s:\n{self.tail()}")

    def memory(self) -> dict | None:
        """``rss_mib`` (VmRSS) and ``peak_rss_mib`` (VmHWM) of the process; None once it is gone."""
        return process_memory_mib(self.proc.pid) if self.alive() else None

    def stop(self) -> None:
        """Terminate, wait up to 10 s, then kill."""
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def _status(port: int | None, path: str) -> int | None:
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None  # not listening yet
    finally:
        conn.close()


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL if the benchmark dies without cleaning up (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Processes:
    """Every process a benchmark starts; ``with Processes(work) as procs:`` stops them all, on errors too.

    Output goes to ``<work>/<name>.log``, never a pipe: a full pipe would block the child.
    """

    def __init__(self, work: Path, cwd: Path = REPO_ROOT, env: dict[str, str] | None = None,
                 detach: bool = False):
        self.work, self.cwd, self.env = work, cwd, env
        # detach: a session of its own (Ctrl-C goes to the benchmark, which stops it) and SIGKILL if the
        # benchmark dies without cleaning up.
        self.detach = detach
        self.started: list[ServiceProcess] = []

    def start(self, name: str, cmd: list[str], port: int | None = None) -> ServiceProcess:
        """Start ``cmd`` without waiting, so that several processes can load their models at the same time."""
        log = self.work / f"{name}.log"
        extra = {"start_new_session": True, "preexec_fn": _die_with_parent} if self.detach else {}
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, cwd=self.cwd, env=self.env, stdout=f, stderr=subprocess.STDOUT, **extra)
        self.started.append(ServiceProcess(name, proc, port, log))
        return self.started[-1]

    def start_service(self, name: str, args: Sequence[str], port: int | None = None) -> ServiceProcess:
        """``python -m service --host 127.0.0.1 ARGS --port PORT`` (a free port unless given)."""
        port = port or free_port()
        return self.start(name, [sys.executable, "-m", "service", "--host", HOST, *args, "--port", str(port)], port)

    def stop_all(self) -> None:
        for p in self.started:
            p.stop()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


# ---------------------------------------------------------------- a run and its results file

def add_run_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every benchmark shares (besides its own --output)."""
    parser.add_argument("--allow_dirty", action="store_true",
                        help="write into benchmarks/results/ even from a tree with uncommitted changes "
                             "(the file name gets -dirty)")
    return parser


def dirty_refusal(output: Path | None, allow_dirty: bool, repo_root: Path = REPO_ROOT) -> str | None:
    """Why a run must not start, or None: results/ only gets runs of committed code, unless allowed.

    Uncommitted changes to tracked files count; untracked files do not. ``--output`` elsewhere is always fine.
    """
    results = (repo_root / "benchmarks" / "results").resolve()
    target = results if output is None else output.resolve()
    if allow_dirty or not target.is_relative_to(results):
        return None
    if source_state(repo_root)["tree_clean"] is not False:
        return None
    return ("the tree has uncommitted changes to tracked files: commit them, or pass --allow_dirty "
            "(the file name gets -dirty), or write elsewhere with --output")


def write_results(benchmark: str, results: dict, output: Path | None, results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``results`` as JSON, by default under results/ (``-dirty`` when the tree was not clean)."""
    machine = results["machine"]
    if output is None:
        # Host and start time to the minute, so that runs on one machine never overwrite each other.
        stamp = datetime.fromisoformat(machine["date"]).strftime("%Y%m%d-%H%M")
        dirty = "-dirty" if machine.get("tree_clean") is False else ""
        output = results_dir / f"{benchmark}-{machine['hostname']}-{stamp}{dirty}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    return output


class Run:
    """One run of a benchmark: machine details at the start, load average at the end, the results file.

    Refuses (SystemExit, one line) to start a run whose results would go into a dirty results/.
    ``light``: machine details without importing TensorFlow (for drivers of other processes).
    ``repo_root``: the clone whose state and results/ count (another one only in tests).
    """

    def __init__(self, benchmark: str, args: argparse.Namespace, light: bool = False, repo_root: Path = REPO_ROOT):
        self.benchmark, self.repo_root = benchmark, repo_root
        self.output: Path | None = getattr(args, "output", None)
        refusal = dirty_refusal(self.output, getattr(args, "allow_dirty", False), repo_root)
        if refusal:
            raise SystemExit(f"{benchmark}: {refusal}")
        self.machine = (machine_info_light if light else machine_info)(repo_root)
        self.started = time.perf_counter()

    def wall_s(self) -> float:
        return round(time.perf_counter() - self.started, 1)

    def end(self) -> dict:
        """The machine details with the load average at the end (taken once); call when measuring is done."""
        self.machine.setdefault("load_average_end", load_average())
        return self.machine

    def write(self, results: dict, name: str | None = None, label: str = "\nWrote ") -> Path:
        """Write the results file (named after ``name`` or the benchmark) and print ``label`` + its path."""
        self.end()
        path = write_results(name or self.benchmark, results, self.output,
                             self.repo_root / "benchmarks" / "results")
        print(f"{label}{path}")
        return path
