"""The service under more clients than it can serve: goodput, latency, refusals and probes.

One run retrains a small 3-class graph with the built-in base (or takes ``--graph``), starts
``python -m service`` with its default flags, and for each number of clients (8 -> 512 by
default) and each workload runs closed-loop clients for ``--seconds``:

- ``thumbs``: ordinary photos (the dog JPEGs of ../shared, 224x224, or sample_images);
- ``big``: valid 6300x6300 PNGs (small files, 40 MP each: under every limit, heavy to decode).

Clients connect from many loopback addresses (127.0.x.y, a few clients each), keep their
connection alive, and on a 503 wait its Retry-After (jittered) before trying again, as a
well-behaved client does. Meanwhile a probe asks ``/healthz`` twice a second from 127.0.0.1 on a
new connection with a 3 s timeout (a Kubernetes liveness probe). Reported per level: goodput
(200s per second), accepted p50/p99, refusals and their p50/p99, probe p50/max and timeouts,
other statuses and errors, and the service's peak RSS.

``--shedding off`` runs the same with an unbounded queue (``--max_queued_requests 1000000``),
which is how the service behaved before it shed load.

``--part memory``: RSS before, just after and 10 s after a burst of 12 concurrent 4000x4000 PNG uploads.

    python benchmarks/bench_overload.py [--quick] [--clients 8,256] [--workloads thumbs]
        [--shedding on,off] [--seconds 20] [--graph G.pb] [--part load|memory|all]

Results: benchmarks/results/bench_overload-<host>-<time>.json. All traffic is on 127.0.0.x.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench_service import graphs_dir_with, make_graph, service_cmd
from harness import (
    DEFAULT_IMAGE_DIR,
    HOST,
    REPO_ROOT,
    Processes,
    Run,
    add_run_flags,
    load_average,
    machine_line,
    process_memory_mib,
    spread_sample,
)

PROBE_EVERY_S = 0.5
PROBE_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 180.0
WARM_UP_S = 2.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--graph", type=Path, help="graph to serve (default: retrain one on sample_images)")
    p.add_argument("--clients", default="8,32,128,256,512", help="client counts, comma-separated")
    p.add_argument("--workloads", default="thumbs,big", help="thumbs, big (comma-separated)")
    p.add_argument("--shedding", default="on,off", help="on (the default service), off (unbounded queue)")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each level (default: %(default)s)")
    p.add_argument("--part", choices=("load", "memory", "all"), default="all")
    p.add_argument("--quick", action="store_true", help="8 and 256 clients, thumbs, 10 s each")
    p.add_argument("--output", type=Path)
    args = add_run_flags(p).parse_args(argv)
    if args.quick:
        args.clients, args.workloads, args.seconds = "8,256", "thumbs", 10.0
    return args


# ---------------------------------------------------------------- payloads

def thumbnails(n: int = 64) -> list[bytes]:
    folder = DEFAULT_IMAGE_DIR if DEFAULT_IMAGE_DIR.is_dir() else REPO_ROOT / "sample_images"
    return [p.read_bytes() for p in spread_sample(sorted(folder.glob("*/*.jpg")), n)]


def big_pngs(n: int = 4, side: int = 6300) -> list[bytes]:
    from PIL import Image, ImageDraw

    out = []
    for i in range(n):
        img = Image.new("RGB", (side, side), (40 * i, 120, 200))
        ImageDraw.Draw(img).ellipse((side // 4, side // 4, 3 * side // 4, 3 * side // 4), fill=(250, 200, 40 * i))
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
        out.append(buf.getvalue())
    return out


def upload(body: bytes) -> bytes:
    return (f"POST /classify HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


# ---------------------------------------------------------------- a small HTTP/1.1 client

async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> tuple[int, dict]:
    writer.write(raw)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers


class Level:
    """What one level's clients and probes saw."""

    def __init__(self) -> None:
        self.ok: list[float] = []
        self.refused: list[float] = []
        self.other: Counter[str] = Counter()
        self.probes: list[float] = []
        self.probe_timeouts = 0
        self.rss: list[float] = []
        self.cpu: dict = {}


