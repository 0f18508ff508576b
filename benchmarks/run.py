"""Benchmark trioserve against its peers, side by side, in one run.

    python benchmarks/run.py [--quick] [--only NAMES] [--repeat N] [--duration S]

Builds the C load generator and the C reference echo server with ``cc -O2``,
then, for every configuration and every server, starts the server pinned to
CPU 0, drives it with the load generator pinned to CPU 1, and stops it (a
server of N worker processes gets CPUs 0..N-1 and the load generator CPU N
where the machine has them; see ``placement``). The
trials are interleaved (each repeat runs every configuration against every
server before the next repeat starts) so that noise from other work on the
machine spreads over all servers alike; every figure is the median of the
repeats, with their min and max. Results go to the terminal, to
``results/latest.json``, ``results/latest.md`` and, when matplotlib is
installed, to the chart ``results/latest.png`` of trioserve's ratio to each
peer. For the whole run, idle CPUs are kept polling rather than halted
(``/dev/cpu_dma_latency`` held at 0; ``--allow-cpu-idle`` turns that off).
``benchmarks/README.md`` explains the configurations and the targets.

Python servers run under the interpreter running this script
(``sys.executable``), with the working tree's ``trioserve`` first on
``PYTHONPATH``, so the benchmark measures the code being worked on.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import fcntl
import fnmatch
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TextIO

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
PEERS_DIR = BENCH_DIR / "peers"
BUILD_DIR = BENCH_DIR / "_build"
# Servers' output, one directory per run so that two runs at once (another
# developer's, say) never read each other's ready lines; removed after a run
# in which every trial succeeded.
LOG_DIR = BUILD_DIR / "logs" / f"run-{os.getpid()}"
RESULTS_DIR = BENCH_DIR / "results"

# Every benchmark socket is on loopback; nothing leaves the machine.
HOST = "127.0.0.1"

# The server gets one core and the load generator the other, so neither
# steals the other's CPU and the server's figure is what one core can do.
# A server of N worker processes gets cores 0..N-1 and the load generator
# core N, where the machine has that many (see placement()).
SERVER_CPU = 0
LOADGEN_CPU = 1

# How long a server may take to print its ready line: Python start-up plus
# imports, with room for a machine busy with other work.
READY_TIMEOUT_S = 30.0

# After SIGTERM, how long a server may take to exit before SIGKILL. trioserve
# shuts down gracefully; the peers die at once.
STOP_TIMEOUT_S = 5.0

# The load generator's run is bounded by its own clock; this is a safety
# margin on top for connecting and reporting before we give up on it.
LOADGEN_SLACK_S = 45.0

# Memory: let the server finish accepting and settle before reading VmRSS
# (the load generator says "ready" once every connection made a round trip).
IDLE_SETTLE_S = 0.5

# The idle load generator holds its connections at most this long, so it
# stops by itself even if this script dies.
IDLE_HOLD_MAX_S = 120.0

# Trials whose other work on the machine (CPU time used by neither the
# server nor the load generator) averaged more than this many cores are
# flagged as noisy in the output.
NOISY_OTHER_CPU = 0.25

# With --retry-noisy, the pause before running a noisy trial again: other
# developers' test runs come in bursts of a few seconds.
NOISY_RETRY_PAUSE_S = 2.0

READY_LINE = re.compile(rb"serving (TCP|UDP) on (\S+):(\d+)")

PY = sys.executable


# ---- what is measured ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Server:
    """A server under test: its command line for TCP and for UDP.

    ``{address}`` in a command stands for ``HOST:PORT`` with port 0; every
    server prints ``serving TCP on HOST:PORT`` once listening.
    """

    name: str
    description: str
    #: "subject" (trioserve, whose ratios are reported), "peer",
    #: "reference" (the C echo server: the load generator's ceiling), or
    #: "scaling" (a subject run in worker processes: compared with the
    #: subject named by ``scales``, not with the peers).
    role: str
    tcp: tuple[str, ...] | None
    udp: tuple[str, ...] | None
    #: A module the server needs; the server is skipped if it is missing.
    requires: str | None = None
    #: The source tree whose ``trioserve`` the server runs (``--baseline``);
    #: None for this working tree.
    tree: Path | None = None
    #: Worker processes the server runs in (``--workers``): it is given that
    #: many cores where the machine has them.
    workers: int = 1
    #: For role "scaling": the one-process server its figures are divided by.
    scales: str | None = None


_TCP = ("--tcp", "{address}")
_UDP = ("--udp", "{address}")


def _peer(script: str, kind: str) -> tuple[str, ...]:
    return (PY, str(PEERS_DIR / script), f"--{kind}", "{address}")


SERVERS = [
    Server(
        "trioserve",
        "python -m trioserve echo (EchoStreamHandler / EchoDatagramHandler)",
        "subject",
        (PY, "-m", "trioserve", "echo", "--tcp", "{address}"),
        (PY, "-m", "trioserve", "echo", "--udp", "{address}"),
    ),
    Server(
        "trioserve-2w",
        "python -m trioserve echo --workers 2: a supervisor and 2 worker "
        "processes, each with its own SO_REUSEPORT socket on the port",
        "scaling",
        (PY, "-m", "trioserve", "echo", "--workers", "2", "--tcp", "{address}"),
        (PY, "-m", "trioserve", "echo", "--workers", "2", "--udp", "{address}"),
        workers=2,
        scales="trioserve",
    ),
    Server(
        "trioserve-lines",
        "python -m trioserve serve: `async for line in self.rfile` handlers",
        "subject",
        (PY, "-m", "trioserve", "serve", "trioserve_lines:LineEcho", *_TCP),
        (PY, "-m", "trioserve", "serve", "trioserve_lines:DatagramLineEcho", *_UDP),
    ),
    Server(
        "stdlib",
        "socketserver ThreadingTCPServer / UDPServer",
        "peer",
        _peer("stdlib_peer.py", "tcp"),
        _peer("stdlib_peer.py", "udp"),
    ),
    Server(
        "trio",
        "hand-written trio.serve_tcp line echo / recvfrom-sendto loop",
        "peer",
        _peer("trio_peer.py", "tcp"),
        _peer("trio_peer.py", "udp"),
    ),
    Server(
        "asyncio",
        "asyncio streams (start_server, readline, drain) / DatagramProtocol",
        "peer",
        _peer("asyncio_peer.py", "tcp"),
        _peer("asyncio_peer.py", "udp"),
    ),
    Server(
        "anyio",
        "anyio TCP listener + BufferedByteReceiveStream / UDP socket (asyncio)",
        "peer",
        _peer("anyio_peer.py", "tcp"),
        _peer("anyio_peer.py", "udp"),
        requires="anyio",
    ),
    Server(
        "c-echo",
        "single-threaded epoll echo in C: the load generator's ceiling",
        "reference",
        (str(BUILD_DIR / "echo_server"), "--tcp", "{address}"),
        (str(BUILD_DIR / "echo_server"), "--udp", "{address}"),
    ),
]


@dataclasses.dataclass(frozen=True)
class Config:
    """One load: a load-generator mode with its connection count and size."""

    name: str
    title: str
    kind: str  # "tcp" or "udp": which listener the server opens
    mode: str  # the load generator's --mode
    conns: int
    size: int = 64
    #: "rps" (round trips per second, more is better) or "memory" (bytes
    #: of server RSS per idle connection, less is better).
    metric: str = "rps"
    #: Hold ``Settings.idle_held`` idle connections open while the load
    #: runs, and compare with the configuration named here, the same load
    #: without them (run too whenever this one is).
    without_idle: str | None = None


CONFIGS = [
    Config("tcp-1", "TCP, 1 connection, 64 B lines", "tcp", "pingpong", 1),
    Config("tcp-100", "TCP, 100 connections, 64 B lines", "tcp", "pingpong", 100),
    Config("tcp-1000", "TCP, 1,000 connections, 64 B lines", "tcp", "pingpong", 1000),
    Config(
        "tcp-16k", "TCP, 10 connections, 16 KiB lines", "tcp", "pingpong", 10, 16384
    ),
    # 50 clients at once keep a Python server busy between one connection's
    # close and the next one's arrival.
    Config("connect", "connect per request, 50 at once", "tcp", "connect", 50),
    Config("udp-1", "UDP, 1 client, 64 B", "udp", "udp", 1),
    Config("udp-50", "UDP, 50 clients, 64 B", "udp", "udp", 50),
    Config(
        "idle-5000",
        "memory per idle connection, 5,000 open",
        "tcp",
        "idle",
        5000,
        metric="memory",
    ),
    # The issue's "10,000 idle connections held while 100 active ones keep
    # their latency": tcp-100 with the idle connections open alongside.
    Config(
        "idle-10k+100",
        "TCP, 100 connections, 64 B lines, while 10,000 idle ones are held open",
        "tcp",
        "pingpong",
        100,
        without_idle="tcp-100",
    ),
]

# How much the p99 latency of the 100 active connections may grow when the
# idle ones are held (idle-10k+100 over tcp-100) and still count as kept:
# the issue sets no figure, and run-to-run noise in p99 on this machine is
# about this size.
IDLE_P99_GROWTH_OK = 1.25

# The goals from the benchmark issue. Each is a ratio of trioserve to a peer
# in one configuration (for memory: the peer's bytes over trioserve's, so
# more is better throughout), or for "max-bytes" an absolute bound.
TARGETS = [
    *((f"{c.name}: >= 1.0x hand-written Trio", c.name, "trio", 1.0) for c in CONFIGS),
    ("tcp-1000: >= 1.0x ThreadingTCPServer", "tcp-1000", "stdlib", 1.0),
    ("udp-50: >= 1.0x stdlib UDPServer", "udp-50", "stdlib", 1.0),
    ("tcp-100 (stretch): >= 1.0x asyncio streams", "tcp-100", "asyncio", 1.0),
    ("idle-5000: <= 6 KiB per idle connection", "idle-5000", "max-bytes", 6 * 1024),
    (
        f"idle-10k+100: p99 <= {IDLE_P99_GROWTH_OK}x tcp-100's (latency kept)",
        "idle-10k+100",
        "max-p99-growth",
        IDLE_P99_GROWTH_OK,
    ),
]


@dataclasses.dataclass
class Settings:
    repeat: int
    warmup: float
    duration: float
    idle_conns: int
    pin: bool
    retry_noisy: int = 0
    #: Idle connections held open during idle-10k+100.
    idle_held: int = 10000
    #: The cores this process may run on (and so pin to).
    cpus: tuple[int, ...] = dataclasses.field(default_factory=lambda: usable_cpus())


@dataclasses.dataclass(frozen=True)
class Placement:
    """The cores a server and its load generator are pinned to."""

    server_cpus: tuple[int, ...] | None  # None: not pinned
    loadgen_cpu: int | None
    #: Fewer cores than the server's worker processes plus the load
    #: generator: its figure is then no measure of how it scales.
    shared: bool
    note: str


def placement(workers: int, cpus: tuple[int, ...]) -> Placement:
    """Where a server of ``workers`` processes and its load generator run.

    The server gets cores 0..N-1 and the load generator core N, where this
    process may use them; the kernel spreads the workers over the server's
    cores. On a smaller machine a multi-process server shares core 0 with
    itself (the load generator keeps core 1), so it gets the CPU a
    one-process server gets: its figure then shows what the extra processes
    cost, not how they scale. Without cores 0 and 1 nothing is pinned.
    """
    available = set(cpus)
    if set(range(workers + 1)) <= available:
        server = tuple(range(workers))
        if workers == 1:
            note = f"server on core {server[0]}, load generator on core {workers}"
        else:
            note = (
                f"{workers} workers on cores 0-{workers - 1} (the kernel places "
                f"each), load generator on core {workers}"
            )
        return Placement(server, workers, False, note)
    if {SERVER_CPU, LOADGEN_CPU} <= available:
        return Placement(
            (SERVER_CPU,),
            LOADGEN_CPU,
            True,
            f"all {workers} workers share core {SERVER_CPU} (this machine has "
            f"{len(available)} usable cores, {workers + 1} needed), load generator "
            f"on core {LOADGEN_CPU}: NOT a scaling measurement",
        )
    return Placement(
        None,
        None,
        workers > 1,
        "not pinned (cores 0 and 1 are not both usable)"
        + (": NOT a scaling measurement" if workers > 1 else ""),
    )


class BenchError(Exception):
    """A trial that could not be measured; the run goes on without it."""


# ---- a network of our own ---------------------------------------------------

# From <sched.h> and <linux/sockios.h>, <net/if.h>.
CLONE_NEWNET = 0x40000000
SIOCSIFFLAGS = 0x8914
IFF_UP, IFF_LOOPBACK, IFF_RUNNING = 0x1, 0x8, 0x40


def enter_private_network() -> bool:
    """Move this process (and so every server and load generator it starts)
    into a network namespace of its own, with loopback up and TIME_WAIT off.

    Connect-per-request at tens of thousands of connections a second leaves
    every client port in TIME_WAIT for a minute. On the shared loopback that
    would make other programs' ``bind(port 0)`` fail with EADDRINUSE, and the
    kernel's search for a reusable port took most of the load generator's
    CPU. In a namespace of our own, ``tcp_max_tw_buckets = 0`` drops
    TIME_WAIT sockets at once, and nothing else on the machine notices our
    sockets at all. Needs CAP_SYS_ADMIN (root);
    returns False, leaving everything as it was, where that is refused.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        flags = IFF_UP | IFF_LOOPBACK | IFF_RUNNING
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags))
    with contextlib.suppress(OSError):
        Path("/proc/sys/net/ipv4/tcp_max_tw_buckets").write_text("0\n")
    return True


