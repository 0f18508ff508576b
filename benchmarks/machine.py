"""The machine the benchmarks run on: where things are, which cores run
what, what the kernel is asked for, and what ``/proc`` says processes used.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import platform
import resource
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TextIO

from benchmarks.records import Machine, Placement

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

PY = sys.executable


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
        return Placement(
            server_cpus=server, loadgen_cpu=workers, shared=False, note=note
        )
    if {SERVER_CPU, LOADGEN_CPU} <= available:
        return Placement(
            server_cpus=(SERVER_CPU,),
            loadgen_cpu=LOADGEN_CPU,
            shared=True,
            note=f"all {workers} workers share core {SERVER_CPU} (this machine has "
            f"{len(available)} usable cores, {workers + 1} needed), load generator "
            f"on core {LOADGEN_CPU}: NOT a scaling measurement",
        )
    return Placement(
        server_cpus=None,
        loadgen_cpu=None,
        shared=workers > 1,
        note="not pinned (cores 0 and 1 are not both usable)"
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


def pinned(cpus: int | tuple[int, ...] | None) -> Callable[[], None] | None:
    if cpus is None:
        return None
    chosen = {cpus} if isinstance(cpus, int) else set(cpus)
    return lambda: os.sched_setaffinity(0, chosen)


def proc_stat(pid: int) -> list[str] | None:
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
            fields = proc_stat(int(entry.name))
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
        fields = proc_stat(member)
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


def machine_info(*, private_network: bool, cpu_idle: str) -> Machine:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return Machine(
        cpus=os.cpu_count(),
        cpu_model=model,
        kernel=platform.release(),
        python=platform.python_version(),
        private_network=private_network,
        cpu_idle=cpu_idle,
    )


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
