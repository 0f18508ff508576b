"""What a run's trials add up to: the summary of each server in each
configuration, trioserve's ratios to its peers, the scaling of worker
processes, the cost of held idle connections, and the targets."""

from __future__ import annotations

import statistics
from collections.abc import Callable

from benchmarks.catalog import TARGETS, Config, Server, Target
from benchmarks.machine import placement
from benchmarks.records import (
    Entry,
    IdleLoad,
    IdleLoads,
    Ratios,
    Scaling,
    Summary,
    TargetCheck,
    Trial,
    Trials,
)

# Figures of the good runs whose median is reported.
_MEDIANS = (
    "p50_us",
    "p99_us",
    "cpu_util",
    "server_cpu",
    "other_cpu",
    "still_open",
    "rss_before_kib",
    "idle_setup_s",
)
# Counts summed over the good runs.
_SUMS = ("errors", "lost", "late", "connect_errors")
# Counts of which the worst run's is reported: the most idle connections
# asked for, the fewest left open, the most processes.
_WORST: tuple[tuple[str, Callable[[list[int]], int]], ...] = (
    ("idle_conns", max),
    ("idle_open", min),
    ("server_processes", max),
)


def summarize(trials: Trials, configs: list[Config]) -> Summary:
    """Median, min and max of each figure over the repeats that succeeded."""
    return {
        config.name: {
            server: summarize_trials(config, runs)
            for server, runs in trials[config.name].items()
        }
        for config in configs
    }


def summarize_trials(config: Config, runs: list[Trial]) -> Entry:
    """One server's figures in one configuration, from its repeats."""
    good = [r for r in runs if r.error is None]
    values = [v for r in good if (v := r.value(config.metric)) is not None]
    if not values:
        return Entry(runs=len(runs), failed=len(runs) - len(good))
    figures: dict[str, object] = {}
    for key in _MEDIANS:
        numbers = [n for r in good if (n := getattr(r, key)) is not None]
        if numbers:
            figures[key] = statistics.median(numbers)
    for key in _SUMS:
        figures[key] = sum(getattr(r, key) or 0 for r in good)
    for key, worst in _WORST:
        counts = [n for r in good if (n := getattr(r, key)) is not None]
        if counts:
            figures[key] = worst(counts)
    # How the server stopped: its exit statuses, the longest stop, and
    # processes of its own it left running.
    exits = {r.server_exit for r in good if r.server_exit is not None}
    if exits:
        figures["server_exits"] = tuple(sorted(exits))
        figures["server_stop_s"] = max(r.server_stop_s or 0.0 for r in good)
        figures["server_leftovers"] = sum(r.server_leftovers or 0 for r in good)
    return Entry(
        runs=len(runs),
        failed=len(runs) - len(good),
        median=statistics.median(values),
        min=min(values),
        max=max(values),
        **figures,  # type: ignore[arg-type]
    )


def ratios(summary: Summary, configs: list[Config], servers: list[Server]) -> Ratios:
    """``ratios[subject][config][peer]``: more than 1 means trioserve is better."""
    result: Ratios = {}
    for subject in (s.name for s in servers if s.role == "subject"):
        result[subject] = {}
        for config in configs:
            row = summary[config.name]
            mine = _median(row, subject)
            result[subject][config.name] = {}
            for peer in (s.name for s in servers if s.role == "peer"):
                theirs = _median(row, peer)
                if not mine or not theirs:
                    continue
                ratio = theirs / mine if config.metric == "memory" else mine / theirs
                result[subject][config.name][peer] = round(ratio, 3)
    return result


def _median(row: dict[str, Entry], server: str) -> float | None:
    entry = row.get(server)
    return None if entry is None else entry.median


