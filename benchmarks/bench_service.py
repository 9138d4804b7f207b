"""Benchmark of the classification service against in-process inference on the same graph.

One run retrains a small graph (or takes ``--graph``) and measures, in this order:

1. in-process reference: ``decode_image`` + ``GraphModel.predict([pixels])`` one image at a
   time (latency), and ``predict`` on batches of 8 and 32 (the best batched rate);
2. ``python -m service`` in a subprocess, one keep-alive client: latency by path
   (``GET /?file=``) and by upload (``POST /classify``, raw body);
3. throughput with 8 and 32 concurrent keep-alive clients (``--threads`` 8 and 32);
4. the same 8-client load on a naive Flask app that loads the graph on every request;
5. resident memory of the service after 100 and after 10,000 uploads (1,000 with --quick).

    python benchmarks/bench_service.py [--quick] [--output FILE.json] [--graph G.pb]

All traffic goes to 127.0.0.1. Every subprocess is stopped at the end, on errors too.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

if TYPE_CHECKING:
    from flask import Flask

    from imageclf.graph_model import GraphModel

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_IMAGE_DIR = REPO_ROOT.parent / "shared" / "data" / "stanford_dogs_9"
FALLBACK_IMAGE_DIR = REPO_ROOT / "sample_images"
RESULTS_DIR = BENCH_DIR / "results"
HOST = "127.0.0.1"  # never anything else: the benchmark only talks to its own processes
TARGET_LATENCY_RATIO = 1.3
TARGET_THROUGHPUT_RATIO = 0.8
N_IMAGES = 256  # distinct images cycled through by every measurement
READY_TIMEOUT_S = 180


@dataclass(frozen=True)
class Sizes:
    """How many requests each measurement makes."""

    latency: int = 200
    batched_images: int = 320  # a multiple of 8 and 32
    load: int = 400
    naive: int = 40
    memory_checkpoints: tuple[int, ...] = (100, 1_000, 4_000, 10_000)


QUICK = Sizes(latency=60, batched_images=128, load=160, naive=16, memory_checkpoints=(100, 500, 1_000))


# ---------------------------------------------------------------- set-up and inputs

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer requests everywhere; memory after 1,000 uploads")
    p.add_argument("--output", type=Path, help="JSON file to write (default: under benchmarks/results/)")
    p.add_argument("--graph", type=Path, help="graph to serve (default: retrain one on sample_images, ~20 s)")
    p.add_argument("--image_dir", type=Path, help=f"images to classify (default: {DEFAULT_IMAGE_DIR})")
    # Internal: this same file serves the naive app in its own process (see serve_naive).
    p.add_argument("--serve_naive", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=8, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def prepare_imports() -> None:
    """Make ``import imageclf`` (and bench_retrain) work from any directory; keep TensorFlow quiet."""
    for path in (str(REPO_ROOT), str(BENCH_DIR)):
        if path not in sys.path:
            sys.path.insert(0, path)
    # Read once by TensorFlow's C++ logging, so it must be set before the import.
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    from imageclf.cli_common import quiet_tensorflow

    quiet_tensorflow()


def resolve_image_dir(requested: Path | None) -> tuple[Path, str | None]:
    if requested is not None:
        return requested, None
    if DEFAULT_IMAGE_DIR.is_dir():
        return DEFAULT_IMAGE_DIR, None
    return FALLBACK_IMAGE_DIR, f"{DEFAULT_IMAGE_DIR} not found; using {FALLBACK_IMAGE_DIR}"


def pick_images(image_dir: Path, n: int) -> list[Path]:
    """At most ``n`` JPEGs spread evenly over the sorted list, so every class is represented."""
    paths = sorted(image_dir.glob("*/*.jpg"))
    if not paths:
        raise SystemExit(f"bench_service.py: error: no */*.jpg under {image_dir}")
    return paths[::max(1, len(paths) // n)][:n]


def make_graph(work: Path) -> Path:
    """A small graph from sample_images with the built-in base: the one every part serves."""
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


# ---------------------------------------------------------------- statistics

def percentiles(seconds: Sequence[float]) -> dict:
    import numpy as np

    ms = np.asarray(seconds) * 1000.0
    return {"n": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "mean_ms": round(float(ms.mean()), 2)}


def rate(images: int, seconds: float) -> dict:
    return {"images": images, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 1)}


# ---------------------------------------------------------------- part 1: in-process reference

def bench_in_process_latency(model: GraphModel, encoded: list[bytes], n: int) -> dict:
    """decode + predict of one image per call: what one request costs without HTTP."""
    from imageclf.images import decode_image

    for data in encoded[:10]:  # warm-up: first runs allocate buffers and pick kernels
        model.predict([decode_image(data)])
    seconds = []
    for i in range(n):
        start = time.perf_counter()
        model.predict([decode_image(encoded[i % len(encoded)])])
        seconds.append(time.perf_counter() - start)
    return percentiles(seconds)


def bench_in_process_batched(model: GraphModel, encoded: list[bytes], n_images: int,
                             batch_sizes: Sequence[int] = (8, 32)) -> dict:
    """Images/s of decode + predict on whole batches; decoding is timed because the service does it too."""
    from imageclf.images import decode_image

    out = {}
    for size in batch_sizes:
        batches = [[encoded[(b * size + j) % len(encoded)] for j in range(size)] for b in range(n_images // size)]
        model.predict([decode_image(d) for d in batches[0]])  # warm-up for this batch shape
        start = time.perf_counter()
        for batch in batches:
            model.predict([decode_image(d) for d in batch])
        out[f"batch_{size}"] = rate(len(batches) * size, time.perf_counter() - start)
    best = max(out.values(), key=lambda r: r["images_per_s"])
    return {**out, "best_images_per_s": best["images_per_s"]}


def bench_in_process_threads(model: GraphModel, encoded: list[bytes], n: int, threads: int = 8) -> dict:
    """Batch-1 predict from several threads at once: what the service does inside, minus HTTP.

    Separates the cost of concurrent single-image Session.run calls from the cost of HTTP.
    """
    from imageclf.images import decode_image

    counter = iter(range(n))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            model.predict([decode_image(encoded[i % len(encoded)])])

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return {**rate(n, time.perf_counter() - start), "threads": threads}


def bench_in_process_stages(model: GraphModel, encoded: list[bytes], n: int) -> dict:
    """Where a batch-1 request's time goes: Pillow decode, eager preprocessing, Session.run.

    Also ``predict_encoded`` (decode and resize inside the graph), the alternative to the
    eager preprocessing that the service uses through ``predict``.
    """
    from imageclf.images import decode_image

    stages: dict[str, list[float]] = {"decode": [], "model_input": [], "session_run": [], "predict_encoded": []}
    for i in range(n):
        data = encoded[i % len(encoded)]
        t0 = time.perf_counter()
        pixels = decode_image(data)
        t1 = time.perf_counter()
        x = model.model_input(pixels)[None]
        t2 = time.perf_counter()
        model.session.run(model.output, {model.input: x})
        t3 = time.perf_counter()
        stages["decode"].append(t1 - t0)
        stages["model_input"].append(t2 - t1)
        stages["session_run"].append(t3 - t2)
        if model.bytes_input is not None:
            model.predict_encoded([data])
            stages["predict_encoded"].append(time.perf_counter() - t3)
    return {name: percentiles(seconds) for name, seconds in stages.items() if seconds}


def bench_in_process(graph: Path, encoded: list[bytes], sizes: Sizes) -> dict:
    from imageclf.graph_model import GraphModel

    model = GraphModel(graph)
    try:
        return {"latency": bench_in_process_latency(model, encoded, sizes.latency),
                "batched": bench_in_process_batched(model, encoded, sizes.batched_images),
                "threads_batch_1": bench_in_process_threads(model, encoded, sizes.load // 2),
                "stages_batch_1": bench_in_process_stages(model, encoded, sizes.latency // 2)}
    finally:
        # Frees its thread pools and memory before the service processes compete for the CPUs.
        model.close()


# ---------------------------------------------------------------- subprocesses

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    port: int
    log: Path

    def rss_kib(self) -> dict:
        """VmRSS (now) and VmHWM (peak) of the server process, from /proc."""
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
        return {"rss_mib": round(fields["VmRSS"] / 1024, 1), "peak_rss_mib": round(fields["VmHWM"] / 1024, 1)}


class Servers:
    """Every process started by the benchmark, so that all are stopped in a finally block."""

    def __init__(self, work: Path):
        self.work = work
        self.started: list[Server] = []

    def start(self, name: str, cmd: list[str]) -> Server:
        port = free_port()
        log = self.work / f"{name}.log"
        with open(log, "wb") as f:  # a file, not a pipe: a full pipe would block the server
            proc = subprocess.Popen([*cmd, "--port", str(port)], cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT)
        server = Server(name, proc, port, log)
        self.started.append(server)
        wait_ready(server)
        return server

    def stop(self, server: Server) -> None:
        if server.proc.poll() is None:
            server.proc.terminate()
            try:
                server.proc.wait(10)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()

    def stop_all(self) -> None:
        for server in self.started:
            self.stop(server)


def wait_ready(server: Server, timeout: float = READY_TIMEOUT_S) -> None:
    """Poll ``/readyz`` until 200: the model is loaded and warmed up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited ({server.proc.returncode}):\n{_tail(server.log)}")
        try:
            conn = http.client.HTTPConnection(HOST, server.port, timeout=5)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                conn.close()
                return
            conn.close()
        except OSError:
            pass  # not listening yet
        time.sleep(0.2)
    raise RuntimeError(f"{server.name} not ready after {timeout:.0f} s:\n{_tail(server.log)}")


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:]


