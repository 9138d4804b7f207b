"""Benchmark of the retrain pipeline: bottleneck throughput and wall time of whole retrains.

Part 1 runs, in one process and on one base model, a bare forward pass over random pixels and
``get_bottlenecks`` over the real files (hash, decode, resize, forward pass, cache writes). Their
ratio is what the pipeline around the model costs. The runtime column: the same bare forward
pass and ``get_bottlenecks`` with the base run by LiteRT (``retrain.py --runtime litert``, the
base converted to ``.tflite``, XNNPACK, one thread per core), in the same rounds. Part 2 times
``retrain.py`` end to end in subprocesses: once on an empty cache, then again after one class
folder is added, which is the case the bottleneck cache exists for.

    python benchmarks/bench_retrain.py [--image_dir DIR] [--quick] [--output FILE.json]

Results are printed as a table and written as JSON (with machine details) to
benchmarks/results/ unless --output says otherwise.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from harness import (
    DEFAULT_IMAGE_DIR,
    REPO_ROOT,
    Run,
    add_run_flags,
    machine_line,
    prepare_imports,
    resolve_image_dir,
    spread_sample,
)

if TYPE_CHECKING:
    import numpy as np

    from imageclf.bases import BaseModel
    from imageclf.bottlenecks import BottleneckReport

BATCH_SIZE = 32  # retrain.py's default --batch_size
WARMUP_IMAGES = 64
QUICK_IMAGES = 200
LEFT_OUT_CLASS = "beagle"  # the class added back in part 2, when the data set has it
TARGET_RATIO = 0.8
ROUNDS = 3  # alternating bare/ours rounds in part 1; the best of each is reported

T = TypeVar("T")


# ---------------------------------------------------------------- set-up and inputs

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image_dir", type=Path,
                   help=f"one subfolder of images per class (default: {DEFAULT_IMAGE_DIR})")
    p.add_argument("--quick", action="store_true",
                   help=f"at most {QUICK_IMAGES} images for the throughput part; no retrains")
    p.add_argument("--output", type=Path, help="JSON file to write (default: under benchmarks/results/)")
    return add_run_flags(p).parse_args(argv)


def image_paths(image_dir: Path) -> list[Path]:
    """Every file retrain.py would consider, found by the same code retrain.py uses."""
    from imageclf.dataset import scan_image_dir

    _, files = scan_image_dir(image_dir)
    return [f.path for f in files]


def class_folders(image_dir: Path) -> list[str]:
    return sorted(p.name for p in image_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


# ---------------------------------------------------------------- timing helpers

def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()`` and its wall time in seconds."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def rate(images: int, seconds: float) -> dict:
    return {"images": images, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 1)}


# ---------------------------------------------------------------- part 1: throughput

def bare_runner(base: BaseModel, n_images: int) -> Callable[[], float]:
    """A timed pass of forward passes alone: random float32 batches, as many images as given."""
    import numpy as np
    import tensorflow as tf

    from imageclf.bottlenecks import feature_function

    features = feature_function(base)
    height, width = base.input_size
    pixels = np.random.default_rng(0).random((BATCH_SIZE, height, width, 3), dtype=np.float32)
    batch = tf.constant(pixels)
    # One tensor reused for every full batch: values do not change the cost, and holding
    # a distinct batch per step would take ~0.5 GB for the dogs set.
    batches = [batch] * (n_images // BATCH_SIZE)
    if n_images % BATCH_SIZE:
        batches.append(tf.constant(pixels[:n_images % BATCH_SIZE]))
    features(batch).numpy()  # warm-up: the first call allocates buffers and picks kernels

    def forward_all() -> None:
        for b in batches:
            features(b).numpy()

    return lambda: timed(forward_all)[1]


def litert_bare_runner(base: BaseModel, n_images: int) -> Callable[[], float]:
    """The bare forward pass through LiteRT: the base's frozen graph converted, batches of BATCH_SIZE."""
    import os

    import numpy as np
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    with tempfile.TemporaryDirectory() as folder:
        frozen = Path(folder) / "base.pb"
        frozen.write_bytes(base.graph_def.SerializeToString())
        inputs, outputs = [base.input_name.split(":")[0]], [base.output_name.split(":")[0]]
        converter = tf.compat.v1.lite.TFLiteConverter.from_frozen_graph(
            str(frozen), inputs, outputs, {inputs[0]: [None, *base.input_size, 3]})
        model = converter.convert()
    interpreter = Interpreter(model_content=model, num_threads=len(os.sched_getaffinity(0)))
    index = interpreter.get_input_details()[0]["index"]
    out = interpreter.get_output_details()[0]["index"]
    pixels = np.random.default_rng(0).random((BATCH_SIZE, *base.input_size, 3), dtype=np.float32)

    def run(batch: np.ndarray) -> None:
        if tuple(interpreter.get_input_details()[0]["shape"]) != batch.shape:
            interpreter.resize_tensor_input(index, batch.shape, strict=True)
            interpreter.allocate_tensors()
        interpreter.set_tensor(index, batch)
        interpreter.invoke()
        interpreter.get_tensor(out)

    batches = [pixels] * (n_images // BATCH_SIZE) + ([pixels[:n_images % BATCH_SIZE]] if n_images % BATCH_SIZE
                                                       else [])
    run(pixels)  # warm-up

    def forward_all() -> None:
        for b in batches:
            run(b)

    return lambda: timed(forward_all)[1]