async def client(index: int, port: int, payloads: list[bytes], window: tuple[float, float], level: Level) -> None:
    source = f"127.0.{1 + index // 4 // 250}.{2 + index // 4 % 250}"  # 4 clients an address
    rng = random.Random(index)
    conn = None
    while time.monotonic() < window[1]:
        try:
            if conn is None:
                conn = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
            started = time.monotonic()
            status, headers = await asyncio.wait_for(exchange(*conn, rng.choice(payloads)), REQUEST_TIMEOUT_S)
        except asyncio.CancelledError:
            if conn is not None:
                conn[1].close()
            raise
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, asyncio.LimitOverrunError) as e:
            level.other[type(e).__name__] += 1
            if conn is not None:
                conn[1].close()
            conn = None
            await asyncio.sleep(0.1)
            continue
        done = time.monotonic()
        counted = window[0] <= done <= window[1]
        if status == 200 and counted:
            level.ok.append(done - started)
        elif status == 503 and counted:
            level.refused.append(done - started)
        elif counted:
            level.other[str(status)] += 1
        if headers.get("connection", "").lower() == "close":
            conn[1].close()
            conn = None
        if status == 503:
            await asyncio.sleep(float(headers.get("retry-after", "1")) * rng.uniform(0.5, 1.0))


async def prober(port: int, pid: int, window: tuple[float, float], level: Level) -> None:
    while time.monotonic() < window[1]:
        started = time.monotonic()
        try:
            conn = await asyncio.wait_for(asyncio.open_connection(HOST, port), PROBE_TIMEOUT_S)
            try:
                status, _ = await asyncio.wait_for(
                    exchange(*conn, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"), PROBE_TIMEOUT_S)
            finally:
                conn[1].close()
            if status != 200:
                level.other[f"probe {status}"] += 1
            level.probes.append(time.monotonic() - started)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            level.probe_timeouts += 1
        memory = process_memory_mib(pid)
        if memory:
            level.rss.append(memory["rss_mib"])
        await asyncio.sleep(max(0.0, PROBE_EVERY_S - (time.monotonic() - started)))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_level(port: int, pid: int, clients: int, payloads: list[bytes], seconds: float) -> Level:
    level = Level()
    start = time.monotonic()
    window = (start + WARM_UP_S, start + WARM_UP_S + seconds)
    tasks = [asyncio.create_task(client(i, port, payloads, window, level)) for i in range(clients)]
    tasks.append(asyncio.create_task(prober(port, pid, window, level)))
    await asyncio.sleep(WARM_UP_S)
    cpu = cpu_seconds(pid), time.process_time()
    await asyncio.sleep(seconds)
    level.cpu = {"service_cores": round((cpu_seconds(pid) - cpu[0]) / seconds, 2),
                 "clients_cores": round((time.process_time() - cpu[1]) / seconds, 2)}
    # Requests still queued when the window ends are abandoned (their connections closed), as clients
    # past their deadline do: waiting for them could take minutes without a bound on the queue.
    await asyncio.wait(tasks, timeout=1.0)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return level


def summary(level: Level, clients: int, seconds: float) -> dict:
    def pct(values: list[float], q: float) -> float | None:
        if not values:
            return None
        ordered = sorted(values)
        return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {"clients": clients, "goodput_per_s": round(len(level.ok) / seconds, 2),
            "ok": len(level.ok), "accepted_p50_ms": pct(level.ok, 0.5), "accepted_p99_ms": pct(level.ok, 0.99),
            "refused": len(level.refused), "refused_p50_ms": pct(level.refused, 0.5),
            "refused_p99_ms": pct(level.refused, 0.99), "probes": len(level.probes),
            "probe_p50_ms": pct(level.probes, 0.5), "probe_max_ms": pct(level.probes, 1.0),
            "probe_timeouts": level.probe_timeouts, "other": dict(level.other),
            "peak_rss_mib": max(level.rss, default=None), **level.cpu}


def line(workload: str, shedding: str, s: dict) -> str:
    return (f"{workload:6} shedding {shedding:3} {s['clients']:4} clients: {s['goodput_per_s']:7.1f}/s ok, "
            f"p50 {s['accepted_p50_ms']} p99 {s['accepted_p99_ms']} ms; refused {s['refused']} "
            f"(p99 {s['refused_p99_ms']} ms); probes max {s['probe_max_ms']} ms, {s['probe_timeouts']} timeouts; "
            f"other {s['other']}; RSS {s['peak_rss_mib']} MiB; cores: service {s['service_cores']}, "
            f"clients {s['clients_cores']}")


# ---------------------------------------------------------------- parts

def bench_load(args: argparse.Namespace, servers: Processes, graphs: Path, root: Path) -> list[dict]:
    payloads = {"thumbs": [upload(b) for b in thumbnails()], "big": [upload(b) for b in big_pngs()]}
    rows = []
    for shedding in args.shedding.split(","):
        extra = [] if shedding == "on" else ["--max_queued_requests", "1000000"]
        server = servers.start_service(f"service-shedding-{shedding}", [*service_cmd(graphs, root, 8), *extra]
                                       ).wait_ready()
        for workload in args.workloads.split(","):
            for clients in (int(c) for c in args.clients.split(",")):
                level = asyncio.run(run_level(server.port, server.proc.pid, clients, payloads[workload], args.seconds))
                row = {"workload": workload, "shedding": shedding, **summary(level, clients, args.seconds),
                       "load_average": load_average()}
                print(line(workload, shedding, row), flush=True)
                rows.append(row)
                time.sleep(3 if shedding == "on" else 20)  # let the queue drain between levels
        server.stop()
    return rows


def bench_memory(servers: Processes, graphs: Path, root: Path, env_name: str = "default") -> dict:
    server = servers.start_service(f"service-memory-{env_name}", service_cmd(graphs, root, 8)).wait_ready()
    thumbs, bigs = [upload(b) for b in thumbnails(20)], [upload(b) for b in big_pngs(12, side=4000)]

    async def burst(payloads: list[bytes]) -> Counter:
        statuses: Counter = Counter()

        async def one(raw: bytes) -> None:
            conn = await asyncio.open_connection(HOST, server.port)
            try:
                status, _ = await exchange(*conn, raw)
                statuses[status] += 1
            finally:
                conn[1].close()
        await asyncio.gather(*(one(raw) for raw in payloads))
        return statuses

    asyncio.run(burst(thumbs))
    time.sleep(2)
    before = server.memory()
    statuses = asyncio.run(burst(bigs))
    right_after = server.memory()
    time.sleep(10)
    after = server.memory()
    server.stop()
    result = {"before_mib": before["rss_mib"], "right_after_mib": right_after["rss_mib"],
              "after_10s_mib": after["rss_mib"], "peak_mib": after["peak_rss_mib"],
              "kept_after_10s_mib": round(after["rss_mib"] - before["rss_mib"], 1), "statuses": dict(statuses)}
    print(f"memory: RSS {before['rss_mib']} MiB before 12 4000x4000 PNGs, {right_after['rss_mib']} right after, "
          f"{after['rss_mib']} 10 s later (+{result['kept_after_10s_mib']}), peak {after['peak_rss_mib']}; "
          f"answers {dict(statuses)}", flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run("bench_overload", args, light=True)
    machine = run.machine
    print(f"Machine: {machine['nproc']} CPUs ({machine['cpu_model']}), load {machine['load_average_start']}",
          flush=True)
    flags = {k: v for k, v in vars(args).items() if k != "allow_dirty"}  # the keys the results always had
    results: dict = {"benchmark": "bench_overload", "machine": machine, "settings": flags | {
        "graph": str(args.graph) if args.graph else None, "output": None,
        "imageclf_env": {k: v for k, v in os.environ.items() if k.startswith("IMAGECLF_") or k.startswith("MALLOC_")}}}
    with tempfile.TemporaryDirectory(prefix="bench_overload_") as tmp:
        work = Path(tmp)
        graph = args.graph or make_graph(work)
        graphs = graphs_dir_with(graph, work)
        with Processes(work) as servers:
            if args.part in ("load", "all"):
                results["load"] = bench_load(args, servers, graphs, REPO_ROOT)
            if args.part in ("memory", "all"):
                results["memory"] = bench_memory(servers, graphs, REPO_ROOT)
    run.write(results, label=f"{machine_line(run.end())}\nResults: ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
