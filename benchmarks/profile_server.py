"""Profile one server under one benchmark load, to see where its time goes.

    python benchmarks/profile_server.py [--server trioserve] [--config tcp-100]
                                        [--seconds 10] [--tool py-spy|cprofile]

Starts the server pinned to CPU 0 and the load generator pinned to CPU 1, as
``run.py`` does, and profiles the server while the load runs:

- ``py-spy`` (the default; ``pip install py-spy``) samples the running
  process from outside, 200 times a second, from CPU 1 so that sampling
  takes no time from the server's core. It writes the collapsed stacks to
  ``_build/profile-SERVER-CONFIG.txt`` (flame-graph tools read them).
- ``cprofile`` runs the server under :mod:`cProfile` (deterministic, but
  it slows every call) and writes ``_build/profile-SERVER-CONFIG.prof``;
  only for the trioserve servers, which exit cleanly on SIGTERM so the
  profile gets written.

Either way it prints the functions with the most time spent in themselves
("self") and below them ("total"), as percentages of the samples in which
the server was running (py-spy leaves out samples where it waits in
``epoll_wait``).
"""

from __future__ import annotations

import argparse
import collections
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

if not __package__:  # run as a script: the package is in this one's parent
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import attrs

from benchmarks import catalog, machine
from benchmarks.catalog import Config, Server
from benchmarks.driver import STOP_TIMEOUT_S, ServerProcess, loadgen_command
from benchmarks.records import Settings

# Samples per second: enough for stable percentages over a ten-second
# window, few enough that stopping the process to sample costs it little.
SAMPLE_RATE = 200

# The load runs this long before profiling starts, to leave start-up and
# connection set-up out of the profile.
WARMUP_S = 1.0

# Sampling without stopping the process. Stopping it (py-spy's default)
# skews the profile on this virtual machine: the server seems to stop only
# when it next leaves a system call, so nearly every sample lands on the
# Python line that made one (94% "in send/recv" for plain Trio, where
# perf says the kernel has about a third of the time).
PY_SPY_EXTRA = ["--nonblocking"]

# How many functions each table shows.
TOP = 25

# A py-spy frame: "function (path/file.py)" once line numbers are off.
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*)\)$")


def _find_server(name: str) -> Server:
    for server in catalog.SERVERS:
        if server.name == name:
            return server
    sys.exit(
        f"no server {name!r}; servers: {', '.join(s.name for s in catalog.SERVERS)}"
    )


def _find_config(name: str) -> Config:
    for config in catalog.CONFIGS:
        if config.name == name and config.metric == "rps":
            return config
    names = ", ".join(c.name for c in catalog.CONFIGS if c.metric == "rps")
    sys.exit(f"no load {name!r}; loads: {names}")


def _settings(seconds: float) -> Settings:
    return Settings(
        repeat=1,
        warmup=WARMUP_S,
        duration=seconds + 2.0,  # the load outlasts the sampling
        idle_conns=0,
        pin=machine.pin_possible(),
        cpus=machine.usable_cpus(),
    )


def _start_load(config: Config, port: int, settings: Settings) -> subprocess.Popen[str]:
    return subprocess.Popen(
        loadgen_command(config, port, settings),
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=machine.pinned(machine.LOADGEN_CPU if settings.pin else None),
    )


