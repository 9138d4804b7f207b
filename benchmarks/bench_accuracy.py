"""Held-out accuracy of the old head, the new head and --fine_tune, with intervals and wall times.

    .venv/bin/python benchmarks/bench_accuracy.py            # all parts, about 15 minutes on 2 cores
    .venv/bin/python benchmarks/bench_accuracy.py --parts digits --quick

Parts (each prints its table; all go into one JSON under results/):
- ``poets``: the Poets base (MobileNet v1 0.25 224, ../shared/base) on the dev data
  (../shared/data/stanford_dogs_9). The Poets script's recipe (its 1001 class logits as the
  bottleneck, plain SGD at 0.01 for 4,000 steps of 100, nothing else) against our default head
  (the pooled features under those logits, class-balanced loss): 5-fold cross-validation, so
  every image is tested once (N = all images), plus the wall time of one real ``retrain.py``
  run of each on an empty cache.
- ``default``: the built-in base on the dev data: the head before class balancing against the
  head now (5-fold CV), then head-only against ``--fine_tune`` on retrain's own split, both
  scored through their exported graphs on the same test images.
- ``digits``: a non-dog set, scikit-learn's bundled handwritten digits (1,797 8x8 scans, BSD
  licence; ``pip install -r benchmarks/requirements.txt``): head-only against ``--fine_tune``
  (no mirroring: a mirrored digit is another shape) through the exported graphs.
- ``bases``: which base should be the default? Each base (``--bases``: the built-in dog-tuned
  MobileNetV2 and EfficientNet-Lite0 ImageNet) on four tasks: the dev breeds, the orientation task
  and a photo-quality task (every ``--orientation_every``-th dev photo as it is, blurred, with
  sensor noise, and as a quality-8 JPEG: four classes, the copies of a photo always in one fold),
  and scikit-learn's digits. 5-fold CV of the default head on each base's bottlenecks (every image
  tested once), the same folds for every base, paired with McNemar; then, on the dev breeds, one
  real ``retrain.py`` per base (wall time) and the one-image latency of its graph in-process on
  each runtime (decode + predict, p50 of 100).
- ``orientation``: a task far from the base's: which way up is a photo? Every ``--orientation_every``-th
  dev photo, saved upright and turned 90, 180 and 270 degrees (four classes; the four copies of a
  photo share one file name in a breed subfolder, so they always land in the same split). Head-only
  against ``--fine_tune`` (no mirroring: a mirror swaps the 90 and 270 classes), through the exported
  graphs on 20% of the photos.

Two models scored on the same test images are compared with an exact McNemar test on the images
only one of them gets right; the 95% Wilson intervals say how precise each accuracy is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import DEFAULT_IMAGE_DIR, REPO_ROOT, Run, add_run_flags, machine_line, prepare_imports

POETS_BASE = REPO_ROOT.parent / "shared" / "base" / "mobilenet_v1_025_224_frozen" / "frozen_graph.pb"
POETS_FLAGS = ["--base_input_tensor", "input:0", "--base_bottleneck_tensor", "MobilenetV1/Predictions/Reshape:0",
               "--base_input_mean", "127.5", "--base_input_std", "127.5"]
FOLDS = 5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="poets,default,digits,orientation",
                        help="comma-separated: poets, default, digits, orientation, bases, finetune")
    parser.add_argument("--quick", action="store_true", help="few steps and epochs: checks the script, not the model")
    parser.add_argument("--output", type=Path, help="results JSON (default: benchmarks/results/...)")
    parser.add_argument("--orientation_every", type=int, default=3,
                        help="orientation part: use every Nth dev photo (default: %(default)s)")
    parser.add_argument("--bases", default=OPTIONS["bases"],
                        help="bases part: the --tfhub_module values to compare; NAME@SIZE gives one another "
                             "input size, e.g. efficientnet_lite0@160 (default: %(default)s)")
    parser.add_argument("--finetune_flags", default="",
                        help="finetune part: retrain.py flags added to --fine_tune (default: none, its defaults)")
    parser.add_argument("--finetune_tasks", default="orientation,photo quality,dog breeds",
                        help="finetune part: which tasks (default: %(default)s)")
    parser.add_argument("--orientation_tune", default=ORIENTATION_TUNE,
                        help="orientation part: the fine-tune flags (default: %(default)s)")
    args = add_run_flags(parser).parse_args()
    OPTIONS.update(vars(args))
    prepare_imports()
    run = Run("bench_accuracy", args)
    machine = run.machine
    results = {"benchmark": "bench_accuracy", "machine": machine, "quick": args.quick, "parts": {}}
    with tempfile.TemporaryDirectory(prefix="bench_accuracy-") as tmp:
        for part in args.parts.split(","):
            started = time.time()
            results["parts"][part] = PARTS[part](Path(tmp) / part, args.quick)
            results["parts"][part]["part_seconds"] = round(time.time() - started, 1)
    print(machine_line(run.end()))
    run.write(results, label="Results: ")
    return 0


# -- the parts ------------------------------------------------------------------------------------


def poets_part(work: Path, quick: bool) -> dict:
    if not (POETS_BASE.is_file() and DEFAULT_IMAGE_DIR.is_dir()):
        print(f"poets: skipped ({POETS_BASE.parent} or {DEFAULT_IMAGE_DIR} not found)")
        return {"skipped": "../shared not found"}
    steps = 300 if quick else 4000
    base_flags = ["--tfhub_module", str(POETS_BASE), *POETS_FLAGS, "--how_many_training_steps", str(steps)]
    runs = {"poets recipe": run_retrain(work / "old", DEFAULT_IMAGE_DIR, [*base_flags, "--exact_bottleneck_tensor",
                                                                        "--no_class_balance"]),
            "new head": run_retrain(work / "new", DEFAULT_IMAGE_DIR, base_flags)}
    from imageclf.bases import FrozenGraphSpec

    spec = FrozenGraphSpec("input:0", "MobilenetV1/Predictions/Reshape:0", 127.5, 127.5)
    cv = {"poets recipe": cross_validate(DEFAULT_IMAGE_DIR, str(POETS_BASE), _replace(spec, exact_bottleneck=True),
                                         work / "old" / "bottlenecks", steps, balance=False),
          "new head": cross_validate(DEFAULT_IMAGE_DIR, str(POETS_BASE), spec, work / "new" / "bottlenecks", steps,
                                     balance=True)}
    out = _report("poets: MobileNet v1 0.25 224 (Poets base) on the dev data", runs, cv)
    out["mcnemar_p"] = mcnemar_p(cv["poets recipe"]["per_image"], cv["new head"]["per_image"])
    print(f"  new head vs poets recipe, CV: McNemar p = {out['mcnemar_p']:.3g}")
    out["other tasks"] = _poets_other_tasks(work, spec, steps)
    return out


def _poets_other_tasks(work: Path, spec, steps: int) -> dict:
    """The Poets recipe against our head on the Poets base, cross-validated on the non-breed tasks."""
    from imageclf.metrics import format_accuracy

    every = OPTIONS["orientation_every"]
    tasks = {"orientation": (write_orientations(work / "orientation", DEFAULT_IMAGE_DIR, every), True),
             "photo quality": (write_qualities(work / "quality", DEFAULT_IMAGE_DIR, every), True)}
    try:
        tasks["digits"] = (write_digits(work / "digits"), False)
    except ImportError:
        print("poets: digits left out (pip install -r benchmarks/requirements.txt for scikit-learn)")
    out = {}
    for task, (image_dir, grouped) in tasks.items():
        cv = {"poets recipe": cross_validate(image_dir, str(POETS_BASE), _replace(spec, exact_bottleneck=True),
                                             work / f"old-{task}", steps, balance=False, group_by_name=grouped),
              "new head": cross_validate(image_dir, str(POETS_BASE), spec, work / f"new-{task}", steps,
                                         balance=True, group_by_name=grouped)}
        p = mcnemar_p(cv["poets recipe"]["per_image"], cv["new head"]["per_image"])
        print(f"\npoets, {task}:")
        for name, result in cv.items():
            print(f"  {name:32s} {FOLDS}-fold CV {format_accuracy(result['correct'], result['n'])}")
        print(f"  new head vs poets recipe: McNemar p = {p:.3g}")
        out[task] = {"cross_validation": cv, "mcnemar_p": p}
    return out


def default_part(work: Path, quick: bool) -> dict:
    if not DEFAULT_IMAGE_DIR.is_dir():
        print(f"default: skipped ({DEFAULT_IMAGE_DIR} not found)")
        return {"skipped": "../shared not found"}
    steps, epochs = (300, 1) if quick else (4000, 10)
    flags = ["--how_many_training_steps", str(steps)]
    runs = {"head only": run_retrain(work / "head", DEFAULT_IMAGE_DIR, flags),
            "fine-tuned": run_retrain(work / "tuned", DEFAULT_IMAGE_DIR,
                                      [*flags, "--fine_tune", "--fine_tune_epochs", str(epochs)],
                                      bottlenecks=work / "head" / "bottlenecks")}
    cv = {"head before (no class balance)": cross_validate(DEFAULT_IMAGE_DIR, "builtin", None,
                                                            work / "head" / "bottlenecks", steps, balance=False),
          "head now": cross_validate(DEFAULT_IMAGE_DIR, "builtin", None, work / "head" / "bottlenecks", steps,
                                     balance=True)}
    return _report("default: built-in MobileNetV2 160 on the dev data", runs, cv, paired=("head only", "fine-tuned"))


def digits_part(work: Path, quick: bool) -> dict:
    try:
        image_dir = write_digits(work / "digits")
    except ImportError:
        print("digits: skipped (pip install -r benchmarks/requirements.txt for scikit-learn's digits)")
        return {"skipped": "scikit-learn not installed"}
    steps, epochs = (300, 1) if quick else (4000, 10)
    flags = ["--how_many_training_steps", str(steps), "--testing_percentage", "20"]
    runs = {"head only": run_retrain(work / "head", image_dir, flags),
            "fine-tuned": run_retrain(work / "tuned", image_dir,
                                      [*flags, "--fine_tune", "--fine_tune_epochs", str(epochs),
                                       "--random_crop", "10", "--random_brightness", "10"],
                                      bottlenecks=work / "head" / "bottlenecks")}
    return _report("digits: scikit-learn's 8x8 digits (non-dog), built-in base", runs, {},
                   paired=("head only", "fine-tuned"))


def orientation_part(work: Path, quick: bool) -> dict:
    if not DEFAULT_IMAGE_DIR.is_dir():
        print(f"orientation: skipped ({DEFAULT_IMAGE_DIR} not found)")
        return {"skipped": "../shared not found"}
    image_dir = write_orientations(work / "orientation", DEFAULT_IMAGE_DIR, OPTIONS["orientation_every"])
    steps, epochs = (300, 1) if quick else (4000, 15)
    flags = ["--how_many_training_steps", str(steps), "--testing_percentage", "20"]
    tune = ["--fine_tune", "--fine_tune_epochs", str(epochs), *OPTIONS["orientation_tune"].split()]
    runs = {"head only": run_retrain(work / "head", image_dir, flags),
            "fine-tuned": run_retrain(work / "tuned", image_dir, [*flags, *tune],
                                      bottlenecks=work / "head" / "bottlenecks")}
    return _report(f"orientation: one dev photo in {OPTIONS['orientation_every']}, turned 4 ways, built-in base",
                   runs, {}, paired=("head only", "fine-tuned"))


def bases_part(work: Path, quick: bool) -> dict:
    if not DEFAULT_IMAGE_DIR.is_dir():
        print(f"bases: skipped ({DEFAULT_IMAGE_DIR} not found)")
        return {"skipped": "../shared not found"}
    bases = OPTIONS["bases"].split(",")
    steps = 300 if quick else 4000
    every = OPTIONS["orientation_every"]
    tasks = {"dog breeds": (DEFAULT_IMAGE_DIR, False),
             "orientation": (write_orientations(work / "orientation", DEFAULT_IMAGE_DIR, every), True),
             "photo quality": (write_qualities(work / "quality", DEFAULT_IMAGE_DIR, every), True)}
    try:
        tasks["digits"] = (write_digits(work / "digits"), False)
    except ImportError:
        print("bases: digits left out (pip install -r benchmarks/requirements.txt for scikit-learn)")
    out: dict = {"bases": bases, "tasks": {}}
    for task, (image_dir, grouped) in tasks.items():
        cv = {base: cross_validate(image_dir, *_sized(base), work / "bottlenecks", steps, balance=True,
                                   group_by_name=grouped) for base in bases}
        print(f"\nbases, {task}:")
        from imageclf.metrics import format_accuracy

        for base, result in cv.items():
            print(f"  {base:24s} {FOLDS}-fold CV {format_accuracy(result['correct'], result['n'])}, "
                  f"bottlenecks {result['bottleneck_seconds']} s")
        pairs = {f"{b} vs {bases[0]}": mcnemar_p(cv[bases[0]]["per_image"], cv[b]["per_image"]) for b in bases[1:]}
        for pair, p in pairs.items():
            print(f"  {pair}: McNemar p = {p:.3g}")
        out["tasks"][task] = {"cross_validation": cv, "mcnemar_p": pairs}
    out["retrain_and_latency"] = {base: _retrain_and_latency(work / f"retrain-{base}", base, steps) for base in bases}
    for base, r in out["retrain_and_latency"].items():
        print(f"  {base:24s} retrain.py wall {r['wall_seconds']} s; one image p50: "
              + ", ".join(f"{k} {v} ms" for k, v in r["latency_p50_ms"].items()))
    return out


def finetune_part(work: Path, quick: bool) -> dict:
    """Head only against ``--fine_tune`` with its default flags, on the first of --bases, task by task.

    Both runs of a task use the same splits (validation 20%, test 25%: more held-out images than
    the defaults, so that a difference of a few points is not noise) and the same bottleneck cache;
    McNemar on the same test images.
    """
    if not DEFAULT_IMAGE_DIR.is_dir():
        print(f"finetune: skipped ({DEFAULT_IMAGE_DIR} not found)")
        return {"skipped": "../shared not found"}
    handle, _, size = OPTIONS["bases"].split(",")[0].partition("@")
    steps, every = (300 if quick else 4000), OPTIONS["orientation_every"]
    writers = {"orientation": lambda: write_orientations(work / "orientation", DEFAULT_IMAGE_DIR, every),
               "photo quality": lambda: write_qualities(work / "quality", DEFAULT_IMAGE_DIR, every),
               "dog breeds": lambda: DEFAULT_IMAGE_DIR}
    tasks = {task: writers[task]() for task in OPTIONS["finetune_tasks"].split(",")}
    tune = ["--fine_tune", *OPTIONS["finetune_flags"].split(), *(["--fine_tune_epochs", "1"] if quick else [])]
    flags = ["--tfhub_module", handle, "--how_many_training_steps", str(steps), "--validation_percentage", "20",
             "--testing_percentage", "25", *(["--base_input_size", size, size] if size else [])]
    out = {"base": OPTIONS["bases"].split(",")[0], "flags": flags, "fine_tune_flags": tune, "tasks": {}}
    for task, image_dir in tasks.items():
        cache = work / f"bottlenecks-{task}"
        runs = {"head only": run_retrain(work / "runs" / task / "head", image_dir, flags, bottlenecks=cache),
                "fine-tuned": run_retrain(work / "runs" / task / "tuned", image_dir, [*flags, *tune],
                                          bottlenecks=cache)}
        out["tasks"][task] = _report(f"finetune, {task}: {out['base']}, {' '.join(tune)}", runs, {},
                                     paired=("head only", "fine-tuned"))
    return out


def _sized(base: str) -> tuple:
    """``efficientnet_lite0@160``: the handle and a spec with that input size (--base_input_size)."""
    from imageclf.bases import FrozenGraphSpec

    handle, _, size = base.partition("@")
    return handle, FrozenGraphSpec(input_size=(int(size), int(size))) if size else None


def _retrain_and_latency(out: Path, base: str, steps: int) -> dict:
    """retrain.py on the dev breeds with ``base`` (empty cache), then decode + predict of one image at a time."""
    from imageclf.images import read_image
    from imageclf.runtimes import RuntimeOptions, load_classifier

    handle, _, size = base.partition("@")
    run = run_retrain(out, DEFAULT_IMAGE_DIR, ["--tfhub_module", handle, "--how_many_training_steps", str(steps),
                                              *(["--base_input_size", size, size] if size else [])])
    photos = sorted(DEFAULT_IMAGE_DIR.rglob("*.jpg"))[::15][:100]
    latency = {}
    for runtime in ("tf", "litert"):
        model = load_classifier(out / "model.pb", options=RuntimeOptions(runtime, cache_dir=str(out / "litert")),
                                decode_in_graph=False)
        model.predict([read_image(photos[0], size=model.input_size)])  # warm-up
        seconds = []
        for path in photos:
            started = time.perf_counter()
            model.predict([read_image(path, size=model.input_size)])
            seconds.append(time.perf_counter() - started)
        latency[runtime] = round(float(np.median(seconds)) * 1000, 2)
        model.close()
    return {"wall_seconds": run["wall_seconds"], "test_accuracy": run["accuracy"] if "accuracy" in run else
            sum(run["test_correct"]) / len(run["test_correct"]), "latency_p50_ms": latency}


PARTS = {"poets": poets_part, "default": default_part, "digits": digits_part, "orientation": orientation_part,
         "bases": bases_part, "finetune": finetune_part}
ORIENTATION_TUNE = "--fine_tune_blocks 4 --fine_tune_learning_rate 3e-5 --random_crop 10 --random_brightness 10"
OPTIONS: dict = {"orientation_every": 3, "orientation_tune": ORIENTATION_TUNE, "finetune_flags": "",
                 "finetune_tasks": "orientation,photo quality,dog breeds",
                 "bases": "builtin,efficientnet_lite0"}


# -- data, runs, scores ---------------------------------------------------------------------------


def write_digits(folder: Path) -> Path:
    """scikit-learn's bundled digits as one PNG per scan, a folder per digit (upscaled 8x)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (pixels, digit) in enumerate(zip(digits.images, digits.target, strict=True)):
        target = folder / f"digit_{digit}"
        target.mkdir(parents=True, exist_ok=True)
        gray = Image.fromarray((pixels / 16.0 * 255).astype(np.uint8))
        gray.resize((64, 64), Image.Resampling.BICUBIC).convert("RGB").save(target / f"{i:04d}.png")
    return folder