def _get_bottlenecks(base: BaseModel, paths: list[Path], cache_root: str
                     ) -> tuple[dict[Path, np.ndarray], BottleneckReport]:
    from imageclf.bottlenecks import BottleneckCache, get_bottlenecks

    return get_bottlenecks(paths, base, BottleneckCache(cache_root, base),
                           batch_size=BATCH_SIZE, progress=False)


def bench_warmup(base: BaseModel, paths: list[Path]) -> dict:
    """Two small calls, each on its own empty cache.

    If tracing carried over between calls, the second would be much faster than the first.
    """
    sample = paths[:WARMUP_IMAGES]
    seconds = []
    for _ in range(2):
        with tempfile.TemporaryDirectory(prefix="bench-warmup-") as tmp:
            seconds.append(timed(lambda tmp=tmp: _get_bottlenecks(base, sample, tmp))[1])
    return {"images": len(sample), "first_call_s": round(seconds[0], 3),
            "second_call_s": round(seconds[1], 3)}


def bench_call_setup(base: BaseModel, paths: list[Path]) -> dict:
    """The fixed cost every get_bottlenecks call pays before its first batch runs at speed.

    Measured directly: build pixels_feature_function, then its first call, against later
    calls on the same batch. Both are memoized per base, so after the first call in a
    process this is close to zero; a regression would show here.
    """
    from imageclf.bottlenecks import pixels_feature_function
    from imageclf.images import read_image
    from imageclf.preprocess import pack_images

    packed = pack_images([read_image(p) for p in paths[:BATCH_SIZE]])
    fn, build = timed(lambda: pixels_feature_function(base))
    _, first = timed(lambda: fn(*packed))
    steady = min(timed(lambda: fn(*packed))[1] for _ in range(3))
    return {"build_s": round(build, 3), "first_batch_s": round(first, 3),
            "steady_batch_s": round(steady, 3), "setup_s": round(build + first - steady, 3)}


def bench_ours(base: BaseModel, paths: list[Path], rerun: bool) -> dict:
    """get_bottlenecks on an empty cache and, if ``rerun``, again on the now full cache."""
    result = {}
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        (_, report), seconds = timed(lambda: _get_bottlenecks(base, paths, tmp))
        result["empty_cache"] = {**rate(len(paths), seconds), "summary": report.summary()}
        if rerun:
            (_, report), seconds = timed(lambda: _get_bottlenecks(base, paths, tmp))
            result["cached_rerun"] = {**rate(len(paths), seconds), "summary": report.summary()}
    return result


def _best(runs: list[dict]) -> dict:
    """The fastest run, with every run's rate kept to show the spread."""
    best = max(runs, key=lambda r: r["images_per_s"])
    return {**best, "images_per_s_all_rounds": [r["images_per_s"] for r in runs]}