def keep_cpus_awake() -> BinaryIO | None:
    """Ask the kernel to keep idle CPUs polling rather than halted, for the run.

    Writing 0 to ``/dev/cpu_dma_latency`` is what latency-benchmark setups
    do (tuned's ``latency-performance`` profile, cyclictest): the request
    holds while the file stays open. On a virtual machine a halted vCPU
    takes tens of microseconds to wake, and that is most of a round trip
    at one connection: with idle CPUs allowed to halt, the C echo server,
    which does the least work per message, came out the *slowest* server at
    ``tcp-1`` (see README). Polling idle makes every figure measure the
    servers rather than the hypervisor's halt and wake-up.

    Returns the open file (close it to end the request), or None where the
    kernel has no such file or refuses it (it needs root).
    """
    try:
        holder = open("/dev/cpu_dma_latency", "wb", buffering=0)  # noqa: SIM115
    except OSError:
        return None
    try:
        holder.write(struct.pack("i", 0))
    except OSError:
        holder.close()
        return None
    return holder


# ---- one run at a time -------------------------------------------------------

# Two runs at once would share the two CPUs and spoil each other's figures,
# so runs on one machine (from any checkout) take turns on this lock.
LOCK_PATH = Path("/tmp/trioserve-benchmark.lock")


def wait_for_our_turn() -> TextIO:
    """Take the machine-wide benchmark lock, waiting while another run has it.

    Returns the open lock file; the lock is held until it is closed.
    """
    lock = LOCK_PATH.open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        print(
            f"waiting for another benchmark run to finish ({LOCK_PATH} was "
            f"last taken by {holder})...",
            flush=True,
        )
        fcntl.flock(lock, fcntl.LOCK_EX)
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} ({' '.join(sys.argv)})\n")
    lock.flush()
    return lock