def service_cmd(graphs_dir: Path, image_root: Path, threads: int) -> list[str]:
    return [sys.executable, "-m", "service", "--graphs_dir", str(graphs_dir), "--image_root", str(image_root),
            "--threads", str(threads), "--host", HOST]


def naive_cmd(graph: Path, threads: int) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--serve_naive", str(graph), "--threads", str(threads)]


# ---------------------------------------------------------------- HTTP load

@dataclass(frozen=True)
class Request:
    method: str
    url: str
    body: bytes | None = None


def path_requests(paths: list[Path], image_root: Path) -> list[Request]:
    return [Request("GET", "/?file=" + quote(str(p.relative_to(image_root)))) for p in paths]


def upload_requests(encoded: list[bytes]) -> list[Request]:
    return [Request("POST", "/classify", data) for data in encoded]


def cycle(requests: list[Request], n: int) -> list[Request]:
    return [requests[i % len(requests)] for i in range(n)]


@dataclass
class LoadResult:
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    server_ms: list[dict] = field(default_factory=list)  # the service's own time_ms breakdown
    errors: list[str] = field(default_factory=list)

    def summary(self, clients: int) -> dict:
        out = {"clients": clients, "requests": len(self.latencies), "errors": len(self.errors),
               **rate(len(self.latencies), self.seconds), "latency": percentiles(self.latencies)}
        out["requests_per_s"] = out.pop("images_per_s")
        out.pop("images")
        if self.server_ms:
            out["server_time_ms_p50"] = {key: percentiles([t[key] / 1000 for t in self.server_ms])["p50_ms"]
                                         for key in ("decode", "inference", "total")}
        if self.errors:
            out["first_error"] = self.errors[0]
        return out


