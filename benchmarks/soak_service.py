"""Soak test of the real service: months of hourly retrains and internet traffic, compressed into minutes.

One run starts ``python -m service`` as a subprocess (on 127.0.0.1 only) over a graphs folder that
holds one model, ``soak.pb``, and then, all at the same time:

- replaces ``soak.pb`` atomically (temp file + ``os.replace``) ``--reloads`` times, cycling through
  2-3 real graphs retrained once at the start, and waits each time until the service shows the
  new load in ``/metrics`` (``imageclf_model_reloads_total``) or ``/models`` (``loaded_at``);
- ``--clients`` threads send mixed traffic: good requests by path, by upload (raw and multipart)
  and TF Serving ``:predict`` batches of 1-32, bad uploads (truncated, not an image, empty) and
  fuzzed JPEGs;
- one thread sends hostile requests, each kind a bounded number of times: a ``:predict`` with
  thousands of tiny PNGs (also as ``text/plain``), JSON nested 100,000 deep, a 5 KB PNG of
  6324x6324 pixels, ``?file=`` with a 300-character name and with ``../../etc/passwd``;
- waves of slow clients on raw sockets: half a request and then a byte a second, or a body
  shorter than its Content-Length; ``/healthz`` is timed once a second throughout;
- a watchdog reads the service's RSS twice a second and kills it beyond ``--rss_limit_mib`` or
  when the machine runs low on memory (a finding, and the end of the soak).

Every answer is classified (status; for errors the kind of the JSON ``error`` text). Failures are
5xx other than 503 with Retry-After (load shedding, counted apart), error bodies that are not
JSON, connection errors and timeouts, and good requests answered with an error. A hostile
request's 4xx is the right answer, never a failure.

    python benchmarks/soak_service.py [--quick] [--reloads N] [--repo DIR] [--keep]

It prints a table and writes JSON with machine details to
``benchmarks/results/soak_service-<host>-<time>.json``. It exits non-zero only when the benchmark
itself breaks, not when the service fails: those are its findings. All traffic goes to
127.0.0.1; every loop is bounded in count and time; the service is stopped at the end, on
Ctrl-C and on errors too.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import math
import os
import random
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from harness import (
    HOST,
    REPO_ROOT,
    NotReady,
    Processes,
    Run,
    ServiceProcess,
    add_run_flags,
    clone_first,
    free_port,
    latency_ms,
    machine_line,
    memory_available_mib,
    percentile,
)

MODEL = "soak"      # the one model name served: graphs_dir/soak.pb
READY_TIMEOUT_S = 240
REQUEST_TIMEOUT_S = 60.0
HOSTILE_TIMEOUT_S = 120.0
WARMUP_EXCLUDED = 0.10  # share of reloads left out of the RSS slope
DEEP_JSON_LEVELS = 100_000
BIG_PNG_SIDE = 6324  # 39,992,976 pixels: just under the default --max_pixels of 40,000,000


# ---------------------------------------------------------------- settings

@dataclass(frozen=True)
class Preset:
    reloads: int
    rss_every: int
    warmup_s: float
    slow_seconds: float       # how long a drip client keeps dripping
    slow_pause_s: float       # between waves of slow clients
    max_minutes: float        # hard bound on the soak phase
    hostile_max: dict         # most requests of each hostile kind in one run


FULL = Preset(reloads=300, rss_every=25, warmup_s=20, slow_seconds=40, slow_pause_s=15, max_minutes=90,
              hostile_max={"predict_many": 3, "predict_many_text_plain": 3, "deep_json": 30, "big_png": 12,
                           "path_long_name": 60, "path_traversal": 60})
QUICK = Preset(reloads=40, rss_every=5, warmup_s=10, slow_seconds=15, slow_pause_s=5, max_minutes=20,
               hostile_max={"predict_many": 1, "predict_many_text_plain": 1, "deep_json": 6, "big_png": 3,
                            "path_long_name": 12, "path_traversal": 12})

# Client traffic: (category, group, weight). Groups: good (must get 200), bad (must get 4xx), fuzz (anything
# but a failure). Hostile requests come from their own thread with bounded counts.
CLIENT_MIX = (("good_path", "good", 25), ("good_raw", "good", 18), ("good_multipart", "good", 10),
              ("good_predict", "good", 15), ("bad_truncated", "bad", 5), ("bad_pdf", "bad", 5),
              ("bad_empty", "bad", 4), ("fuzz", "fuzz", 18))


def _whole_answer(sock: socket.socket, limit: int = 65536) -> tuple[bytes, str | None]:
    """An answer read up to its Content-Length or the end of the connection (one recv may hold only
    the head: the service writes head and body apart), and the name of the error that ended it."""
    data = b""
    while len(data) < limit:
        try:
            chunk = sock.recv(limit)
        except OSError as e:
            return data, type(e).__name__
        if not chunk:
            break
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length:[ \t]*(\d+)", head) if sep else None
        if length and len(body) >= int(length.group(1)):
            break
    return data, None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Defaults in brackets are for a full run; --quick changes them as shown.")
    p.add_argument("--quick", action="store_true",
                   help=f"a short run: {QUICK.reloads} reloads, RSS every {QUICK.rss_every}, shorter slow clients")
    p.add_argument("--reloads", type=int, help=f"hot reloads of the model [{FULL.reloads}; quick {QUICK.reloads}]")
    p.add_argument("--rss_every", type=int,
                   help=f"RSS checkpoint every N reloads [{FULL.rss_every}; quick {QUICK.rss_every}]")
    p.add_argument("--clients", type=int, default=4, help="client threads sending mixed traffic [%(default)s]")
    p.add_argument("--port", type=int, help="service port [a free one]")
    p.add_argument("--repo", type=Path, default=REPO_ROOT,
                   help="repository whose `python -m service` (and retrain code) to run: cwd and PYTHONPATH "
                        "[this one, %(default)s]")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (graphs, images, service log)")
    p.add_argument("--hostile_predict_instances", type=int, default=3000,
                   help="instances (1x1 PNGs) in the hostile :predict body [%(default)s]")
    p.add_argument("--hostile_predict_times", type=int,
                   help="how many times each hostile :predict (JSON, text/plain) is sent "
                        f"[{FULL.hostile_max['predict_many']}; quick {QUICK.hostile_max['predict_many']}]")
    p.add_argument("--slow_clients", type=int, default=6,
                   help="raw sockets per wave of slow clients: two thirds drip, one third short body [%(default)s]")
    p.add_argument("--think_ms", type=float, default=0.0,
                   help="pause of each client thread between requests [%(default)s]")
    p.add_argument("--reload_timeout_s", type=float, default=60.0,
                   help="how long to wait for a reload to show up [%(default)s]")
    p.add_argument("--rss_limit_mib", type=float, default=10240,
                   help="watchdog: kill the service beyond this RSS [%(default)s]")
    p.add_argument("--min_available_mib", type=float, default=3072,
                   help="watchdog: kill the service when the machine has less memory available [%(default)s]")
    p.add_argument("--max_minutes", type=float, help=f"bound on the soak phase [{FULL.max_minutes}; quick "
                                                     f"{QUICK.max_minutes}]")
    p.add_argument("--service_args", default="", help="extra flags for the service, e.g. '--threads 4'")
    p.add_argument("--seed", type=int, default=0, help="random seed of traffic and fuzzing [%(default)s]")
    p.add_argument("--output", type=Path, help="JSON file to write [under benchmarks/results/]")
    # Internal: this file also retrains the graph variants, in a child process with --repo's code.
    p.add_argument("--make_graphs", type=Path, help=argparse.SUPPRESS)
    args = add_run_flags(p).parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.reloads = args.reloads if args.reloads is not None else preset.reloads
    args.rss_every = args.rss_every or preset.rss_every
    args.max_minutes = args.max_minutes or preset.max_minutes
    args.preset = preset
    hostile_max = dict(preset.hostile_max)
    if args.hostile_predict_times is not None:
        hostile_max["predict_many"] = hostile_max["predict_many_text_plain"] = args.hostile_predict_times
    args.hostile_max = hostile_max
    args.repo = args.repo.resolve()
    if args.reloads < 1 or args.clients < 1 or args.rss_every < 1:
        p.error("--reloads, --clients and --rss_every must be at least 1")
    if not (args.repo / "service" / "__main__.py").is_file():
        p.error(f"--repo {args.repo}: no service/__main__.py there")
    return args


# ---------------------------------------------------------------- set-up: graphs (child process) and images

VARIANTS = (  # name, classes (None: all), training steps, learning rate
    ("all_300_steps", None, 300, 0.01),
    ("circle_square_200_steps", ("circle", "square"), 200, 0.01),
    ("all_1000_steps_lr_0.05", None, 1000, 0.05),
)


def make_graphs_child(out: Path, repo: Path) -> int:
    """Retrain every variant with ``repo``'s code on its sample_images; one shared bottleneck cache."""
    clone_first(repo)
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    from imageclf.cli_common import quiet_tensorflow

    quiet_tensorflow()
    from imageclf.retrain import RetrainOptions, retrain
    from imageclf.training import TrainConfig

    samples = repo / "sample_images"
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for i, (name, classes, steps, rate) in enumerate(VARIANTS):
        image_dir = samples
        if classes is not None:  # a folder of symlinks to some of the classes
            image_dir = out / f"images_{name}"
            image_dir.mkdir(exist_ok=True)
            for c in classes:
                if not (image_dir / c).exists():
                    (image_dir / c).symlink_to(samples / c)
        started = time.perf_counter()
        result = retrain(RetrainOptions(image_dir=str(image_dir), output_graph=str(out / f"variant{i}.pb"),
                                        bottleneck_dir=str(out / "bottlenecks"),
                                        follow_symlinks=True,  # the variants link to our own sample folders
                                        training=TrainConfig(steps=steps, learning_rate=rate,
                                                             eval_step_interval=max(steps // 2, 1),
                                                             progress=False)),
                         log=lambda line: None)
        made.append({"name": name, "file": result.graph.name, "labels": result.labels, "steps": steps,
                     "learning_rate": rate, "bytes": result.graph.stat().st_size,
                     "seconds": round(time.perf_counter() - started, 1),
                     "bottlenecks": str(result.bottlenecks)})
    (out / "variants.json").write_text(json.dumps(made, indent=2))
    return 0


def make_graphs(work: Path, repo: Path) -> tuple[list[dict], list[bytes]]:
    out = work / "variants"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--make_graphs", str(out), "--repo", str(repo)]
    proc = subprocess.run(cmd, cwd=repo, env=_child_env(repo), capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"retraining the graph variants failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    variants = json.loads((out / "variants.json").read_text())
    return variants, [(out / v["file"]).read_bytes() for v in variants]


def make_image_root(work: Path, repo: Path, rng: random.Random) -> tuple[Path, list[str]]:
    """A copy of sample_images plus bigger generated JPEGs (up to 12 MP); relative paths of every image."""
    from PIL import Image, ImageDraw, ImageFilter

    root = work / "images"
    shutil.copytree(repo / "sample_images", root / "sample_images")
    big = root / "big"
    big.mkdir()
    for i, (w, h) in enumerate(((1024, 768), (2048, 1536), (3000, 2000), (4000, 3000))):
        small = Image.frombytes("RGB", (32, 24), rng.randbytes(32 * 24 * 3))
        img = small.resize((w, h), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(2))
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x0, y0 = rng.randrange(w), rng.randrange(h)
            draw.ellipse((x0, y0, x0 + rng.randrange(w // 8, w // 3), y0 + rng.randrange(h // 8, h // 3)),
                         fill=tuple(rng.randrange(256) for _ in range(3)))
        img.save(big / f"big_{i}_{w}x{h}.jpg", "JPEG", quality=88)
    paths = sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))
    return root, paths


@dataclass
class Payloads:
    """Every body the traffic uses, made once."""

    paths: list[str]                # relative to the image root
    jpegs: list[bytes]              # every image's bytes (small and big)
    small_jpegs: list[bytes]        # for :predict batches
    truncated: bytes
    pdf: bytes
    tiny_png: bytes
    big_png: bytes
    deep_json: bytes
    predict_many: bytes


def make_payloads(root: Path, paths: list[str], instances: int) -> Payloads:
    from PIL import Image

    jpegs = [(root / p).read_bytes() for p in paths]
    small = [d for p, d in zip(paths, jpegs, strict=True) if p.startswith("sample_images/")]
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (200, 10, 10)).save(buf, "PNG")
    tiny = buf.getvalue()
    buf = io.BytesIO()
    Image.new("1", (BIG_PNG_SIDE, BIG_PNG_SIDE)).save(buf, "PNG", optimize=True)
    b64 = base64.b64encode(tiny).decode()
    many = json.dumps({"instances": [{"b64": b64}] * instances}).encode()
    deep = b'{"instances": ' + b"[" * DEEP_JSON_LEVELS + b"]" * DEEP_JSON_LEVELS + b"}"
    return Payloads(paths=paths, jpegs=jpegs, small_jpegs=small, truncated=small[0][: len(small[0]) // 2],
                    pdf=b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
                    tiny_png=tiny, big_png=buf.getvalue(), deep_json=deep, predict_many=many)


def fuzz(data: bytes, rng: random.Random) -> bytes:
    """A random mutation of a good JPEG: flipped bytes, a random chunk, a cut, a duplicate or an insert."""
    b = bytearray(data)
    op = rng.randrange(5)
    if op == 0:
        for _ in range(rng.randint(1, 50)):
            i = rng.randrange(2, len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif op == 1:
        i = rng.randrange(2, len(b) - 1)
        n = min(rng.randint(1, 512), len(b) - i)
        b[i:i + n] = rng.randbytes(n)
    elif op == 2:
        b = b[: rng.randrange(2, len(b))]
    elif op == 3:
        i, j = sorted(rng.sample(range(2, len(b)), 2))
        b[j:j] = b[i:j][:4096]
    else:
        i = rng.randrange(2, len(b))
        b[i:i] = rng.randbytes(rng.randint(1, 256))
    return bytes(b)


def multipart(data: bytes, filename: str) -> tuple[bytes, str]:
    boundary = f"soak{random.getrandbits(64):016x}"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{filename}\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def predict_body(images: list[bytes]) -> bytes:
    return json.dumps({"instances": [{"b64": base64.b64encode(d).decode()} for d in images]}).encode()


# ---------------------------------------------------------------- the service process

def _child_env(repo: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(repo) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env["IMAGECLF_GRPC_PORT"] = "0"  # HTTP only: two soaks (or a soak and a service) must not share port 8500
    return env


def service_log_summary(log: Path) -> dict:
    text = log.read_text(errors="replace") if log.exists() else ""
    lines = text.splitlines()
    errors = [ln for ln in lines if " ERROR " in ln or " CRITICAL " in ln]
    return {"lines": len(lines), "tracebacks": text.count("Traceback (most recent call last)"),
            "error_lines": len(errors), "warning_lines": sum(" WARNING " in ln for ln in lines),
            "first_error_lines": errors[:5], "last_lines": lines[-15:]}


# ---------------------------------------------------------------- HTTP

@dataclass
class Outcome:
    status: int | None          # None: no answer (see error)
    seconds: float
    body: bytes = b""
    headers: dict = field(default_factory=dict)
    error: str | None = None    # "timeout" or "connection: ..."


def send(port: int, method: str, url: str, body: bytes | None = None, content_type: str | None = None,
         timeout: float = REQUEST_TIMEOUT_S) -> Outcome:
    """One request on a fresh connection (so that no stale keep-alive connection is ever blamed)."""
    headers = {"Content-Type": content_type} if content_type else {}
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    t0 = time.perf_counter()
    try:
        conn.request(method, url, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        return Outcome(response.status, time.perf_counter() - t0, data,
                       {k.lower(): v for k, v in response.getheaders()})
    except TimeoutError:
        return Outcome(None, time.perf_counter() - t0, error="timeout")
    except (OSError, http.client.HTTPException) as e:
        return Outcome(None, time.perf_counter() - t0, error=f"connection: {type(e).__name__}: {e}"[:200])
    finally:
        conn.close()


def get(port: int, url: str, timeout: float = 10.0) -> Outcome:
    return send(port, "GET", url, timeout=timeout)


# Kinds of the service's JSON error texts, first match wins (the texts come from service/ and imageclf/).
ERROR_KINDS = (
    ("internal", r"internal error"),
    ("not_an_image", r"not an image"),
    ("empty", r"empty (file|upload)|no instances"),
    ("truncated_or_corrupt", r"truncated or corrupt|cannot decode"),
    ("too_many_pixels", r"pixels is over the limit|over the limit of [\d,]+ pixels|decode budget|budget"),
    ("too_many_instances", r"images in one request; the limit"),
    ("needs_json_content_type", r"Content-Type: application/json"),
    ("bad_json", r"not valid JSON|nested too deeply|expected JSON|invalid base64|expected \{"),
    ("forbidden_path", r"outside the image root|refused|permission denied"),
    ("file_not_found", r"no such file|is not a file"),
    ("name_too_long", r"too long"),
    ("too_large", r"byte limit|too large|Request Entity"),
    ("busy", r"busy|try again|timed out|Retry"),
    ("no_model", r"no model|retired|unavailable"),
    ("bad_request_http", r"Bad Request|Content-Length|Header"),
)


def error_kind(message: str) -> str:
    for kind, pattern in ERROR_KINDS:
        if re.search(pattern, message, re.I):
            return kind
    words = re.sub(r"[^a-z ]+", " ", message.lower()).split()
    return "other:" + "_".join(words[:4])


# ---------------------------------------------------------------- counting answers

@dataclass
class Stats:
    """Every answer, by category: statuses, error kinds, failures, latency of good answers."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    statuses: dict = field(default_factory=lambda: defaultdict(Counter))      # category -> status -> n
    kinds: dict = field(default_factory=lambda: defaultdict(Counter))         # category -> error kind -> n
    failures: dict = field(default_factory=lambda: defaultdict(Counter))      # category -> failure type -> n
    examples: dict = field(default_factory=dict)                              # failure type -> first few
    kind_examples: dict = field(default_factory=dict)                         # error kind -> one message
    latency: dict = field(default_factory=lambda: defaultdict(list))          # good category -> seconds
    shed: Counter = field(default_factory=Counter)                            # category -> 503 + Retry-After
    accepted_bad: Counter = field(default_factory=Counter)                    # bad input answered 200
    groups: dict = field(default_factory=dict)                                # category -> group

    def record(self, category: str, group: str, out: Outcome, check: Callable[[dict], bool] | None = None) -> None:
        status = out.status if out.status is not None else out.error.split(":")[0]
        failure, kind, message = None, None, None
        if out.status is None:
            failure = out.error.split(":")[0]            # "timeout" or "connection"
        else:
            shed = out.status == 503 and "retry-after" in out.headers
            parsed = _json(out.body)
            if out.status >= 400:
                message = parsed.get("error") if isinstance(parsed, dict) else None
                if isinstance(message, str):
                    kind = error_kind(message)
                else:
                    kind, failure = "non_json", "non_json_error"
            if out.status >= 500 and not shed:
                failure = failure or f"http_{out.status}"
            elif group == "good" and out.status != 200 and not shed:
                failure = failure or "wrong_answer"
            elif group == "good" and out.status == 200 and check is not None and not _safe(check, parsed):
                failure = "wrong_answer"
                message = "malformed 200 answer"
        with self.lock:
            self.groups[category] = group
            self.statuses[category][status] += 1
            if out.status == 503 and "retry-after" in out.headers:
                self.shed[category] += 1
            if kind:
                self.kinds[category][kind] += 1
                if isinstance(message, str):
                    self.kind_examples.setdefault(kind, message[:300])
            if failure:
                self.failures[category][failure] += 1
                examples = self.examples.setdefault(failure, [])
                if len(examples) < 5:
                    examples.append({"category": category, "status": out.status, "error": out.error,
                                     "seconds": round(out.seconds, 3), "body": out.body[:300].decode(errors="replace")})
            elif group == "good" and out.status == 200:
                self.latency[category].append(out.seconds)
            if group == "bad" and out.status == 200:
                self.accepted_bad[category] += 1

    def total_failures(self) -> int:
        with self.lock:
            return sum(sum(c.values()) for c in self.failures.values())

    def total_requests(self) -> int:
        with self.lock:
            return sum(sum(c.values()) for c in self.statuses.values())

    def summary(self) -> dict:
        with self.lock:
            categories = {}
            for cat in sorted(self.statuses, key=_category_order):
                st = self.statuses[cat]
                categories[cat] = {
                    "group": self.groups[cat], "requests": sum(st.values()),
                    "statuses": {str(k): v for k, v in sorted(st.items(), key=lambda kv: str(kv[0]))},
                    "error_kinds": dict(self.kinds[cat].most_common()),
                    "shed_503_retry_after": self.shed[cat], "failures": dict(self.failures[cat]),
                    "accepted_bad_input": self.accepted_bad[cat],
                    "latency_ok": latency_summary(self.latency[cat]) if self.latency.get(cat) else None}
            by_type = Counter()
            for c in self.failures.values():
                by_type.update(c)
            return {"categories": categories, "failures_total": sum(by_type.values()),
                    "failures_by_type": dict(by_type), "failure_examples": self.examples,
                    "shed_total": sum(self.shed.values()), "accepted_bad_total": sum(self.accepted_bad.values()),
                    "error_kind_examples": self.kind_examples}


def _json(body: bytes):
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _safe(check: Callable[[dict], bool], parsed) -> bool:
    try:
        return bool(check(parsed))
    except Exception:  # noqa: BLE001 - any surprise in the answer's shape is a wrong answer
        return False


_ORDER = ("good_", "healthz", "bad_", "fuzz", "hostile_", "slow_")


def _category_order(cat: str) -> tuple:
    return next((i for i, p in enumerate(_ORDER) if cat.startswith(p)), len(_ORDER)), cat


def latency_summary(seconds: Sequence[float]) -> dict:
    return latency_ms(seconds, (50, 99), digits=1, mean=False, maximum=True)


def slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x."""
    if len(points) < 2:
        return None
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else None


# ---------------------------------------------------------------- traffic

def _is_classification(parsed) -> bool:
    return isinstance(parsed, dict) and bool(parsed.get("predictions")) and isinstance(parsed.get("model"), dict)


class Soak:
    """The shared state of one run: the service, the counters, the stop signal and the threads."""

    def __init__(self, args: argparse.Namespace, service: ServiceProcess, payloads: Payloads):
        self.args, self.service, self.p = args, service, payloads
        self.port = service.port
        self.killed_by_watchdog: str | None = None
        self.stats = Stats()
        self.stop = threading.Event()           # everything stops
        self.phase_stop = threading.Event()     # hostile and slow clients stop (before the final checks)
        self.reloads_done = 0
        self.reloads_planned = args.reloads
        self.threads: list[threading.Thread] = []
        self.slow_open = 0                      # raw slow sockets open now
        self.slow_lock = threading.Lock()
        self.slow_results: list[dict] = []
        self.healthz: list[dict] = []
        self.hostile_sent: Counter = Counter()
        self.hostile_log: list[dict] = []
        self.rss_timeline: list[dict] = []
        self.watchdog_peak_rss = 0.0
        self.window_min_rss: float | None = None  # lowest sampled RSS since the last checkpoint
        self.request_max_rss: float | None = None  # highest sampled RSS during the current hostile request
        self.events: list[str] = []
        self.t0 = time.monotonic()
        self.deadline = self.t0 + 60 * args.max_minutes + 120

    def elapsed(self) -> float:
        return round(time.monotonic() - self.t0, 1)

    def event(self, message: str) -> None:
        line = f"[{self.elapsed():7.1f} s] {message}"
        self.events.append(line)
        print(line, file=sys.stderr, flush=True)

    def spawn(self, name: str, target: Callable, *args) -> None:
        t = threading.Thread(target=self._guard, args=(name, target, *args), name=name, daemon=True)
        self.threads.append(t)
        t.start()

    def _guard(self, name: str, target: Callable, *args) -> None:
        try:
            target(*args)
        except Exception as e:  # noqa: BLE001 - a bug in one thread must not hang the run
            self.event(f"thread {name} crashed: {type(e).__name__}: {e}")
            self.crashed = f"{name}: {type(e).__name__}: {e}"
            self.stop.set()

    crashed: str | None = None

    def take_window_min(self) -> float | None:
        """The lowest RSS the watchdog saw since the last call: a floor that in-flight decodes do not lift."""
        low, self.window_min_rss = self.window_min_rss, None
        return low

    # -- client threads: good, bad and fuzzed requests ------------------------------------------

    def client(self, index: int, max_requests: int) -> None:
        rng = random.Random(self.args.seed * 1000 + index)
        cats = [c for c, _, _ in CLIENT_MIX]
        weights = [w for _, _, w in CLIENT_MIX]
        groups = {c: g for c, g, _ in CLIENT_MIX}
        for _ in range(max_requests):
            if self.stop.is_set():
                return
            cat = rng.choices(cats, weights)[0]
            self.send_one(cat, groups[cat], rng)
            if self.args.think_ms:
                self.stop.wait(self.args.think_ms / 1000)

    def send_one(self, cat: str, group: str, rng: random.Random) -> None:
        p, port = self.p, self.port
        check: Callable | None = _is_classification
        if cat == "good_path":
            out = send(port, "GET", "/?file=" + quote(rng.choice(p.paths)))
        elif cat == "good_raw":
            out = send(port, "POST", "/classify", rng.choice(p.jpegs), "application/octet-stream")
        elif cat == "good_multipart":
            body, ctype = multipart(rng.choice(p.jpegs), "photo.jpg")
            out = send(port, "POST", "/classify", body, ctype)
        elif cat == "good_predict":
            n = rng.randint(1, 32)
            out = send(port, "POST", f"/v1/models/{MODEL}:predict", predict_body(rng.choices(p.small_jpegs, k=n)),
                       "application/json")

            def check(parsed, n=n):
                return isinstance(parsed, dict) and len(parsed["predictions"]) == n
        elif cat == "bad_truncated":
            out = send(port, "POST", "/classify", p.truncated, "application/octet-stream")
        elif cat == "bad_pdf":
            out = send(port, "POST", "/classify", p.pdf, "application/octet-stream")
        elif cat == "bad_empty":
            out = send(port, "POST", "/classify", b"", "application/octet-stream")
        elif cat == "fuzz":
            out = send(port, "POST", "/classify", fuzz(rng.choice(p.small_jpegs), rng), "application/octet-stream")
        else:
            raise ValueError(cat)
        self.stats.record(cat, group, out, check if group == "good" else None)

    # -- hostile requests, each kind a bounded number of times, spread over the reloads -----------

    def hostile(self) -> None:
        p, port = self.p, self.port
        kinds: dict[str, Callable[[], Outcome]] = {
            "predict_many": lambda: send(port, "POST", f"/v1/models/{MODEL}:predict", p.predict_many,
                                         "application/json", HOSTILE_TIMEOUT_S),
            "predict_many_text_plain": lambda: send(port, "POST", f"/v1/models/{MODEL}:predict", p.predict_many,
                                                    "text/plain", HOSTILE_TIMEOUT_S),
            "deep_json": lambda: send(port, "POST", f"/v1/models/{MODEL}:predict", p.deep_json,
                                      "application/json", HOSTILE_TIMEOUT_S),
            "path_long_name": lambda: get(port, "/?file=" + quote("sample_images/" + "a" * 296 + ".jpg"), 60),
            "path_traversal": lambda: get(port, "/?file=" + quote("../../etc/passwd"), 60),
            "big_png": lambda: send(port, "POST", "/classify", p.big_png, "application/octet-stream",
                                    HOSTILE_TIMEOUT_S),
        }
        order = {k: i for i, k in enumerate(kinds)}  # ties go to the :predict ones, so they run first
        limits = self.args.hostile_max
        for _ in range(100_000):  # bounded in count, and in time by the soak's deadline
            if self.phase_stop.is_set() or time.monotonic() > self.deadline:
                return
            progress = min(1.0, self.reloads_done / max(1, self.reloads_planned))
            due = [k for k in kinds if self.hostile_sent[k] < limits.get(k, 0)
                   and self.hostile_sent[k] < math.floor(limits.get(k, 0) * progress) + 1]
            if not due:
                self.phase_stop.wait(2.0)
                continue
            kind = min(due, key=lambda k: (self.hostile_sent[k] / limits[k], order[k]))
            self.hostile_sent[kind] += 1
            before = self.service.memory() or {}
            self.request_max_rss = before.get("rss_mib")  # the watchdog raises it while the request runs
            out = kinds[kind]()
            after = self.service.memory() or {}
            sampled_max, self.request_max_rss = self.request_max_rss, None
            self.stats.record(f"hostile_{kind}", "hostile", out)
            entry = {"kind": kind, "at_s": self.elapsed(), "reload": self.reloads_done, "status": out.status,
                     "error": out.error, "seconds": round(out.seconds, 3),
                     "body": out.body[:160].decode(errors="replace"),
                     "rss_before_mib": before.get("rss_mib"), "rss_after_mib": after.get("rss_mib"),
                     "rss_max_sampled_mib": max(x for x in (sampled_max, after.get("rss_mib"), 0) if x is not None),
                     "peak_rss_before_mib": before.get("peak_rss_mib"), "peak_rss_after_mib": after.get("peak_rss_mib")}
            # Growth during the request: the highest sample over RSS before, or a new high-water mark.
            sampled = entry["rss_max_sampled_mib"] - (entry["rss_before_mib"] or 0)
            new_peak = (entry["peak_rss_after_mib"] or 0) - (entry["peak_rss_before_mib"] or 0)
            entry["rss_growth_mib"] = round(max(sampled, new_peak), 1)
            self.hostile_log.append(entry)
            if kind.startswith("predict_many") or kind == "big_png":
                self.event(f"hostile {kind}: {out.status or out.error} in {out.seconds:.1f} s, "
                           f"RSS {entry['rss_before_mib']} -> {entry['rss_after_mib']} MiB, up to "
                           f"{entry['rss_growth_mib']:+.0f} MiB during it")
            self.phase_stop.wait(1.0)

    # -- slow clients: raw sockets, in waves ---------------------------------------------------

    def slow_waves(self) -> None:
        n = self.args.slow_clients
        for wave in range(10_000):  # bounded in count, and in time by the soak's deadline
            if self.phase_stop.is_set() or time.monotonic() > self.deadline:
                return
            kinds = ["drip_headers" if i % 3 == 0 else "drip_body" if i % 3 == 1 else "short_body"
                     for i in range(n)]
            threads = [threading.Thread(target=self._slow_guarded, args=(wave, kind), daemon=True) for kind in kinds]
            for t in threads:
                t.start()
            for t in threads:
                t.join(self.args.preset.slow_seconds + 120)
            self.phase_stop.wait(self.args.preset.slow_pause_s)

    def _slow_guarded(self, wave: int, kind: str) -> None:
        try:
            result = self.slow_client(kind)
        except Exception as e:  # noqa: BLE001 - counted, never fatal
            result = {"outcome": f"client error: {type(e).__name__}: {e}"}
        result.update(wave=wave, kind=kind)
        with self.slow_lock:
            self.slow_results.append(result)
        if result.get("status"):
            self.stats.record(f"slow_{kind}", "hostile",
                              Outcome(result["status"], result["seconds"], result.get("body", b"").encode(),
                                      result.get("headers", {})))

    def slow_client(self, kind: str) -> dict:
        """Half a request, then a byte a second (drip), or a body shorter than its Content-Length (short_body)."""
        host = f"Host: {HOST}:{self.port}\r\n"
        if kind == "drip_headers":
            first, drip = f"GET /healthz HTTP/1.1\r\n{host}X-Slow: ".encode(), b"a"
        elif kind == "drip_body":
            first, drip = (f"POST /classify HTTP/1.1\r\n{host}Content-Type: application/octet-stream\r\n"
                           "Content-Length: 100000\r\n\r\n").encode() + self.p.small_jpegs[0][:200], b"\x00"
        else:
            first, drip = (f"POST /classify HTTP/1.1\r\n{host}Content-Type: application/octet-stream\r\n"
                           "Content-Length: 500000\r\n\r\n").encode() + self.p.small_jpegs[0][:1000], None
        # A drip client drips for slow_seconds; a short-body one waits silently for the service to give up.
        limit = self.args.preset.slow_seconds if drip else 75.0
        sock = socket.create_connection((HOST, self.port), timeout=10)
        with self.slow_lock:
            self.slow_open += 1
        t0 = time.monotonic()
        try:
            sock.sendall(first)
            while time.monotonic() - t0 < limit and not self.phase_stop.is_set():
                readable, _, _ = select.select([sock], [], [], 1.0)
                if readable:
                    return self._slow_answer(sock, t0)
                if drip:
                    try:
                        sock.sendall(drip)
                    except OSError as e:
                        return {"outcome": "closed by service", "error": type(e).__name__,
                                "seconds": round(time.monotonic() - t0, 1)}
            return {"outcome": "still open at our limit", "seconds": round(time.monotonic() - t0, 1)}
        finally:
            sock.close()
            with self.slow_lock:
                self.slow_open -= 1

    @staticmethod
    def _slow_answer(sock: socket.socket, t0: float) -> dict:
        seconds = round(time.monotonic() - t0, 1)
        sock.settimeout(5)
        data, error = _whole_answer(sock)
        if error is not None and not data:
            return {"outcome": "closed by service", "error": error, "seconds": seconds}
        if not data:
            return {"outcome": "closed by service", "seconds": seconds}
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode(errors="replace").split("\r\n")
        try:
            status = int(lines[0].split()[1])
        except (IndexError, ValueError):
            return {"outcome": "garbage answer", "seconds": seconds, "body": data[:200].decode(errors="replace")}
        headers = {ln.partition(":")[0].strip().lower(): ln.partition(":")[2].strip() for ln in lines[1:]}
        return {"outcome": f"answered {status}", "status": status, "seconds": seconds, "headers": headers,
                "body": body[:300].decode(errors="replace")}

    # -- /healthz once a second, and the memory watchdog --------------------------------------

    def healthz_monitor(self, max_samples: int) -> None:
        for _ in range(max_samples):
            if self.stop.is_set():
                return
            with self.slow_lock:
                slow = self.slow_open
            out = get(self.port, "/healthz", 30)
            self.stats.record("healthz", "good", out, None)
            self.healthz.append({"at_s": self.elapsed(), "ms": round(1000 * out.seconds, 1), "status": out.status,
                                 "error": out.error, "slow_open": slow})
            self.stop.wait(max(0.0, 1.0 - out.seconds))

    def watchdog(self, max_ticks: int) -> None:
        for tick in range(max_ticks):
            if self.stop.is_set():
                return
            mem = self.service.memory()
            if mem is None:
                if not self.service.alive():
                    self.event(f"the service exited with code {self.service.proc.returncode}")
                    self.stop.set()
                    return
            else:
                self.watchdog_peak_rss = max(self.watchdog_peak_rss, mem["rss_mib"])
                if self.request_max_rss is not None:
                    self.request_max_rss = max(self.request_max_rss, mem["rss_mib"])
                low = self.window_min_rss
                self.window_min_rss = mem["rss_mib"] if low is None else min(low, mem["rss_mib"])
                if tick % 10 == 0:
                    self.rss_timeline.append({"at_s": self.elapsed(), "reload": self.reloads_done, **mem})
                available = memory_available_mib()
                reason = None
                if mem["rss_mib"] > self.args.rss_limit_mib:
                    reason = f"RSS {mem['rss_mib']:.0f} MiB over --rss_limit_mib {self.args.rss_limit_mib:.0f}"
                elif available is not None and available < self.args.min_available_mib:
                    reason = (f"machine MemAvailable {available:.0f} MiB under --min_available_mib "
                              f"{self.args.min_available_mib:.0f} (service RSS {mem['rss_mib']:.0f} MiB)")
                if reason:
                    self.killed_by_watchdog = reason
                    self.service.proc.kill()
                    self.event(f"WATCHDOG killed the service: {reason}")
                    self.stop.set()
                    return
            time.sleep(0.5)


# ---------------------------------------------------------------- reloads

def read_reload_counters(port: int) -> tuple[float, float] | None:
    """(ok, failed) of imageclf_model_reloads_total for our model, or None if /metrics does not answer."""
    out = get(port, "/metrics", 10)
    if out.status != 200:
        return None
    ok = failed = 0.0
    for line in out.body.decode(errors="replace").splitlines():
        if line.startswith("imageclf_model_reloads_total{") and f'model="{MODEL}"' in line:
            value = float(line.rsplit(" ", 1)[1])
            if 'result="ok"' in line:
                ok = value
            elif 'result="failed"' in line:
                failed = value
    return ok, failed


def read_loaded_at(port: int) -> float | None:
    out = get(port, "/models", 10)
    parsed = _json(out.body) if out.status == 200 else None
    for m in (parsed or {}).get("models", []) if isinstance(parsed, dict) else []:
        if isinstance(m, dict) and m.get("name") == MODEL:
            return m.get("loaded_at")
    return None


def atomic_replace(graphs_dir: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=graphs_dir, prefix=".soak-", suffix=".tmp")  # not *.pb: never scanned
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, graphs_dir / f"{MODEL}.pb")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def wait_for_reload(soak: Soak, before: tuple[float, float], loaded_before: float | None,
                    timeout: float) -> tuple[str, float]:
    """'ok', 'failed' or 'missing' (never showed up within ``timeout``), and the seconds it took."""
    t0 = time.monotonic()
    polls = 0
    while time.monotonic() - t0 < timeout and not soak.stop.is_set():
        counters = read_reload_counters(soak.port)
        if counters is not None:
            if counters[1] > before[1]:
                return "failed", time.monotonic() - t0
            if counters[0] > before[0]:
                return "ok", time.monotonic() - t0
        polls += 1
        if polls % 8 == 0:  # also /models, in case the metric is missing
            loaded = read_loaded_at(soak.port)
            if loaded is not None and loaded != loaded_before:
                return "ok", time.monotonic() - t0
        time.sleep(0.25)
    return ("stopped" if soak.stop.is_set() else "missing"), time.monotonic() - t0


def run_reloads(soak: Soak, graphs_dir: Path, variants: list[bytes], deadline: float) -> dict:
    args = soak.args
    reloads: list[dict] = []
    checkpoints: list[dict] = []
    counters = read_reload_counters(soak.port) or (0.0, 0.0)
    for i in range(args.reloads):
        if soak.stop.is_set():
            break
        if time.monotonic() > deadline:
            soak.event(f"--max_minutes {args.max_minutes} reached after {i} reloads; stopping")
            break
        variant = (i + 1) % len(variants)
        loaded_before = read_loaded_at(soak.port)
        t0 = time.monotonic()
        atomic_replace(graphs_dir, variants[variant])
        result, seconds = wait_for_reload(soak, counters, loaded_before, args.reload_timeout_s)
        counters = read_reload_counters(soak.port) or counters
        mem = soak.service.memory() or {}
        reloads.append({"reload": i + 1, "variant": variant, "result": result, "seconds": round(seconds, 2),
                        "rss_mib": mem.get("rss_mib"), "at_s": soak.elapsed()})
        soak.reloads_done = i + 1
        if result == "stopped":
            break
        if (i + 1) % args.rss_every == 0 or i + 1 == args.reloads:
            checkpoints.append({"reload": i + 1, "at_s": soak.elapsed(), **mem, "rss_floor_mib": soak.take_window_min(),
                                "requests": soak.stats.total_requests(), "failures": soak.stats.total_failures()})
            soak.event(f"reload {i + 1}/{args.reloads}: RSS {mem.get('rss_mib')} MiB (peak {mem.get('peak_rss_mib')}),"
                       f" {soak.stats.total_requests():,} requests, {soak.stats.total_failures()} failures")
        if result == "missing":
            soak.event(f"reload {i + 1} never showed up within {args.reload_timeout_s:.0f} s")
        elapsed = time.monotonic() - t0
        soak.stop.wait(max(0.0, 0.5 - elapsed))  # leave each version at least half a second of traffic
    return {"reloads": reloads, "checkpoints": checkpoints}


def summarize_reloads(r: dict, planned: int, warm: dict | None, start: dict | None) -> dict:
    reloads, checkpoints = r["reloads"], r["checkpoints"]
    results = Counter(x["result"] for x in reloads)
    seen = [x["seconds"] for x in reloads if x["result"] in ("ok", "failed")]
    skip = math.ceil(WARMUP_EXCLUDED * planned)
    points = [(c["reload"], c["rss_mib"]) for c in checkpoints if c["reload"] > skip and c.get("rss_mib") is not None]
    every = [(x["reload"], x["rss_mib"]) for x in reloads if x["reload"] > skip and x["rss_mib"] is not None]
    floors = [(c["reload"], c["rss_floor_mib"]) for c in checkpoints
              if c["reload"] > skip and c.get("rss_floor_mib") is not None]
    s, s_all, s_floor = slope(points), slope(every), slope(floors)
    last = next((c for c in reversed(checkpoints) if c.get("rss_mib") is not None), None)
    return {"planned": planned, "done": len(reloads), "ok": results["ok"], "failed": results["failed"],
            "never_showed_up": results["missing"], "stopped": results["stopped"],
            "show_up_seconds": {"p50": round(percentile(seen, 50), 2), "p99": round(percentile(seen, 99), 2),
                                "max": round(max(seen), 2)} if seen else None,
            "rss_start_mib": start, "rss_after_warmup_mib": warm,
            "rss_slope_excludes_first_reloads": skip,
            "rss_slope_mib_per_reload": round(s, 3) if s is not None else None,
            "rss_slope_checkpoints": len(points),
            "rss_slope_every_reload_mib_per_reload": round(s_all, 3) if s_all is not None else None,
            "rss_floor_slope_mib_per_reload": round(s_floor, 3) if s_floor is not None else None,
            "rss_growth_after_warmup_mib": (round(last["rss_mib"] - warm["rss_mib"], 1)
                                            if last and warm else None)}


# ---------------------------------------------------------------- the run

def repo_state(repo: Path) -> dict:
    """Commit and whether the tree has local changes (read-only git commands, no index refresh)."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", "--no-optional-locks", *cmd], cwd=repo, capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    changed = git("status", "--porcelain", "--untracked-files=no", "--", "service", "imageclf")
    return {"path": str(repo), "commit": git("rev-parse", "--short", "HEAD") or None,
            "subject": git("log", "-1", "--format=%s") or None,
            "service_or_imageclf_modified": bool(changed), "modified_files": changed.splitlines()[:30]}


def run(args: argparse.Namespace, work: Path) -> dict:
    rng = random.Random(args.seed)
    t_start = time.monotonic()
    print(f"[setup] retraining {len(VARIANTS)} graph variants with {args.repo} (once; ~1-2 min on 2 cores)...",
          file=sys.stderr, flush=True)
    variants, variant_bytes = make_graphs(work, args.repo)
    setup_graphs_s = round(time.monotonic() - t_start, 1)
    image_root, paths = make_image_root(work, args.repo, rng)
    payloads = make_payloads(image_root, paths, args.hostile_predict_instances)
    graphs_dir = work / "graphs"
    graphs_dir.mkdir()
    atomic_replace(graphs_dir, variant_bytes[0])
    port = args.port or free_port()
    procs = Processes(work, cwd=args.repo, env=_child_env(args.repo), detach=True)
    service = procs.start_service("service", ["--graphs_dir", str(graphs_dir), "--image_root", str(image_root),
                                              *shlex.split(args.service_args)], port)
    out: dict = {"repo": repo_state(args.repo), "port": port, "setup_graphs_seconds": setup_graphs_s,
                 "variants": variants, "image_root": {"images": len(paths), "big": [p for p in paths if "big" in p]},
                 "payload_bytes": {"predict_many": len(payloads.predict_many), "deep_json": len(payloads.deep_json),
                                   "big_png": len(payloads.big_png), "truncated": len(payloads.truncated)},
                 "findings": []}
    soak = None
    try:
        try:
            out["ready_seconds"] = round(service.wait_ready(READY_TIMEOUT_S).ready_seconds, 1)
        except NotReady as e:
            out["findings"].append(f"service never became ready: {e}")
            return out
        out["rss_start"] = service.memory()
        print(f"[setup] service ready in {out['ready_seconds']} s on port {port}, RSS "
              f"{(out['rss_start'] or {}).get('rss_mib')} MiB; setup took {time.monotonic() - t_start:.0f} s",
              file=sys.stderr, flush=True)
        soak = Soak(args, service, payloads)
        deadline = time.monotonic() + 60 * args.max_minutes
        soak.spawn("watchdog", soak.watchdog, int(args.max_minutes * 60 * 2) + 600)
        soak.spawn("healthz", soak.healthz_monitor, int(args.max_minutes * 60) + 300)
        per_client = 200 * args.reloads + 2000
        for i in range(args.clients):
            soak.spawn(f"client-{i}", soak.client, i, per_client)
        soak.event(f"warm-up: {args.preset.warmup_s:.0f} s of client traffic before the first reload")
        soak.stop.wait(args.preset.warmup_s)
        out["rss_after_warmup"] = service.memory()
        soak.event(f"after warm-up: RSS {(out['rss_after_warmup'] or {}).get('rss_mib')} MiB; "
                   f"{args.reloads} reloads with hostile and slow clients")
        soak.spawn("hostile", soak.hostile)
        soak.spawn("slow", soak.slow_waves)
        reloads = run_reloads(soak, graphs_dir, variant_bytes, deadline)
        # The end, in order: hostile and slow clients, then the client threads finish their last request
        # (so that stopping the service is never counted as a connection error), then the final readings.
        soak.phase_stop.set()
        soak.stop.set()
        for t in soak.threads:
            t.join(HOSTILE_TIMEOUT_S + 10)
        out["service_alive_at_end"] = service.alive()
        out["rss_end"] = service.memory()
        out["service_metrics"] = service_metrics(port) if service.alive() else None
    finally:
        if soak is not None:
            soak.phase_stop.set()
            soak.stop.set()
        service.stop()
    out["still_running_threads"] = [t.name for t in soak.threads if t.is_alive()]
    out["service_exit_code"] = service.proc.returncode
    out["killed_by_watchdog"] = soak.killed_by_watchdog
    out["soak_seconds"] = soak.elapsed()
    out["reloads"] = summarize_reloads(reloads, args.reloads, out.get("rss_after_warmup"), out.get("rss_start"))
    out["reload_log"] = reloads["reloads"]
    out["rss_checkpoints"] = reloads["checkpoints"]
    out["rss_timeline"] = soak.rss_timeline
    out["rss_peak_sampled_mib"] = soak.watchdog_peak_rss
    out["requests"] = soak.stats.summary()
    out["healthz"] = healthz_summary(soak.healthz)
    out["slow_clients"] = slow_summary(soak.slow_results)
    out["hostile"] = {"sent": dict(soak.hostile_sent), "limits": args.hostile_max, "log": soak.hostile_log}
    out["service_log"] = service_log_summary(service.log)
    out["events"] = soak.events
    out["benchmark_thread_crash"] = soak.crashed
    out["findings"] += findings(out, args)
    return out


def service_metrics(port: int) -> dict:
    """The service's own counters at the end: errors by kind, requests by status."""
    res = get(port, "/metrics", 10)
    errors, statuses = Counter(), Counter()
    for line in res.body.decode(errors="replace").splitlines() if res.status == 200 else []:
        m = re.match(r'imageclf_errors_total\{kind="([^"]+)"\} ([\d.e+]+)', line)
        if m:
            errors[m.group(1)] += int(float(m.group(2)))
        m = re.match(r'imageclf_requests_total\{endpoint="[^"]*",status="(\d+)"\} ([\d.e+]+)', line)
        if m:
            statuses[m.group(1)] += int(float(m.group(2)))
    return {"errors_total_by_kind": dict(errors.most_common()),
            "requests_total_by_status": dict(sorted(statuses.items()))}


def healthz_summary(samples: list[dict]) -> dict:
    def part(rows: list[dict]) -> dict | None:
        ok = [r["ms"] for r in rows if r["status"] == 200]
        if not rows:
            return None
        return {"n": len(rows), "ok": len(ok), "no_answer": sum(r["status"] is None for r in rows),
                "p50_ms": round(percentile(ok, 50), 1) if ok else None,
                "p99_ms": round(percentile(ok, 99), 1) if ok else None,
                "max_ms": round(max(r["ms"] for r in rows), 1)}
    return {"all": part(samples), "with_slow_clients": part([r for r in samples if r["slow_open"] > 0]),
            "without_slow_clients": part([r for r in samples if r["slow_open"] == 0]),
            "slowest": sorted(samples, key=lambda r: -r["ms"])[:5]}


def slow_summary(results: list[dict]) -> dict:
    by_kind: dict[str, dict] = {}
    for kind in sorted({r["kind"] for r in results}):
        rows = [r for r in results if r["kind"] == kind]
        outcomes = Counter(r["outcome"] for r in rows)
        closed = [r["seconds"] for r in rows
                  if r.get("seconds") is not None and r["outcome"] != "still open at our limit"]
        by_kind[kind] = {"n": len(rows), "outcomes": dict(outcomes.most_common()),
                         "answered_or_closed_after_s": {"p50": round(percentile(closed, 50), 1),
                                                        "max": round(max(closed), 1)} if closed else None}
    return {"waves": len({r["wave"] for r in results}), "by_kind": by_kind}


def findings(out: dict, args: argparse.Namespace) -> list[str]:
    """The run's results in a few sentences: what a reader should look at."""
    f = []
    r, req = out["reloads"], out["requests"]
    if out["killed_by_watchdog"]:
        f.append(f"the watchdog killed the service: {out['killed_by_watchdog']}")
    elif not out.get("service_alive_at_end"):
        f.append(f"the service exited with code {out['service_exit_code']} during the soak")
    if r["done"] < r["planned"]:
        f.append(f"only {r['done']} of {r['planned']} reloads were made")
    if r["never_showed_up"] or r["failed"]:
        f.append(f"{r['never_showed_up']} reloads never showed up, {r['failed']} failed to load")
    s = r["rss_slope_mib_per_reload"]
    floor = r["rss_floor_slope_mib_per_reload"]
    if s is not None and s >= 0.5:
        f.append(f"RSS grows {s:+.2f} MiB per reload after warm-up ({r['rss_slope_checkpoints']} checkpoints; "
                 f"floor between checkpoints {floor:+.2f} MiB per reload)" if floor is not None else
                 f"RSS grows {s:+.2f} MiB per reload after warm-up ({r['rss_slope_checkpoints']} checkpoints)")
    if req["failures_total"]:
        f.append(f"{req['failures_total']} failures: "
                 + ", ".join(f"{k} {v}" for k, v in req["failures_by_type"].items()))
    if req["shed_total"]:
        f.append(f"{req['shed_total']} requests shed with 503 + Retry-After")
    if req["accepted_bad_total"]:
        f.append(f"{req['accepted_bad_total']} bad uploads answered 200")
    for entry in out["hostile"]["log"]:
        if entry["kind"].startswith("predict_many") and entry["rss_growth_mib"] > 500:
            f.append(f"hostile {entry['kind']} ({args.hostile_predict_instances} instances) took RSS up "
                     f"{entry['rss_growth_mib']:+.0f} MiB (answer {entry['status'] or entry['error']} "
                     f"after {entry['seconds']:.1f} s)")
    h = out["healthz"].get("with_slow_clients")
    if h and h["max_ms"] > 1000:
        f.append(f"/healthz stalled up to {h['max_ms']:.0f} ms while slow clients were connected")
    if out["service_log"]["tracebacks"]:
        f.append(f"{out['service_log']['tracebacks']} tracebacks in the service log")
    if out.get("benchmark_thread_crash"):
        f.append(f"a benchmark thread crashed: {out['benchmark_thread_crash']}")
    return f


# ---------------------------------------------------------------- report

def format_report(res: dict) -> str:
    m, a = res["machine"], res["arguments"]
    repo = res["repo"]
    where = f"@ {repo['commit']} ({repo['subject']})" if repo["commit"] else "(not a git checkout)"
    lines = [f"Soak of `python -m service` in {repo['path']} {where}"
             + (" + local changes" if repo["service_or_imageclf_modified"] else ""),
             f"Machine: {machine_line(m)}",
             f"Run: {a['reloads']} reloads, {a['clients']} clients, wall {res['wall_s'] / 60:.1f} min "
             f"(setup {res.get('setup_graphs_seconds')} s of retraining, soak {res.get('soak_seconds')} s)"]
    if "reloads" not in res:
        return "\n".join(lines + ["", "No soak: " + "; ".join(res["findings"])])
    r = res["reloads"]
    su = r["show_up_seconds"] or {}
    lines += ["", f"Reloads: {r['done']} of {r['planned']} made; ok {r['ok']}, failed {r['failed']}, "
                  f"never showed up {r['never_showed_up']}; time to show up p50 {su.get('p50')} s, "
                  f"p99 {su.get('p99')} s, max {su.get('max')} s"]
    mem = [("start", res.get("rss_start")), ("after warm-up", res.get("rss_after_warmup"))]
    mem += [(f"reload {c['reload']}", c) for c in res["rss_checkpoints"]]
    mem.append(("end", res.get("rss_end")))
    lines.append("Service RSS (MiB): " + ", ".join(f"{k} {v['rss_mib']:.0f}" for k, v in mem if v))
    peak = max((v["peak_rss_mib"] for _, v in mem if v), default=None)
    s = r["rss_slope_mib_per_reload"]
    floors = ", ".join(f"{c['reload']} {c['rss_floor_mib']:.0f}" for c in res["rss_checkpoints"]
                       if c.get("rss_floor_mib") is not None)
    lines.append(f"  floor (lowest sample since the previous checkpoint), at reload: {floors}")
    fl = r["rss_floor_slope_mib_per_reload"]
    lines.append(f"  peak (VmHWM) {peak} MiB; change after warm-up {r['rss_growth_after_warmup_mib']} MiB")
    lines.append(f"  slope after reload {r['rss_slope_excludes_first_reloads']} ({r['rss_slope_checkpoints']} "
                 f"checkpoints): {'n/a' if s is None else f'{s:+.3f}'} MiB/reload; of the floors: "
                 f"{'n/a' if fl is None else f'{fl:+.3f}'} MiB/reload; of every reload's RSS: "
                 f"{r['rss_slope_every_reload_mib_per_reload']} MiB/reload")
    lines += ["", f"{'category':<32}{'n':>7}{'200':>7}{'4xx':>6}{'5xx':>5}{'shed':>6}{'fail':>6}{'p50 ms':>9}"
                  f"{'p99 ms':>9}  statuses / error kinds"]
    for cat, c in res["requests"]["categories"].items():
        st = c["statuses"]
        n4 = sum(v for k, v in st.items() if k.isdigit() and 400 <= int(k) < 500)
        n5 = sum(v for k, v in st.items() if k.isdigit() and int(k) >= 500)
        lat = c["latency_ok"] or {}
        kinds = ", ".join(f"{k} {v}" for k, v in c["error_kinds"].items())
        other = ", ".join(f"{k}: {v}" for k, v in st.items() if k not in ("200",))
        detail = "; ".join(x for x in (other, kinds) if x)
        lines.append(f"  {cat:<30}{c['requests']:>7}{st.get('200', 0):>7}{n4:>6}{n5:>5}{c['shed_503_retry_after']:>6}"
                     f"{sum(c['failures'].values()):>6}{lat.get('p50_ms', ''):>9}{lat.get('p99_ms', ''):>9}  {detail}")
    q = res["requests"]
    lines.append(f"Failures: {q['failures_total']}"
                 + (f" ({', '.join(f'{k} {v}' for k, v in q['failures_by_type'].items())})"
                    if q["failures_total"] else "")
                 + f"; shed (503 + Retry-After): {q['shed_total']}; bad input answered 200: {q['accepted_bad_total']}")
    for kind, examples in q["failure_examples"].items():
        e = examples[0]
        lines.append(f"  e.g. {kind}: {e['category']} -> {e['status'] or e['error']} {e['body'][:120]!r}")
    h = res["healthz"]
    lines.append("")
    for label, key in (("/healthz, all", "all"), ("  with slow clients connected", "with_slow_clients"),
                       ("  without", "without_slow_clients")):
        v = h.get(key)
        if v:
            lines.append(f"{label:<32} n {v['n']}, p50 {v['p50_ms']} ms, p99 {v['p99_ms']} ms, max {v['max_ms']} ms, "
                         f"no answer {v['no_answer']}")
    sc = res["slow_clients"]
    lines.append(f"Slow clients: {sc['waves']} waves of {a['slow_clients']}")
    for kind, v in sc["by_kind"].items():
        after = v["answered_or_closed_after_s"]
        lines.append(f"  {kind:<14} {v['n']:>4}: " + ", ".join(f"{k} {n}" for k, n in v["outcomes"].items())
                     + (f" (after p50 {after['p50']} s, max {after['max']} s)" if after else ""))
    lines.append("Hostile requests, first of each kind (answer, seconds, service RSS before -> after, most growth "
                 "during it):")
    seen = set()
    for e in res["hostile"]["log"]:
        if e["kind"] in seen and not e["kind"].startswith("predict_many"):
            continue
        seen.add(e["kind"])
        lines.append(f"  {e['kind']:<24} {e['status'] or e['error']}  {e['seconds']:.2f} s  RSS {e['rss_before_mib']} "
                     f"-> {e['rss_after_mib']} ({e['rss_growth_mib']:+.0f})  {e['body'][:70]!r}")
    lines.append(f"  sent: {', '.join(f'{k} {v}' for k, v in res['hostile']['sent'].items())}")
    log = res["service_log"]
    lines.append(f"Service log: {log['lines']} lines, {log['tracebacks']} tracebacks, {log['error_lines']} ERROR "
                 f"lines; exit code {res['service_exit_code']} (-15 = stopped by us)")
    lines += ["", "Findings:"] + [f"  - {x}" for x in res["findings"] or ["none"]]
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.make_graphs:
        return make_graphs_child(args.make_graphs, args.repo)
    bench = Run("soak_service", args, light=True)  # not "run": that is the soak itself
    # SIGTERM (e.g. from a CI timeout) unwinds like Ctrl-C, so that the service is stopped; SIGINT is set
    # too, since a shell starts background jobs with it ignored.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    work = Path(tempfile.mkdtemp(prefix="soak-service-"))
    try:
        results = run(args, work)
    except KeyboardInterrupt:
        print("\nInterrupted; the service was stopped.", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"Kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    arguments = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                 if k not in ("preset", "make_graphs", "allow_dirty")}
    results = {"machine": bench.end(), "arguments": arguments, "wall_s": bench.wall_s(), **results}
    print(format_report(results))
    bench.write(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
