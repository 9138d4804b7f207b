"""Benchmark of 12 MP phone photos against web thumbnails: decode cost and memory, service latency, bottlenecks.

Users bring 4032x3024 phone JPEGs (2-5 MB, often turned by an EXIF Orientation tag), while
everything else was measured on ~224 px thumbnails. One run:

1. makes phone-size photos in a temporary folder (never kept): N thumbnails from the data set,
   each upscaled to 4032x3024 (Lanczos) with sensor grain and fine texture added, saved as JPEG
   quality 92; half of them stored turned, with EXIF Orientation 6, 3 or 8 making them upright;
2. a) times decoding one photo into model input on the product's Python path
   (``decode_image`` then ``GraphModel.model_input``) and inside the graph (``image_bytes:0``),
   checks that both give an upright picture, and measures the peak memory of one decode in a
   fresh process (VmHWM from /proc), 3 photos;
   b) starts ``python -m service`` on 127.0.0.1, once per runtime (``--runtime tf`` and
      ``litert``), and times ``POST /classify`` from one client, thumbnails and photos and the two
      services interleaved: p50, p90 and the ratio p50(photo) / p50(thumbnail) for each;
   c) ``get_bottlenecks`` with no cache on the photos and on their thumbnails, against the
      bare forward pass (as bench_retrain.py measures it), in alternating rounds.

The product is called only from the functions under "Calls into the product" below, so that
the same command gives the figures before and after a change to the decode path. When
``decode_image`` accepts a ``size`` argument, it is given the model's input size.

    python benchmarks/bench_photos.py [--quick] [--photos N] [--image_dir DIR] [--graph G.pb] [--output FILE.json]

Results are printed as a table and written as JSON (with machine details) to
benchmarks/results/ unless --output says otherwise. Every subprocess is stopped at the end, on
errors too.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from harness import (
    DEFAULT_IMAGE_DIR,
    HOST,
    REPO_ROOT,
    Processes,
    Run,
    add_run_flags,
    latency_ms,
    machine_line,
    prepare_imports,
    process_memory_mib,
    resolve_image_dir,
    spread_sample,
)

if TYPE_CHECKING:
    import numpy as np

    from imageclf.bases import BaseModel
    from imageclf.bottlenecks import BottleneckReport
    from imageclf.graph_model import GraphModel

PHOTO_SIZE = (4032, 3024)  # width, height as a phone sensor stores them (12.2 MP)
JPEG_QUALITY = 92
# Orientation tags given in turn: half the photos are stored turned, as a phone held upright or
# upside down writes them. 6 and 8 are portrait photos stored landscape; 3 is upside down.
ORIENTATIONS = (6, 1, 3, 1, 8, 1)
SEED = 0
TARGET_SIZE_MB = (2.0, 5.0)
TARGET_SERVICE_RATIO = 2.0  # the goal for p50(12 MP) / p50(thumbnail) after the decode change
BATCH_SIZE = 32  # retrain.py's default --batch_size
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass(frozen=True)
class Sizes:
    photos: int = 16            # phone photos made (and as many thumbnails)
    decode_passes: int = 2      # in-process passes over every photo and thumbnail (part a)
    memory_probes: int = 3      # fresh processes, one photo each, on the Python path (part a)
    graph_memory_probes: int = 1  # the same on the in-graph path (image_bytes:0)
    service_requests: int = 40  # of each kind, interleaved (part b)
    bottleneck_rounds: int = 2  # rounds of bare / photos / thumbnails (part c)
    bare_images: int = 128      # images per bare forward-pass round (its rate hardly depends on it)


QUICK = Sizes(photos=8, decode_passes=1, memory_probes=3, graph_memory_probes=1, service_requests=16,
              bottleneck_rounds=2, bare_images=64)


# ---------------------------------------------------------------- calls into the product
# Everything the benchmark asks of imageclf and the service goes through these functions. A later
# change to the decode path (reduced-scale DCT decoding, orientation applied everywhere) should
# only need them adjusted, if at all.

def decode_accepts_size() -> bool:
    """Whether ``imageclf.images.decode_image`` takes a ``size=`` argument (the target of a reduced decode)."""
    from imageclf.images import decode_image

    return "size" in inspect.signature(decode_image).parameters


def decode_photo(data: bytes, size: Sequence[int] | None = None) -> np.ndarray:
    """Encoded bytes -> upright RGB uint8 pixels, as the service and label_image decode them."""
    from imageclf.images import decode_image

    if size is not None and decode_accepts_size():
        return decode_image(data, size=tuple(size))
    return decode_image(data)


def to_model_input(model: GraphModel, pixels: np.ndarray) -> np.ndarray:
    """Decoded pixels -> what the graph's input tensor takes (resize to its input size, scaling)."""
    return model.model_input(pixels)


