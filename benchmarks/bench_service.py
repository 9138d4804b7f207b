"""Benchmark of the classification service against in-process inference on the same graph.

One run retrains a small graph (or takes ``--graph``) and measures:

1. in-process reference: ``decode_image`` + ``predict([pixels])`` one image at a time (latency),
   and decode + ``predict`` on batches of 8 and 32 (the best batched rate), with each runtime:
   a TensorFlow session (``GraphModel``) and LiteRT (``LiteModel``, XNNPACK);
2. ``python -m service`` in a subprocess, one keep-alive client: latency by path
   (``GET /?file=``) and by upload (``POST /classify``, raw body);
3. throughput with 8 and 32 concurrent keep-alive clients (services with ``--threads`` 8 and 32),
   each with micro-batching on (the default) and off (``--batch_size 1``), and the same batched
   services with ``--runtime litert``;
4. the same 8-client load on a naive Flask app that loads the graph on every request;
5. resident memory of a fresh service after 100 and after 10,000 uploads (1,000 with --quick),
   one in ten of them bad input (truncated JPEG, not an image) that must get its 400 or 415: with
   each runtime (HTTP only), and with LiteRT and gRPC on (gRPC needs TensorFlow's protos).

Parts 1-3 run in interleaved rounds (in-process, then each service, then again), so that load
from other work on a shared machine hits the reference and the service alike.

    python benchmarks/bench_service.py [--quick] [--output FILE.json] [--graph G.pb]

The services inherit the environment, so service settings can be compared with, for example,
``IMAGECLF_BATCH_WAIT_MS=5``; the JSON records the ``IMAGECLF_*`` variables that take effect.

All traffic goes to 127.0.0.1. Every subprocess is stopped at the end, on errors too.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from harness import (
    DEFAULT_IMAGE_DIR,
    HOST,
    REPO_ROOT,
    Processes,
    Run,
    ServiceProcess,
    add_run_flags,
    free_port,
    latency_ms,
    machine_line,
    prepare_imports,
    resolve_image_dir,
    spread_sample,
)

if TYPE_CHECKING:
    from flask import Flask

    from imageclf.classifier import Classifier

TARGET_LATENCY_RATIO = 1.3
TARGET_THROUGHPUT_RATIO = 0.8
N_IMAGES = 256  # distinct images cycled through by every measurement
BATCH_SIZES = (8, 32)
CLIENTS = (8, 32)  # each against a service with as many --threads


@dataclass(frozen=True)
class Setup:
    """One service configuration of the throughput part: its clients, and whether it batches."""

    clients: int
    batched: bool = True
    runtime: str = "tf"

    @property
    def key(self) -> str:
        return (f"service_{self.clients}_clients" + ("" if self.batched else "_unbatched")
                + ("" if self.runtime == "tf" else f"_{self.runtime}"))

    @property
    def label(self) -> str:
        flags = [f"--threads {self.clients}"] + ([] if self.batched else ["--batch_size 1"]) + \
            ([] if self.runtime == "tf" else [f"--runtime {self.runtime}"])
        return f"service, {self.clients} clients ({', '.join(flags)})"


# Batching on and off side by side, in the same rounds: the one fair test of what batching buys;
# and each runtime, batched, in the same rounds too.
SETUPS = (*(Setup(c, batched) for batched in (True, False) for c in CLIENTS),
          *(Setup(c, True, "litert") for c in CLIENTS))
RUNTIMES = ("tf", "litert")


@dataclass(frozen=True)
class Sizes:
    """How many requests each measurement makes, in total over its rounds."""

    latency: int = 200
    latency_rounds: int = 4
    load: int = 480  # per configuration; each round's share (96) is a multiple of 32 (batches, clients)
    load_rounds: int = 5
    naive: int = 40
    memory_checkpoints: tuple[int, ...] = (100, 1_000, 4_000, 10_000)


QUICK = Sizes(latency=60, latency_rounds=2, load=192, load_rounds=2, naive=16, memory_checkpoints=(100, 500, 1_000))


# ---------------------------------------------------------------- set-up and inputs

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer requests everywhere; memory after 1,000 uploads")
    p.add_argument("--output", type=Path, help="JSON file to write (default: under benchmarks/results/)")
    p.add_argument("--graph", type=Path, help="graph to serve (default: retrain one on sample_images, ~20 s)")
    p.add_argument("--image_dir", type=Path,
                   help=f"class folders of JPEGs to classify (default: {DEFAULT_IMAGE_DIR}, else sample_images)")
    # Internal: this same file serves the naive app in its own process (see serve_naive).
    p.add_argument("--serve_naive", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=8, help=argparse.SUPPRESS)
    return add_run_flags(p).parse_args(argv)


def load_images(image_dir: Path, n: int = N_IMAGES) -> tuple[list[Path], list[bytes]]:
    """At most ``n`` JPEGs spread evenly over the sorted list (every class represented), and their bytes."""
    paths = sorted(image_dir.glob("*/*.jpg"))
    if not paths:
        raise SystemExit(f"bench_service.py: error: no */*.jpg under {image_dir}")
    paths = spread_sample(paths, n)
    return paths, [p.read_bytes() for p in paths]


def make_graph(work: Path) -> Path:
    """A small graph from sample_images with the built-in base (MobileNetV2, 160x160)."""
    out = work / "graphs" / "shapes.pb"
    cmd = [sys.executable, "retrain.py", "--image_dir", "sample_images", "--output_graph", str(out),
           "--bottleneck_dir", str(work / "bn"), "--quiet", "--how_many_training_steps", "200"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return out


def graphs_dir_with(graph: Path, work: Path) -> Path:
    """A folder holding only ``graph``: the service serves every .pb in its folder."""
    folder = work / "graphs"
    folder.mkdir(exist_ok=True)
    target = folder / graph.name
    if not target.exists():
        target.symlink_to(graph.resolve())
    return folder


def graph_details(model: Classifier, graph: Path) -> dict:
    return {"name": model.name, "path": str(graph), "input_size": list(model.input_size), "labels": model.labels}


# ---------------------------------------------------------------- statistics

def per_s(n: int, seconds: float) -> float:
    return round(n / seconds, 1)


def rounds_summary(rates: list[float]) -> dict:
    """The best round (the least disturbed by other work) and every round, to show the spread."""
    return {"best_per_s": max(rates), "rounds_per_s": rates}


# ---------------------------------------------------------------- in-process reference

def inproc_latencies(model: Classifier, encoded: list[bytes], start: int, n: int) -> list[float]:
    """decode + predict of one image per call: what one request costs without HTTP."""
    from imageclf.images import decode_image

    seconds = []
    for i in range(start, start + n):
        t0 = time.perf_counter()
        model.predict([decode_image(encoded[i % len(encoded)])])
        seconds.append(time.perf_counter() - t0)
    return seconds


def inproc_batched_rate(model: Classifier, encoded: list[bytes], batch_size: int, n: int) -> float:
    """Images/s of decode + predict on whole batches; decoding is timed because the service does it too."""
    from imageclf.images import decode_image

    batches = [[encoded[(b * batch_size + j) % len(encoded)] for j in range(batch_size)]
               for b in range(n // batch_size)]
    t0 = time.perf_counter()
    for batch in batches:
        model.predict([decode_image(d) for d in batch])
    return per_s(len(batches) * batch_size, time.perf_counter() - t0)


def inproc_threads_rate(model: Classifier, encoded: list[bytes], n: int, threads: int = 8) -> float:
    """Batch-1 predict from several threads at once: what the service does inside, minus HTTP."""
    from imageclf.images import decode_image

    shares = [range(i, n, threads) for i in range(threads)]

    def worker(indices: range) -> None:
        for i in indices:
            model.predict([decode_image(encoded[i % len(encoded)])])

    workers = [threading.Thread(target=worker, args=(share,)) for share in shares]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return per_s(n, time.perf_counter() - t0)


def inproc_stages(model: Classifier, encoded: list[bytes], n: int) -> dict:
    """Where a batch-1 request's time goes: Pillow decode, the resize (``model_input``), the model
    (Session.run or the LiteRT invoke).

    Also, with TensorFlow, ``predict_encoded`` (decode and resize inside the graph), the alternative
    to the Pillow decode and separate resize that the service runs through ``predict``.
    """
    from imageclf.images import decode_image

    stages: dict[str, list[float]] = {"decode": [], "model_input": [], "model_run": [], "predict_encoded": []}
    for i in range(n):
        data = encoded[i % len(encoded)]
        t0 = time.perf_counter()
        pixels = decode_image(data)
        t1 = time.perf_counter()
        x = model.model_input(pixels)[None]
        t2 = time.perf_counter()
        model.run(x)
        t3 = time.perf_counter()
        for name, seconds in (("decode", t1 - t0), ("model_input", t2 - t1), ("model_run", t3 - t2)):
            stages[name].append(seconds)
        if getattr(model, "bytes_input", None) is not None:
            model.predict_encoded([data])
            stages["predict_encoded"].append(time.perf_counter() - t3)
    return {name: latency_ms(seconds) for name, seconds in stages.items() if seconds}


def warm_up_model(model: Classifier, encoded: list[bytes]) -> None:
    """First runs of each batch shape allocate buffers and pick kernels; keep them out of the timings."""
    from imageclf.images import decode_image

    for size in (1, *BATCH_SIZES):
        model.predict([decode_image(d) for d in encoded[:size]])


# ---------------------------------------------------------------- subprocesses

def service_cmd(graphs_dir: Path, image_root: Path, threads: int, batched: bool = True, runtime: str = "tf",
                grpc: bool = False) -> list[str]:
    """The service's flags (``Processes.start_service`` adds host and port)."""
    return ["--graphs_dir", str(graphs_dir), "--image_root", str(image_root),
            "--threads", str(threads), "--runtime", runtime,
            # HTTP only (several run at once), unless the memory part asks what gRPC costs.
            "--grpc_port", str(free_port() if grpc else 0), *([] if batched else ["--batch_size", "1"])]


