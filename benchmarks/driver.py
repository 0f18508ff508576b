"""Running trials: a server started pinned, the C load generator driven
against it, and what both reported, as :class:`~benchmarks.records.Trial`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from typing import Any

import attrs

from benchmarks.catalog import Config, Server, servers_for
from benchmarks.machine import (
    BUILD_DIR,
    HOST,
    LOG_DIR,
    PEERS_DIR,
    REPO_DIR,
    BenchError,
    children_cpu_seconds,
    cpu_seconds,
    machine_busy_seconds,
    pinned,
    placement,
    proc_stat,
    process_tree,
    rss_bytes,
)
from benchmarks.records import Settings, Trial, Trials, from_json
from benchmarks.tables import NOISY_OTHER_CPU, format_value

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

# With --retry-noisy, the pause before running a noisy trial again: other
# developers' test runs come in bursts of a few seconds.
NOISY_RETRY_PAUSE_S = 2.0

READY_LINE = re.compile(rb"serving (TCP|UDP) on (\S+):(\d+)")


class ServerProcess:
    """A server under test, started pinned and stopped on exit.

    Its stdout and stderr go to files under ``_build/logs`` (a pipe nobody
    reads could fill and stall it); the ready line is read from the file.
    """

    def __init__(self, server: Server, kind: str, settings: Settings, tag: str) -> None:
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
                preexec_fn=pinned(self.placement.server_cpus),
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
                fields = proc_stat(pid)
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
        fields = proc_stat(pid)
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
        report: dict[str, Any] = json.loads(line)
    except json.JSONDecodeError:
        raise BenchError(f"load generator said {line!r}") from None
    if "error" in report:
        raise BenchError(f"load generator: {report['error']}")
    return report


# ---- one trial ---------------------------------------------------------------


def run_trial(server: Server, config: Config, settings: Settings, tag: str) -> Trial:
    """Start the server, load it, stop it; return the load generator's report.

    Besides the load generator's figures (rps, p50_us, p99_us, errors,
    cpu_util ...), the trial has ``server_cpu`` and ``other_cpu``: the
    cores the server and everything else on the machine kept busy while the
    load generator ran, and how the server stopped.
    """
    with ServerProcess(server, config.kind, settings, tag) as proc:
        if config.metric == "memory":
            trial = measure_idle(proc, config, settings)
        else:
            trial = measure_load(proc, config, settings)
        processes = len(process_tree(proc.process.pid))
    return attrs.evolve(
        trial,
        server_processes=processes,
        server_cpus=proc.placement.server_cpus,
        loadgen_cpu=proc.placement.loadgen_cpu,
        server_stop_s=round(proc.stop_seconds, 3),
        server_exit=proc.process.returncode,
        server_killed=proc.killed or None,
        server_leftovers=proc.leftovers or None,
    )


def measure_load(proc: ServerProcess, config: Config, settings: Settings) -> Trial:
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
            preexec_fn=pinned(proc.placement.loadgen_cpu),
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
    return attrs.evolve(
        from_json(Trial, _parse_report(lines[-1])),
        server_cpu=round(server_cpu / elapsed, 3),
        other_cpu=round(max(other, 0.0) / elapsed, 3),
    )


def measure_idle(proc: ServerProcess, config: Config, settings: Settings) -> Trial:
    """RSS growth of the server per connection held open and idle."""
    time.sleep(IDLE_SETTLE_S)
    before = rss_bytes(proc.process.pid)
    loadgen = subprocess.Popen(
        loadgen_command(config, proc.port, settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=pinned(proc.placement.loadgen_cpu),
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
    conns: int = ready["conns"]
    return Trial(
        mode="idle",
        conns=conns,
        bytes_per_conn=round((after - before) / conns, 1),
        rss_before_kib=before // 1024,
        rss_after_kib=after // 1024,
        setup_s=ready["setup_s"],
        still_open=done["open"],
        errors=ready["errors"] + done["errors"],
    )


# ---- the whole run -----------------------------------------------------------


def run_quietest_trial(
    server: Server, config: Config, settings: Settings, tag: str
) -> Trial:
    """Run a trial, again up to ``settings.retry_noisy`` times while it is noisy.

    Returns the attempt during which other work on the machine took the
    least CPU, with the number of attempts made.
    """
    attempts: list[Trial] = []
    for attempt in range(1 + settings.retry_noisy):
        if attempt:
            time.sleep(NOISY_RETRY_PAUSE_S)
        trial = run_trial(server, config, settings, tag)
        attempts.append(trial)
        if (trial.other_cpu or 0.0) <= NOISY_OTHER_CPU:
            break
    best = min(attempts, key=lambda t: t.other_cpu or 0.0)
    return attrs.evolve(best, attempts=len(attempts))


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


def run_all(servers: list[Server], configs: list[Config], settings: Settings) -> Trials:
    """Every trial, as ``trials[config][server] = [trial, ...]`` (one a repeat)."""
    trials: Trials = {c.name: {} for c in configs}
    steps = schedule(servers, configs)
    total = settings.repeat * len(steps)
    count, started = 0, time.monotonic()
    for rep in range(settings.repeat):
        for config, server in steps:
            count += 1
            tag = f"{config.name}-{server.name}-{rep + 1}"
            try:
                trial = run_quietest_trial(server, config, settings, tag)
                shown = format_value(config, trial.value(config.metric) or 0.0)
                if trial.errors or trial.lost:
                    shown += f" ({trial.errors} errors, {trial.lost or 0} lost)"
            except BenchError as exc:
                trial, shown = Trial(error=str(exc)), f"FAILED: {exc}"
            trials[config.name].setdefault(server.name, []).append(trial)
            elapsed = time.monotonic() - started
            print(
                f"[{count}/{total} {elapsed:4.0f}s] {config.name:<12} "
                f"{server.name:<20} {shown}",
                flush=True,
            )
    return trials
