"""The tables of one run, as plain text for the terminal or as Markdown."""

from __future__ import annotations

from benchmarks.catalog import Config, Server
from benchmarks.records import Entry, Results

# Trials whose other work on the machine (CPU time used by neither the
# server nor the load generator) averaged more than this many cores are
# flagged as noisy in the output.
NOISY_OTHER_CPU = 0.25


def format_value(config: Config, value: float) -> str:
    if config.metric == "memory":
        return f"{value / 1024:.1f} KiB"
    return f"{value / 1000:.1f}k" if value >= 1000 else f"{value:.0f}"


def _cell(config: Config, entry: Entry | None) -> str:
    if entry is None:
        return "-"
    if entry.median is None or entry.min is None or entry.max is None:
        return "failed"
    low, high = entry.min, entry.max
    if config.metric == "memory":
        spread = f"{low / 1024:.1f}-{high / 1024:.1f}"
    else:
        spread = f"{low / 1000:.0f}-{high / 1000:.0f}"
    text = f"{format_value(config, entry.median)} ({spread})"
    if entry.errors or entry.lost or entry.failed or entry.server_leftovers:
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
    results: Results, configs: list[Config], servers: list[Server], markdown: bool
) -> str:
    """The tables of one run, as plain text or as Markdown."""
    summary, ratio_table = results.summary, results.ratios
    names = [s.name for s in servers]
    out = []

    out.append(
        "Round trips per second (idle: KiB per connection), "
        "median (min-max in thousands or KiB) of "
        f"{results.settings.repeat} runs; ! = errors or lost requests"
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
            entry = summary[c.name].get(n)
            row.append(
                f"{entry.p50_us:.0f} / {entry.p99_us:.0f}"
                if entry and entry.p50_us is not None and entry.p99_us is not None
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
    out += _render_targets(results, markdown)
    out += _render_headroom(results, configs, markdown)
    return "\n".join(out)


def _render_targets(results: Results, markdown: bool) -> list[str]:
    if not results.targets:
        return []
    subjects = list(results.ratios)
    cells: dict[str, dict[str, str]] = {}
    for t in results.targets:
        verdict = "met" if t.met else "MISSED"
        cells.setdefault(t.target, {})[t.subject] = f"{t.shown} {verdict}"
    rows = [
        [target] + [by_subject.get(subject, "-") for subject in subjects]
        for target, by_subject in cells.items()
    ]
    return [
        "\nTargets from the benchmark issue (measured; MISSED or met)",
        _table(["target", *subjects], rows, markdown),
    ]


def _render_headroom(
    results: Results, configs: list[Config], markdown: bool
) -> list[str]:
    """Is the load generator the bottleneck? The C echo server against the
    best Python server, and the CPU each side and the rest of the machine
    took."""
    rows = []
    for c in configs:
        if c.metric != "rps":
            continue
        row = results.summary[c.name]
        python = {n: e.median for n, e in row.items() if n != "c-echo" and e.median}
        best = max(python, key=lambda n: python[n], default=None)
        ref = row.get("c-echo")
        ref_median = ref.median if ref else None
        lg = max(
            (row[n].cpu_util or 0.0 for n in python),
            default=0.0,
        )
        other = max((e.other_cpu or 0.0 for e in row.values()), default=0.0)
        rows.append(
            [
                c.name,
                format_value(c, ref_median) if ref_median else "-",
                f"{ref.cpu_util or 0:.2f}" if ref and ref_median else "-",
                f"{best} {format_value(c, python[best])}" if best else "-",
                f"{ref_median / python[best]:.1f}x" if best and ref_median else "-",
                f"{lg:.2f}",
                f"{other:.2f}" + (" (noisy)" if other > NOISY_OTHER_CPU else ""),
            ]
        )
    header = [
        "config", "c-echo", "its loadgen CPU", "best Python", "c-echo / best",
        "max loadgen CPU (Python)", "max other CPU",
    ]  # fmt: skip
    return [
        "\nIs the load generator the bottleneck? (its CPU: share of its core "
        "in the measured window; other CPU: cores busy with neither server nor "
        "load generator, i.e. noise)",
        _table(header, rows, markdown),
    ]


def _stop_summary(entry: Entry) -> str:
    """How a server stopped over its trials: exit statuses, longest stop."""
    if not entry.server_exits:
        return "-"
    text = f"exit {', '.join(str(code) for code in entry.server_exits)}, "
    text += f"<= {entry.server_stop_s or 0.0:.1f} s"
    if entry.server_leftovers:
        text += f", {entry.server_leftovers} processes left running (killed)"
    return text


def _render_scaling(
    results: Results, configs: list[Config], markdown: bool
) -> list[str]:
    """The workers table: each multi-process server over its one-process self."""
    out = []
    summary = results.summary
    for name, info in results.scaling.items():
        base, where = info.of, info.placement
        out.append(
            f"\n{name} ({info.workers} worker processes) vs {base}: 'scaling' is "
            f"{name}'s figure over {base}'s. Cores: {where.note}"
            + (
                f"; {name} had the one core {base} had"
                if where.shared and where.server_cpus
                else ""
            )
        )
        rows = []
        for c in configs:
            mine = summary[c.name].get(name)
            theirs = summary[c.name].get(base)
            if not (mine and mine.median) and not (theirs and theirs.median):
                continue
            ratio = info.ratios.get(c.name)
            if ratio is None:
                shown = "-"
            elif c.metric == "memory":
                shown = f"{ratio:.2f}x memory"
            else:
                shown = f"{ratio:.2f}x"
            rss = cpu = "-"
            if mine and theirs:
                if mine.rss_before_kib and theirs.rss_before_kib:
                    rss = (
                        f"{theirs.rss_before_kib / 1024:.0f} / "
                        f"{mine.rss_before_kib / 1024:.0f} MiB"
                    )
                if mine.server_cpu is not None and theirs.server_cpu is not None:
                    cpu = f"{theirs.server_cpu:.2f} / {mine.server_cpu:.2f}"
            per_core = info.per_core.get(c.name)
            rows.append(
                [
                    c.name,
                    _cell(c, theirs),
                    _cell(c, mine),
                    shown,
                    cpu,
                    "-" if per_core is None else f"{per_core:.2f}x",
                    rss,
                    _stop_summary(mine) if mine else "-",
                ]
            )
        header = [
            "config", base, name, "scaling", "server CPU, cores (1 / N)",
            "scaling per CPU", "RSS at start (1 / N)", f"{name} stop (SIGTERM)",
        ]  # fmt: skip
        out.append(_table(header, rows, markdown))
    return out


def _render_idle_load(
    results: Results, configs: list[Config], markdown: bool
) -> list[str]:
    """The active load with idle connections held against it without them."""
    out = []
    held = results.settings.idle_held
    for config in configs:
        table = results.idle_load.get(config.name)
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
            if e.p99_ratio is not None:
                lat = (
                    f"{e.plain_p50_us or 0:.0f} / {e.plain_p99_us or 0:.0f} -> "
                    f"{e.p50_us or 0:.0f} / {e.p99_us or 0:.0f}"
                )
            rows.append(
                [
                    server,
                    f"{e.plain_rps / 1000:.1f}k -> {e.rps / 1000:.1f}k",
                    f"{e.rps_ratio:.2f}x",
                    lat,
                    "-" if e.p99_ratio is None else f"{e.p99_ratio:.2f}x",
                    f"{_or_dash(e.idle_open)} of {_or_dash(e.idle_conns)}",
                ]
            )
        header = [
            "server", "rps (without -> with idle)", "rps ratio",
            "p50 / p99 us (without -> with)", "p99 ratio", "idle still open",
        ]  # fmt: skip
        out.append(_table(header, rows, markdown))
    return out


def _or_dash(count: int | None) -> str:
    return "-" if count is None else str(count)
