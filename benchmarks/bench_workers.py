"""Threads or processes: service configurations against in-process batched inference, per core.

One run retrains a small graph (or takes ``--graph``), starts every configuration below as
``python -m service`` on 127.0.0.1, and then, in interleaved rounds (the order rotating from
round to round), measures the in-process reference (decode + ``GraphModel.predict`` on batches
of 8 and 32) and each configuration under the same concurrent upload load:

- one process, ``--threads T`` (TensorFlow's default thread pools: one thread per core), also
  with ``--intra_op_threads 1 --inter_op_threads 1``;
- ``--workers C`` (C = the cores), T/C threads each, with the default split (intra-op = cores / C),
  and with every worker given all the cores (``--intra_op_threads C``): oversubscribed;
- at 8 clients: one process with 8 threads, and ``--workers C`` with 8 threads each;
- one process and ``--workers C``, at T and at 8 clients, also with ``--batch_wait_ms 50``
  (while a model call runs, a new batch waits for it to finish, up to 50 ms, instead of 2 ms).

Besides images/s it records the CPU seconds per image of each service's process tree (parent
and workers, from /proc) and of the in-process reference: the per-core cost, which is what
decides on a machine with more cores than this one.

    python benchmarks/bench_workers.py [--rounds 5] [--images 192] [--clients 32] [--output F.json]

All traffic goes to 127.0.0.1; every subprocess is stopped at the end, on errors too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench_service import (
    graphs_dir_with,
    inproc_batched_rate,
    load_images,
    make_graph,
    run_load,
    take,
    upload_requests,
    warm_up,
    warm_up_model,
    work_dir,
)
from harness import Processes, Run, add_run_flags, load_average, machine_line, prepare_imports, resolve_image_dir

TARGET_THROUGHPUT_RATIO = 0.8


@dataclass(frozen=True)
class Config:
    key: str
    clients: int
    flags: tuple[str, ...]


def configs(cores: int, clients: int) -> list[Config]:
    per_worker = max(1, clients // cores)
    one, many = ("--threads", str(clients)), ("--workers", str(cores), "--threads", str(per_worker))
    many_8 = ("--workers", str(cores), "--threads", "8")
    wait, intra1 = ("--batch_wait_ms", "50"), ("--intra_op_threads", "1", "--inter_op_threads", "1")
    return [
        Config(f"1x{clients}_threads", clients, one),
        Config(f"1x{clients}_threads_intra1_inter1", clients, (*one, *intra1)),
        Config(f"1x{clients}_threads_wait50", clients, (*one, *wait)),
        Config(f"{cores}_workers_x{per_worker}", clients, many),
        Config(f"{cores}_workers_x{per_worker}_intra{cores}", clients, (*many, "--intra_op_threads", str(cores))),
        Config(f"{cores}_workers_x{per_worker}_wait50", clients, (*many, *wait)),
        Config("1x8_threads_8_clients", 8, ("--threads", "8")),
        Config("1x8_threads_wait50_8_clients", 8, ("--threads", "8", *wait)),
        Config(f"{cores}_workers_x8_8_clients", 8, many_8),
        Config(f"{cores}_workers_x8_wait50_8_clients", 8, (*many_8, *wait)),
    ]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: %(default)s)")
    p.add_argument("--images", type=int, default=192, help="images per configuration and round (default: %(default)s)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients of the main configurations "
                                                            "(default: %(default)s)")
    p.add_argument("--graph", type=Path, help="graph to serve (default: retrain one on sample_images, ~20 s)")
    p.add_argument("--image_dir", type=Path, help="class folders of JPEGs (default: as bench_service.py)")
    p.add_argument("--output", type=Path, help="JSON file to write (default: under benchmarks/results/)")
    args = add_run_flags(p).parse_args(argv)
    if args.rounds < 1 or args.images < 32 or args.clients < 1:
        p.error("--rounds must be positive, --images at least 32, --clients positive")
    return args


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its descendants (the workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue  # exited meanwhile
        fields = stat.rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
        todo += [int(c) for c in children]
    return total


def process_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def measure_inproc(model, encoded: list[bytes], batch: int, n: int) -> dict:
    cpu0 = process_cpu_seconds()
    rate = inproc_batched_rate(model, encoded, batch, n)
    return {"per_s": rate, "cpu_ms_per_image": round(1000 * (process_cpu_seconds() - cpu0) / n, 2)}


def measure_service(server, config: Config, requests, n: int, start: int) -> dict:
    cpu0, client0 = tree_cpu_seconds(server.proc.pid), process_cpu_seconds()
    result = run_load(server.port, take(requests, start, n), config.clients)
    summary = result.summary()
    return {"per_s": summary["requests_per_s"], "errors": summary["errors"],
            "p50_ms": summary["latency"]["p50_ms"], "p99_ms": summary["latency"]["p99_ms"],
            "cpu_ms_per_image": round(1000 * (tree_cpu_seconds(server.proc.pid) - cpu0) / n, 2),
            "client_cpu_ms_per_image": round(1000 * (process_cpu_seconds() - client0) / n, 2),
            **({"first_error": summary["first_error"]} if summary["errors"] else {})}


def run_rounds(args: argparse.Namespace, work: Path, cores: int) -> dict:
    from imageclf.graph_model import GraphModel

    image_dir, note = resolve_image_dir(args.image_dir)
    paths, encoded = load_images(image_dir.resolve())
    uploads = upload_requests(encoded)
    graph = args.graph.resolve() if args.graph else make_graph(work)
    graphs_dir = graphs_dir_with(graph, work)
    all_configs = configs(cores, args.clients)
    base = ["--graphs_dir", str(graphs_dir), "--image_root", str(image_dir), "--grpc_port", "0"]
    with Processes(work) as servers:
        started = {c.key: servers.start_service(c.key, [*base, *c.flags]) for c in all_configs}
        model = GraphModel(graph)
        for c in all_configs:
            started[c.key].wait_ready()
            warm_up(started[c.key], uploads, c.clients)
        warm_up_model(model, encoded)
        rounds: list[dict] = []
        for r in range(args.rounds):
            row = {"load_average": load_average()[0]}
            for b in (8, 32):
                row[f"in_process_batch_{b}"] = measure_inproc(model, encoded, b, args.images)
            shift = r % len(all_configs)  # rotate, so that no configuration always runs first
            for c in all_configs[shift:] + all_configs[:shift]:
                row[c.key] = measure_service(started[c.key], c, uploads, args.images, r * args.images)
            rounds.append(row)
            print(f"  round {r + 1}/{args.rounds}, load {row['load_average']}: " + ", ".join(
                f"{k} {v['per_s']}" for k, v in row.items() if k != "load_average"), file=sys.stderr, flush=True)
        model.close()
    return {"image_dir": str(image_dir), "note": note, "n_images": len(paths), "graph": str(graph),
            "configs": {c.key: {"clients": c.clients, "flags": list(c.flags)} for c in all_configs},
            "rounds": rounds}


def summarize(results: dict) -> dict:
    """Per configuration: best and median rate, ratio to the same round's best batched rate, CPU per image."""
    rounds = results["rounds"]
    reference = [max(r["in_process_batch_8"]["per_s"], r["in_process_batch_32"]["per_s"]) for r in rounds]
    out = {}
    for key in ["in_process_batch_8", "in_process_batch_32", *results["configs"]]:
        rates = [r[key]["per_s"] for r in rounds]
        cpu = [r[key]["cpu_ms_per_image"] for r in rounds]
        entry = {"best_per_s": max(rates), "median_per_s": statistics.median(rates), "rounds_per_s": rates,
                 "median_cpu_ms_per_image": statistics.median(cpu)}
        if key in results["configs"]:
            ratios = [round(a / b, 2) for a, b in zip(rates, reference, strict=True)]
            entry |= {"ratio_per_round": ratios, "median_ratio": statistics.median(ratios),
                      "errors": sum(r[key]["errors"] for r in rounds),
                      "median_p50_ms": statistics.median(r[key]["p50_ms"] for r in rounds),
                      "median_p99_ms": statistics.median(r[key]["p99_ms"] for r in rounds)}
        out[key] = entry
    return out