def decode_in_graph(model: GraphModel, data: bytes) -> np.ndarray:
    """Encoded bytes -> model input decoded and resized inside the graph (``image_bytes:0``).

    Our graphs feed the decoded batch through ``placeholder_with_default`` named ``Placeholder``,
    so fetching the input tensor while feeding bytes returns exactly what the graph decoded.
    """
    return model.session.run(model.input, {model.bytes_input: [data]})[0]


def load_graph(graph: Path) -> GraphModel:
    from imageclf.graph_model import GraphModel

    return GraphModel(graph)


def build_graph(work: Path) -> Path:
    """A small real graph: the built-in base retrained on sample_images, 200 steps (as the tests do)."""
    from imageclf.retrain import RetrainOptions, retrain
    from imageclf.training import TrainConfig

    opts = RetrainOptions(image_dir=str(REPO_ROOT / "sample_images"), output_graph=str(work / "graphs" / "shapes.pb"),
                          bottleneck_dir=str(work / "graph-bottlenecks"),
                          training=TrainConfig(steps=200, eval_step_interval=100, progress=False))
    return Path(retrain(opts, log=lambda line: None).graph)


def load_builtin_base() -> BaseModel:
    from imageclf.bases import load_base

    return load_base("builtin")


def bottlenecks_no_cache(paths: list[Path], base: BaseModel) -> BottleneckReport:
    """What retrain.py does for files it has never seen: hash, decode, resize, forward pass (no cache)."""
    from imageclf.bottlenecks import get_bottlenecks

    vectors, report = get_bottlenecks(paths, base, None, batch_size=BATCH_SIZE, progress=False)
    if len(vectors) != len(paths):
        raise RuntimeError(f"get_bottlenecks: {report.summary()}: {report.skipped[:3]}")
    return report


def bare_forward_runner(base: BaseModel, n_images: int) -> Callable[[], float]:
    """bench_retrain.py's bare forward pass: random pixels at the base's input size; returns seconds per pass."""
    from bench_retrain import bare_runner

    return bare_runner(base, n_images)


RUNTIMES = ("tf", "litert")


def service_command(graphs_dir: Path, image_root: Path, runtime: str = "tf") -> list[str]:
    """``python -m service``'s flags: its defaults, except what it serves and its runtime (the harness adds
    where it listens)."""
    return ["--graphs_dir", str(graphs_dir), "--image_root", str(image_root), "--grpc_port", "0",
            "--runtime", runtime]


def classify_upload(conn: http.client.HTTPConnection, data: bytes) -> tuple[int, dict]:
    """``POST /classify`` with the raw image as the body; the status and the JSON answer."""
    conn.request("POST", "/classify", body=data, headers={"Content-Type": "application/octet-stream"})
    response = conn.getresponse()
    body = response.read()
    try:
        answer = json.loads(body)
    except ValueError:
        answer = {"error": body[:200].decode("utf-8", "replace")}
    return response.status, answer


# ---------------------------------------------------------------- step 1: the photos

@dataclass
class Photo:
    thumbnail: Path          # the original file, copied unchanged
    photo: Path              # the 12 MP JPEG made from it
    orientation: int         # EXIF Orientation tag (1: none written)
    stored_size: tuple[int, int]   # width, height of the stored pixels
    upright_size: tuple[int, int]  # width, height once the tag is applied
    photo_bytes: int
    thumbnail_bytes: int
    grain: float             # sigma of the added luma grain, in levels


