"""Where a request's time goes in the service: CPU and wall time per image, stage by stage.

The service runs in this process exactly as ``python -m service`` builds it (create_app,
create_server, serve_until), with timers wrapped around its stages: waitress' event loop
(reading and parsing requests) and task (around the app), Flask, the header check, the
Pillow decode, the resize, the batch (waiting and Session.run), the answer and its JSON. Each
timer adds wall time and the calling thread's CPU time (``time.thread_time``). Stages other than
the decode (libjpeg) and TensorFlow's kernels hold the GIL while they use CPU, so their CPU is
the GIL time a request costs. The load comes from a separate process (``--client``), so that
its own Python work does not share this process' GIL.

    python benchmarks/profile_service.py [--clients 8] [--images 1536] [--batch_wait_ms 2] [--graph G.pb]

The timers cost a little themselves (a few microseconds per call); compare stages, not totals
with bench_service.py. All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from bench_service import graphs_dir_with, load_images, make_graph, run_load, take, upload_requests, work_dir
from harness import HOST, Run, add_run_flags, prepare_imports, resolve_image_dir

_STAGES: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])  # calls, wall s, thread CPU s
_LOCK = threading.Lock()


def _timed(name: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            with _LOCK:
                stage = _STAGES[name]
                stage[0] += 1
                stage[1] += wall
                stage[2] += cpu
    return wrapper


def instrument() -> None:
    """Wrap the stages in place (this process only)."""
    import flask
    import waitress.channel
    import waitress.task

    import imageclf.engine.classify as engine
    import imageclf.graph_model as graph_model
    import service.app as app

    patches = [
        (waitress.channel.HTTPChannel, "handle_read", "waitress loop: read and parse"),
        (waitress.channel.HTTPChannel, "handle_write", "waitress loop: send"),
        (waitress.task.WSGITask, "service", "waitress task (app included)"),
        (engine.Engine, "classify", "engine.classify (below included)"),
        (engine.Engine, "_open", "header check (open_image)"),
        (engine, "decode_opened", "decode (Pillow)"),
        (graph_model.GraphModel, "model_input", "resize (model_input)"),
        (engine.Engine, "_predict", "batch: wait and Session.run"),
        (graph_model.GraphModel, "run", "Session.run (per call)"),
        (app, "_one_answer", "answer (top_k, dict)"),
    ]
    for owner, attr, name in patches:
        setattr(owner, attr, _timed(name, getattr(owner, attr)))
    app.jsonify = _timed("jsonify", flask.jsonify)


def serve(graphs_dir: Path, image_root: Path, threads: int, batch_wait_ms: float):
    """The service as python -m service builds it, on a free port, in a thread; (server, stop, app)."""
    from service.app import ServiceConfig, create_app
    from service.server import create_server, serve_until

    config = ServiceConfig(graphs_dir=str(graphs_dir), image_root=str(image_root), batch_size=threads,
                           batch_wait_ms=batch_wait_ms)
    app = create_app(config)
    app.wsgi_app = _timed("flask (app included)", app.wsgi_app)
    server = create_server(app, host=HOST, port=0, threads=threads,
                           max_request_body_size=config.max_upload_bytes + 65536)
    stop = threading.Event()
    thread = threading.Thread(target=serve_until, args=(server, stop), name="waitress-loop", daemon=True)
    thread.start()
    return server, stop, thread, app


def client(port: int, image_dir: Path, clients: int, images: int) -> int:
    """The load: ``images`` uploads from ``clients`` keep-alive connections; JSON summary on stdout."""
    _, encoded = load_images(image_dir)
    uploads = upload_requests(encoded)
    run_load(port, take(uploads, 0, 2 * clients), clients)  # warm-up, not counted by the parent either
    print("WARM", flush=True)
    sys.stdin.readline()  # the parent resets its timers, then says go
    t = os.times()
    result = run_load(port, take(uploads, 0, images), clients)
    cpu = os.times().user + os.times().system - t.user - t.system
    print(json.dumps({**result.summary(), "client_cpu_ms_per_image": round(1000 * cpu / images, 3)}), flush=True)
    return 0


def loop_thread_cpu(thread: threading.Thread) -> float:
    stat = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def profile(args: argparse.Namespace, work: Path) -> dict:
    image_dir = resolve_image_dir(args.image_dir)[0].resolve()
    graph = args.graph.resolve() if args.graph else make_graph(work)
    instrument()
    server, stop, loop, app = serve(graphs_dir_with(graph, work), image_dir, args.clients, args.batch_wait_ms)
    registry = app.extensions["imageclf"]["registry"]
    try:
        deadline = time.monotonic() + 120
        while not registry.ready() and time.monotonic() < deadline:
            time.sleep(0.2)
        proc = subprocess.Popen([sys.executable, __file__, "--client", str(server.effective_port), "--image_dir",
                                 str(image_dir), "--clients", str(args.clients), "--images", str(args.images)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "WARM"
        with _LOCK:
            _STAGES.clear()
        process0, loop0, wall0 = time.process_time(), loop_thread_cpu(loop), time.perf_counter()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        load = json.loads(proc.stdout.readline())
        wall = time.perf_counter() - wall0
        process_cpu, loop_cpu = time.process_time() - process0, loop_thread_cpu(loop) - loop0
        proc.wait(30)
    finally:
        stop.set()
        server.pull_trigger()
        loop.join(10)
        registry.stop()
    return summarize(load, wall, process_cpu, loop_cpu)


def summarize(load: dict, wall: float, process_cpu: float, loop_cpu: float) -> dict:
    with _LOCK:
        stages = {k: list(v) for k, v in _STAGES.items()}
    n = stages["engine.classify (below included)"][0]
    calls = stages["Session.run (per call)"][0]
    per_image = {k: {"calls": c, "wall_ms": round(1000 * w / n, 3), "cpu_ms": round(1000 * cpu / n, 3)}
                 for k, (c, w, cpu) in stages.items()}
    return {"images": n, "wall_s": round(wall, 2), "images_per_s": round(n / wall, 1),
            "mean_batch": round(n / calls, 2), "process_cpu_ms_per_image": round(1000 * process_cpu / n, 3),
            "loop_thread_cpu_ms_per_image": round(1000 * loop_cpu / n, 3),
            "process_cores_used": round(process_cpu / wall, 2), "stages_per_image": per_image, "load": load}


def format_report(r: dict) -> str:
    lines = [f"{r['images']} images in {r['wall_s']} s: {r['images_per_s']} img/s, mean batch {r['mean_batch']}, "
             f"process CPU {r['process_cpu_ms_per_image']} ms/image ({r['process_cores_used']} cores), "
             f"waitress loop thread {r['loop_thread_cpu_ms_per_image']} ms/image, "
             f"client {r['load']['client_cpu_ms_per_image']} ms/image",
             f"  {'stage':<36} {'calls':>7} {'wall ms':>9} {'CPU ms':>8}  (per image)"]
    for name, s in sorted(r["stages_per_image"].items()):
        lines.append(f"  {name:<36} {s['calls']:>7} {s['wall_ms']:>9.3f} {s['cpu_ms']:>8.3f}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8, help="concurrent clients = service threads (default: 8)")
    p.add_argument("--images", type=int, default=1536, help="uploads measured (default: %(default)s)")
    p.add_argument("--batch_wait_ms", type=float, default=2.0, help="the service's --batch_wait_ms (default: 2)")
    p.add_argument("--graph", type=Path, help="graph to serve (default: retrain one on sample_images, ~20 s)")
    p.add_argument("--image_dir", type=Path, help="class folders of JPEGs (default: as bench_service.py)")
    p.add_argument("--output", type=Path, help="JSON file to write (default: under benchmarks/results/)")
    p.add_argument("--client", type=int, help=argparse.SUPPRESS)  # internal: the load process, on this port
    return add_run_flags(p).parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_imports()
    if args.client:
        return client(args.client, args.image_dir, args.clients, args.images)
    run = Run(f"profile_service-{args.clients}c", args)
    with work_dir() as work:
        results = profile(args, work)
    results = {"machine": run.end(), "settings": {"clients": args.clients, "images": args.images,
                                                "batch_wait_ms": args.batch_wait_ms}, **results}
    print(format_report(results))
    run.write(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