def scaling(
    summary: Summary,
    configs: list[Config],
    servers: list[Server],
    cpus: tuple[int, ...],
) -> dict[str, Scaling]:
    """Each multi-process server against its one-process self, per config.

    ``ratios`` holds the round-trip rate over the one-process server's (or
    for memory configurations, bytes per idle connection over its: more is
    worse there); ``per_core`` the same for round trips per second of
    server CPU (what each used, all its processes counted: this tells the
    cost of the extra processes apart from the CPU they were given, or took
    from other work on a shared core); ``placement`` says how many cores
    the workers really had.
    """
    result: dict[str, Scaling] = {}
    for server in servers:
        if server.role != "scaling" or server.scales is None:
            continue
        by_ratio: dict[str, float] = {}
        per_core: dict[str, float] = {}
        for config in configs:
            mine = summary[config.name].get(server.name)
            base = summary[config.name].get(server.scales)
            if not (mine and base and mine.median and base.median):
                continue
            ratio = mine.median / base.median
            by_ratio[config.name] = round(ratio, 3)
            if mine.server_cpu and base.server_cpu:
                ratio *= base.server_cpu / mine.server_cpu
                per_core[config.name] = round(ratio, 3)
        result[server.name] = Scaling(
            of=server.scales,
            workers=server.workers,
            placement=placement(server.workers, cpus),
            ratios=by_ratio,
            per_core=per_core,
        )
    return result


def idle_load(summary: Summary, configs: list[Config]) -> IdleLoads:
    """``idle_load[config][server]``: the load with idle connections held
    against the same load without them, same server, same run.

    ``rps_ratio`` below 1 and ``p99_ratio``/``p50_ratio`` above 1 mean the
    idle connections slowed the active ones.
    """
    result: IdleLoads = {}
    for config in configs:
        if not config.without_idle or config.without_idle not in summary:
            continue
        result[config.name] = {}
        plain_row = summary[config.without_idle]
        for server, loaded in summary[config.name].items():
            plain = plain_row.get(server)
            if plain is None or loaded.median is None or plain.median is None:
                continue
            latency: dict[str, float] = {}
            for key, was, now in (
                ("p50", plain.p50_us, loaded.p50_us),
                ("p99", plain.p99_us, loaded.p99_us),
            ):
                if was and now:
                    latency[f"plain_{key}_us"] = was
                    latency[f"{key}_us"] = now
                    latency[f"{key}_ratio"] = round(now / was, 3)
            result[config.name][server] = IdleLoad(
                idle_conns=loaded.idle_conns,
                idle_open=loaded.idle_open,
                plain_rps=plain.median,
                rps=loaded.median,
                rps_ratio=round(loaded.median / plain.median, 3),
                **latency,
            )
    return result


def check_targets(
    summary: Summary, ratio_table: Ratios, idle_table: IdleLoads
) -> list[TargetCheck]:
    """Every target, for each subject it is for that was measured in what
    it needs."""
    checks = []
    for target in TARGETS:
        for subject in filter(target.applies_to, ratio_table):
            check = check_target(target, subject, summary, ratio_table, idle_table)
            if check is not None:
                checks.append(check)
    return checks


def check_target(
    target: Target,
    subject: str,
    summary: Summary,
    ratio_table: Ratios,
    idle_table: IdleLoads,
) -> TargetCheck | None:
    """One target for one subject; None where its figure was not measured."""
    if target.kind == "max-bytes":
        entry = summary.get(target.config, {}).get(subject)
        value = None if entry is None else entry.median
        if value is None:
            return None
        met, shown = value <= target.bound, f"{value / 1024:.1f} KiB"
    elif target.kind == "max-p99-growth":
        idle = idle_table.get(target.config, {}).get(subject)
        value = None if idle is None else idle.p99_ratio
        if idle is None or value is None:
            return None
        # Latency is kept only beside idle connections that were all held.
        met, shown = value <= target.bound and idle.all_held, f"{value:.2f}x"
        if not idle.all_held:
            shown += f" ({idle.idle_open} of {idle.idle_conns} idle held)"
    else:
        assert target.peer is not None
        value = ratio_table[subject].get(target.config, {}).get(target.peer)
        if value is None:
            return None
        met, shown = value >= target.bound, f"{value:.2f}x"
    return TargetCheck(
        target=target.description, subject=subject, value=value, shown=shown, met=met
    )
