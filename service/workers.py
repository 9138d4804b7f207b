"""``--workers N``: N service processes answering on one port, under a parent that supervises them.

One process is capped by its GIL: every request's Python work (HTTP, Flask, JSON, the
batcher) runs one thread at a time. Several processes each have their own GIL, sessions and
batcher, so a machine with many cores can be used by several of them (see README, "Big
machines").

The parent imports no TensorFlow. It binds the HTTP port itself (so "port in use" is one clear
error), starts the workers as ``python -m service`` with the listening socket inherited, and
closes its own copy: the kernel hands each new connection to one worker. For gRPC, the parent
holds the port with SO_REUSEPORT, unlistened, and every worker listens on it with SO_REUSEPORT
too, so the kernel spreads gRPC connections over the workers and no other program can take the
port while they start.

Each worker gets ``--memory_budget_mb / N`` (the flag stays a bound on the whole service) and,
unless given, ``--intra_op_threads`` = cores / N, so that N workers do not run N x cores
TensorFlow threads. Each worker polls ``--graphs_dir`` and reloads on its own, and answers
``/metrics`` and ``/readyz`` for itself.

Stopping: SIGTERM or SIGINT to the parent is passed on to every worker as SIGTERM (each stops
gracefully, see server.serve_until); the parent waits for them and exits 0 when all exited 0.
Workers run in their own session (Ctrl-C in a terminal reaches only the parent, which passes it
on once) and get SIGTERM from the kernel if the parent dies, so none is left orphaned. If a
worker exits on its own, the parent stops the others and exits 1: the supervisor above it
(systemd, Docker, Kubernetes) restarts the whole service.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

POLL_S = 0.2
KILL_MARGIN_S = 15.0  # after a worker's own grace period: model loading or a hung call may delay it
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerPlan:
    """What each of ``count`` workers is started with."""

    count: int
    memory_budget_mb: int
    intra_op_threads: int
    inter_op_threads: int


def plan_workers(count: int, memory_budget_mb: int, intra_op_threads: int, inter_op_threads: int,
                 cores: int | None = None) -> WorkerPlan:
    """Split the memory budget and, unless given, the cores between ``count`` workers."""
    cores = cores or len(os.sched_getaffinity(0))
    intra = intra_op_threads or max(1, cores // count)
    inter = inter_op_threads or max(1, min(2, intra))
    return WorkerPlan(count, max(1, memory_budget_mb // count), intra, inter)


def bind_http(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """The listening socket every worker accepts on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=backlog)
    sock.set_inheritable(True)
    return sock


def hold_grpc_port(host: str, port: int) -> socket.socket:
    """Bind ``port`` with SO_REUSEPORT without listening: the workers can join, other programs cannot."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def worker_command(argv: Sequence[str], index: int, plan: WorkerPlan, fd: int, port: int,
                   grpc_port: int) -> list[str]:
    """The user's own flags, then the worker's (argparse: the last value of a flag wins)."""
    return [sys.executable, "-m", "service", *argv, "--workers", "1", "--port", str(port),
            "--grpc_port", str(grpc_port), "--memory_budget_mb", str(plan.memory_budget_mb),
            "--intra_op_threads", str(plan.intra_op_threads), "--inter_op_threads", str(plan.inter_op_threads),
            "--listen_fd", str(fd), "--worker_index", str(index)]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies, so a killed parent leaves no orphan."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    """The workers' parent: starts them, passes stop signals on, reports how they ended."""

    def __init__(self, commands: list[list[str]], fd: int):
        self.requested = False  # a stop signal came
        self.procs: list[subprocess.Popen] = []
        for cmd in commands:
            # A new session: a terminal's Ctrl-C goes to the parent only, which passes it on once.
            self.procs.append(subprocess.Popen(cmd, pass_fds=(fd,), start_new_session=True,
                                               preexec_fn=_die_with_parent))

    def signal_all(self, signum: int = signal.SIGTERM) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    def on_signal(self, signum, frame) -> None:
        """The first signal stops the workers gracefully; a second one (their second SIGTERM) at once."""
        again = " again" if self.requested else ""
        print(f"{signal.Signals(signum).name}{again}: stopping {len(self.procs)} workers", flush=True)
        self.requested = True
        self.signal_all()

    def wait(self, grace_s: float) -> int:
        """Until a stop signal or a worker's exit, then until every worker has exited.

        0 if the stop was asked for and every worker exited 0 (or of that SIGTERM); 1 otherwise.
        """
        failed = None
        while not self.requested and failed is None:
            failed = next((p for p in self.procs if p.poll() is not None), None)
            if failed is None:
                time.sleep(POLL_S)
        if failed is not None:
            print(f"worker pid {failed.pid} exited with code {failed.returncode}; stopping the others",
                  file=sys.stderr, flush=True)
            self.signal_all()
        self._reap(grace_s + KILL_MARGIN_S)
        # A worker stopped before it set up its handlers (still loading) dies of the SIGTERM itself: as asked.
        clean = (0, -signal.SIGTERM)
        return 0 if failed is None and all(p.returncode in clean for p in self.procs) else 1

    def _reap(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"worker pid {proc.pid} did not stop in time; killing it", file=sys.stderr, flush=True)
                proc.kill()
                proc.wait()


def run_workers(argv: Sequence[str], *, host: str, port: int, grpc_port: int, plan: WorkerPlan,
                grace_s: float) -> int:
    """Serve with ``plan.count`` worker processes until SIGTERM/SIGINT; the exit code (see Supervisor.wait)."""
    from imageclf.errors import UserError

    try:
        http = bind_http(host, port)
    except OSError as e:
        raise UserError(f"--port {port}: {e.strerror or e}") from None
    try:
        grpc_hold = hold_grpc_port(host, grpc_port) if grpc_port else None
    except OSError as e:
        http.close()
        raise UserError(f"--grpc_port {grpc_port}: {e.strerror or e}; pick another port, or 0 to turn gRPC off"
                        ) from None
    bound_port = http.getsockname()[1]
    bound_grpc = grpc_hold.getsockname()[1] if grpc_hold else 0
    commands = [worker_command(argv, i, plan, http.fileno(), bound_port, bound_grpc) for i in range(plan.count)]
    supervisor = Supervisor(commands, http.fileno())
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, supervisor.on_signal)
    http.close()  # the workers hold it now; once they close theirs, new connections are refused
    also = f" and gRPC on {host}:{bound_grpc}" if bound_grpc else ""
    print(f"{plan.count} workers (pids {', '.join(str(p.pid) for p in supervisor.procs)}) on "
          f"http://{host}:{bound_port}/{also}; each: --intra_op_threads {plan.intra_op_threads} "
          f"--inter_op_threads {plan.inter_op_threads} --memory_budget_mb {plan.memory_budget_mb}", flush=True)
    try:
        code = supervisor.wait(grace_s)
    finally:
        if grpc_hold:
            grpc_hold.close()
    print("Stopped." if code == 0 else f"Stopped (exit {code}).", flush=True)
    return code