def format_report(results: dict) -> str:
    s = results["summary"]
    lines = [f"Machine: {machine_line(results['machine'])}", "",
             f"{'configuration':<40} {'best':>7} {'median':>7} img/s  {'ratio':>5}  {'CPU':>6} ms/img  p50/p99 ms"]
    for key, e in s.items():
        ratio = f"{e['median_ratio']:>5.2f}" if "median_ratio" in e else "    -"
        lat = f"  {e['median_p50_ms']:.0f}/{e['median_p99_ms']:.0f}, errors {e['errors']}" if "errors" in e else ""
        lines.append(f"{key:<40} {e['best_per_s']:>7.1f} {e['median_per_s']:>7.1f}        {ratio}  "
                     f"{e['median_cpu_ms_per_image']:>6.2f}{lat}")
    lines.append(f"(ratio: median over rounds of the rate / that round's best in-process batched rate; "
                 f"target >= {TARGET_THROUGHPUT_RATIO})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_imports()
    run = Run("bench_workers", args)
    with work_dir() as work:
        results = run_rounds(args, work, run.machine["nproc"])
    results = {"machine": run.end(), "wall_s": run.wall_s(),
               "settings": {"rounds": args.rounds, "images_per_round": args.images, "clients": args.clients},
               **results}
    results["summary"] = summarize(results)
    print(format_report(results))
    run.write(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