def write_orientations(folder: Path, photos: Path, every: int) -> Path:
    """Every ``every``-th photo four times: upright and turned a quarter, a half and three quarters."""
    from PIL import Image, ImageOps

    turns = {"upright": None, "turned 90": Image.Transpose.ROTATE_90, "turned 180": Image.Transpose.ROTATE_180,
             "turned 270": Image.Transpose.ROTATE_270}
    sources = sorted(p for p in photos.rglob("*.jpg"))[::every]
    for source in sources:
        with Image.open(source) as img:
            upright = ImageOps.exif_transpose(img).convert("RGB")
        for name, turn in turns.items():
            target = folder / name / source.parent.name / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            (upright.transpose(turn) if turn else upright).save(target, quality=95)
    return folder


def write_qualities(folder: Path, photos: Path, every: int) -> Path:
    """Every ``every``-th photo four times: as it is, blurred, with sensor noise, and as a quality-8 JPEG."""
    from PIL import Image, ImageFilter, ImageOps

    rng = np.random.default_rng(0)
    sources = sorted(p for p in photos.rglob("*.jpg"))[::every]
    for source in sources:
        with Image.open(source) as img:
            photo = ImageOps.exif_transpose(img).convert("RGB")
        noisy = np.clip(np.asarray(photo, np.float32) + rng.normal(0, 20, (photo.height, photo.width, 3)), 0, 255)
        versions = {"sharp": (photo, 95), "blurred": (photo.filter(ImageFilter.GaussianBlur(2)), 95),
                    "noisy": (Image.fromarray(noisy.astype(np.uint8)), 95), "blocky": (photo, 8)}
        for name, (version, quality) in versions.items():
            target = folder / name / source.parent.name / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            version.save(target, quality=quality)
    return folder