def _client(port: int, requests: list[Request], start: threading.Barrier, result: LoadResult,
            lock: threading.Lock) -> None:
    """One keep-alive connection sending its requests one after the other."""
    conn = http.client.HTTPConnection(HOST, port, timeout=300)
    conn.connect()  # before the barrier, so connecting is not timed
    latencies, server_ms, errors = [], [], []
    start.wait()
    for req in requests:
        headers = {"Content-Type": "application/octet-stream"} if req.body is not None else {}
        t0 = time.perf_counter()
        try:
            conn.request(req.method, req.url, body=req.body, headers=headers)
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as e:
            errors.append(f"{type(e).__name__}: {e}")
            conn.close()  # http.client reconnects on the next request
            continue
        latencies.append(time.perf_counter() - t0)
        if response.status != 200:
            errors.append(f"HTTP {response.status}: {body[:200]!r}")
            continue
        timing = json.loads(body).get("time_ms")
        if timing:
            server_ms.append(timing)
    conn.close()
    with lock:
        result.latencies += latencies
        result.server_ms += server_ms
        result.errors += errors


def run_load(port: int, requests: list[Request], clients: int) -> LoadResult:
    """Send ``requests`` from ``clients`` threads at once; wall time from the common start to the last answer."""
    result, lock = LoadResult(), threading.Lock()
    start = threading.Barrier(clients + 1)
    shares = [requests[i::clients] for i in range(clients)]
    threads = [threading.Thread(target=_client, args=(port, share, start, result, lock)) for share in shares]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - t0
    if not result.latencies or len(result.errors) == len(requests):
        raise RuntimeError(f"every request failed; first error: {result.errors[:1]}")
    return result


