"""What both benchmarks share: where things are, a quiet TensorFlow, machine details, results files."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_IMAGE_DIR = REPO_ROOT.parent / "shared" / "data" / "stanford_dogs_9"
FALLBACK_IMAGE_DIR = REPO_ROOT / "sample_images"
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def prepare_imports() -> None:
    """Make ``import imageclf`` work from any working directory and keep TensorFlow quiet."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
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


def machine_info() -> dict:
    """Host, date, CPUs, memory, versions and the load average now (the start of a run)."""
    import numpy as np
    import tensorflow as tf

    return {"hostname": socket.gethostname(),
            "date": datetime.now().astimezone().isoformat(timespec="seconds"),
            "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu_model": _proc_field("/proc/cpuinfo", "model name") or platform.processor(),
            "memory_total_gib": _memory_gib(),
            "python": platform.python_version(), "tensorflow": tf.__version__,
            "numpy": np.__version__, "platform": platform.platform(),
            "load_average_start": load_average(), **source_state()}


def source_state() -> dict:
    """The commit measured and whether the tree had changes (a run of uncommitted code says so)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "tree_clean": None if status is None else status == ""}


def machine_line(m: dict) -> str:
    return (f"{m['nproc']} CPUs ({m['cpu_model']}), {m['memory_total_gib']} GiB, Python {m['python']}, "
            f"TensorFlow {m['tensorflow']}, {m['date']}, load {m['load_average_start']}"
            f" -> {m['load_average_end']}")


def write_results(benchmark: str, results: dict, output: Path | None) -> Path:
    """Write ``results`` as JSON, by default under results/; returns the file written."""
    machine = results["machine"]
    if output is None:
        # Host and start time to the minute, so that runs on one machine never overwrite each other.
        stamp = datetime.fromisoformat(machine["date"]).strftime("%Y%m%d-%H%M")
        output = RESULTS_DIR / f"{benchmark}-{machine['hostname']}-{stamp}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    return output


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


def machine_info_light() -> dict:
    """``machine_info()`` without importing TensorFlow or NumPy: versions from package metadata.

    For drivers that only talk to other processes and should stay small and quiet themselves.
    """
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    return {"hostname": socket.gethostname(),
            "date": datetime.now().astimezone().isoformat(timespec="seconds"),
            "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu_model": _proc_field("/proc/cpuinfo", "model name") or platform.processor(),
            "memory_total_gib": _memory_gib(),
            "python": platform.python_version(), "tensorflow": installed("tensorflow"),
            "numpy": installed("numpy"), "platform": platform.platform(),
            "load_average_start": load_average(), **source_state()}


def memory_available_mib() -> float | None:
    """MemAvailable of the whole machine, in MiB (None off Linux)."""
    available = _proc_field("/proc/meminfo", "MemAvailable")  # "23000000 kB"
    return round(int(available.split()[0]) / 1024, 1) if available else None


def process_memory_mib(pid: int) -> dict | None:
    """VmRSS (now) and VmHWM (peak) of process ``pid`` from /proc, in MiB; None once it is gone."""
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