def run_retrain(out: Path, image_dir: Path, flags: list[str], bottlenecks: Path | None = None) -> dict:
    """One real retrain.py run (wall time included), scored afterwards through its exported graph."""
    out.mkdir(parents=True, exist_ok=True)
    graph = out / "model.pb"
    command = [sys.executable, str(REPO_ROOT / "retrain.py"), "--image_dir", str(image_dir), "--quiet",
               "--output_graph", str(graph), "--bottleneck_dir", str(bottlenecks or out / "bottlenecks"), *flags]
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.time() - started
    if done.returncode != 0:
        raise SystemExit(f"retrain.py failed:\n{done.stderr[-3000:]}")
    sidecar = json.loads(graph.with_suffix(".json").read_text())
    correct, names = score_graph(graph, image_dir, flags)
    return {"flags": flags, "wall_seconds": round(seconds, 1), "test_correct": correct, "test_files": names,
            "fine_tune": sidecar.get("fine_tune"), "base": sidecar["base_model"]["description"]}


def score_graph(graph: Path, image_dir: Path, flags: list[str]) -> tuple[list[bool], list[str]]:
    """Per test image (retrain's own split), whether the exported graph's top-1 is right."""
    from imageclf.dataset import TEST, scan_image_dir
    from imageclf.graph_model import GraphModel
    from imageclf.images import read_image

    def percentage(flag: str) -> float:
        return float(flags[flags.index(flag) + 1]) if flag in flags else 10

    labels, files = scan_image_dir(image_dir, percentage("--validation_percentage"), percentage("--testing_percentage"))
    test = [f for f in files if f.split == TEST]
    model = GraphModel(graph)
    try:
        correct = []
        for i in range(0, len(test), 32):
            chunk = test[i:i + 32]
            predicted = model.predict([read_image(f.path, size=model.input_size) for f in chunk]).argmax(axis=1)
            correct += [model.labels[p] == f.label for p, f in zip(predicted, chunk, strict=True)]
    finally:
        model.close()
    return correct, [f"{f.label}/{f.rel}" for f in test]