def warm_up(server: Server, requests: list[Request], clients: int) -> None:
    """A few requests first: waitress threads, TensorFlow's pools and the page cache get going."""
    run_load(server.port, cycle(requests, 2 * clients), clients)


# ---------------------------------------------------------------- parts 2-5: the service

def bench_service_latency(servers: Servers, graphs_dir: Path, image_root: Path, by_path: list[Request],
                          uploads: list[Request], sizes: Sizes) -> dict:
    """One client, one request at a time, by path and by upload; then 8 clients on the same server."""
    server = servers.start("service-threads-8", service_cmd(graphs_dir, image_root, threads=8))
    try:
        warm_up(server, by_path + uploads, 1)
        path = run_load(server.port, cycle(by_path, sizes.latency), 1).summary(1)
        upload = run_load(server.port, cycle(uploads, sizes.latency), 1).summary(1)
        warm_up(server, uploads, 8)
        load_8 = run_load(server.port, cycle(uploads, sizes.load), 8).summary(8)
    finally:
        servers.stop(server)
    return {"by_path": path, "by_upload": upload, "load": {"8_clients": {"service_threads": 8, **load_8}}}


def bench_service_32(servers: Servers, graphs_dir: Path, image_root: Path, uploads: list[Request],
                     sizes: Sizes) -> dict:
    server = servers.start("service-threads-32", service_cmd(graphs_dir, image_root, threads=32))
    try:
        warm_up(server, uploads, 32)
        return {"service_threads": 32, **run_load(server.port, cycle(uploads, sizes.load), 32).summary(32)}
    finally:
        servers.stop(server)


def bench_memory(servers: Servers, graphs_dir: Path, image_root: Path, uploads: list[Request],
                 sizes: Sizes) -> dict:
    """RSS of a fresh service after each checkpoint of uploads from 8 clients: growth means a leak."""
    server = servers.start("service-memory", service_cmd(graphs_dir, image_root, threads=8))
    try:
        points = [{"requests": 0, **server.rss_kib()}]
        done, seconds, errors = 0, 0.0, 0
        for checkpoint in sizes.memory_checkpoints:
            result = run_load(server.port, cycle(uploads, checkpoint - done), 8)
            done, seconds, errors = checkpoint, seconds + result.seconds, errors + len(result.errors)
            points.append({"requests": done, **server.rss_kib()})
            print(f"  memory: {done:,} uploads, RSS {points[-1]['rss_mib']} MiB", file=sys.stderr)
        return {"clients": 8, "service_threads": 8, "checkpoints": points, "errors": errors,
                "requests_per_s": round(done / seconds, 1)}
    finally:
        servers.stop(server)


def bench_naive(servers: Servers, graph: Path, uploads: list[Request], sizes: Sizes) -> dict:
    server = servers.start("naive", naive_cmd(graph, threads=8))
    try:
        run_load(server.port, uploads[:2], 1)  # TensorFlow's one-time start-up, paid by any server
        result = run_load(server.port, cycle(uploads, sizes.naive), 8).summary(8)
        return {"service_threads": 8, **result, "peak_rss_mib": server.rss_kib()["peak_rss_mib"]}
    finally:
        servers.stop(server)


# ---------------------------------------------------------------- the naive app (part 4)