# ---- building ----------------------------------------------------------------


def build() -> None:
    """Compile the load generator and the C echo server when out of date."""
    BUILD_DIR.mkdir(exist_ok=True)
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        sys.exit(f"run.py: no C compiler {compiler!r} (set CC or install cc)")
    for name in ("loadgen", "echo_server"):
        source, binary = BENCH_DIR / f"{name}.c", BUILD_DIR / name
        if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
            continue
        # Built under a name of its own and renamed into place, so that a
        # run starting meanwhile (the test suite's smoke test, say) never
        # executes a half-written binary.
        partial = binary.with_name(f".{name}.{os.getpid()}")
        command = [compiler, "-O2", "-Wall", "-o", str(partial), str(source)]
        print("building:", " ".join(command), flush=True)
        subprocess.run(command, check=True)
        os.replace(partial, binary)


# ---- processes ---------------------------------------------------------------


def _pinned(cpus: int | tuple[int, ...] | None) -> Callable[[], None] | None:
    if cpus is None:
        return None
    chosen = {cpus} if isinstance(cpus, int) else set(cpus)
    return lambda: os.sched_setaffinity(0, chosen)


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first);
    None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def process_tree(pid: int) -> list[int]:
    """pid and every live process descended from it: a server's workers
    (and whatever helpers it started) besides the process we started."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields and fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


def cpu_seconds(pid: int) -> float:
    """User plus system CPU of a process and its descendants, in seconds."""
    total = 0
    for member in process_tree(pid):
        fields = _stat(member)
        if fields:  # not gone meanwhile
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident set size (VmRSS) of a process and its descendants.

    Pages they share are counted in each; a figure per connection is the
    growth of this sum, which shared start-up pages do not affect.
    """
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    if not total:
        raise BenchError(f"no VmRSS for process {pid}")
    return total


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot, from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(f) for f in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class ServerProcess:
    """A server under test, started pinned and stopped on exit.

    Its stdout and stderr go to files under ``_build/logs`` (a pipe nobody
    reads could fill and stall it); the ready line is read from the file.
    """

    def __init__(self, server: Server, kind: str, settings: Settings, tag: str):
        command = server.tcp if kind == "tcp" else server.udp
        assert command is not None
        self.argv = [arg.replace("{address}", f"{HOST}:0") for arg in command]
        self.name = server.name
        self.tree = server.tree or REPO_DIR
        self.settings = settings
        self.placement = placement(server.workers, settings.cpus)
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.out_path = LOG_DIR / f"{tag}.out"
        self.err_path = LOG_DIR / f"{tag}.err"
        self.port = 0
        self.stop_seconds = 0.0
        self.killed = False
        #: Descendants (workers) still running once the server had exited;
        #: they are killed.
        self.leftovers = 0

    def __enter__(self) -> ServerProcess:
        env = dict(os.environ)
        tree = self.tree
        paths = [str(tree), str(PEERS_DIR), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=tree,
                env=env,
                preexec_fn=_pinned(self.placement.server_cpus),
            )
        try:
            self.port = self._wait_ready()
        except BaseException:
            self._stop()
            raise
        return self

    def _wait_ready(self) -> int:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            match = READY_LINE.search(self.out_path.read_bytes())
            if match:
                return int(match.group(3))
            if self.process.poll() is not None:
                raise BenchError(
                    f"{self.name} exited at start-up: {self.stderr_tail()}"
                )
            time.sleep(0.02)
        raise BenchError(f"{self.name} printed no ready line in {READY_TIMEOUT_S} s")

    def stderr_tail(self, lines: int = 5) -> str:
        text = self.err_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "(no output)"

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise BenchError(f"{self.name} died during the trial: {self.stderr_tail()}")

    def _stop(self) -> None:
        """SIGTERM, and wait for the server and every process it started
        (a supervisor's workers) to exit; SIGKILL any left after 5 s."""
        start = time.monotonic()
        deadline = start + STOP_TIMEOUT_S
        family: list[tuple[int, str]] = []
        if self.process.poll() is None:
            for pid in process_tree(self.process.pid)[1:]:
                fields = _stat(pid)
                if fields:  # the start time tells a reused pid apart
                    family.append((pid, fields[19]))
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.killed = True
                self.process.kill()
                self.process.wait()
        running = _still_running(family)
        while running and time.monotonic() < deadline:
            time.sleep(0.02)
            running = _still_running(family)
        self.leftovers = len(running)
        for pid in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.stop_seconds = time.monotonic() - start

    def __exit__(self, *exc_info: object) -> None:
        self._stop()


def _still_running(family: list[tuple[int, str]]) -> list[int]:
    """The processes of family (pid, start time) not yet exited."""
    running = []
    for pid, started in family:
        fields = _stat(pid)
        if fields and fields[0] != "Z" and fields[19] == started:
            running.append(pid)
    return running


def loadgen_command(config: Config, port: int, settings: Settings) -> list[str]:
    conns = settings.idle_conns if config.mode == "idle" else config.conns
    duration = IDLE_HOLD_MAX_S if config.mode == "idle" else settings.duration
    command = [
        str(BUILD_DIR / "loadgen"),
        f"--mode={config.mode}",
        f"--host={HOST}",
        f"--port={port}",
        f"--conns={conns}",
        f"--size={config.size}",
        f"--warmup={settings.warmup}",
        f"--duration={duration}",
    ]
    if config.without_idle:
        command.append(f"--idle-conns={settings.idle_held}")
    return command


