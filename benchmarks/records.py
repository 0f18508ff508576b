"""The records a run produces, and their JSON form (``latest.json``).

Every figure a run measures or derives is one of these frozen records, so
the code that reads a figure is checked against the code that wrote it. A
field that was not measured is None, and left out of the JSON; reading
JSON ignores keys it does not know and defaults the ones it lacks, so the
``latest.json`` files of earlier rounds in ``results/`` still load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

import attrs

if TYPE_CHECKING:
    from attrs import AttrsInstance

_R = TypeVar("_R", bound="AttrsInstance")

#: One JSON object, as :func:`json.loads` gives it.
JSON = dict[str, Any]


def to_json(record: AttrsInstance) -> JSON:
    """The record as a JSON object, fields that were not measured left out."""
    return attrs.asdict(
        record,
        filter=lambda _field, value: value is not None,
    )


def from_json(cls: type[_R], data: JSON) -> _R:
    """A flat record from its JSON object: unknown keys ignored, missing ones
    defaulted, lists made tuples."""
    known = {f.name for f in attrs.fields(cls)}
    return cls(
        **{
            key: tuple(value) if isinstance(value, list) else value
            for key, value in data.items()
            if key in known
        }
    )


@attrs.frozen(kw_only=True)
class Settings:
    """How long and how often every trial runs, and with what."""

    repeat: int
    warmup: float
    duration: float
    #: Connections held for the memory figure (idle-5000).
    idle_conns: int
    pin: bool
    retry_noisy: int = 0
    #: Idle connections held open during idle-10k+100.
    idle_held: int = 10000
    #: The cores this process may run on (and so pin to); () in runs
    #: recorded before they were noted.
    cpus: tuple[int, ...]


@attrs.frozen(kw_only=True)
class Placement:
    """The cores a server and its load generator are pinned to."""

    server_cpus: tuple[int, ...] | None  # None: not pinned
    loadgen_cpu: int | None
    #: Fewer cores than the server's worker processes plus the load
    #: generator: its figure is then no measure of how it scales.
    shared: bool
    note: str


@attrs.frozen(kw_only=True)
class Machine:
    cpus: int | None
    cpu_model: str
    kernel: str
    python: str
    private_network: bool = False
    cpu_idle: str = "halting allowed"


@attrs.frozen(kw_only=True)
class Trial:
    """One trial: the load generator's report and how the server stopped.

    A failed trial has only ``error``. Round-trip loads have ``rps`` and
    the latencies; the idle-memory load has ``bytes_per_conn``.
    """

    #: Why the trial could not be measured; None when it was.
    error: str | None = None
    mode: str | None = None
    conns: int | None = None
    size: int | None = None
    warmup_s: float | None = None
    duration_s: float | None = None
    round_trips: int | None = None
    rps: float | None = None
    p50_us: float | None = None
    p99_us: float | None = None
    max_us: float | None = None
    errors: int = 0
    connect_errors: int | None = None
    #: UDP: datagrams never answered, and answered after the timeout.
    lost: int | None = None
    late: int | None = None
    timeout_ms: int | None = None
    #: The load generator's share of its core in the measured window.
    cpu_util: float | None = None
    #: Cores the server, and everything else on the machine, kept busy.
    server_cpu: float | None = None
    other_cpu: float | None = None
    #: Idle connections held open beside the load, and still open at its end.
    idle_conns: int | None = None
    idle_open: int | None = None
    idle_setup_s: float | None = None
    # The idle-memory load (mode "idle").
    bytes_per_conn: float | None = None
    rss_before_kib: int | None = None
    rss_after_kib: int | None = None
    setup_s: float | None = None
    still_open: int | None = None
    # How the server ran and stopped.
    server_processes: int | None = None
    server_cpus: tuple[int, ...] | None = None
    loadgen_cpu: int | None = None
    server_stop_s: float | None = None
    server_exit: int | None = None
    server_killed: bool | None = None
    server_leftovers: int | None = None
    #: Runs made to get one with little other work on the machine.
    attempts: int | None = None

    def value(self, metric: str) -> float | None:
        """The figure compared: round trips per second, or bytes per idle
        connection for the memory metric."""
        return self.bytes_per_conn if metric == "memory" else self.rps


@attrs.frozen(kw_only=True)
class Entry:
    """One server's figures in one configuration, over the repeats.

    ``median``, ``min`` and ``max`` are of the configuration's metric; the
    latencies and CPU shares are medians; errors are summed; the idle and
    process counts are the worst run's.
    """

    runs: int
    failed: int
    median: float | None = None
    min: float | None = None
    max: float | None = None
    p50_us: float | None = None
    p99_us: float | None = None
    cpu_util: float | None = None
    server_cpu: float | None = None
    other_cpu: float | None = None
    still_open: float | None = None
    rss_before_kib: float | None = None
    idle_setup_s: float | None = None
    errors: int = 0
    lost: int = 0
    late: int = 0
    connect_errors: int = 0
    idle_conns: int | None = None
    idle_open: int | None = None
    server_processes: int | None = None
    #: The server's exit statuses, its longest stop, and processes of its
    #: own it left running.
    server_exits: tuple[int, ...] | None = None
    server_stop_s: float | None = None
    server_leftovers: int | None = None


@attrs.frozen(kw_only=True)
class Scaling:
    """A multi-process server against its one-process self (``of``).

    ``ratios`` holds its round-trip rate over the one-process server's per
    configuration (for memory, bytes per idle connection over its: more is
    worse there); ``per_core`` the same per second of server CPU.
    """

    of: str
    workers: int
    placement: Placement
    ratios: dict[str, float]
    per_core: dict[str, float]

    @classmethod
    def from_json(cls, data: JSON) -> Scaling:
        return cls(
            of=data["of"],
            workers=data["workers"],
            placement=from_json(Placement, data["placement"]),
            ratios=data["ratios"],
            per_core=data["per_core"],
        )


@attrs.frozen(kw_only=True)
class IdleLoad:
    """A load with idle connections held, against the same load without
    them (``plain_*``): same server, same run."""

    #: Idle connections asked for, and the fewest still open at the end.
    idle_conns: int | None
    idle_open: int | None
    plain_rps: float
    rps: float
    rps_ratio: float
    plain_p50_us: float | None = None
    p50_us: float | None = None
    p50_ratio: float | None = None
    plain_p99_us: float | None = None
    p99_us: float | None = None
    p99_ratio: float | None = None

    @property
    def all_held(self) -> bool:
        """Every idle connection asked for was open through the load."""
        return bool(self.idle_conns) and self.idle_open == self.idle_conns


@attrs.frozen(kw_only=True)
class TargetCheck:
    """One goal of the benchmark issue, for one subject, as measured."""

    target: str
    subject: str
    value: float
    shown: str
    met: bool


#: ``summary[config][server]``.
Summary = dict[str, dict[str, Entry]]
#: ``ratios[subject][config][peer]``: more than 1 means the subject is better.
Ratios = dict[str, dict[str, dict[str, float]]]
#: ``idle_load[config][server]``.
IdleLoads = dict[str, dict[str, IdleLoad]]
#: ``trials[config][server]``: one per repeat.
Trials = dict[str, dict[str, list[Trial]]]


@attrs.frozen(kw_only=True)
class Results:
    """Everything one run measured: what ``latest.json`` holds."""

    date: str
    wall_s: float
    machine: Machine
    settings: Settings
    #: Name and description of every server, in the run's order.
    servers: dict[str, str]
    trioserve_version: str | None
    baseline: str | None
    #: Name and title of every configuration, in the run's order.
    configs: dict[str, str]
    summary: Summary
    ratios: Ratios
    scaling: dict[str, Scaling]
    idle_load: IdleLoads
    targets: list[TargetCheck]
    trials: Trials

    def to_json(self) -> JSON:
        data = to_json(self)
        # Unknown is null here, as it always was.
        data["trioserve_version"] = self.trioserve_version
        data["baseline"] = self.baseline
        return data

    @classmethod
    def from_json(cls, data: JSON) -> Results:
        return cls(
            date=data["date"],
            wall_s=data["wall_s"],
            machine=from_json(Machine, data["machine"]),
            settings=from_json(Settings, {"cpus": (), **data["settings"]}),
            servers=data["servers"],
            trioserve_version=data.get("trioserve_version"),
            baseline=data.get("baseline"),
            configs=data["configs"],
            summary=_nested(Entry, data["summary"]),
            ratios=data["ratios"],
            scaling={
                name: Scaling.from_json(info)
                for name, info in data.get("scaling", {}).items()
            },
            idle_load=_nested(IdleLoad, data.get("idle_load", {})),
            targets=[from_json(TargetCheck, t) for t in data["targets"]],
            trials={
                config: {
                    server: [from_json(Trial, t) for t in reports]
                    for server, reports in row.items()
                }
                for config, row in data["trials"].items()
            },
        )


def _nested(
    cls: type[_R], data: dict[str, dict[str, JSON]]
) -> dict[str, dict[str, _R]]:
    return {
        config: {server: from_json(cls, entry) for server, entry in row.items()}
        for config, row in data.items()
    }