def cross_validate(image_dir: Path, handle: str, spec, cache_dir: Path, steps: int, balance: bool,
                   group_by_name: bool = False) -> dict:
    """5-fold CV of the head on cached bottlenecks: every image is a test image once.

    ``group_by_name``: for tasks made of several versions of one photo (one per class), the fold
    comes from the photo's path below its class folder, so all its versions are tested together.
    """
    import tensorflow as tf

    from imageclf.bases import load_base
    from imageclf.bottlenecks import BottleneckCache, get_bottlenecks, with_runtime
    from imageclf.dataset import scan_image_dir
    from imageclf.training import TrainConfig, class_weights, sampler_from_arrays, train_final_layer

    tf.get_logger().setLevel("ERROR")  # one trainer per fold: its retracing warnings say nothing here
    labels, files = scan_image_dir(image_dir)
    base, _ = with_runtime(load_base(handle, spec), "litert")  # as retrain.py computes them by default
    started = time.time()
    vectors, _ = get_bottlenecks([f.path for f in files], base, BottleneckCache(cache_dir, base), progress=False)
    bottleneck_seconds = round(time.time() - started, 1)
    files = [f for f in files if f.path in vectors]
    x = np.stack([vectors[f.path] for f in files])
    y = np.array([labels.index(f.label) for f in files], np.int32)
    fold = np.array([_bucket(f.rel if group_by_name else f"{f.label}/{f.rel}", "fold") % FOLDS for f in files])
    validation = np.array([_bucket(f"{f.label}/{f.rel}", "validation") % 9 == 0 for f in files])
    correct, per_image = 0, np.zeros(len(y), bool)
    started = time.time()
    for k in range(FOLDS):
        test, train = fold == k, (fold != k) & ~validation
        val = (fold != k) & validation
        layer = train_final_layer(sampler_from_arrays(x[train], y[train]), (x[val], y[val]), base.bottleneck_size,
                                  len(labels), TrainConfig(steps=steps, eval_step_interval=steps, progress=False),
                                  log=lambda line: None,
                                  weights_per_class=class_weights(y[train], len(labels)) if balance else None)
        right = layer.probabilities(x[test]).argmax(axis=1) == y[test]
        per_image[test] = right
        correct += int(right.sum())
    return {"correct": correct, "n": len(y), "features": base.bottleneck_size, "per_image": per_image.tolist(),
            "bottleneck_seconds": bottleneck_seconds, "seconds": round(time.time() - started, 1)}