def build_naive_app(graph_path: Path) -> Flask:
    """The pattern users start from: every request parses the graph and runs it in a new Session.

    Only the tensor names, input size and scaling are found once, as a user would hard-code them.
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
            scaled = (resized * 255.0 - mean) / std
            with tf.compat.v1.Session(graph=graph) as session:
                batch = session.run(scaled, {data: request.get_data()})[None]
                scores = session.run(graph.get_tensor_by_name(output_name), {input_name: batch})[0]
        best = int(scores.argmax())
        return jsonify({"label": labels[best], "score": float(scores[best])})

    return app


def serve_naive(graph: Path, port: int, threads: int) -> int:
    import waitress

    waitress.serve(build_naive_app(graph), host=HOST, port=port, threads=threads, ident="naive")
    return 0


# ---------------------------------------------------------------- machine and report

def machine_details() -> dict:
    from bench_retrain import machine_info  # same fields as the retrain benchmark's JSON

    return machine_info()


def default_output(machine: dict) -> Path:
    stamp = datetime.fromisoformat(machine["date"]).strftime("%Y%m%d-%H%M")
    return RESULTS_DIR / f"bench_service-{machine['hostname']}-{stamp}.json"


def add_ratios(r: dict) -> None:
    """The two targets: service latency ≤ 1.3x in-process, throughput ≥ 0.8x the best batched rate."""
    ref_ms = r["in_process"]["latency"]["p50_ms"]
    ref_rate = r["in_process"]["batched"]["best_images_per_s"]
    svc = r["service"]
    r["ratios"] = {
        "latency_p50_by_path": round(svc["by_path"]["latency"]["p50_ms"] / ref_ms, 2),
        "latency_p50_by_upload": round(svc["by_upload"]["latency"]["p50_ms"] / ref_ms, 2),
        **{f"throughput_{k}": round(v["requests_per_s"] / ref_rate, 2) for k, v in svc["load"].items()},
        "throughput_naive_8_clients": round(r["naive"]["requests_per_s"] / ref_rate, 3),
        "service_over_naive_8_clients": round(svc["load"]["8_clients"]["requests_per_s"]
                                              / r["naive"]["requests_per_s"], 1),
        "target_latency_ratio": TARGET_LATENCY_RATIO, "target_throughput_ratio": TARGET_THROUGHPUT_RATIO}


def format_report(r: dict) -> str:
    m = r["machine"]
    lines = [f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_total_gib']} GiB, Python {m['python']}, "
             f"TensorFlow {m['tensorflow']}, {m['date']}, load {m['load_average_start']} -> {m['load_average_end']}",
             f"Graph:   {r['graph']['name']} {r['graph']['input_size']},"
             f" {r['n_images']} images from {r['image_dir']}"]
    if r["note"]:
        lines.append(f"Note:    {r['note']}")
    return "\n".join(lines + ["", *_latency_lines(r), "", *_throughput_lines(r), "", *_memory_lines(r)])


def _lat(label: str, lat: dict, extra: str = "") -> str:
    return f"  {label:<44} p50 {lat['p50_ms']:>8.1f} ms   p99 {lat['p99_ms']:>8.1f} ms  (n={lat['n']}){extra}"


def _latency_lines(r: dict) -> list[str]:
    ratios, svc = r["ratios"], r["service"]

    def server(s: dict) -> str:
        t = s.get("server_time_ms_p50")
        return f"  server: decode {t['decode']} + inference {t['inference']} ms" if t else ""

    return ["Latency, one client, one request at a time",
            _lat("in-process decode + predict([pixels])", r["in_process"]["latency"]),
            _stages_line(r["in_process"]["stages_batch_1"]),
            _lat("service GET /?file=", svc["by_path"]["latency"], server(svc["by_path"])),
            _lat("service POST /classify (raw body)", svc["by_upload"]["latency"], server(svc["by_upload"])),
            f"  ratio service / in-process p50: by path {ratios['latency_p50_by_path']:.2f}, by upload "
            f"{ratios['latency_p50_by_upload']:.2f} (target <= {TARGET_LATENCY_RATIO})"]


def _stages_line(stages: dict) -> str:
    parts = [f"{name} {stages[name]['p50_ms']:.1f}" for name in ("decode", "model_input", "session_run")]
    line = f"    p50 by stage (ms): {', '.join(parts)}"
    if "predict_encoded" in stages:
        line += f"; predict_encoded([bytes]) {stages['predict_encoded']['p50_ms']:.1f}"
    return line


def _rate_row(label: str, per_s: float, extra: str = "") -> str:
    return f"  {label:<44} {per_s:>8.1f} img/s{extra}"


def _throughput_lines(r: dict) -> list[str]:
    b, ratios = r["in_process"]["batched"], r["ratios"]
    lines = ["Throughput",
             _rate_row("in-process decode + predict, batch 8", b["batch_8"]["images_per_s"]),
             _rate_row("in-process decode + predict, batch 32", b["batch_32"]["images_per_s"]),
             _rate_row("in-process batch 1 from 8 threads", r["in_process"]["threads_batch_1"]["images_per_s"])]
    for key, load in r["service"]["load"].items():
        lines.append(_rate_row(f"service, {load['clients']} clients (--threads {load['service_threads']})",
                               load["requests_per_s"],
                               f"  ratio {ratios[f'throughput_{key}']:.2f}  p50 {load['latency']['p50_ms']:.0f} ms"
                               f"  p99 {load['latency']['p99_ms']:.0f} ms  errors {load['errors']}"))
    n = r["naive"]
    lines += [_rate_row("naive app, 8 clients (graph loaded per request)", n["requests_per_s"],
                        f"  ratio {ratios['throughput_naive_8_clients']:.3f}  p50 {n['latency']['p50_ms']:.0f} ms"
                        f"  errors {n['errors']}"),
              f"  service / naive at 8 clients: {ratios['service_over_naive_8_clients']}x;"
              f" throughput target >= {TARGET_THROUGHPUT_RATIO} of the best batched rate"]
    return lines


def _memory_lines(r: dict) -> list[str]:
    mem = r["memory"]
    points = ", ".join(f"{p['requests']:,}: {p['rss_mib']:.0f}" for p in mem["checkpoints"])
    return [f"Service RSS (MiB) after N uploads, 8 clients: {points}",
            f"  peak {mem['checkpoints'][-1]['peak_rss_mib']:.0f} MiB, {mem['requests_per_s']} req/s,"
            f" errors {mem['errors']}; naive app peak {r['naive']['peak_rss_mib']:.0f} MiB"]


# ---------------------------------------------------------------- main

def load_images(image_dir: Path) -> tuple[list[Path], list[bytes]]:
    paths = pick_images(image_dir, N_IMAGES)
    return paths, [p.read_bytes() for p in paths]


def graph_details(graph: Path) -> dict:
    from imageclf.graph_model import GraphModel

    model = GraphModel(graph)
    try:
        return {"name": model.name, "path": str(graph), "input_size": list(model.input_size),
                "labels": model.labels}
    finally:
        model.close()


def run_all(args: argparse.Namespace, work: Path, sizes: Sizes) -> dict:
    image_dir, note = resolve_image_dir(args.image_dir)
    image_dir = image_dir.resolve()
    paths, encoded = load_images(image_dir)
    step = _progress()
    step("graph" if args.graph else "retraining a graph on sample_images (~20 s)")
    graph = args.graph.resolve() if args.graph else make_graph(work)
    graphs_dir = graphs_dir_with(graph, work)
    by_path, uploads = path_requests(paths, image_dir), upload_requests(encoded)
    results: dict = {"image_dir": str(image_dir), "n_images": len(paths), "note": note, "quick": args.quick,
                     "sizes": sizes.__dict__, "graph": graph_details(graph)}
    step("part 1: in-process reference")
    results["in_process"] = bench_in_process(graph, encoded, sizes)
    servers = Servers(work)
    try:
        step("parts 2-3: service, 1 client and 8 clients")
        results["service"] = bench_service_latency(servers, graphs_dir, image_dir, by_path, uploads, sizes)
        step("part 3: service, 32 clients")
        results["service"]["load"]["32_clients"] = bench_service_32(servers, graphs_dir, image_dir, uploads, sizes)
        step("part 4: naive app, 8 clients")
        results["naive"] = bench_naive(servers, graph, uploads, sizes)
        step(f"part 5: service memory over {sizes.memory_checkpoints[-1]:,} uploads")
        results["memory"] = bench_memory(servers, graphs_dir, image_dir, uploads, sizes)
    finally:
        servers.stop_all()
    return results


def _progress() -> Callable[[str], None]:
    start = time.perf_counter()

    def step(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {message}...", file=sys.stderr, flush=True)
    return step


@contextmanager
def work_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        yield Path(tmp)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_imports()
    if args.serve_naive:
        return serve_naive(args.serve_naive, args.port, args.threads)
    sizes = QUICK if args.quick else Sizes()
    machine = machine_details()
    machine["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    with work_dir() as work:
        results = run_all(args, work, sizes)
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    results = {"machine": machine, "wall_s": round(time.perf_counter() - started, 1), **results}
    add_ratios(results)
    print(format_report(results))
    output = args.output or default_output(machine)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nWrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
