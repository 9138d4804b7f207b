"""Benchmark of the Beam bottleneck job against retrain.py's in-process bottleneck step.

Both compute every image's bottleneck on the built-in base, batches of 32, into an empty cache
(a new temporary folder each time):

- in-process: ``get_bottlenecks`` (what retrain.py runs) in this process, the base loaded first;
- Beam job: ``python -m imageclf.bottlenecks_job`` as a subprocess, DirectRunner with 2 worker
  processes (its default). Its own "Done in" time runs from the pipeline's start (workers
  starting, importing TensorFlow and loading the base included) to its end; the wall time adds
  the driver's start-up (imports, loading the base once to name the cache folder). The job
  also reports its decode-and-forward stage alone (first batch started to last batch ended,
  across workers): its rate once the workers are up.

It then checks that both caches hold the same entries, bit for bit.

    python benchmarks/bench_bottlenecks_job.py [--image_dir DIR] [--quick] [--output FILE.json]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from harness import (
    DEFAULT_IMAGE_DIR,
    REPO_ROOT,
    Run,
    add_run_flags,
    load_average,
    machine_line,
    prepare_imports,
    resolve_image_dir,
    spread_sample,
)

BATCH_SIZE = 32  # retrain.py's and the job's default --batch_size
QUICK_IMAGES = 200
WORKERS = 2


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image_dir", type=Path, help=f"one subfolder of images per class (default: {DEFAULT_IMAGE_DIR})")
    p.add_argument("--quick", action="store_true", help=f"at most {QUICK_IMAGES} images, spread over every class")
    p.add_argument("--output", type=Path, help="JSON file to write (default: under benchmarks/results/)")
    return add_run_flags(p).parse_args(argv)


def image_set(image_dir: Path, quick: bool, tmp: Path) -> tuple[Path, list[Path]]:
    """The folder both sides read and its files in retrain.py's order; with --quick, a folder holding
    copies of a sample spread over every class (the job lists folders, it takes no file list; copies,
    since both sides leave out symlinks that lead out of the folder they read)."""
    from imageclf.dataset import scan_image_dir

    _, files = scan_image_dir(image_dir)
    if not quick:
        return image_dir, [f.path for f in files]
    subset = tmp / "subset"
    for f in spread_sample(files, QUICK_IMAGES):
        copy = subset / f.path.parent.name / f.path.name
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f.path, copy)
    _, files = scan_image_dir(subset)
    return subset, [f.path for f in files]


def rate(images: int, seconds: float) -> dict:
    return {"images": images, "seconds": round(seconds, 2), "images_per_s": round(images / seconds, 1)}


def bench_in_process(paths: list[Path], cache_root: Path) -> dict:
    from imageclf.bases import load_base
    from imageclf.bottlenecks import BottleneckCache, get_bottlenecks

    started = time.perf_counter()
    base = load_base("builtin")
    loaded = time.perf_counter()
    _, report = get_bottlenecks(paths, base, BottleneckCache(cache_root, base), batch_size=BATCH_SIZE,
                                progress=False)
    done = time.perf_counter()
    return {**rate(report.computed, done - loaded), "load_base_s": round(loaded - started, 2),
            "summary": report.summary(), "load_average_after": load_average()}


def bench_job(image_dir: Path, cache_root: Path) -> dict:
    command = [sys.executable, "-m", "imageclf.bottlenecks_job", "--image_dir", str(image_dir),
               "--bottleneck_dir", str(cache_root), "--batch_size", str(BATCH_SIZE), "--num_workers", str(WORKERS)]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=3600,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"the job failed (status {result.returncode}):\n{result.stderr[-3000:]}")
    counts = re.search(r"Bottlenecks: computed ([\d,]+), reused ([\d,]+), skipped ([\d,]+)", result.stdout)
    pipeline = re.search(r"Done in ([\d.]+) s", result.stdout)
    stage = re.search(r"decoding and forward passes ([\d.]+) s", result.stdout)
    look_up = re.search(r"hashing and cache look-ups ([\d.]+) s", result.stdout)
    computed = int(counts.group(1).replace(",", ""))
    return {**rate(computed, float(pipeline.group(1))), "wall": rate(computed, wall),
            "compute_stage": rate(computed, float(stage.group(1))), "look_up_stage_s": float(look_up.group(1)),
            "output": result.stdout.strip().splitlines()[-4:],
            "summary": counts.group(0).removeprefix("Bottlenecks: "), "workers": WORKERS,
            "runner": "DirectRunner, multi_processing", "load_average_after": load_average()}


def compare_caches(ours: Path, theirs: Path) -> dict:
    """Entries of both caches, by name, and how many hold the same bytes."""
    import numpy as np

    a = {p.relative_to(ours): p for p in ours.rglob("*.npy")}
    b = {p.relative_to(theirs): p for p in theirs.rglob("*.npy")}
    same = sum(np.array_equal(np.load(a[k]), np.load(b[k])) for k in a.keys() & b.keys())
    return {"entries_job": len(a), "entries_in_process": len(b), "same_names": a.keys() == b.keys(),
            "bit_identical": int(same)}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_imports()
    requested, note = resolve_image_dir(args.image_dir)
    name = "bench_bottlenecks_job" + ("-quick" if args.quick else "")  # a quick run never overwrites a full one
    run = Run(name, args)
    with tempfile.TemporaryDirectory(prefix="bench-job-") as tmp:
        tmp = Path(tmp)
        image_dir, paths = image_set(requested, args.quick, tmp)
        print(f"{len(paths):,} files in {requested}{' (--quick sample)' if args.quick else ''}", flush=True)
        job = bench_job(image_dir, tmp / "job-cache")
        print(f"Beam job:   {job['images_per_s']} images/s ({job['summary']}; wall {job['wall']['images_per_s']}, "
              f"compute stage {job['compute_stage']['images_per_s']})", flush=True)
        in_process = bench_in_process(paths, tmp / "in-process-cache")
        print(f"in-process: {in_process['images_per_s']} images/s ({in_process['summary']})", flush=True)
        caches = compare_caches(tmp / "job-cache", tmp / "in-process-cache")
    machine = run.end()
    results = {"machine": machine, "image_dir": str(requested), "note": note, "quick": args.quick,
               "batch_size": BATCH_SIZE, "job": job, "in_process": in_process,
               "ratio_job_to_in_process": round(job["images_per_s"] / in_process["images_per_s"], 3),
               "ratio_job_wall_to_in_process": round(job["wall"]["images_per_s"] / in_process["images_per_s"], 3),
               "ratio_job_compute_stage_to_in_process": round(job["compute_stage"]["images_per_s"]
                                                              / in_process["images_per_s"], 3),
               "caches": caches}
    print(f"ratio job / in-process: {results['ratio_job_to_in_process']} "
          f"(job wall time: {results['ratio_job_wall_to_in_process']}, job compute stage: "
          f"{results['ratio_job_compute_stage_to_in_process']}); caches: {caches}")
    print(machine_line(machine))
    if note:
        print(f"note: {note}")
    run.write(results, label="results: ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
