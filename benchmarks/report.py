"""A run's report: the tables on the terminal, ``latest.json``,
``latest.md`` and the chart ``latest.png``."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.catalog import CONFIGS, Config, Server, server_named
from benchmarks.records import Results
from benchmarks.tables import render


def report(
    results: Results,
    configs: list[Config],
    servers: list[Server],
    output: Path,
    chart: bool,
) -> None:
    """Print the tables and write latest.json, latest.md and latest.png."""
    print()
    print(render(results, configs, servers, markdown=False))
    output.mkdir(parents=True, exist_ok=True)
    (output / "latest.json").write_text(json.dumps(results.to_json(), indent=1) + "\n")
    machine = results.machine
    (output / "latest.md").write_text(
        f"Run of {results.date} on {machine.cpus} cores "
        f"({machine.cpu_model}; idle CPUs {machine.cpu_idle}), "
        f"Python {machine.python}, trioserve {results.trioserve_version}"
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
        f"(the run took {results.wall_s:.0f} s)"
    )


def report_again(path: Path, output: Path, chart: bool) -> None:
    """Tables and chart anew from a saved latest.json (``--from-json``)."""
    results = Results.from_json(json.loads(path.read_text()))
    configs = [c for c in CONFIGS if c.name in results.configs]
    servers = [server_named(name) for name in results.servers]
    report(results, configs, servers, output, chart)


def plot(
    results: Results, configs: list[Config], servers: list[Server], path: Path
) -> bool:
    """Chart each trioserve server's ratio to each peer; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, NullLocator
    except ImportError:
        return False
    ratio_table = results.ratios
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
            xs: list[float] = []
            ys: list[float] = []
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
    fig.suptitle(
        f"trioserve {results.trioserve_version or ''} benchmark, "
        f"{results.date[:16]}, {results.machine.cpus} cores, "
        f"median of {results.settings.repeat} runs",
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