def profile_with_py_spy(
    server: Server, config: Config, seconds: float, output: Path
) -> collections.Counter[tuple[str, ...]]:
    """Sample the server with py-spy; return the collapsed stacks' counts."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.access(py_spy, os.X_OK):
        sys.exit("py-spy is not installed: pip install py-spy (or use --tool cprofile)")
    settings = _settings(seconds)
    tag = f"profile-{server.name}-{config.name}"
    with ServerProcess(server, config.kind, settings, tag) as proc:
        load = _start_load(config, proc.port, settings)
        time.sleep(WARMUP_S)
        subprocess.run(
            [
                py_spy,
                "record",
                "--pid",
                str(proc.process.pid),
                "--rate",
                str(SAMPLE_RATE),
                "--duration",
                str(round(seconds)),
                "--format",
                "raw",
                "--nolineno",
                *PY_SPY_EXTRA,
                "--output",
                str(output),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            preexec_fn=machine.pinned(machine.LOADGEN_CPU if settings.pin else None),
        )
        report, _ = load.communicate()
        print("load:", report.strip())
    stacks: collections.Counter[tuple[str, ...]] = collections.Counter()
    for line in output.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        stacks[tuple(frames.split(";"))] += int(count)
    return stacks


def _short(frame: str) -> str:
    match = FRAME.match(frame)
    if not match:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match['function']} ({path})"


def print_py_spy_tables(stacks: collections.Counter[tuple[str, ...]]) -> None:
    """Print the functions most often running ("self") and on the stack ("total").

    Sampling without stopping the process cuts some stacks short at the
    outer end, so "total" is exact for the handler's own calls but too low
    for the outermost frames (``main``, ``trio.run``).
    """
    total = sum(stacks.values())
    if not total:
        print("no samples: the server was never seen running")
        return
    own: collections.Counter[str] = collections.Counter()
    below: collections.Counter[str] = collections.Counter()
    for frames, count in stacks.items():
        # py-spy lists the outermost frame first; the last one is running.
        own[_short(frames[-1])] += count
        for frame in {_short(f) for f in frames}:  # recursion counts once
            below[frame] += count
    print(f"\n{total} samples while running")
    for title, counter in (("self", own), ("total", below)):
        print(f"\ntop {TOP} by {title} time:")
        for frame, count in counter.most_common(TOP):
            print(f"  {100 * count / total:5.1f}%  {frame}")


def profile_with_cprofile(
    server: Server, config: Config, seconds: float, output: Path
) -> None:
    command = server.tcp if config.kind == "tcp" else server.udp
    assert command is not None
    if command[1:3] != ("-m", "trioserve"):
        sys.exit("--tool cprofile profiles the trioserve servers only")
    profiled = attrs.evolve(
        server,
        tcp=(command[0], "-m", "cProfile", "-o", str(output), *command[1:]),
        udp=(command[0], "-m", "cProfile", "-o", str(output), *command[1:]),
    )
    settings = _settings(seconds)
    tag = f"profile-{server.name}-{config.name}"
    output.unlink(missing_ok=True)
    with ServerProcess(profiled, config.kind, settings, tag) as proc:
        load = _start_load(config, proc.port, settings)
        report, _ = load.communicate()
        print("load:", report.strip())
        proc.process.send_signal(signal.SIGTERM)  # trioserve then writes it
        proc.process.wait(STOP_TIMEOUT_S)
    stats = pstats.Stats(str(output))
    stats.sort_stats("tottime").print_stats(TOP)
    stats.sort_stats("cumulative").print_stats(TOP)


def main() -> None:
    assert __doc__ is not None
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="trioserve")
    parser.add_argument("--config", default="tcp-100")
    parser.add_argument("--seconds", type=int, default=10, help="sampling time")
    parser.add_argument("--tool", choices=["py-spy", "cprofile"], default="py-spy")
    parser.add_argument(
        "--tree",
        type=Path,
        metavar="DIR",
        help="profile the trioserve in DIR instead of this working tree",
    )
    args = parser.parse_args()
    server, config = _find_server(args.server), _find_config(args.config)
    if args.tree:
        tree = args.tree.resolve()
        server = attrs.evolve(server, name=f"{server.name}@{tree.name}", tree=tree)
    machine.enter_private_network()
    machine.build()
    machine.raise_fd_limit(2 * config.conns + 100)
    suffix = "txt" if args.tool == "py-spy" else "prof"
    output = machine.BUILD_DIR / f"profile-{server.name}-{config.name}.{suffix}"
    if args.tool == "py-spy":
        print_py_spy_tables(profile_with_py_spy(server, config, args.seconds, output))
    else:
        profile_with_cprofile(server, config, args.seconds, output)
    shutil.rmtree(machine.LOG_DIR, ignore_errors=True)
    print(f"\nprofile written to {output}")


if __name__ == "__main__":
    main()