def _bucket(name: str, salt: str) -> int:
    return int(hashlib.sha1(f"{salt}:{name}".encode()).hexdigest(), 16)


def _replace(spec, **changes):
    import dataclasses

    return dataclasses.replace(spec, **changes)


def mcnemar_p(a: list[bool], b: list[bool]) -> float:
    """Exact two-sided McNemar test: how likely so lopsided a split of the disagreements is by chance."""
    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _report(title: str, runs: dict, cv: dict, paired: tuple[str, str] | None = None) -> dict:
    from imageclf.metrics import format_accuracy

    print(f"\n{title}")
    for name, run in runs.items():
        n, right = len(run["test_correct"]), sum(run["test_correct"])
        tuned = run["fine_tune"]
        extra = (f", fine-tune best epoch {tuned['best_epoch']}/{tuned['epochs_run']}, "
                 f"{tuned['images_per_second']} img/s" if tuned else "")
        print(f"  {name:32s} test {format_accuracy(right, n)}, retrain.py wall {run['wall_seconds']} s{extra}")
        run["accuracy"] = right / n if n else None
    for name, result in cv.items():
        print(f"  {name:32s} {FOLDS}-fold CV {format_accuracy(result['correct'], result['n'])} "
              f"on {result['features']} features")
    out = {"runs": runs, "cross_validation": cv}
    if paired:
        p = mcnemar_p(runs[paired[0]]["test_correct"], runs[paired[1]]["test_correct"])
        print(f"  {paired[1]} vs {paired[0]} on the same test images: McNemar p = {p:.3g}")
        out["mcnemar_p"] = p
    return out


if __name__ == "__main__":
    sys.exit(main())
