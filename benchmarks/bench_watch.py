"""How long from dropping a class folder into the image folder to the service answering with it.

Starts the real service and ``retrain.py --watch`` (both as subprocesses, on 127.0.0.1), lets
the first retrain land, then copies a folder of N images of a new class in, and polls the
service until it classifies one of them with the new label available. Prints the phases and
writes a JSON result with machine details.

    .venv/bin/python benchmarks/bench_watch.py             # 3 dog classes, then a 50-image 4th
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from harness import HOST, REPO_ROOT, Processes, Run, add_run_flags, resolve_image_dir


def _get(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def _wait(predicate, seconds: float) -> float | None:
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        if predicate():
            return time.perf_counter() - started
        time.sleep(0.2)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_dir", type=Path, default=None, help="class folders (default: the dev data)")
    parser.add_argument("--images", type=int, default=50, help="images in the dropped-in folder")
    parser.add_argument("--output", type=Path, help="results JSON (default: under benchmarks/results/)")
    args = add_run_flags(parser).parse_args()
    source, note = resolve_image_dir(args.image_dir)
    classes = sorted(p for p in source.iterdir() if p.is_dir())
    if len(classes) < 4:
        sys.exit("need at least 4 class folders")
    run = Run("bench_watch", args, light=True)
    work = Path(tempfile.mkdtemp(prefix="bench_watch-"))
    data, graphs = work / "photos", work / "graphs"
    graphs.mkdir()
    for folder in classes[:3]:
        shutil.copytree(folder, data / folder.name)
    new = classes[3]
    procs = Processes(work)
    try:
        service = procs.start_service("service", ["--graphs_dir", str(graphs), "--image_root", str(work),
                                                  "--grpc_port", "0"])
        procs.start("retrain-watch", [sys.executable, str(REPO_ROOT / "retrain.py"), "--image_dir", str(data),
                                      "--watch", "--quiet", "--output_graph", str(graphs / "photos.pb"),
                                      "--bottleneck_dir", str(work / "bottlenecks"), "--watch_interval", "1",
                                      "--watch_settle", "2"])
        url = f"http://{HOST}:{service.port}"
        first = service.wait_ready(600).ready_seconds
        label = new.name.lower().replace("_", " ")
        images = sorted(new.iterdir())[:args.images]
        probe = f"photos/{new.name}/{images[0].name}"
        dropped = time.perf_counter()
        staging = work / f".{new.name}"
        staging.mkdir()
        for image in images:
            shutil.copy(image, staging / image.name)
        staging.rename(data / new.name)  # the folder appears at once, as a user's drag and drop does

        def answered() -> bool:
            answer = _get(f"{url}/?file={probe}")
            return bool(answer) and label in answer.get("probabilities", {})
        seconds = _wait(answered, 600)
        total = time.perf_counter() - dropped if seconds is not None else None
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    results = {"machine": run.end(), "image_dir": str(source), "note": note,
               "base_classes": [c.name for c in classes[:3]], "new_class": new.name, "new_images": len(images),
               "watch_interval_s": 1, "watch_settle_s": 2, "first_model_served_s": first,
               "drop_to_new_label_s": total}
    print(json.dumps(results, indent=2))
    run.write(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