def bench_throughput(paths: list[Path]) -> dict:
    from imageclf.bases import load_base

    base = load_base("builtin")
    warmup = bench_warmup(base, paths)
    setup = bench_call_setup(base, paths)
    from imageclf.bottlenecks import with_runtime

    lite_base, why_not = with_runtime(base, "litert")
    if why_not:
        raise SystemExit(f"bench_retrain.py: {why_not}")
    bare = bare_runner(base, len(paths))
    litert_bare = litert_bare_runner(base, len(paths))
    # Alternate bare and ours so that load from other work on a shared machine hits both
    # alike; the best round of each is the least disturbed one.
    bare_runs, ours_runs, litert_runs, litert_ours_runs = [], [], [], []
    for i in range(ROUNDS):
        bare_runs.append(rate(len(paths), bare()))
        litert_runs.append(rate(len(paths), litert_bare()))
        ours_runs.append(bench_ours(base, paths, rerun=i == ROUNDS - 1))
        litert_ours_runs.append(bench_ours(lite_base, paths, rerun=False))
    cached = ours_runs[-1]["cached_rerun"]
    best_bare, best_ours = _best(bare_runs), _best([r["empty_cache"] for r in ours_runs])
    ratio = best_ours["images_per_s"] / best_bare["images_per_s"]
    round_ratios = [o["empty_cache"]["images_per_s"] / b["images_per_s"]
                    for b, o in zip(bare_runs, ours_runs, strict=True)]
    return {"base": base.description, "input_size": list(base.input_size),
            "bottleneck_size": base.bottleneck_size, "batch_size": BATCH_SIZE, "rounds": ROUNDS,
            "warmup": warmup, "call_setup": setup, "bare": best_bare, "empty_cache": best_ours,
            "cached_rerun": cached, "ratio": round(ratio, 3),
            "litert_bare": _best(litert_runs),
            "litert_over_tf_bare_per_round": [round(lt["images_per_s"] / b["images_per_s"], 2)
                                              for lt, b in zip(litert_runs, bare_runs, strict=True)],
            "litert_empty_cache": _best([r["empty_cache"] for r in litert_ours_runs]),
            "litert_over_tf_empty_cache_per_round": [
                round(lt["empty_cache"]["images_per_s"] / o["empty_cache"]["images_per_s"], 2)
                for lt, o in zip(litert_ours_runs, ours_runs, strict=True)],
            "ratio_per_round": [round(r, 3) for r in round_ratios],
            "target_ratio": TARGET_RATIO}


# ---------------------------------------------------------------- part 2: retrains

_ACCURACY = re.compile(r"^Final test accuracy = ([\d.]+)% \(N=(\d+)\)", re.MULTILINE)
_BOTTLENECKS = re.compile(r"^Bottlenecks: (computed [\d,]+, reused [\d,]+, skipped [\d,]+)", re.MULTILINE)
_DONE = re.compile(r"^Done in ([\d.]+) s\.", re.MULTILINE)


def run_retrain(image_dir: Path, work: Path) -> dict:
    """One ``retrain.py`` run with default flags; its wall time and what it printed."""
    cmd = [sys.executable, "retrain.py", "--image_dir", str(image_dir), "--bottleneck_dir", str(work),
           "--output_graph", str(work / "out.pb"), "--quiet"]
    proc, seconds = timed(lambda: subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True))
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    accuracy, bottlenecks, done = (r.search(proc.stdout) for r in (_ACCURACY, _BOTTLENECKS, _DONE))
    return {"classes": len(class_folders(image_dir)), "wall_s": round(seconds, 1),
            # retrain's own clock: without interpreter start, TensorFlow import and exit
            "in_process_s": float(done.group(1)) if done else None,
            "test_accuracy_pct": float(accuracy.group(1)) if accuracy else None,
            "test_n": int(accuracy.group(2)) if accuracy else None,
            "bottlenecks": bottlenecks.group(1) if bottlenecks else None}


def link_classes(source: Path, target: Path, classes: Sequence[str]) -> None:
    """Symlink class folders, so a data set variant costs no copying and keeps file contents."""
    for name in classes:
        (target / name).symlink_to((source / name).resolve(), target_is_directory=True)


def bench_add_class(image_dir: Path) -> dict | None:
    """Retrain on all classes but one (empty cache), then add that class and retrain again."""
    classes = class_folders(image_dir)
    if len(classes) < 3:
        return None  # leaving one out must still leave the two classes a classifier needs
    left_out = LEFT_OUT_CLASS if LEFT_OUT_CLASS in classes else classes[-1]
    with tempfile.TemporaryDirectory(prefix="bench-retrain-") as tmp:
        data, work = Path(tmp) / "data", Path(tmp) / "work"
        data.mkdir()
        work.mkdir()
        link_classes(image_dir, data, [c for c in classes if c != left_out])
        first = run_retrain(data, work)
        link_classes(image_dir, data, [left_out])
        second = run_retrain(data, work)
    return {"left_out_class": left_out, "first_run": first, "after_adding_class": second}


# ---------------------------------------------------------------- machine and report

