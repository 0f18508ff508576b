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
import datetime
import shutil
from pathlib import Path

from benchmarks.catalog import CONFIGS, SERVERS, select, with_baseline
from benchmarks.driver import run_all
from benchmarks.figures import check_targets, idle_load, ratios, scaling, summarize
from benchmarks.machine import (
    LOG_DIR,
    REPO_DIR,
    RESULTS_DIR,
    build,
    enter_private_network,
    keep_cpus_awake,
    machine_info,
    pin_possible,
    placement,
    raise_fd_limit,
    source_version,
    usable_cpus,
    wait_for_our_turn,
)
from benchmarks.records import Results, Settings
from benchmarks.report import report, report_again
from benchmarks.tables import NOISY_OTHER_CPU


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    assert __doc__ is not None
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


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks (or report a saved run again); the exit status."""
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
        cpus=usable_cpus(),
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
    idle_table = idle_load(summary, configs)
    results = Results(
        date=started.isoformat(timespec="seconds"),
        wall_s=round(
            (datetime.datetime.now().astimezone() - started).total_seconds(), 1
        ),
        machine=machine_info(private_network=private_network, cpu_idle=cpu_idle),
        settings=settings,
        servers={s.name: s.description for s in servers},
        trioserve_version=source_version(REPO_DIR),
        baseline=str(args.baseline.resolve()) if args.baseline else None,
        configs={c.name: c.title for c in configs},
        summary=summary,
        ratios=ratio_table,
        scaling=scaling(summary, configs, servers, settings.cpus),
        idle_load=idle_table,
        targets=check_targets(summary, ratio_table, idle_table),
        trials=trials,
    )

    report(results, configs, servers, args.output, chart=not args.no_chart)
    failed = sum(e.failed for row in summary.values() for e in row.values())
    if failed:
        print(f"{failed} trials failed; the servers' output is in {LOG_DIR}")
        return 1
    shutil.rmtree(LOG_DIR, ignore_errors=True)
    return 0