def _parse_report(line: str) -> dict[str, Any]:
    try:
        report = json.loads(line)
    except json.JSONDecodeError:
        raise BenchError(f"load generator said {line!r}") from None
    if "error" in report:
        raise BenchError(f"load generator: {report['error']}")
    return report


# ---- one trial ---------------------------------------------------------------


def run_trial(server: Server, config: Config, settings: Settings, tag: str) -> dict:
    """Start the server, load it, stop it; return the load generator's report.

    Besides the load generator's fields (rps, p50_us, p99_us, errors,
    cpu_util ...), the report gets ``server_cpu`` and ``other_cpu``: the
    cores the server and everything else on the machine kept busy while the
    load generator ran.
    """
    with ServerProcess(server, config.kind, settings, tag) as proc:
        if config.metric == "memory":
            report = measure_idle(proc, config, settings)
        else:
            report = measure_load(proc, config, settings)
        report["server_processes"] = len(process_tree(proc.process.pid))
    report["server_cpus"] = proc.placement.server_cpus
    report["loadgen_cpu"] = proc.placement.loadgen_cpu
    report["server_stop_s"] = round(proc.stop_seconds, 3)
    report["server_exit"] = proc.process.returncode
    if proc.killed:
        report["server_killed"] = True
    if proc.leftovers:
        report["server_leftovers"] = proc.leftovers
    return report


def measure_load(proc: ServerProcess, config: Config, settings: Settings) -> dict:
    command = loadgen_command(config, proc.port, settings)
    limit = settings.warmup + settings.duration + LOADGEN_SLACK_S
    server_cpu = cpu_seconds(proc.process.pid)
    busy, ours, start = machine_busy_seconds(), children_cpu_seconds(), time.monotonic()
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=limit,
            preexec_fn=_pinned(proc.placement.loadgen_cpu),
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"load generator ran past {limit:.0f} s") from None
    elapsed = time.monotonic() - start
    proc.check_alive()
    server_cpu = cpu_seconds(proc.process.pid) - server_cpu
    loadgen_cpu = children_cpu_seconds() - ours
    other = machine_busy_seconds() - busy - server_cpu - loadgen_cpu
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise BenchError(f"load generator printed nothing: {done.stderr.strip()}")
    report = _parse_report(lines[-1])
    report["server_cpu"] = round(server_cpu / elapsed, 3)
    report["other_cpu"] = round(max(other, 0.0) / elapsed, 3)
    return report