def service_environment() -> dict[str, str]:
    """The IMAGECLF_* variables that reach the services (the others are overridden by service_cmd's flags)."""
    overridden = {f"IMAGECLF_{flag}" for flag in ("HOST", "PORT", "GRAPHS_DIR", "IMAGE_ROOT", "THREADS")}
    return {k: v for k, v in os.environ.items() if k.startswith("IMAGECLF_") and k not in overridden}


def start_naive(servers: Processes, graph: Path, threads: int) -> ServiceProcess:
    port = free_port()
    return servers.start("naive", [sys.executable, str(Path(__file__).resolve()), "--serve_naive", str(graph),
                                   "--threads", str(threads), "--port", str(port)], port)


# ---------------------------------------------------------------- HTTP load

@dataclass(frozen=True)
class Request:
    method: str
    url: str
    body: bytes | None = None
    expect: int = 200  # the status a correct service answers


def with_bad_uploads(uploads: list[Request], every: int = 10) -> list[Request]:
    """Every ``every``-th upload replaced by a truncated JPEG or a non-image (400 and 415)."""
    bad = [Request("POST", "/classify", uploads[0].body[: len(uploads[0].body) // 2], 400),
           Request("POST", "/classify", b"%PDF-1.4 not an image", 415)]
    return [bad[(i // every) % 2] if i % every == every - 1 else req for i, req in enumerate(uploads)]


def path_requests(paths: list[Path], image_root: Path) -> list[Request]:
    return [Request("GET", "/?file=" + quote(str(p.relative_to(image_root)))) for p in paths]


def upload_requests(encoded: list[bytes]) -> list[Request]:
    return [Request("POST", "/classify", data) for data in encoded]


def take(requests: list[Request], start: int, n: int) -> list[Request]:
    """``n`` requests cycling through the list from ``start``: each round sends different images."""
    return [requests[(start + i) % len(requests)] for i in range(n)]


@dataclass
class LoadResult:
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    server_ms: list[dict] = field(default_factory=list)  # the service's own time_ms breakdown
    errors: list[str] = field(default_factory=list)

    def add(self, other: LoadResult) -> None:
        self.seconds += other.seconds
        self.latencies += other.latencies
        self.server_ms += other.server_ms
        self.errors += other.errors

    def summary(self) -> dict:
        out = {"requests": len(self.latencies), "errors": len(self.errors), "seconds": round(self.seconds, 3),
               "requests_per_s": per_s(len(self.latencies), self.seconds), "latency": latency_ms(self.latencies)}
        if self.server_ms:
            out["server_time_ms_p50"] = {key: latency_ms([t[key] / 1000 for t in self.server_ms])["p50_ms"]
                                         for key in ("decode", "inference", "total")}
        if self.errors:
            out["first_error"] = self.errors[0]
        return out


def _client(port: int, requests: list[Request], start: threading.Barrier, result: LoadResult,
            lock: threading.Lock) -> None:
    """One keep-alive connection sending its requests one after the other."""
    conn = http.client.HTTPConnection(HOST, port, timeout=300)
    conn.connect()  # before the barrier, so that connecting is not timed
    own = LoadResult()
    start.wait()
    for req in requests:
        headers = {"Content-Type": "application/octet-stream"} if req.body is not None else {}
        t0 = time.perf_counter()
        try:
            conn.request(req.method, req.url, body=req.body, headers=headers)
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as e:
            own.errors.append(f"{type(e).__name__}: {e}")
            conn.close()  # http.client reconnects on the next request
            continue
        own.latencies.append(time.perf_counter() - t0)
        if response.status != req.expect:
            own.errors.append(f"HTTP {response.status} (expected {req.expect}): {body[:200]!r}")
        elif response.status == 200 and (timing := json.loads(body).get("time_ms")):
            own.server_ms.append(timing)
    conn.close()
    with lock:
        result.add(own)


def run_load(port: int, requests: list[Request], clients: int) -> LoadResult:
    """Send ``requests`` from ``clients`` threads at once; wall time from the common start to the last answer."""
    result, lock = LoadResult(), threading.Lock()
    start = threading.Barrier(clients + 1)
    threads = [threading.Thread(target=_client, args=(port, requests[i::clients], start, result, lock))
               for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - t0
    if len(result.errors) == len(requests):
        raise RuntimeError(f"every request failed; first error: {result.errors[0]}")
    return result


def warm_up(server: ServiceProcess, requests: list[Request], clients: int) -> None:
    """A few requests first: waitress threads, TensorFlow's pools and the page cache get going."""
    run_load(server.port, take(requests, 0, 2 * clients), clients)


# ---------------------------------------------------------------- parts 1-3: interleaved rounds

def bench_latency(models: dict[str, Classifier], services: dict[str, ServiceProcess], encoded: list[bytes],
                  by_path: list[Request], uploads: list[Request], sizes: Sizes) -> dict:
    """One request at a time: in-process, by path, by upload, per runtime, in alternating rounds; p50/p99 pooled."""
    chunk = sizes.latency // sizes.latency_rounds
    out = {}
    for runtime in models:
        out[runtime] = {"in_process": [], "by_path": LoadResult(), "by_upload": LoadResult(),
                        "p50_ms_per_round": {"in_process": [], "by_path": [], "by_upload": []}}
    for r in range(sizes.latency_rounds):
        for runtime, model in models.items():
            times = inproc_latencies(model, encoded, r * chunk, chunk)
            port = services[runtime].port
            p, u = (run_load(port, take(reqs, r * chunk, chunk), 1) for reqs in (by_path, uploads))
            o = out[runtime]
            o["in_process"] += times
            o["by_path"].add(p)
            o["by_upload"].add(u)
            for key, seconds in (("in_process", times), ("by_path", p.latencies), ("by_upload", u.latencies)):
                o["p50_ms_per_round"][key].append(latency_ms(seconds)["p50_ms"])
    return {runtime: {"in_process": latency_ms(o["in_process"]), "by_path": o["by_path"].summary(),
                      "by_upload": o["by_upload"].summary(), "p50_ms_per_round": o["p50_ms_per_round"]}
            for runtime, o in out.items()}


def _rate_key(runtime: str, what: str) -> str:
    return what if runtime == "tf" else f"{runtime}_{what}"


def bench_throughput(models: dict[str, Classifier], services: dict[Setup, ServiceProcess], encoded: list[bytes],
                     uploads: list[Request], sizes: Sizes) -> dict:
    """In-process batches of 8 and 32 and batch 1 from 8 threads, per runtime, then each service, round
    after round."""
    chunk = sizes.load // sizes.load_rounds
    rates: dict[str, list[float]] = {}
    loads = {setup: LoadResult() for setup in services}
    for r in range(sizes.load_rounds):
        for runtime, model in models.items():
            for b in BATCH_SIZES:
                rates.setdefault(_rate_key(runtime, f"batch_{b}"), []).append(
                    inproc_batched_rate(model, encoded, b, chunk))
            rates.setdefault(_rate_key(runtime, "threads_8_batch_1"), []).append(
                inproc_threads_rate(model, encoded, chunk))
        for setup, server in services.items():
            result = run_load(server.port, take(uploads, r * chunk, chunk), setup.clients)
            loads[setup].add(result)
            rates.setdefault(setup.key, []).append(per_s(len(result.latencies), result.seconds))
    return {"images_per_round": chunk, "rates": {k: rounds_summary(v) for k, v in rates.items()},
            "service": {s.key: {"clients": s.clients, "service_threads": s.clients, "batched": s.batched,
                                "runtime": s.runtime, **loads[s].summary()} for s in services}}


def bench_rounds(graph: Path, graphs_dir: Path, image_root: Path, images: tuple[list[Path], list[bytes]],
                 servers: Processes, sizes: Sizes, step: Callable[[str], None]) -> dict:
    """Parts 1-3: the in-process models and the services are up together, used in turns."""
    from imageclf.graph_model import GraphModel
    from imageclf.litert_model import LiteModel, LiteOptions

    paths, encoded = images
    by_path, uploads = path_requests(paths, image_root), upload_requests(encoded)
    services = {s: servers.start_service(s.key, service_cmd(graphs_dir, image_root, s.clients, s.batched, s.runtime))
                for s in SETUPS}
    # In-process LiteRT as the service runs it by default: one single-threaded interpreter per core.
    cores = len(os.sched_getaffinity(0))
    models: dict[str, Classifier] = {"tf": GraphModel(graph),
                                     "litert": LiteModel(graph, options=LiteOptions(threads=1, interpreters=cores))}
    try:
        for setup, server in services.items():
            server.wait_ready()
            warm_up(server, by_path + uploads, setup.clients)
        for model in models.values():
            warm_up_model(model, encoded)
        step("where a batch-1 request's time goes, in-process")
        stages = {runtime: inproc_stages(model, encoded, sizes.latency // 2) for runtime, model in models.items()}
        step(f"latency, 1 client, {sizes.latency_rounds} rounds")
        first = {s.runtime: services[s] for s in reversed(SETUPS) if s.clients == CLIENTS[0] and s.batched}
        latency = bench_latency(models, first, encoded, by_path, uploads, sizes)
        step(f"throughput, {sizes.load_rounds} rounds of in-process and {len(SETUPS)} services")
        throughput = bench_throughput(models, services, encoded, uploads, sizes)
        return {"graph": graph_details(models["tf"], graph), "stages_batch_1": stages, "latency": latency,
                "throughput": throughput}
    finally:
        for model in models.values():
            model.close()  # frees thread pools and interpreters before the next parts
        for server in services.values():
            server.stop()


# ---------------------------------------------------------------- parts 4-5

def bench_naive(servers: Processes, graph: Path, uploads: list[Request], sizes: Sizes) -> dict:
    server = start_naive(servers, graph, threads=8).wait_ready()
    try:
        run_load(server.port, uploads[:2], 1)  # TensorFlow's one-time start-up, which any server pays once
        result = run_load(server.port, take(uploads, 0, sizes.naive), 8)
        return {"clients": 8, "service_threads": 8, **result.summary(), **server.memory()}
    finally:
        server.stop()


def bench_memory(servers: Processes, graphs_dir: Path, image_root: Path, uploads: list[Request],
                 sizes: Sizes, runtime: str = "tf", grpc: bool = False) -> dict:
    """RSS of a fresh service after each checkpoint of uploads from 8 clients: steady growth means a leak.

    One upload in ten is bad input (truncated JPEG or not an image), which must not leak either.
    """
    uploads = with_bad_uploads(uploads)
    name = f"service-memory-{runtime}" + ("-grpc" if grpc else "")
    server = servers.start_service(name, service_cmd(graphs_dir, image_root, 8, runtime=runtime, grpc=grpc)
                                   ).wait_ready()
    try:
        points = [{"requests": 0, **server.memory()}]
        total = LoadResult()
        for checkpoint in sizes.memory_checkpoints:
            done = points[-1]["requests"]
            total.add(run_load(server.port, take(uploads, done, checkpoint - done), 8))
            points.append({"requests": checkpoint, **server.memory()})
            print(f"  {name}, {checkpoint:,} uploads: RSS {points[-1]['rss_mib']} MiB", file=sys.stderr, flush=True)
        summary = total.summary()
        bad_share = round(sum(r.expect != 200 for r in uploads) / len(uploads), 3)
        # Rate and latency pool the good uploads with the bad ones, which are answered faster.
        return {"clients": 8, "service_threads": 8, "runtime": runtime, "grpc": grpc, "bad_input_share": bad_share,
                "checkpoints": points, "errors": summary["errors"], "mixed_requests_per_s": summary["requests_per_s"],
                "mixed_latency": summary["latency"]}
    finally:
        server.stop()


# ---------------------------------------------------------------- the naive app (part 4)

def build_naive_app(graph_path: Path) -> Flask:
    """The pattern users start from: every request parses the graph and runs it in a new Session.

    Only tensor names, input size and scaling are looked up once, as a user would hard-code them.
    """
    import tensorflow as tf
    from flask import Flask, jsonify, request

    from imageclf.graph_model import GraphModel

    probe = GraphModel(graph_path)
    input_name, output_name, size = probe.input.name, probe.output.name, list(probe.input_size)
    mean, std, labels = probe.input_mean, probe.input_std, probe.labels
    probe.close()
    app = Flask("naive")

    @app.get("/readyz")
    def readyz():
        return jsonify({"status": "ready"})

    @app.post("/classify")
    def classify():
        graph_def = tf.compat.v1.GraphDef()
        graph_def.ParseFromString(graph_path.read_bytes())
        with tf.Graph().as_default() as graph:
            tf.import_graph_def(graph_def, name="")
            data = tf.compat.v1.placeholder(tf.string, [])
            pixels = tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")
            resized = tf.image.resize(tf.image.convert_image_dtype(pixels, tf.float32), size, antialias=True)
            scaled = (resized * 255.0 - mean) / std  # the same scaling as GraphModel.model_input
            with tf.compat.v1.Session(graph=graph) as session:
                batch = session.run(scaled, {data: request.get_data()})[None]
                scores = session.run(output_name, {input_name: batch})[0]
        best = int(scores.argmax())
        return jsonify({"label": labels[best], "score": float(scores[best])})

    return app


def serve_naive(graph: Path, port: int, threads: int) -> int:
    import waitress

    waitress.serve(build_naive_app(graph), host=HOST, port=port, threads=threads, ident="naive")
    return 0


# ---------------------------------------------------------------- ratios and report

def add_ratios(r: dict) -> None:
    """The targets: service p50 <= 1.3x in-process p50; service rate >= 0.8x the best in-process batched
    rate of the same runtime (for LiteRT, batch 1 from 8 threads counts too: one caller keeps one
    interpreter, one core, busy). And what LiteRT gives over TensorFlow, round by round."""
    tp = r["throughput"]["rates"]
    ratios: dict = {}
    best, batched_rounds = {}, {}
    for runtime in RUNTIMES:
        lat = r["latency"][runtime]
        ref_ms = lat["in_process"]["p50_ms"]
        keys = [_rate_key(runtime, f"batch_{b}") for b in BATCH_SIZES]
        if runtime == "litert":
            # One caller uses one interpreter, so one core: callers on 8 threads use them all, as the service does.
            keys.append(_rate_key(runtime, "threads_8_batch_1"))
        best[runtime] = max(tp[k]["best_per_s"] for k in keys)
        # Per round: each service round against the batched rounds run just before it.
        batched_rounds[runtime] = [max(vals) for vals in zip(*(tp[k]["rounds_per_s"] for k in keys), strict=True)]
        ratios[runtime] = {"latency_p50_by_path": round(lat["by_path"]["latency"]["p50_ms"] / ref_ms, 2),
                           "latency_p50_by_upload": round(lat["by_upload"]["latency"]["p50_ms"] / ref_ms, 2),
                           "best_batched_images_per_s": best[runtime]}
    for setup in SETUPS:
        svc, name = tp[setup.key], setup.key.replace("service", "throughput")
        ratios[name] = round(svc["best_per_s"] / best[setup.runtime], 2)
        ratios[f"{name}_per_round"] = [round(s / b, 2) for s, b in
                                       zip(svc["rounds_per_s"], batched_rounds[setup.runtime], strict=True)]
    for c in CLIENTS:
        on, off = tp[f"service_{c}_clients"], tp[f"service_{c}_clients_unbatched"]
        # Per round too: the two services ran one right after the other, under the same load.
        ratios[f"batching_gain_{c}_clients_per_round"] = [
            round(a / b, 2) for a, b in zip(on["rounds_per_s"], off["rounds_per_s"], strict=True)]
        lite = tp[f"service_{c}_clients_litert"]
        ratios[f"litert_over_tf_service_{c}_clients_per_round"] = [
            round(a / b, 2) for a, b in zip(lite["rounds_per_s"], on["rounds_per_s"], strict=True)]
    for b in BATCH_SIZES:
        ratios[f"litert_over_tf_in_process_batch_{b}_per_round"] = [
            round(a / t, 2) for a, t in zip(tp[f"litert_batch_{b}"]["rounds_per_s"], tp[f"batch_{b}"]["rounds_per_s"],
                                            strict=True)]
    naive = r["naive"]["requests_per_s"]
    ratios["throughput_naive_8_clients"] = round(naive / best["tf"], 3)
    ratios["service_over_naive_8_clients"] = round(tp["service_8_clients"]["best_per_s"] / naive, 1)
    r["ratios"] = {**ratios, "target_latency_ratio": TARGET_LATENCY_RATIO,
                   "target_throughput_ratio": TARGET_THROUGHPUT_RATIO}


def format_report(r: dict) -> str:
    m, g = r["machine"], r["graph"]
    lines = [f"Machine: {machine_line(m)}",
             f"Graph:   {g['name']} {g['input_size']}, {r['n_images']} images from {r['image_dir']}"]
    if r["note"]:
        lines.append(f"Note:    {r['note']}")
    if r["service_environment"]:
        lines.append("Service: " + " ".join(f"{k}={v}" for k, v in r["service_environment"].items()))
    sections = (_latency_lines(r), _throughput_lines(r), _memory_lines(r))
    return "\n".join(lines + [line for section in sections for line in ["", *section]])


def _lat(label: str, lat: dict, extra: str = "") -> str:
    return f"  {label:<52} p50 {lat['p50_ms']:>7.1f} ms  p99 {lat['p99_ms']:>7.1f} ms  (n={lat['n']}){extra}"


def _server_ms(s: dict) -> str:
    t = s.get("server_time_ms_p50")
    return f"  server p50: decode {t['decode']:.1f} + inference {t['inference']:.1f} ms" if t else ""


def _latency_lines(r: dict) -> list[str]:
    lines = ["Latency, one client, one request at a time (rounds interleaved, percentiles pooled)"]
    for runtime in RUNTIMES:
        lat, ratios, st = r["latency"][runtime], r["ratios"][runtime], r["stages_batch_1"][runtime]
        stages = ", ".join(f"{k} {st[k]['p50_ms']:.1f}" for k in ("decode", "model_input", "model_run"))
        encoded = f"; predict_encoded([bytes]) {st['predict_encoded']['p50_ms']:.1f}" if "predict_encoded" in st \
            else ""
        rounds = "; ".join(f"{k} {', '.join(f'{v:.1f}' for v in vals)}"
                           for k, vals in lat["p50_ms_per_round"].items())
        lines += [f" runtime {runtime}:",
                  _lat("in-process decode + predict([pixels])", lat["in_process"]),
                  f"    in-process p50 by stage (ms): {stages}{encoded}",
                  _lat("service GET /?file=", lat["by_path"]["latency"], _server_ms(lat["by_path"])),
                  _lat("service POST /classify (raw body)", lat["by_upload"]["latency"], _server_ms(lat["by_upload"])),
                  f"  p50 per round (ms): {rounds}",
                  f"  ratio service / in-process p50: by path {ratios['latency_p50_by_path']:.2f}, by upload "
                  f"{ratios['latency_p50_by_upload']:.2f} (target <= {TARGET_LATENCY_RATIO})"]
    return lines


def _rate_row(label: str, rates: dict, extra: str = "") -> str:
    rounds = ", ".join(f"{v:.1f}" for v in rates["rounds_per_s"])
    return f"  {label:<52} {rates['best_per_s']:>7.1f} img/s (rounds {rounds}){extra}"


def _throughput_lines(r: dict) -> list[str]:
    tp, ratios, naive = r["throughput"], r["ratios"], r["naive"]
    lines = [f"Throughput, best of {len(tp['rates']['batch_8']['rounds_per_s'])} rounds of "
             f"{tp['images_per_round']} images each"]
    for runtime in RUNTIMES:
        lines += [*(_rate_row(f"in-process {runtime}: decode + predict, batch {b}",
                              tp["rates"][_rate_key(runtime, f"batch_{b}")]) for b in BATCH_SIZES),
                  _rate_row(f"in-process {runtime}: batch 1 from 8 threads",
                            tp["rates"][_rate_key(runtime, "threads_8_batch_1")])]
    for setup in SETUPS:
        svc, name = tp["service"][setup.key], setup.key.replace("service", "throughput")
        lines.append(_rate_row(setup.label, tp["rates"][setup.key],
                               f"  p50 {svc['latency']['p50_ms']:.0f} ms, p99 {svc['latency']['p99_ms']:.0f} ms,"
                               f" errors {svc['errors']}"))
        per_round = ratios[f"{name}_per_round"]
        lines.append(f"    ratio to the best in-process rate of {setup.runtime} {ratios[name]:.2f}; per round "
                     f"{', '.join(map(str, per_round))}, median {statistics.median(per_round):.2f}"
                     f" (target >= {TARGET_THROUGHPUT_RATIO})")
    for c in CLIENTS:
        gain = ratios[f"batching_gain_{c}_clients_per_round"]
        lines.append(f"  batching on / off, {c} clients, per round: {', '.join(map(str, gain))}, "
                     f"median {statistics.median(gain):.2f}")
    for key, label in [*((f"litert_over_tf_in_process_batch_{b}_per_round", f"in-process batch {b}")
                         for b in BATCH_SIZES),
                       *((f"litert_over_tf_service_{c}_clients_per_round", f"service, {c} clients") for c in CLIENTS)]:
        lines.append(f"  litert / tf, {label}, per round: {', '.join(map(str, ratios[key]))}, "
                     f"median {statistics.median(ratios[key]):.2f}")
    lines += [f"  {'naive app, 8 clients (graph loaded per request)':<52} {naive['requests_per_s']:>7.1f} img/s"
              f" ({naive['requests']} requests)  p50 {naive['latency']['p50_ms']:.0f} ms, errors {naive['errors']}",
              f"    ratio to the best batched rate {ratios['throughput_naive_8_clients']:.3f}; the service is "
              f"{ratios['service_over_naive_8_clients']}x faster at 8 clients"]
    return lines


def _memory_lines(r: dict) -> list[str]:
    lines = []
    for key, mem in r["memory"].items():
        points = ", ".join(f"{p['requests']:,}: {p['rss_mib']:.0f}" for p in mem["checkpoints"])
        lines += [f"Service RSS (MiB), {key}, after N uploads from 8 clients, {mem['bad_input_share']:.0%} "
                  f"of them bad input: {points}",
                  f"  peak {mem['checkpoints'][-1]['peak_rss_mib']:.0f} MiB; {mem['mixed_requests_per_s']} req/s"
                  f" (good and bad), errors {mem['errors']}"]
    lines.append(f"Naive app peak {r['naive']['peak_rss_mib']:.0f} MiB")
    return lines


# ---------------------------------------------------------------- main

def _progress() -> Callable[[str], None]:
    start = time.perf_counter()

    def step(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {message}...", file=sys.stderr, flush=True)
    return step


@contextmanager
def work_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        yield Path(tmp)


def run_all(args: argparse.Namespace, work: Path, sizes: Sizes) -> dict:
    image_dir, note = resolve_image_dir(args.image_dir)
    image_dir = image_dir.resolve()
    images = load_images(image_dir)
    step = _progress()
    step("using --graph" if args.graph else "retraining a graph on sample_images (~20 s)")
    graph = args.graph.resolve() if args.graph else make_graph(work)
    graphs_dir = graphs_dir_with(graph, work)
    with Processes(work) as servers:
        step(f"starting the in-process model and {len(SETUPS)} services")
        results = bench_rounds(graph, graphs_dir, image_dir, images, servers, sizes, step)
        uploads = upload_requests(images[1])
        step(f"naive app, {sizes.naive} uploads from 8 clients")
        results["naive"] = bench_naive(servers, graph, uploads, sizes)
        results["memory"] = {}
        for runtime, grpc in (("tf", False), ("litert", False), ("litert", True)):
            key = f"runtime {runtime}" + (", gRPC on" if grpc else ", HTTP only")
            step(f"memory of a fresh service ({key}) over {sizes.memory_checkpoints[-1]:,} uploads")
            results["memory"][key] = bench_memory(servers, graphs_dir, image_dir, uploads, sizes, runtime, grpc)
    return {"image_dir": str(image_dir), "n_images": len(images[0]), "note": note, "quick": bool(args.quick),
            "sizes": asdict(sizes),
            "service_environment": service_environment(), **results}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_imports()
    if args.serve_naive:
        return serve_naive(args.serve_naive, args.port, args.threads)
    sizes = QUICK if args.quick else Sizes()
    run = Run("bench_service", args)
    with work_dir() as work:
        results = run_all(args, work, sizes)
    results = {"machine": run.end(), "wall_s": run.wall_s(), **results}
    add_ratios(results)
    print(format_report(results))
    run.write(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
