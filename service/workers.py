"""``--workers N``: N service processes answering on one port, under a parent that supervises them.

One process is capped by its GIL: every request's Python work (HTTP, Flask, JSON, the
batcher) runs one thread at a time. Several processes each have their own GIL, sessions and
batcher, so a machine with many cores can be used by several of them (see docs/serving.md, "Big
machines").

The parent imports no TensorFlow. It binds the HTTP port itself (so "port in use" is one clear
error), starts the workers as ``python -m service`` with the listening socket inherited, and
keeps its own copy to hand to replacements: the kernel hands each new connection to one worker.
For gRPC, the parent holds the port with SO_REUSEPORT, unlistened, and every worker listens on
it with SO_REUSEPORT too, so the kernel spreads gRPC connections over the workers and no other
program can take the port while they start (or while one is being replaced).

Each worker gets ``--memory_budget_mb / N`` (the flag stays a bound on the whole service) and,
unless given, ``--intra_op_threads`` = usable cores / N, so that N workers do not run N x cores
TensorFlow threads. Usable cores are the CPU affinity, capped by the cgroup's CPU quota (a
container's CPU limit): sizing from the host's cores would oversubscribe the quota. Each worker
polls ``--graphs_dir`` and reloads on its own, and answers ``/metrics`` and ``/readyz`` for itself.

A worker that dies (killed, crashed) is replaced, as gunicorn does, with one line on standard
error; the others go on answering meanwhile. Only when workers keep dying (more than
RESTART_LIMIT deaths within RESTART_WINDOW_S seconds), or one refuses its settings (exit 2: a
new one would too), does the parent stop the others and exit non-zero, for the supervisor above
it (systemd, Docker, Kubernetes) to act.

Stopping: SIGTERM or SIGINT to the parent closes its copy of the listening socket and is passed
on to every worker as SIGTERM (each stops gracefully, see server.serve_until); the parent waits
for them and exits 0 when all exited 0. SIGTERM is idempotent: under systemd's default
KillMode=control-group each worker gets SIGTERM from systemd and again from the parent, and still
drains. Stopping at once takes SIGQUIT, or a second SIGINT (Ctrl-C twice), which the parent passes
on as SIGQUIT. Workers run in their own session (Ctrl-C in a terminal reaches only the parent,
which passes it on once) and get SIGTERM from the kernel if the parent dies, so none is left
orphaned.
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
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

POLL_S = 0.1
KILL_MARGIN_S = 15.0  # after a worker's own grace period: model loading or a hung call may delay it
RESTART_LIMIT = 5  # worker deaths within RESTART_WINDOW_S that are replaced; one more stops the service
RESTART_WINDOW_S = 60.0
CGROUP_ROOT = "/sys/fs/cgroup"
SELF_CGROUP = "/proc/self/cgroup"
_PR_SET_PDEATHSIG = 1
_USAGE_ERROR = 2  # what run() exits with for a UserError: bad settings, which a new worker would repeat


@dataclass(frozen=True)
class WorkerPlan:
    """What each of ``count`` workers is started with."""

    count: int
    memory_budget_mb: int
    intra_op_threads: int
    inter_op_threads: int
    cores: int = 0  # the usable cores the threads were sized from


def cgroup_cpu_limit(root: str | Path = CGROUP_ROOT, self_cgroup: str | Path = SELF_CGROUP) -> float | None:
    """The CPU quota this process runs under, in cores (1.5 = 150 ms of CPU per 100 ms); None without one.

    cgroup v2: ``cpu.max`` ("QUOTA PERIOD", or "max PERIOD" for none) of the process's cgroup and of
    each ancestor below ``root`` (a parent's quota bounds its children too); cgroup v1, as fallback:
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1: none) in the cpu controller's hierarchy.
    The smallest quota found wins. ``self_cgroup`` is ``/proc/self/cgroup``'s text, as a file.
    """
    try:
        lines = Path(self_cgroup).read_text().splitlines()
    except OSError:
        return None
    root, quotas = Path(root), []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and not controllers:  # the v2 unified hierarchy
            quotas += _quotas_along(root, path, _cpu_max)
        elif "cpu" in controllers.split(","):
            mount = next((m for m in (root / controllers, root / "cpu", root / "cpu,cpuacct") if m.is_dir()), None)
            if mount is not None:
                quotas += _quotas_along(mount, path, _cfs_quota)
    return min(quotas) if quotas else None


def _quotas_along(mount: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    """The quotas set on ``path``'s cgroup and its ancestors under ``mount``.

    In a container, /proc/self/cgroup may name a host path that the container's mount does not
    show (its own cgroup is the mount's root): then the mount's root is the process's cgroup.
    """
    leaf = mount / path.strip("/")
    if not leaf.is_dir():
        leaf = mount
    folders = [leaf, *(parent for parent in leaf.parents if parent.is_relative_to(mount))]
    return [quota for quota in map(read, folders) if quota is not None]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cpu_max(folder: Path) -> float | None:
    text = _read(folder / "cpu.max")
    if not text:
        return None
    quota, _, period = text.partition(" ")
    if quota == "max":
        return None
    try:
        return int(quota) / int(period or 100_000)
    except (ValueError, ZeroDivisionError):
        return None


def _cfs_quota(folder: Path) -> float | None:
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    try:
        quota_us, period_us = int(quota or "-1"), int(period or "0")
    except ValueError:
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def usable_cores(root: str | Path = CGROUP_ROOT, self_cgroup: str | Path = SELF_CGROUP) -> int:
    """Cores this process may use: its CPU affinity, capped by the cgroup CPU quota (rounded down, at least 1).

    Rounded down: threads for a fraction of a core would be throttled by the quota, not run.
    """
    cores = len(os.sched_getaffinity(0))
    quota = cgroup_cpu_limit(root, self_cgroup)
    return max(1, min(cores, int(quota))) if quota is not None else cores


def plan_workers(count: int, memory_budget_mb: int, intra_op_threads: int, inter_op_threads: int,
                 cores: int | None = None) -> WorkerPlan:
    """Split the memory budget and, unless given, the usable cores between ``count`` workers."""
    cores = cores or usable_cores()
    intra = intra_op_threads or max(1, cores // count)
    inter = inter_op_threads or max(1, min(2, intra))
    return WorkerPlan(count, max(1, memory_budget_mb // count), intra, inter, cores)


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


def _ended(returncode: int) -> str:
    """How a worker ended, in words."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Supervisor:
    """The workers' parent: starts them, replaces those that die, passes stop signals on.

    Signal handlers only record the signal (``on_signal``); the loop in ``wait`` acts on it, so a
    stop never lands half-way through starting a replacement (which would then miss it).
    """

    def __init__(self, commands: list[list[str]], listener: socket.socket,
                 restart_limit: int = RESTART_LIMIT, restart_window_s: float = RESTART_WINDOW_S):
        self.commands = commands
        self.listener = listener  # kept open for replacements; closed when the service stops
        self.restart_limit, self.restart_window_s = restart_limit, restart_window_s
        self.procs: list[subprocess.Popen] = []
        self.requested = False  # a stop signal came
        self._received: list[int] = []  # signals not yet acted on
        self._deaths: deque[float] = deque()  # when workers died, within the restart window

    def start(self) -> None:
        self.procs = [self._spawn(cmd) for cmd in self.commands]

    def _spawn(self, cmd: list[str]) -> subprocess.Popen:
        # A new session: a terminal's Ctrl-C goes to the parent only, which passes it on once.
        return subprocess.Popen(cmd, pass_fds=(self.listener.fileno(),), start_new_session=True,
                                preexec_fn=_die_with_parent)

    def signal_all(self, signum: int = signal.SIGTERM) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    def on_signal(self, signum, frame) -> None:
        self._received.append(signum)

    def wait(self, grace_s: float) -> int:
        """Serve until a stop signal, or until workers keep dying; then until every worker has exited.

        0 if the stop was asked for and every worker exited 0 (or of that SIGTERM); otherwise 1, or 2
        when a worker refused its settings.
        """
        code = None
        while code is None:
            self._act_on_signals()
            code = 0 if self.requested else self._replace_dead()
            if code is None:
                time.sleep(POLL_S)
        self._reap(grace_s + KILL_MARGIN_S)
        # A worker stopped before it set up its handlers (still loading) dies of the SIGTERM itself: as asked.
        clean = (0, -signal.SIGTERM)
        return code or (0 if all(p.returncode in clean for p in self.procs) else 1)

    def _act_on_signals(self) -> None:
        """The first SIGTERM/SIGINT stops the workers gracefully; SIGQUIT or a second SIGINT at once.

        A repeated SIGTERM changes nothing (a supervisor may send it to the whole group more than once).
        """
        while self._received:
            signum = self._received.pop(0)
            name = signal.Signals(signum).name
            at_once = signum == signal.SIGQUIT or (self.requested and signum == signal.SIGINT)
            if self.requested and not at_once:
                print(f"{name} again: already stopping (SIGQUIT or a second Ctrl-C stops at once)", flush=True)
                continue
            again = " again" if self.requested else ""
            print(f"{name}{again}: stopping {len(self.procs)} workers{' at once' if at_once else ''}", flush=True)
            self._stop(signal.SIGQUIT if at_once else signal.SIGTERM)

    def _stop(self, signum: int) -> None:
        self.requested = True
        self.listener.close()  # once the workers close theirs too, new connections are refused
        self.signal_all(signum)

    def _replace_dead(self) -> int | None:
        """Start a new worker in place of each that exited; an exit code when the service must stop instead."""
        for index, proc in enumerate(self.procs):
            if proc.poll() is None:
                continue
            now = time.monotonic()
            self._deaths.append(now)
            while self._deaths and self._deaths[0] < now - self.restart_window_s:
                self._deaths.popleft()
            ended = f"worker {index} (pid {proc.pid}) {_ended(proc.returncode)}"
            if proc.returncode == _USAGE_ERROR:
                _log(f"{ended}: it refused its settings and a new one would too; stopping the others")
                self._stop(signal.SIGTERM)
                return _USAGE_ERROR
            if len(self._deaths) > self.restart_limit:
                _log(f"workers keep dying: {len(self._deaths)} exits within {self.restart_window_s:g} s, the last: "
                     f"{ended}; stopping the others")
                self._stop(signal.SIGTERM)
                return 1
            self.procs[index] = self._spawn(self.commands[index])
            _log(f"{ended}; started worker {index} again as pid {self.procs[index].pid}")
        return None

    def _reap(self, timeout_s: float) -> None:
        """Wait for every worker (acting on signals meanwhile: a second Ctrl-C); kill those still there at the end."""
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
            self._act_on_signals()
            time.sleep(POLL_S)
        for proc in self.procs:
            if proc.poll() is None:
                _log(f"worker pid {proc.pid} did not stop in time; killing it")
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
    supervisor = Supervisor(commands, http)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, supervisor.on_signal)
    try:
        supervisor.start()
        also = f" and gRPC on {host}:{bound_grpc}" if bound_grpc else ""
        print(f"{plan.count} workers (pids {', '.join(str(p.pid) for p in supervisor.procs)}) on "
              f"http://{host}:{bound_port}/{also}; each: --intra_op_threads {plan.intra_op_threads} "
              f"--inter_op_threads {plan.inter_op_threads} --memory_budget_mb {plan.memory_budget_mb} "
              f"({plan.cores} usable cores)", flush=True)
        code = supervisor.wait(grace_s)
    finally:
        http.close()
        if grpc_hold:
            grpc_hold.close()
    print("Stopped." if code == 0 else f"Stopped (exit {code}).", flush=True)
    return code