def measure_idle(proc: ServerProcess, config: Config, settings: Settings) -> dict:
    """RSS growth of the server per connection held open and idle."""
    time.sleep(IDLE_SETTLE_S)
    before = rss_bytes(proc.process.pid)
    loadgen = subprocess.Popen(
        loadgen_command(config, proc.port, settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_pinned(proc.placement.loadgen_cpu),
    )
    try:
        assert loadgen.stdout is not None
        ready = _parse_report(loadgen.stdout.readline() or '{"error": "no output"}')
        proc.check_alive()
        time.sleep(IDLE_SETTLE_S)
        after = rss_bytes(proc.process.pid)
        loadgen.send_signal(signal.SIGTERM)
        out, _ = loadgen.communicate(timeout=LOADGEN_SLACK_S)
    finally:
        if loadgen.poll() is None:
            loadgen.kill()
            loadgen.wait()
    done = _parse_report(out.strip().splitlines()[-1] if out.strip() else "")
    conns = ready["conns"]
    return {
        "mode": "idle",
        "conns": conns,
        "bytes_per_conn": round((after - before) / conns, 1),
        "rss_before_kib": before // 1024,
        "rss_after_kib": after // 1024,
        "setup_s": ready["setup_s"],
        "still_open": done["open"],
        "errors": ready["errors"] + done["errors"],
    }


# ---- the whole run -----------------------------------------------------------


def value_of(config: Config, report: dict) -> float:
    return report["bytes_per_conn" if config.metric == "memory" else "rps"]


def servers_for(config: Config, servers: list[Server]) -> list[Server]:
    return [s for s in servers if (s.tcp if config.kind == "tcp" else s.udp)]


def run_quietest_trial(
    server: Server, config: Config, settings: Settings, tag: str
) -> dict:
    """Run a trial, again up to ``settings.retry_noisy`` times while it is noisy.

    Returns the attempt during which other work on the machine took the
    least CPU, with the number of attempts made.
    """
    attempts = []
    for attempt in range(1 + settings.retry_noisy):
        if attempt:
            time.sleep(NOISY_RETRY_PAUSE_S)
        report = run_trial(server, config, settings, tag)
        attempts.append(report)
        if report.get("other_cpu", 0.0) <= NOISY_OTHER_CPU:
            break
    best = min(attempts, key=lambda r: r.get("other_cpu", 0.0))
    best["attempts"] = len(attempts)
    return best


def schedule(
    servers: list[Server], configs: list[Config]
) -> list[tuple[Config, Server]]:
    """One repeat's trials, in order: configuration by configuration, every
    server in turn, except that a load with idle connections held runs
    right after the same server's load without them, so that the two trials
    compared are seconds apart and meet the same noise."""
    names = {c.name for c in configs}
    with_idle = {c.without_idle: c for c in configs if c.without_idle in names}
    steps = []
    for config in configs:
        if config.without_idle in names:
            continue  # run beside the configuration it is compared with
        partner = with_idle.get(config.name)
        for server in servers_for(config, servers):
            steps.append((config, server))
            if partner is not None and server in servers_for(partner, servers):
                steps.append((partner, server))
    return steps


def run_all(
    servers: list[Server], configs: list[Config], settings: Settings
) -> dict[str, dict[str, list[dict]]]:
    """Every trial, as ``trials[config][server] = [report or {"error"}, ...]``."""
    trials: dict[str, dict[str, list[dict]]] = {c.name: {} for c in configs}
    steps = schedule(servers, configs)
    total = settings.repeat * len(steps)
    count, started = 0, time.monotonic()
    for rep in range(settings.repeat):
        for config, server in steps:
            count += 1
            tag = f"{config.name}-{server.name}-{rep + 1}"
            try:
                report = run_quietest_trial(server, config, settings, tag)
                shown = _format_value(config, value_of(config, report))
                if report.get("errors") or report.get("lost"):
                    shown += f" ({report.get('errors', 0)} errors,"
                    shown += f" {report.get('lost', 0)} lost)"
            except BenchError as exc:
                report, shown = {"error": str(exc)}, f"FAILED: {exc}"
            trials[config.name].setdefault(server.name, []).append(report)
            elapsed = time.monotonic() - started
            print(
                f"[{count}/{total} {elapsed:4.0f}s] {config.name:<12} "
                f"{server.name:<20} {shown}",
                flush=True,
            )
    return trials


def summarize(
    trials: dict[str, dict[str, list[dict]]], configs: list[Config]
) -> dict[str, dict[str, dict]]:
    """Median, min and max of each figure over the repeats that succeeded."""
    summary: dict[str, dict[str, dict]] = {}
    for config in configs:
        summary[config.name] = {}
        for server, reports in trials[config.name].items():
            good = [r for r in reports if "error" not in r]
            entry: dict[str, Any] = {
                "runs": len(reports),
                "failed": len(reports) - len(good),
            }
            if good:
                values = [value_of(config, r) for r in good]
                entry.update(
                    median=statistics.median(values), min=min(values), max=max(values)
                )
                for key in (
                    "p50_us",
                    "p99_us",
                    "cpu_util",
                    "server_cpu",
                    "other_cpu",
                    "still_open",
                    "rss_before_kib",
                    "idle_setup_s",
                ):
                    numbers = [r[key] for r in good if key in r]
                    if numbers:
                        entry[key] = statistics.median(numbers)
                for key in ("errors", "lost", "late", "connect_errors"):
                    entry[key] = sum(r.get(key, 0) for r in good)
                # The worst run's: fewest idle connections left open, most
                # processes.
                for key, worst in (
                    ("idle_conns", max),
                    ("idle_open", min),
                    ("server_processes", max),
                ):
                    numbers = [r[key] for r in good if key in r]
                    if numbers:
                        entry[key] = worst(numbers)
                # How the server stopped: its exit statuses, the longest stop,
                # and processes of its own it left running.
                exits = {r["server_exit"] for r in good if "server_exit" in r}
                if exits:
                    entry["server_exits"] = sorted(exits)
                    entry["server_stop_s"] = max(r["server_stop_s"] for r in good)
                    entry["server_leftovers"] = sum(
                        r.get("server_leftovers", 0) for r in good
                    )
            summary[config.name][server] = entry
    return summary


def ratios(
    summary: dict[str, dict[str, dict]], configs: list[Config], servers: list[Server]
) -> dict[str, dict[str, dict[str, float]]]:
    """``ratios[subject][config][peer]``: more than 1 means trioserve is better."""
    result: dict[str, dict[str, dict[str, float]]] = {}
    for subject in (s.name for s in servers if s.role == "subject"):
        result[subject] = {}
        for config in configs:
            row = summary[config.name]
            mine = row.get(subject, {}).get("median")
            result[subject][config.name] = {}
            for peer in (s.name for s in servers if s.role == "peer"):
                theirs = row.get(peer, {}).get("median")
                if not mine or not theirs:
                    continue
                ratio = theirs / mine if config.metric == "memory" else mine / theirs
                result[subject][config.name][peer] = round(ratio, 3)
    return result


def scaling(
    summary: dict[str, dict[str, dict]],
    configs: list[Config],
    servers: list[Server],
    cpus: tuple[int, ...],
) -> dict[str, dict]:
    """Each multi-process server against its one-process self, per config.

    ``ratios`` holds the round-trip rate over the one-process server's (or
    for memory configurations, bytes per idle connection over its: more is
    worse there); ``per_core`` the same for round trips per second of
    server CPU (what each used, all its processes counted: this tells the
    cost of the extra processes apart from the CPU they were given, or took
    from other work on a shared core); ``placement`` says how many cores
    the workers really had.
    """
    result: dict[str, dict] = {}
    for server in servers:
        if server.role != "scaling" or server.scales is None:
            continue
        where = placement(server.workers, cpus)
        result[server.name] = {
            "of": server.scales,
            "workers": server.workers,
            "placement": dataclasses.asdict(where),
            "ratios": {},
            "per_core": {},
        }
        for config in configs:
            mine = summary[config.name].get(server.name, {})
            base = summary[config.name].get(server.scales, {})
            if mine.get("median") and base.get("median"):
                ratio = mine["median"] / base["median"]
                result[server.name]["ratios"][config.name] = round(ratio, 3)
                if mine.get("server_cpu") and base.get("server_cpu"):
                    ratio *= base["server_cpu"] / mine["server_cpu"]
                    result[server.name]["per_core"][config.name] = round(ratio, 3)
    return result


def idle_load(
    summary: dict[str, dict[str, dict]], configs: list[Config]
) -> dict[str, dict[str, dict]]:
    """``idle_load[config][server]``: the load with idle connections held
    against the same load without them, same server, same run.

    ``rps_ratio`` below 1 and ``p99_ratio``/``p50_ratio`` above 1 mean the
    idle connections slowed the active ones.
    """
    result: dict[str, dict[str, dict]] = {}
    for config in configs:
        if not config.without_idle or config.without_idle not in summary:
            continue
        result[config.name] = {}
        plain_row = summary[config.without_idle]
        for server, loaded in summary[config.name].items():
            plain = plain_row.get(server, {})
            if "median" not in loaded or "median" not in plain:
                continue
            entry = {
                "idle_conns": loaded.get("idle_conns"),
                "idle_open": loaded.get("idle_open"),
                "plain_rps": plain["median"],
                "rps": loaded["median"],
                "rps_ratio": round(loaded["median"] / plain["median"], 3),
            }
            for key in ("p50_us", "p99_us"):
                if loaded.get(key) and plain.get(key):
                    entry[f"plain_{key}"] = plain[key]
                    entry[key] = loaded[key]
                    ratio = loaded[key] / plain[key]
                    entry[key.replace("_us", "_ratio")] = round(ratio, 3)
            result[config.name][server] = entry
    return result


def check_targets(
    summary: dict[str, dict[str, dict]],
    ratio_table: dict[str, dict[str, dict[str, float]]],
    idle_table: dict[str, dict[str, dict]] | None = None,
) -> list[dict]:
    checks = []
    for description, config, peer, bound in TARGETS:
        for subject, by_config in ratio_table.items():
            if peer == "max-bytes":
                value = summary.get(config, {}).get(subject, {}).get("median")
                met = value is not None and value <= bound
                shown = None if value is None else f"{value / 1024:.1f} KiB"
            elif peer == "max-p99-growth":
                entry = (idle_table or {}).get(config, {}).get(subject, {})
                value = entry.get("p99_ratio")
                met = value is not None and value <= bound
                shown = None if value is None else f"{value:.2f}x"
            else:
                value = by_config.get(config, {}).get(peer)
                met = value is not None and value >= bound
                shown = None if value is None else f"{value:.2f}x"
            if value is not None:
                checks.append(
                    {
                        "target": description,
                        "subject": subject,
                        "value": value,
                        "shown": shown,
                        "met": met,
                    }
                )
    return checks


# ---- presenting ----------------------------------------------------------------


def _format_value(config: Config, value: float) -> str:
    if config.metric == "memory":
        return f"{value / 1024:.1f} KiB"
    return f"{value / 1000:.1f}k" if value >= 1000 else f"{value:.0f}"


def _cell(config: Config, entry: dict | None) -> str:
    if not entry:
        return "-"
    if "median" not in entry:
        return "failed"
    low, high = entry["min"], entry["max"]
    if config.metric == "memory":
        spread = f"{low / 1024:.1f}-{high / 1024:.1f}"
    else:
        spread = f"{low / 1000:.0f}-{high / 1000:.0f}"
    text = f"{_format_value(config, entry['median'])} ({spread})"
    if (
        entry.get("errors")
        or entry.get("lost")
        or entry.get("failed")
        or entry.get("server_leftovers")
    ):
        text += " !"
    return text


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |"]
        lines.append("|" + "|".join("---" for _ in header) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()

    return "\n".join(
        [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    )


def render(
    results: dict, configs: list[Config], servers: list[Server], markdown: bool
) -> str:
    """The tables of one run, as plain text or as Markdown."""
    summary, ratio_table = results["summary"], results["ratios"]
    names = [s.name for s in servers]
    out = []

    out.append(
        "Round trips per second (idle: KiB per connection), "
        "median (min-max in thousands or KiB) of "
        f"{results['settings']['repeat']} runs; ! = errors or lost requests"
    )
    rows = [
        [c.name] + [_cell(c, summary[c.name].get(n)) for n in names] for c in configs
    ]
    out.append(_table(["config", *names], rows, markdown))

    out.append("\nLatency p50 / p99 in microseconds (medians)")
    rows = []
    for c in configs:
        if c.metric != "rps":
            continue
        row = [c.name]
        for n in names:
            entry = summary[c.name].get(n, {})
            row.append(
                f"{entry['p50_us']:.0f} / {entry['p99_us']:.0f}"
                if "p50_us" in entry
                else "-"
            )
        rows.append(row)
    out.append(_table(["config", *names], rows, markdown))

    peers = [s.name for s in servers if s.role == "peer"]
    for subject, by_config in ratio_table.items() if peers else ():
        out.append(
            f"\n{subject} vs each peer (ratio of medians; > 1 means {subject} is "
            "faster, or for idle-5000 uses less memory)"
        )
        rows = [
            [c.name]
            + [
                f"{by_config[c.name][p]:.2f}x" if p in by_config[c.name] else "-"
                for p in peers
            ]
            for c in configs
        ]
        out.append(_table(["config", *peers], rows, markdown))

    out += _render_scaling(results, configs, markdown)
    out += _render_idle_load(results, configs, markdown)

    if results["targets"]:
        out.append("\nTargets from the benchmark issue (measured; MISSED or met)")
        subjects = list(ratio_table)
        cells: dict[str, dict[str, str]] = {}
        for t in results["targets"]:
            verdict = "met" if t["met"] else "MISSED"
            cells.setdefault(t["target"], {})[t["subject"]] = f"{t['shown']} {verdict}"
        rows = [
            [target] + [by_subject.get(subject, "-") for subject in subjects]
            for target, by_subject in cells.items()
        ]
        out.append(_table(["target", *subjects], rows, markdown))

    out.append(
        "\nIs the load generator the bottleneck? (its CPU: share of its core "
        "in the measured window; other CPU: cores busy with neither server nor "
        "load generator, i.e. noise)"
    )
    rows = []
    for c in configs:
        if c.metric != "rps":
            continue
        row = summary[c.name]
        python = {n: e for n, e in row.items() if n != "c-echo" and "median" in e}
        best = max(python, key=lambda n: python[n]["median"], default=None)
        ref = row.get("c-echo", {})
        lg = max((e.get("cpu_util", 0) for e in python.values()), default=0)
        other = max((e.get("other_cpu", 0) for e in row.values()), default=0)
        rows.append(
            [
                c.name,
                _format_value(c, ref["median"]) if "median" in ref else "-",
                f"{ref.get('cpu_util', 0):.2f}" if "median" in ref else "-",
                f"{best} {_format_value(c, python[best]['median'])}" if best else "-",
                f"{ref['median'] / python[best]['median']:.1f}x"
                if best and "median" in ref
                else "-",
                f"{lg:.2f}",
                f"{other:.2f}" + (" (noisy)" if other > NOISY_OTHER_CPU else ""),
            ]
        )
    header = [
        "config", "c-echo", "its loadgen CPU", "best Python", "c-echo / best",
        "max loadgen CPU (Python)", "max other CPU",
    ]  # fmt: skip
    out.append(_table(header, rows, markdown))
    return "\n".join(out)


def _stop_summary(entries: list[dict]) -> str:
    """How a server stopped over its trials: exit statuses, longest stop."""
    exits = sorted({code for e in entries for code in e.get("server_exits", [])})
    if not exits:
        return "-"
    text = f"exit {', '.join(str(code) for code in exits)}, "
    text += f"<= {max(e['server_stop_s'] for e in entries):.1f} s"
    leftovers = sum(e.get("server_leftovers", 0) for e in entries)
    if leftovers:
        text += f", {leftovers} processes left running (killed)"
    return text


def _render_scaling(results: dict, configs: list[Config], markdown: bool) -> list[str]:
    """The workers table: each multi-process server over its one-process self."""
    out = []
    summary = results["summary"]
    for name, info in results.get("scaling", {}).items():
        base, where = info["of"], info["placement"]
        out.append(
            f"\n{name} ({info['workers']} worker processes) vs {base}: 'scaling' is "
            f"{name}'s figure over {base}'s. Cores: {where['note']}"
            + (
                f"; {name} had the one core {base} had"
                if where["shared"] and where["server_cpus"]
                else ""
            )
        )
        rows = []
        for c in configs:
            mine = summary[c.name].get(name, {})
            theirs = summary[c.name].get(base, {})
            if "median" not in mine and "median" not in theirs:
                continue
            ratio = info["ratios"].get(c.name)
            if ratio is None:
                shown = "-"
            elif c.metric == "memory":
                shown = f"{ratio:.2f}x memory"
            else:
                shown = f"{ratio:.2f}x"
            rss = "-"
            if "rss_before_kib" in mine and "rss_before_kib" in theirs:
                rss = (
                    f"{theirs['rss_before_kib'] / 1024:.0f} / "
                    f"{mine['rss_before_kib'] / 1024:.0f} MiB"
                )
            cpu = "-"
            if "server_cpu" in mine and "server_cpu" in theirs:
                cpu = f"{theirs['server_cpu']:.2f} / {mine['server_cpu']:.2f}"
            per_core = info.get("per_core", {}).get(c.name)
            rows.append(
                [
                    c.name,
                    _cell(c, theirs) if theirs else "-",
                    _cell(c, mine) if mine else "-",
                    shown,
                    cpu,
                    "-" if per_core is None else f"{per_core:.2f}x",
                    rss,
                    _stop_summary([mine]),
                ]
            )
        header = [
            "config", base, name, "scaling", "server CPU, cores (1 / N)",
            "scaling per CPU", "RSS at start (1 / N)", f"{name} stop (SIGTERM)",
        ]  # fmt: skip
        out.append(_table(header, rows, markdown))
    return out


def _render_idle_load(
    results: dict, configs: list[Config], markdown: bool
) -> list[str]:
    """The active load with idle connections held against it without them."""
    out = []
    held = results["settings"].get("idle_held")
    for config in configs:
        table = results.get("idle_load", {}).get(config.name)
        if not table:
            continue
        out.append(
            f"\n{config.name}: {config.without_idle}'s load while "
            f"{held:,} idle connections are held open, against {config.without_idle} "
            "without them (same server, same run; rps ratio < 1 and p99 ratio > 1 "
            "mean the idle connections cost the active ones)"
        )
        rows = []
        for server, e in table.items():
            lat = "-"
            if "p99_ratio" in e:
                lat = (
                    f"{e['plain_p50_us']:.0f} / {e['plain_p99_us']:.0f} -> "
                    f"{e['p50_us']:.0f} / {e['p99_us']:.0f}"
                )
            rows.append(
                [
                    server,
                    f"{e['plain_rps'] / 1000:.1f}k -> {e['rps'] / 1000:.1f}k",
                    f"{e['rps_ratio']:.2f}x",
                    lat,
                    f"{e['p99_ratio']:.2f}x" if "p99_ratio" in e else "-",
                    f"{e.get('idle_open', '-')} of {e.get('idle_conns', '-')}",
                ]
            )
        header = [
            "server", "rps (without -> with idle)", "rps ratio",
            "p50 / p99 us (without -> with)", "p99 ratio", "idle still open",
        ]  # fmt: skip
        out.append(_table(header, rows, markdown))
    return out


def plot(
    results: dict, configs: list[Config], servers: list[Server], path: Path
) -> bool:
    """Chart each trioserve server's ratio to each peer; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, NullLocator
    except ImportError:
        return False
    ratio_table = results["ratios"]
    peers = [s.name for s in servers if s.role == "peer"]
    subjects = list(ratio_table)
    if not subjects or not peers:
        return False
    fig, axes = plt.subplots(
        len(subjects), 1, figsize=(12, 4.2 * len(subjects)), squeeze=False
    )
    width = 0.8 / len(peers)
    values = [v for by in ratio_table.values() for r in by.values() for v in r.values()]
    low = min([0.5, *values]) / 1.25
    high = max([2.0, *values]) * 1.25
    for ax, subject in zip(axes[:, 0], subjects, strict=True):
        by_config = ratio_table[subject]
        for i, peer in enumerate(peers):
            xs, ys = [], []
            for x, config in enumerate(configs):
                if peer in by_config.get(config.name, {}):
                    xs.append(x - 0.4 + width * (i + 0.5))
                    ys.append(by_config[config.name][peer])
            # Bars grow from the 1.0 line: up where trioserve is ahead, down
            # where it is behind.
            heights = [y - 1.0 for y in ys]
            bars = ax.bar(xs, heights, width, bottom=1.0, label=f"vs {peer}")
            ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=7, padding=2)
        ax.axhline(1.0, color="black", linewidth=1)
        ax.set_yscale("log")
        ticks = [t for t in (0.125, 0.25, 0.5, 1, 2, 4, 8) if low <= t <= high]
        ax.yaxis.set_major_locator(FixedLocator(ticks))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_yticklabels([f"{t:g}x" for t in ticks])
        ax.set_ylim(low, high)
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels(
            [
                c.name + ("\n(memory, inverted)" if c.metric == "memory" else "")
                for c in configs
            ]
        )
        ax.set_ylabel(f"{subject} / peer")
        ax.set_title(
            f"{subject}: ratio to each peer (above 1 = {subject} ahead)", fontsize=11
        )
        ax.grid(axis="y", alpha=0.3)
    machine = results["machine"]
    fig.suptitle(
        f"trioserve {results.get('trioserve_version') or ''} benchmark, "
        f"{results['date'][:16]}, {machine['cpus']} cores, "
        f"median of {results['settings']['repeat']} runs",
        fontsize=12,
    )
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="upper center",
        ncol=len(peers),
        fontsize=9,
        bbox_to_anchor=(0.5, 1 - 0.45 / fig.get_figheight()),
    )
    # Room at the top for the title and the legend.
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.75 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---- command line --------------------------------------------------------------


def source_version(tree: Path) -> str | None:
    """The commit checked out in tree, with "+dirty" for local changes."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(tree), "status", "--porcelain", "--", "trioserve"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def machine_info() -> dict:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def select(only: str | None) -> tuple[list[Server], list[Config]]:
    """Servers and configurations named by ``--only`` (globs; both kinds mixed)."""
    servers = [s for s in SERVERS if s.requires is None or _importable(s.requires)]
    for s in SERVERS:
        if s not in servers:
            print(f"skipping {s.name}: {s.requires} is not installed", file=sys.stderr)
    configs = list(CONFIGS)
    if not only:
        return servers, configs
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    server_names = [s.name for s in SERVERS]
    config_names = [c.name for c in CONFIGS]
    for pattern in patterns:
        if not fnmatch.filter(server_names + config_names, pattern):
            sys.exit(
                f"run.py: --only {pattern!r} names nothing; servers: "
                f"{', '.join(server_names)}; configs: {', '.join(config_names)}"
            )

    def chosen(name: str, names: list[str]) -> bool:
        mine = [p for p in patterns if fnmatch.filter(names, p)]
        return not mine or any(fnmatch.fnmatch(name, p) for p in mine)

    servers = [s for s in servers if chosen(s.name, server_names)]
    # What a chosen server or configuration is compared with comes too.
    wanted = {c.name for c in configs if chosen(c.name, config_names)}
    for c in configs:
        if c.name in wanted and c.without_idle and c.without_idle not in wanted:
            print(f"also running {c.without_idle}: {c.name} is compared with it")
            wanted.add(c.without_idle)
    for s in list(servers):
        if s.scales and s.scales not in {t.name for t in servers}:
            print(f"also running {s.scales}: {s.name} is compared with it")
            base = next(t for t in SERVERS if t.name == s.scales)
            servers.insert(servers.index(s), base)
    return servers, [c for c in configs if c.name in wanted]


def with_baseline(servers: list[Server], tree: Path) -> list[Server]:
    """Add ``NAME@base`` after each trioserve server, running the trioserve in tree."""
    if not (tree / "trioserve" / "__init__.py").exists():
        sys.exit(f"run.py: --baseline {tree} has no trioserve/ package")
    result = []
    for server in servers:
        result.append(server)
        if server.role == "subject":
            result.append(
                dataclasses.replace(
                    server,
                    name=f"{server.name}@base",
                    description=f"{server.description}, from {tree}",
                    tree=tree,
                )
            )
    return result


def _importable(module: str) -> bool:
    done = subprocess.run([PY, "-c", f"import {module}"], capture_output=True)
    return done.returncode == 0


def raise_fd_limit(needed: int) -> int:
    """Raise our open-file limit (the servers inherit it); return what it is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft < needed:
        print(f"warning: RLIMIT_NOFILE is {soft}, below the {needed} wanted")
    return soft


def usable_cpus() -> tuple[int, ...]:
    """The cores this process may run on (and pin what it starts to)."""
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return ()


def pin_possible() -> bool:
    return {SERVER_CPU, LOADGEN_CPU} <= set(usable_cpus())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="configs: "
        + ", ".join(c.name for c in CONFIGS)
        + "\nservers: "
        + ", ".join(s.name for s in SERVERS),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 1 run, short windows, 1,000 idle connections (~1.5 min)",
    )
    parser.add_argument(
        "--only",
        metavar="NAMES",
        help="comma-separated server and/or config names (globs), e.g. "
        "'trioserve,trio,tcp-*'",
    )
    parser.add_argument("--repeat", type=int, help="runs per figure (default 3)")
    parser.add_argument(
        "--duration", type=float, help="measured seconds per run (default 3)"
    )
    parser.add_argument(
        "--warmup", type=float, help="unmeasured seconds before each (default 1)"
    )
    parser.add_argument(
        "--idle-conns",
        type=int,
        help="connections held for the memory figure (default 5000)",
    )
    parser.add_argument(
        "--idle-held",
        type=int,
        metavar="N",
        help="idle connections held open during idle-10k+100 (default 10000; "
        "--quick: 1000)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS_DIR,
        help="directory for latest.json/.md/.png (default benchmarks/results)",
    )
    parser.add_argument(
        "--retry-noisy",
        type=int,
        default=0,
        metavar="N",
        help="run a trial again, up to N times, while other processes use more "
        f"than {NOISY_OTHER_CPU} cores; keep the quietest attempt (default 0)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="also measure the trioserve in DIR (e.g. `git worktree add DIR "
        "COMMIT`), as trioserve@base and trioserve-lines@base, side by side",
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="FILE",
        help="run nothing: print the tables and redraw the chart from a saved "
        "latest.json",
    )
    parser.add_argument(
        "--allow-cpu-idle",
        action="store_true",
        help="let idle CPUs halt, as the machine does by default, instead of "
        "holding /dev/cpu_dma_latency at 0 (see README: halted CPUs' wake-up "
        "then dominates tcp-1)",
    )
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG")
    parser.add_argument(
        "--no-lock",
        action="store_true",
        help="do not wait for other benchmark runs (for smoke tests, whose "
        "figures do not matter)",
    )
    return parser.parse_args(argv)


def report(
    results: dict,
    configs: list[Config],
    servers: list[Server],
    output: Path,
    chart: bool,
) -> None:
    """Print the tables and write latest.json, latest.md and latest.png."""
    print()
    print(render(results, configs, servers, markdown=False))
    output.mkdir(parents=True, exist_ok=True)
    (output / "latest.json").write_text(json.dumps(results, indent=1) + "\n")
    machine = results["machine"]
    (output / "latest.md").write_text(
        f"Run of {results['date']} on {machine['cpus']} cores "
        f"({machine['cpu_model']}; idle CPUs "
        f"{machine.get('cpu_idle', 'halting allowed')}), "
        f"Python {machine['python']}, trioserve "
        f"{results.get('trioserve_version')}"
        f"\n\n{render(results, configs, servers, markdown=True)}\n"
    )
    wrote = ["latest.json", "latest.md"]
    if chart:
        if plot(results, configs, servers, output / "latest.png"):
            wrote.append("latest.png")
        else:
            print(
                "no chart: no peer was measured, or matplotlib is not installed "
                "(pip install matplotlib)"
            )
    print(
        f"\nwrote {', '.join(str(output / w) for w in wrote)} "
        f"(the run took {results['wall_s']:.0f} s)"
    )


def report_again(path: Path, output: Path, chart: bool) -> None:
    """Tables and chart anew from a saved latest.json (``--from-json``)."""
    results = json.loads(path.read_text())
    configs = [c for c in CONFIGS if c.name in results["configs"]]
    by_name = {s.name: s for s in SERVERS}
    servers = [
        dataclasses.replace(by_name[name.split("@")[0]], name=name)
        for name in results["servers"]
    ]
    report(results, configs, servers, output, chart)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        report_again(args.from_json, args.output, chart=not args.no_chart)
        return 0
    quick = args.quick
    settings = Settings(
        repeat=args.repeat or (1 if quick else 3),
        warmup=args.warmup if args.warmup is not None else (0.25 if quick else 1.0),
        duration=args.duration or (0.5 if quick else 3.0),
        idle_conns=args.idle_conns or (1000 if quick else 5000),
        pin=pin_possible(),
        retry_noisy=args.retry_noisy,
        idle_held=args.idle_held or (1000 if quick else 10000),
    )
    if not settings.pin:
        print("warning: CPUs 0 and 1 are not both available; running unpinned")
    servers, configs = select(args.only)
    if args.baseline:
        servers = with_baseline(servers, args.baseline.resolve())
    for server in servers:
        if server.workers > 1:
            print(f"{server.name}: {placement(server.workers, settings.cpus).note}")
    private_network = enter_private_network()
    if not private_network:
        print(
            "warning: no private network namespace (needs CAP_SYS_ADMIN): "
            "sharing the machine's loopback; connect-per-request is then limited "
            "by the kernel's search for free ports"
        )
    awake = None if args.allow_cpu_idle else keep_cpus_awake()
    if awake is None and not args.allow_cpu_idle:
        print(
            "warning: cannot hold /dev/cpu_dma_latency at 0 (needs root): idle "
            "CPUs may halt, and their wake-up then dominates tcp-1"
        )
    cpu_idle = "polling (cpu_dma_latency 0)" if awake else "halting allowed"
    print(f"idle CPUs: {cpu_idle}")
    build()
    # Each side (server, load generator) holds one descriptor per connection.
    raise_fd_limit(max(settings.idle_conns, settings.idle_held + 100) + 100)

    with (
        contextlib.nullcontext() if args.no_lock else wait_for_our_turn(),
        awake or contextlib.nullcontext(),
    ):
        started = datetime.datetime.now().astimezone()
        trials = run_all(servers, configs, settings)
    summary = summarize(trials, configs)
    ratio_table = ratios(summary, configs, servers)
    results = {
        "date": started.isoformat(timespec="seconds"),
        "wall_s": 0.0,
        "machine": machine_info()
        | {"private_network": private_network, "cpu_idle": cpu_idle},
        "settings": dataclasses.asdict(settings),
        "servers": {s.name: s.description for s in servers},
        "trioserve_version": source_version(REPO_DIR),
        "baseline": str(args.baseline.resolve()) if args.baseline else None,
        "configs": {c.name: c.title for c in configs},
        "summary": summary,
        "ratios": ratio_table,
        "scaling": scaling(summary, configs, servers, settings.cpus),
        "idle_load": idle_load(summary, configs),
        "targets": [],
        "trials": trials,
    }
    results["targets"] = check_targets(summary, ratio_table, results["idle_load"])
    results["wall_s"] = round(
        (datetime.datetime.now().astimezone() - started).total_seconds(), 1
    )

    report(results, configs, servers, args.output, chart=not args.no_chart)
    failed = sum(e.get("failed", 0) for row in summary.values() for e in row.values())
    if failed:
        print(f"{failed} trials failed; the servers' output is in {LOG_DIR}")
        return 1
    shutil.rmtree(LOG_DIR, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