def source_images(image_dir: Path, n: int) -> list[Path]:
    """At most ``n`` images from the class folders, spread evenly so that every class is represented."""
    paths = sorted(p for p in image_dir.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise SystemExit(f"bench_photos.py: error: no images in the class folders of {image_dir}")
    return spread_sample(paths, n)


def _transpose_to_store(orientation: int):
    """The Pillow transpose that turns upright pixels into what a camera stores with this tag.

    The inverse of what ``ImageOps.exif_transpose`` applies: 3 -> ROTATE_180, 6 -> ROTATE_270,
    8 -> ROTATE_90.
    """
    from PIL import Image

    return {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation]


def add_texture(rgb: np.ndarray, grain: float, rng: np.random.Generator) -> np.ndarray:
    """Sensor-like noise on an upscaled (so too smooth) image: what makes real 12 MP JPEGs 2-5 MB.

    Per-pixel luma grain, a finer-than-the-source luma texture (noise at 1/4 resolution,
    bicubic-upscaled) and chroma noise at 1/2 resolution (as sensors' colour noise is blotchier).
    """
    import numpy as np
    from PIL import Image

    h, w, _ = rgb.shape
    x = rgb.astype(np.float32)
    luma = rng.standard_normal((h, w), dtype=np.float32) * grain
    texture = rng.standard_normal((h // 4, w // 4), dtype=np.float32) * 5.0
    luma += np.asarray(Image.fromarray(texture, "F").resize((w, h), Image.Resampling.BICUBIC))
    x += luma[..., None]
    del luma
    chroma = rng.standard_normal(((h + 1) // 2, (w + 1) // 2, 3), dtype=np.float32) * 2.0
    x += np.repeat(np.repeat(chroma, 2, axis=0), 2, axis=1)[:h, :w]
    return np.clip(x, 0, 255, out=x).astype(np.uint8)


def make_photo(source: Path, target: Path, orientation: int, grain: float, rng: np.random.Generator
               ) -> tuple[tuple[int, int], tuple[int, int]]:
    """Write a 12 MP JPEG of ``source``; returns the stored and upright sizes (width, height)."""
    import numpy as np
    from PIL import Image

    landscape = PHOTO_SIZE
    portrait = (PHOTO_SIZE[1], PHOTO_SIZE[0])
    upright_size = portrait if orientation in (6, 8) else landscape  # a portrait shot is stored landscape
    with Image.open(source) as img:
        upright = img.convert("RGB").resize(upright_size, Image.Resampling.LANCZOS)
    upright = Image.fromarray(add_texture(np.asarray(upright), grain, rng))
    stored = upright if orientation == 1 else upright.transpose(_transpose_to_store(orientation))
    exif = Image.Exif()
    exif[0x010F] = "bench_photos"        # Make
    exif[0x0110] = "12 MP test photo"    # Model
    if orientation != 1:
        exif[0x0112] = orientation       # Orientation
    target.parent.mkdir(parents=True, exist_ok=True)
    stored.save(target, "JPEG", quality=JPEG_QUALITY, exif=exif.tobytes())
    return stored.size, upright_size


def make_photos(sources: list[Path], work: Path, step: Callable[[str], None]) -> list[Photo]:
    """Thumbnails copied to work/thumbs, their 12 MP versions in work/photos (same class/stem)."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    photos = []
    for i, source in enumerate(sources):
        rel = Path(source.parent.name) / source.name
        thumb = work / "thumbs" / rel
        thumb.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, thumb)
        target = work / "photos" / rel.with_name(f"{source.stem}_12mp.jpg")
        orientation = ORIENTATIONS[i % len(ORIENTATIONS)]
        grain = float(rng.uniform(2.5, 4.5))  # like photos taken at different ISO
        stored, upright = make_photo(source, target, orientation, grain, rng)
        photos.append(Photo(thumb, target, orientation, stored, upright, target.stat().st_size,
                             thumb.stat().st_size, round(grain, 2)))
        if (i + 1) % 4 == 0 or i + 1 == len(sources):
            step(f"  {i + 1}/{len(sources)} photos made")
    return photos


def photo_summary(photos: list[Photo]) -> dict:
    mb = [p.photo_bytes / 1e6 for p in photos]
    tagged = [p for p in photos if p.orientation != 1]
    thumb_sizes = sorted({_image_size(p.thumbnail) for p in photos})
    return {"n": len(photos), "stored_size": list(PHOTO_SIZE), "jpeg_quality": JPEG_QUALITY,
            "mean_mb": round(statistics.mean(mb), 2), "min_mb": round(min(mb), 2), "max_mb": round(max(mb), 2),
            "in_target_range": all(TARGET_SIZE_MB[0] <= v <= TARGET_SIZE_MB[1] for v in mb),
            "target_mb": list(TARGET_SIZE_MB),
            "orientations": {str(o): sum(p.orientation == o for p in photos) for o in (1, 3, 6, 8)},
            "tagged_share": round(len(tagged) / len(photos), 2),
            "thumbnail_sizes": [list(s) for s in thumb_sizes[:5]],
            "thumbnail_mean_kb": round(statistics.mean(p.thumbnail_bytes for p in photos) / 1e3, 1),
            "seed": SEED,
            "files": [{"thumbnail": f"{p.thumbnail.parent.name}/{p.thumbnail.name}", "orientation": p.orientation,
                       "upright_size": list(p.upright_size), "mb": round(p.photo_bytes / 1e6, 2), "grain": p.grain}
                      for p in photos]}


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        return img.size


# ---------------------------------------------------------------- statistics, /proc and provenance

def code_state() -> dict:
    """The commit measured and the product files that differ from it (read-only git calls, no locks taken)."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # git status must not rewrite the index others use

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.rstrip("\n") if proc.returncode == 0 else None

    status = git("status", "--porcelain", "--", "imageclf", "service")
    return {"commit": git("rev-parse", "HEAD"),
            "uncommitted_product_files": status.splitlines() if status else ([] if status == "" else None)}


def ms_stats(seconds: Sequence[float]) -> dict:
    return latency_ms(seconds, (50, 90), digits=1)


def proc_memory(pid: int | str = "self") -> dict:
    """VmRSS and VmHWM (peak RSS) of a process, in MiB, under this benchmark's key names."""
    m = process_memory_mib(pid)
    return {"rss_mib": m["rss_mib"], "hwm_mib": m["peak_rss_mib"]}


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _progress() -> Callable[[str], None]:
    start = time.perf_counter()

    def step(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {message}", file=sys.stderr, flush=True)
    return step


# ---------------------------------------------------------------- part a: decode time, orientation, memory

def upright_turns(x: np.ndarray, reference: np.ndarray) -> tuple[int, float]:
    """Which quarter turn of ``reference`` (the thumbnail's model input) ``x`` matches best, and how well.

    0 means upright. Both are model inputs of the same square size, so every turn is comparable.
    """
    import numpy as np

    errors = [float(np.abs(x - np.rot90(reference, k)).mean()) for k in range(4)]
    best = int(np.argmin(errors))
    return best, round(errors[best], 4)


def bench_decode(model: GraphModel, photos: list[Photo], sizes: Sizes) -> dict:
    """Decode and resize of every photo and thumbnail, interleaved, ``decode_passes`` times; medians."""
    size = model.input_size
    data = {p.photo: p.photo.read_bytes() for p in photos} | {p.thumbnail: p.thumbnail.read_bytes() for p in photos}
    # Warm-up: the resize function's trace and TensorFlow's first large allocations.
    for p in photos[:2]:
        for path in (p.thumbnail, p.photo):
            to_model_input(model, decode_photo(data[path], size))
            if model.bytes_input is not None:
                decode_in_graph(model, data[path])
    times: dict[str, dict[str, list[float]]] = {kind: {"decode": [], "model_input": [], "total": [], "in_graph": []}
                                                for kind in ("photo", "photo_tagged", "photo_untagged", "thumbnail")}
    checks: dict[str, list[dict]] = {"python": [], "in_graph": []}
    for rep in range(sizes.decode_passes):
        for p in photos:
            refs: dict[str, np.ndarray] = {}
            for kind, path in (("thumbnail", p.thumbnail), ("photo", p.photo)):
                t0 = time.perf_counter()
                pixels = decode_photo(data[path], size)
                t1 = time.perf_counter()
                x = to_model_input(model, pixels)
                t2 = time.perf_counter()
                del pixels
                kinds = [kind] if kind == "thumbnail" else [kind, "photo_tagged" if p.orientation != 1
                                                            else "photo_untagged"]
                for k in kinds:
                    times[k]["decode"].append(t1 - t0)
                    times[k]["model_input"].append(t2 - t1)
                    times[k]["total"].append(t2 - t0)
                g = None
                if model.bytes_input is not None:
                    t3 = time.perf_counter()
                    g = decode_in_graph(model, data[path])
                    for k in kinds:
                        times[k]["in_graph"].append(time.perf_counter() - t3)
                if kind == "thumbnail":
                    refs = {"python": x, "in_graph": g}
                elif rep == 0:
                    for way, y in (("python", x), ("in_graph", g)):
                        if y is not None:
                            turns, error = upright_turns(y, refs[way])
                            checks[way].append({"orientation": p.orientation, "quarter_turns_off": turns,
                                                "mean_abs_diff": error})
    result = {kind: {stage: ms_stats(v) for stage, v in stages.items() if v} for kind, stages in times.items()}
    photo, thumb = result["photo"]["total"]["p50_ms"], result["thumbnail"]["total"]["p50_ms"]
    out = {"passes": sizes.decode_passes, "model_input_size": list(size), "decode_size_argument": decode_accepts_size(),
           "stages": result, "ratio_total_p50_photo_over_thumbnail": round(photo / thumb, 1)}
    if "in_graph" in result["photo"]:
        out["ratio_in_graph_p50_photo_over_thumbnail"] = round(
            result["photo"]["in_graph"]["p50_ms"] / result["thumbnail"]["in_graph"]["p50_ms"], 1)
    out["orientation"] = {way: _orientation_summary(c) for way, c in checks.items() if c}
    return out


def _orientation_summary(checks: list[dict]) -> dict:
    wrong = [c for c in checks if c["quarter_turns_off"]]
    return {"upright": len(checks) - len(wrong), "checked": len(checks),
            "wrong_orientations": sorted({c["orientation"] for c in wrong}),
            "max_mean_abs_diff_upright": max((c["mean_abs_diff"] for c in checks if not c["quarter_turns_off"]),
                                             default=None),
            "per_photo": checks}


def memory_probe(graph: Path, thumbnail: Path, photo: Path, way: str) -> dict:
    """In this (fresh) process: peak and resident memory of turning one photo into model input.

    Imports, loads the graph and warms up on the thumbnail first, so that only the photo's decode
    and resize are in the difference.
    """
    prepare_imports()
    model = load_graph(graph)
    size = model.input_size
    small, data = thumbnail.read_bytes(), photo.read_bytes()

    def convert(encoded: bytes) -> np.ndarray:
        if way == "in_graph":
            return decode_in_graph(model, encoded)
        return to_model_input(model, decode_photo(encoded, size))

    for _ in range(3):
        convert(small)
    gc.collect()
    hwm_reset = reset_peak_rss()
    before = proc_memory()
    t0 = time.perf_counter()
    x = convert(data)
    seconds = time.perf_counter() - t0
    after = proc_memory()
    del x
    gc.collect()
    released = proc_memory()
    return {"way": way, "photo": f"{photo.parent.name}/{photo.name}", "hwm_reset": hwm_reset,
            "seconds": round(seconds, 3), "before": before, "after": after, "after_release": released,
            "peak_delta_mib": round(after["hwm_mib"] - before["hwm_mib"], 1),
            "rss_delta_mib": round(after["rss_mib"] - before["rss_mib"], 1),
            "rss_delta_after_release_mib": round(released["rss_mib"] - before["rss_mib"], 1)}


def run_memory_probes(graph: Path, photos: list[Photo], sizes: Sizes, step: Callable[[str], None]) -> dict:
    """``memory_probe`` in a fresh subprocess per photo: no earlier allocation hides the peak."""
    runs: dict[str, list[dict]] = {"python": [], "in_graph": []}
    plan = [("python", p) for p in photos[:sizes.memory_probes]]
    plan += [("in_graph", p) for p in photos[:sizes.graph_memory_probes]]
    for way, p in plan:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory_probe", way, "--graph", str(graph),
               "--probe_thumbnail", str(p.thumbnail), "--probe_photo", str(p.photo)]
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        if proc.returncode:
            raise RuntimeError(f"memory probe failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        run["orientation"] = p.orientation
        runs[way].append(run)
        step(f"  {way} path, orientation {p.orientation}: peak +{run['peak_delta_mib']:.0f} MiB, "
             f"RSS +{run['rss_delta_mib']:.0f} MiB")
    return {way: {"runs": r, "peak_delta_mib": [x["peak_delta_mib"] for x in r],
                  "median_peak_delta_mib": statistics.median(x["peak_delta_mib"] for x in r)}
            for way, r in runs.items() if r}


# ---------------------------------------------------------------- part b: the service

def service_environment() -> dict[str, str]:
    """The IMAGECLF_* variables the service inherits (the flags service_command gives win over theirs)."""
    overridden = {f"IMAGECLF_{flag}" for flag in ("HOST", "PORT", "GRAPHS_DIR", "IMAGE_ROOT")}
    return {k: v for k, v in os.environ.items() if k.startswith("IMAGECLF_") and k not in overridden}


def bench_service(graph: Path, photos: list[Photo], work: Path, sizes: Sizes, step: Callable[[str], None]) -> dict:
    """One keep-alive client per service, one request at a time: thumbnail, photo, on tf then on litert..."""
    graphs_dir = work / "served-graphs"
    graphs_dir.mkdir(exist_ok=True)
    (graphs_dir / graph.name).symlink_to(graph.resolve())
    thumbs = [p.thumbnail.read_bytes() for p in photos]
    big = [p.photo.read_bytes() for p in photos]
    with Processes(work) as services:
        procs = {runtime: services.start_service(f"service-{runtime}", service_command(graphs_dir, work, runtime)
                                                 ).wait_ready() for runtime in RUNTIMES}
        conns = {runtime: http.client.HTTPConnection(HOST, proc.port, timeout=300) for runtime, proc in procs.items()}
        for conn in conns.values():
            for data in thumbs[:3] + big[:2]:  # waitress threads, thread pools, the first large buffers
                classify_upload(conn, data)
        memory_before = {runtime: proc_memory(proc.proc.pid) for runtime, proc in procs.items()}
        step(f"  services ready; {sizes.service_requests} thumbnails and {sizes.service_requests} photos each, "
             "interleaved")
        latencies = {r: {"thumbnail": [], "photo": []} for r in RUNTIMES}
        server_ms = {r: {"thumbnail": [], "photo": []} for r in RUNTIMES}
        errors: dict[str, list[str]] = {r: [] for r in RUNTIMES}
        for i in range(sizes.service_requests):
            for kind, data in (("thumbnail", thumbs[i % len(thumbs)]), ("photo", big[i % len(big)])):
                for runtime, conn in conns.items():
                    t0 = time.perf_counter()
                    status, answer = classify_upload(conn, data)
                    latencies[runtime][kind].append(time.perf_counter() - t0)
                    if status != 200:
                        errors[runtime].append(f"{kind}: HTTP {status}: {answer.get('error')}")
                    elif "time_ms" in answer:
                        server_ms[runtime][kind].append(answer["time_ms"])
        for conn in conns.values():
            conn.close()
        memory_after = {runtime: proc_memory(proc.proc.pid) for runtime, proc in procs.items()}
    out = {}
    for runtime in RUNTIMES:
        one: dict = {"requests_each": sizes.service_requests, "errors": len(errors[runtime]),
                     "first_errors": errors[runtime][:3],
                     "service_args": service_command(graphs_dir, work, runtime),
                     "environment": service_environment(),
                     "memory_mib": {"before": memory_before[runtime], "after": memory_after[runtime]}}
        for kind, seconds in latencies[runtime].items():
            times = server_ms[runtime][kind]
            one[kind] = {"latency": ms_stats(seconds),
                         "server_time_ms_p50": {key: round(statistics.median(t[key] for t in times), 1)
                                                for key in ("decode", "inference", "total")} if times else None}
        one["ratio_p50_photo_over_thumbnail"] = round(one["photo"]["latency"]["p50_ms"]
                                                      / one["thumbnail"]["latency"]["p50_ms"], 1)
        one["target_ratio"] = TARGET_SERVICE_RATIO
        out[runtime] = one
    return out


# ---------------------------------------------------------------- part c: bottlenecks

def bench_bottlenecks(photos: list[Photo], sizes: Sizes, step: Callable[[str], None]) -> dict:
    """get_bottlenecks (no cache) on the photos and on the thumbnails, against the bare forward pass."""
    base = load_builtin_base()
    photo_paths, thumb_paths = [p.photo for p in photos], [p.thumbnail for p in photos]
    bottlenecks_no_cache(thumb_paths[:8], base)  # builds and traces the memoized functions
    bare = bare_forward_runner(base, sizes.bare_images)
    rounds: dict[str, list[float]] = {"bare": [], "photos": [], "thumbnails": []}
    peaks = []
    for r in range(sizes.bottleneck_rounds):
        # The faster of two passes: on a shared machine one pass of ~1 s is easily disturbed.
        rounds["bare"].append(sizes.bare_images / min(bare(), bare()))
        gc.collect()
        reset = reset_peak_rss()
        before = proc_memory()
        t0 = time.perf_counter()
        report = bottlenecks_no_cache(photo_paths, base)
        rounds["photos"].append(len(photo_paths) / (time.perf_counter() - t0))
        peaks.append(round(proc_memory()["hwm_mib"] - before["rss_mib"], 1) if reset else None)
        t0 = time.perf_counter()
        bottlenecks_no_cache(thumb_paths, base)
        rounds["thumbnails"].append(len(thumb_paths) / (time.perf_counter() - t0))
        step(f"  round {r + 1}: bare {rounds['bare'][-1]:.1f}, photos {rounds['photos'][-1]:.2f}, "
             f"thumbnails {rounds['thumbnails'][-1]:.1f} img/s")
    best = {k: round(max(v), 2) for k, v in rounds.items()}
    return {"base": base.description, "input_size": list(base.input_size), "batch_size": BATCH_SIZE,
            "photos": len(photo_paths), "bare_images_per_round": sizes.bare_images, "rounds": sizes.bottleneck_rounds,
            "images_per_s_best": best, "images_per_s_rounds": {k: [round(x, 2) for x in v] for k, v in rounds.items()},
            "ratio_photos_over_bare": round(best["photos"] / best["bare"], 3),
            "ratio_thumbnails_over_bare": round(best["thumbnails"] / best["bare"], 3),
            "ratio_photos_over_bare_per_round": [round(p / b, 3) for p, b in
                                                 zip(rounds["photos"], rounds["bare"], strict=True)],
            "summary": report.summary(),
            "peak_rss_over_start_mib_photos": peaks}


# ---------------------------------------------------------------- report

def format_report(r: dict) -> str:
    m, ph = r["machine"], r["photos"]
    orient = ", ".join(f"{k}: {v}" for k, v in ph["orientations"].items() if v)
    lines = [f"Machine: {machine_line(m)}",
             f"Run:     {'--quick' if r['quick'] else 'default'}, {r['wall_s']:.0f} s; graph {r['graph']['name']} "
             f"{r['graph']['input_size']}",
             f"Photos:  {ph['n']} from {r['image_dir']}: {ph['stored_size'][0]}x{ph['stored_size'][1]} JPEG q"
             f"{ph['jpeg_quality']}, mean {ph['mean_mb']:.2f} MB (min {ph['min_mb']:.2f}, max {ph['max_mb']:.2f}; "
             f"target {ph['target_mb'][0]:g}-{ph['target_mb'][1]:g} MB{'' if ph['in_target_range'] else ' MISSED'}); "
             f"EXIF orientation {orient}",
             f"         thumbnails {', '.join('x'.join(map(str, s)) for s in ph['thumbnail_sizes'])}, "
             f"mean {ph['thumbnail_mean_kb']} kB"]
    code = r.get("code") or {}
    changed = code.get("uncommitted_product_files")
    lines.append(f"Code:    {(code.get('commit') or 'unknown')[:12]}"
                 + (f" + uncommitted {', '.join(x.split()[-1] for x in changed)}" if changed else ""))
    if r["note"]:
        lines.append(f"Note:    {r['note']}")
    service = [line for runtime, svc in r["service"].items() for line in ["", *_service_lines(svc, runtime)]]
    return "\n".join(lines + ["", *_decode_lines(r["decode"], r["memory"]), *service,
                              "", *_bottleneck_lines(r["bottlenecks"])])


def _decode_lines(d: dict, mem: dict) -> list[str]:
    st = d["stages"]

    def row(label: str, kind: str) -> str:
        s = st[kind]
        graph = f"  {s['in_graph']['p50_ms']:>9.1f}" if "in_graph" in s else ""
        return (f"  {label:<30} {s['decode']['p50_ms']:>9.1f} {s['model_input']['p50_ms']:>12.1f}"
                f" {s['total']['p50_ms']:>9.1f} {s['total']['p90_ms']:>9.1f}{graph}   n={s['total']['n']}")

    size = "x".join(map(str, d["model_input_size"]))
    lines = [f"a) Decode to model input ({size}), in-process, p50 ms ({d['passes']} pass(es); decode_image "
             f"{'given size=' if d['decode_size_argument'] else 'has no size= argument'})",
             f"  {'':<30} {'decode':>9} {'model_input':>12} {'total':>9} {'total p90':>9}"
             + (f"  {'in-graph':>9}" if "in_graph" in st["photo"] else ""),
             row("thumbnail", "thumbnail"), row("12 MP photo, all", "photo"),
             row("12 MP photo, EXIF-turned", "photo_tagged"), row("12 MP photo, no tag", "photo_untagged"),
             f"  ratio photo / thumbnail, total p50: {d['ratio_total_p50_photo_over_thumbnail']}x"
             + (f"; in-graph (image_bytes:0) {d['ratio_in_graph_p50_photo_over_thumbnail']}x"
                if "ratio_in_graph_p50_photo_over_thumbnail" in d else "")]
    for way, o in d["orientation"].items():
        label = "Python path (decode_image)" if way == "python" else "in-graph path (image_bytes:0)"
        bad = o["wrong_orientations"]
        wrong = f"; WRONG for orientation {', '.join(map(str, bad))}" if bad else ""
        lines.append(f"  upright vs thumbnail, {label}: {o['upright']}/{o['checked']}{wrong}")
    for way, m in mem.items():
        label = "Python path" if way == "python" else "in-graph path"
        runs = m["runs"]
        lines.append(f"  peak memory of one 12 MP decode, {label}, fresh process: VmHWM +"
                     + ", +".join(f"{x['peak_delta_mib']:.0f}" for x in runs)
                     + f" MiB (median {m['median_peak_delta_mib']:.0f}); VmRSS +"
                     + ", +".join(f"{x['rss_delta_mib']:.0f}" for x in runs) + " MiB after, "
                     + ", ".join(f"{x['rss_delta_after_release_mib']:+.0f}" for x in runs) + " MiB once freed"
                     + f"  (orientations {', '.join(str(x['orientation']) for x in runs)})")
    return lines


def _service_lines(s: dict, runtime: str) -> list[str]:
    def row(label: str, kind: str) -> str:
        lat, server = s[kind]["latency"], s[kind]["server_time_ms_p50"]
        inside = (f"  server p50: decode {server['decode']:.1f} + inference {server['inference']:.1f} ms"
                  if server else "")
        return f"  {label:<30} p50 {lat['p50_ms']:>8.1f} ms  p90 {lat['p90_ms']:>8.1f} ms  (n={lat['n']}){inside}"

    verdict = "meets" if s["ratio_p50_photo_over_thumbnail"] <= s["target_ratio"] else "above"
    mem = s["memory_mib"]
    return [f"b) Service --runtime {runtime}: POST /classify (raw body), one client, one request at a time, "
            "interleaved",
            row("thumbnail", "thumbnail"), row("12 MP photo", "photo"),
            f"  ratio p50 photo / thumbnail: {s['ratio_p50_photo_over_thumbnail']}x ({verdict} the goal of "
            f"<= {s['target_ratio']:g}x); errors {s['errors']}",
            f"  service RSS {mem['before']['rss_mib']:.0f} -> {mem['after']['rss_mib']:.0f} MiB, "
            f"peak {mem['after']['hwm_mib']:.0f} MiB"]


def _bottleneck_lines(b: dict) -> list[str]:
    best, rounds = b["images_per_s_best"], b["images_per_s_rounds"]

    def row(label: str, key: str) -> str:
        return (f"  {label:<40} {best[key]:>8.2f} img/s  (rounds: "
                f"{', '.join(f'{x:.2f}' for x in rounds[key])})")

    peaks = [p for p in b["peak_rss_over_start_mib_photos"] if p is not None]
    return [f"c) Bottlenecks, no cache ({b['base']}; batch {b['batch_size']}; {b['photos']} images; "
            f"best of {b['rounds']} round(s))",
            row("bare forward pass, random pixels", "bare"),
            row("get_bottlenecks, 12 MP photos", "photos"),
            row("get_bottlenecks, their thumbnails", "thumbnails"),
            f"  ratio to bare: photos {b['ratio_photos_over_bare']:.3f} (per round "
            f"{', '.join(f'{x:.3f}' for x in b['ratio_photos_over_bare_per_round'])}), thumbnails "
            f"{b['ratio_thumbnails_over_bare']:.3f}"
            + (f"; peak RSS during the photos call: +{max(peaks):.0f} MiB" if peaks else "")]


# ---------------------------------------------------------------- main

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK.photos} photos, one decode pass, {QUICK.service_requests} service requests of each "
                        "kind (about 2 minutes on 2 cores; the default takes about 4)")
    p.add_argument("--photos", type=int, help=f"how many photos to make (default {Sizes.photos}, quick {QUICK.photos})")
    p.add_argument("--image_dir", type=Path,
                   help=f"class folders of thumbnails (default: {DEFAULT_IMAGE_DIR}, else sample_images)")
    p.add_argument("--graph", type=Path, help="graph to use (default: retrain one on sample_images, ~20 s)")
    p.add_argument("--output", type=Path, help="JSON file to write (default: under benchmarks/results/)")
    # Internal: this file measures one decode's memory in a fresh process (see run_memory_probes).
    p.add_argument("--memory_probe", choices=("python", "in_graph"), help=argparse.SUPPRESS)
    p.add_argument("--probe_thumbnail", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--probe_photo", type=Path, help=argparse.SUPPRESS)
    args = add_run_flags(p).parse_args(argv)
    if args.photos is not None and args.photos < 2:
        p.error("--photos must be at least 2")
    return args


def run_all(args: argparse.Namespace, sizes: Sizes, work: Path) -> dict:
    step = _progress()
    image_dir, note = resolve_image_dir(args.image_dir)
    image_dir = image_dir.resolve()
    sources = source_images(image_dir, sizes.photos)
    step(f"1. making {len(sources)} phone photos from {image_dir}")
    photos = make_photos(sources, work, step)
    summary = photo_summary(photos)
    step(f"  mean JPEG size {summary['mean_mb']:.2f} MB (min {summary['min_mb']:.2f}, max {summary['max_mb']:.2f})")
    if not summary["in_target_range"]:
        note = "; ".join(filter(None, [note, f"photo sizes outside {TARGET_SIZE_MB[0]}-{TARGET_SIZE_MB[1]} MB"]))
    step("using --graph" if args.graph else "building a graph: retrain on sample_images, 200 steps")
    graph = args.graph.resolve() if args.graph else build_graph(work)
    model = load_graph(graph)
    try:
        graph_info = {"name": model.name, "path": str(graph), "input_size": list(model.input_size),
                      "has_image_bytes_input": model.bytes_input is not None}
        step("2a. decode to model input, in-process")
        decode = bench_decode(model, photos, sizes)
    finally:
        model.close()
    step(f"2a. peak memory of one decode, {sizes.memory_probes + sizes.graph_memory_probes} fresh processes")
    memory = run_memory_probes(graph, photos, sizes, step)
    step("2b. service latency")
    service = bench_service(graph, photos, work, sizes, step)
    step(f"2c. bottlenecks without cache, {sizes.bottleneck_rounds} round(s)")
    bottlenecks = bench_bottlenecks(photos, sizes, step)
    return {"image_dir": str(image_dir), "note": note, "sizes": asdict(sizes), "photos": summary,
            "graph": graph_info, "decode": decode, "memory": memory, "service": service, "bottlenecks": bottlenecks}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.graph, args.probe_thumbnail, args.probe_photo, args.memory_probe)))
        return 0
    prepare_imports()
    sizes = QUICK if args.quick else Sizes()
    if args.photos is not None:
        sizes = Sizes(**{**asdict(sizes), "photos": args.photos})
    run = Run("bench_photos", args)
    code = code_state()
    with tempfile.TemporaryDirectory(prefix="bench-photos-") as tmp:
        results = run_all(args, sizes, Path(tmp))
    results = {"machine": run.end(), "code": code, "quick": bool(args.quick), "wall_s": run.wall_s(), **results}
    print(format_report(results))
    run.write(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