def format_report(results: dict) -> str:
    lines = [f"Machine: {machine_line(results['machine'])}",
             f"Images:  {results['n_images']:,} files in {results['image_dir']}"]
    if results["note"]:
        lines.append(f"Note:    {results['note']}")
    lines += ["", *_throughput_lines(results["throughput"])]
    if results["retrain"]:
        lines += ["", *_retrain_lines(results["retrain"])]
    return "\n".join(lines)


def _row(label: str, value: dict) -> str:
    line = (f"  {label:<38} {value['images']:>6,} img {value['seconds']:>8.2f} s"
            f" {value['images_per_s']:>8.1f} img/s")
    rounds = value.get("images_per_s_all_rounds")
    return line + (f"  (rounds: {', '.join(f'{r:.1f}' for r in rounds)})" if rounds else "")


def _throughput_lines(t: dict) -> list[str]:
    w, s = t["warmup"], t["call_setup"]
    verdict = "meets" if t["ratio"] >= t["target_ratio"] else "BELOW"
    per_round = ", ".join(f"{r:.2f}" for r in t["ratio_per_round"])
    return [
        f"Bottleneck throughput ({t['base']}; batch {t['batch_size']}; best of {t['rounds']} rounds)",
        _row("bare forward pass, random pixels", t["bare"]),
        _row("get_bottlenecks, empty cache", t["empty_cache"]),
        _row("bare forward pass, LiteRT (XNNPACK)", t["litert_bare"]),
        f"  {'LiteRT / TF, bare, per round':<38} {', '.join(map(str, t['litert_over_tf_bare_per_round']))}",
        _row("get_bottlenecks, LiteRT, empty cache", t["litert_empty_cache"]),
        f"  {'LiteRT / TF, get_bottlenecks, per round':<38} "
        f"{', '.join(map(str, t['litert_over_tf_empty_cache_per_round']))}",
        f"  {'ratio ours / bare':<38} {t['ratio']:.2f} ({verdict} the {t['target_ratio']} target;"
        f" per round: {per_round})",
        _row("get_bottlenecks, cached rerun", t["cached_rerun"]) + f"  ({t['cached_rerun']['summary']})",
        f"  per-call setup: build {s['build_s']:.2f} s + first batch {s['first_batch_s']:.2f} s"
        f" - steady batch {s['steady_batch_s']:.2f} s = {s['setup_s']:.2f} s",
        f"  warm-up calls ({w['images']} img, fresh caches): {w['first_call_s']:.2f} s, then"
        f" {w['second_call_s']:.2f} s",
    ]


def _retrain_lines(r: dict) -> list[str]:
    first, second = r["first_run"], r["after_adding_class"]
    return [
        "Retrain wall time (retrain.py, default flags, separate process)",
        _retrain_row(f"{first['classes']} classes (no {r['left_out_class']}), empty cache", first),
        _retrain_row(f"+ {r['left_out_class']} ({second['classes']} classes), same cache", second),
    ]


def _retrain_row(label: str, run: dict) -> str:
    accuracy = (f"test {run['test_accuracy_pct']:.1f}% (N={run['test_n']})"
                if run["test_accuracy_pct"] is not None else "no test accuracy")
    return (f"  {label:<38} {run['wall_s']:>6.1f} s (in-process {run['in_process_s']} s)  {accuracy}"
            f"  bottlenecks: {run['bottlenecks']}")


# ---------------------------------------------------------------- main

def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_imports()
    from imageclf.errors import UserError

    image_dir, note = resolve_image_dir(args.image_dir)
    if note:
        print(f"Note: {note}", file=sys.stderr)
    try:
        paths = image_paths(image_dir)
    except UserError as e:  # a folder retrain.py would refuse: say why, no traceback
        print(f"bench_retrain.py: error: {e}", file=sys.stderr)
        return 2
    if args.quick:
        paths = spread_sample(paths, QUICK_IMAGES)
    run = Run("bench_retrain", args)
    print(f"Part 1: bottleneck throughput on {len(paths):,} images...", file=sys.stderr)
    throughput = bench_throughput(paths)
    retrain = None
    if not args.quick:
        print("Part 2: two retrains (a few minutes)...", file=sys.stderr)
        retrain = bench_add_class(image_dir)
        if retrain is None:
            note = "; ".join(filter(None, [note, "retrains skipped: they need at least 3 class folders"]))
    results = {"machine": run.end(), "image_dir": str(image_dir), "note": note, "quick": args.quick,
               "n_images": len(paths), "throughput": throughput, "retrain": retrain}
    print(format_report(results))
    run.write(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
