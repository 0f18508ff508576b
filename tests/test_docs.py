"""The documentation's promises: its reference, its included files, its units.

The docs (``docs/``, built by Sphinx in CI) may show code only if something
runs it: doctests run under ``sphinx-build -b doctest``, and every included
file is run here or by ``test_examples.py``. These tests check that rule and
the files only the docs use: the API reference names every public name, every
``literalinclude`` exists and is exercised, the handler tests shown in
"Testing your handlers" pass, and the systemd units in ``examples/deploy``
start a service that serves and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from support.cli import (
    IO_TIMEOUT,
    PROMPT_EXIT,
    EchoCLI,
    assert_clean,
    running,
    tcp_echo,
    udp_echo,
)
from support.examples import EXAMPLES, REPO
from support.servers import free_port
from support.systemd import FakeSystemd

import trioserve
import trioserve.testing
from trioserve._server import REQUEST_CLOSE_TIMEOUT

DOCS = REPO / "docs"
DEPLOY = EXAMPLES / "deploy"
SERVICE_UNIT = DEPLOY / "trioserve-echo.service"
ACTIVATED_SOCKET_UNIT = DEPLOY / "socket-activation" / "trioserve-echo.socket"
ACTIVATED_SERVICE_UNIT = DEPLOY / "socket-activation" / "trioserve-echo.service"

INCLUDE = re.compile(r"^\s*\.\. (literalinclude|figure|image):: (\S+)", re.MULTILINE)
AUTODOC = re.compile(
    r"^\.\. auto(?:class|function|exception|data):: (\w+)", re.MULTILINE
)


def doc_pages() -> list[Path]:
    pages = sorted(DOCS.glob("**/*.rst"))
    assert pages, "no documentation pages found"
    return [page for page in pages if "_build" not in page.parts]


def included_files() -> list[tuple[Path, str, Path]]:
    """Every ``(page, directive, file)`` a page includes or shows."""
    return [
        (page, match[1], (page.parent / match[2]).resolve())
        for page in doc_pages()
        for match in INCLUDE.finditer(page.read_text(encoding="utf-8"))
    ]


# -- the documentation's own consistency --------------------------------------


@pytest.mark.parametrize("module", [trioserve, trioserve.testing])
def test_api_reference_documents_every_public_name(module: ModuleType) -> None:
    # Each module's entries follow its ".. module::" line.
    reference = (DOCS / "reference.rst").read_text(encoding="utf-8")
    sections = re.split(r"^\.\. module:: (\S+)$", reference, flags=re.MULTILINE)
    [text] = [
        text
        for name, text in zip(sections[1::2], sections[2::2], strict=True)
        if name == module.__name__
    ]
    documented = AUTODOC.findall(text)
    missing = set(module.__all__) - set(documented)
    assert not missing, f"add these to docs/reference.rst: {sorted(missing)}"
    unknown = set(documented) - set(module.__all__)
    assert not unknown, f"not in {module.__name__}.__all__: {sorted(unknown)}"
    assert len(documented) == len(set(documented)), "a name is documented twice"


def test_every_included_file_exists() -> None:
    includes = included_files()
    assert includes, "the docs include no files at all?"
    missing = [
        f"{page.name}: {directive} {path}"
        for page, directive, path in includes
        if not path.is_file()
    ]
    assert not missing, missing


def test_every_included_example_is_run_by_a_test() -> None:
    # The docs' rule: a code block is a doctest, or a file that a test runs.
    runners = {
        EXAMPLES / "testing": "test_handler_tests_in_the_docs_pass",
        DEPLOY: "test_service_unit_serves_and_stops_on_sigterm",
        DEPLOY
        / "socket-activation": "test_socket_activated_units_serve_across_restart",
    }
    examples_tests = (REPO / "tests" / "test_examples.py").read_text(encoding="utf-8")
    # examples/production, and the HAProxy configuration they run behind.
    production = REPO / "tests" / "test_examples_production.py"
    production_tests = production.read_text(encoding="utf-8")
    this_file = Path(__file__).read_text(encoding="utf-8")
    for page, _, path in included_files():
        if path.suffix == ".svg":
            continue
        assert path.is_relative_to(EXAMPLES), f"{page.name} includes {path}"
        if path.parent == EXAMPLES:
            assert f'"{path.stem}"' in examples_tests, (
                f"{page.name} includes {path.name}, which test_examples.py never runs"
            )
        elif path.parent == EXAMPLES / "production" or path == DEPLOY / "haproxy.cfg":
            name = path.stem if path.suffix == ".py" else path.name
            assert f'"{name}"' in production_tests, (
                f"{page.name} includes {path.name}, which {production.name} never runs"
            )
        elif path == DEPLOY / "haproxy-scale-out.cfg":
            # Run by test_scale_out.py, in front of two instances.
            scale_out = REPO / "tests" / "test_scale_out.py"
            assert f'"{path.name}"' in scale_out.read_text(encoding="utf-8"), (
                f"{page.name} includes {path.name}, which {scale_out.name} never runs"
            )
        else:
            runner = runners.get(path.parent)
            assert runner is not None, f"{page.name}: no test runs {path}"
            assert f"def {runner}(" in this_file


def test_code_is_shown_only_by_tested_directives() -> None:
    # A literal block (a paragraph ending in "::", or a code-block directive)
    # would show code that nothing runs. A "text" block is a diagram, not
    # code.
    code_directive = re.compile(
        r"^\s*\.\. (code-block|code|sourcecode|parsed-literal)::(?! text$)"
    )
    any_directive = re.compile(r"^\s*\.\. [\w:-]+::")
    offenders = [
        f"{page.name}:{number}: {line.strip()}"
        for page in doc_pages()
        for number, line in enumerate(
            page.read_text(encoding="utf-8").splitlines(), start=1
        )
        if code_directive.match(line)
        or (line.rstrip().endswith("::") and not any_directive.match(line))
    ]
    assert not offenders, offenders


# -- "Testing your handlers" --------------------------------------------------


def test_handler_tests_in_the_docs_pass() -> None:
    # The page shows examples/testing/test_upper.py: run it as a reader would.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            EXAMPLES / "testing",
        ],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 passed" in result.stdout, result.stdout


def test_serve_command_in_the_docs_serves_the_handler() -> None:
    # "Deploying" shows `python -m trioserve serve upper:Upper` run from
    # examples/testing; the same command, on a free port.
    argv = [sys.executable, "-W", "error::ResourceWarning", "-m", "trioserve"]
    argv += ["serve", "upper:Upper", "--tcp", "127.0.0.1:0"]
    with run_command(argv, cwd=EXAMPLES / "testing") as service:
        [(kind, host, port)] = service.listeners(1)
        assert kind == "TCP"
        with socket.create_connection((host, port), timeout=IO_TIMEOUT) as client:
            client.sendall(b"shout\n")
            assert client.recv(100) == b"SHOUT\n"
        rc, _, stderr = service.stop(signal.SIGTERM)
    assert rc == 0, stderr
    assert_clean(stderr)


# -- "Deploying": the systemd units -------------------------------------------


def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit file as ``{section: [(key, value), ...]}``, in file order.

    Follows systemd's syntax as far as our units use it: ``#`` and ``;``
    comments, ``[Section]`` headers, ``Key=Value`` lines, and a backslash at
    the end of a line continuing it on the next.
    """
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: cannot parse {raw!r}"
        assert current is not None, f"{path.name}: {raw!r} is outside any section"
        current.append((key.strip(), value.strip()))
    return sections


def unit_value(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    values = [value for name, value in unit.get(section, []) if name == key]
    assert len(values) == 1, f"[{section}] {key}= should be set once: {values}"
    return values[0]


def seconds(value: str) -> float:
    """A systemd time span such as ``20``, ``20s`` or ``1min 30s``, in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def service_command(
    unit: dict[str, list[tuple[str, str]]],
) -> tuple[list[str], list[str]]:
    """The service's ExecStart as ``(python-argv, trioserve-arguments)``."""
    argv = shlex.split(unit_value(unit, "Service", "ExecStart"))
    assert Path(argv[0]).is_absolute(), "systemd wants an absolute path"
    assert Path(argv[0]).name.startswith("python"), argv
    assert argv[1:3] == ["-m", "trioserve"], argv
    return argv[:3], argv[3:]


def option(arguments: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` in ``arguments``, or None."""
    return arguments[arguments.index(name) + 1] if name in arguments else None


def check_stop_timing(unit: dict[str, list[tuple[str, str]]]) -> None:
    """systemd must not SIGKILL a graceful shutdown that is still within bounds."""
    _, arguments = service_command(unit)
    grace_option = option(arguments, "--shutdown-timeout")
    grace = trioserve.BaseServer.shutdown_timeout
    if grace_option is not None:
        grace = float(grace_option)
    finish = trioserve.BaseRequestHandler.finish_timeout or 0.0
    longest_shutdown = grace + finish + REQUEST_CLOSE_TIMEOUT
    assert seconds(unit_value(unit, "Service", "TimeoutStopSec")) > longest_shutdown
    # Only the main process gets SIGTERM, so trioserve alone decides the pace.
    assert unit_value(unit, "Service", "KillMode") == "mixed"
    kill_signal = [value for key, value in unit["Service"] if key == "KillSignal"]
    assert kill_signal in ([], ["SIGTERM"])


def run_command(
    argv: list[str], **popen: Any
) -> contextlib.AbstractContextManager[EchoCLI]:
    """Run a trioserve service; kill it if a test leaves it running."""
    return running(EchoCLI, argv, **popen)


def assert_json_logs(stderr: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "nothing was logged"
    records = [json.loads(line) for line in lines]
    assert any("shutting down" in record["message"] for record in records), records


def test_service_unit_serves_and_stops_on_sigterm(short_tmp: Path) -> None:
    unit = read_unit(SERVICE_UNIT)
    check_stop_timing(unit)
    # Type=notify: play systemd's part, with the unit's watchdog.
    assert unit_value(unit, "Service", "Type") == "notify"
    watchdog = seconds(unit_value(unit, "Service", "WatchdogSec"))
    systemd = FakeSystemd(str(short_tmp / "notify"))
    env = systemd.environment(WATCHDOG_USEC=str(int(watchdog * 1_000_000)))
    python, arguments = service_command(unit)
    assert arguments[0] == "echo"
    # The unit's own command line, on free loopback ports, with this Python.
    local = list(arguments)
    for index, value in enumerate(arguments[1:], start=1):
        if arguments[index - 1] in ("--tcp", "--udp"):
            assert re.fullmatch(r"[\d.]+:\d+", value), value
            local[index] = "127.0.0.1:0"
    argv = [sys.executable, "-W", "error::ResourceWarning", *python[1:], *local]
    with contextlib.closing(systemd), run_command(argv, env=env) as service:
        listeners = {kind: (host, port) for kind, host, port in service.listeners(2)}
        assert set(listeners) == {"TCP", "UDP"}
        ready, pid = systemd.receive_blocking()
        assert ready["READY"] == "1"
        assert pid == service.proc.pid
        tcp_echo(*listeners["TCP"], b"from the unit's command line\n")
        udp_echo(*listeners["UDP"], b"a datagram")
        with socket.create_connection(listeners["TCP"], timeout=IO_TIMEOUT) as idle:
            # What systemctl stop does: SIGTERM to the main process.
            rc, _, stderr = service.stop(signal.SIGTERM, timeout=PROMPT_EXIT)
            assert idle.recv(100) == b"", "an idle client was not let go"
        assert systemd.receive_blocking()[0]["STOPPING"] == "1"
    assert rc == 0, stderr
    assert_clean(stderr)
    if option(arguments, "--log-format") == "json":
        assert_json_logs(stderr)


# systemd's part in socket activation: the sockets at fd 3, 4, ... and
# LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES set for the service's own pid.
# The launcher moves the inherited sockets out of the way first, so that
# placing one at fd 3 cannot overwrite another, then execs the service.
ACTIVATION_LAUNCHER = """
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index)
    os.close(fd)
os.environ.update(
    LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=sys.argv[2]
)
os.execv(sys.argv[3], sys.argv[3:])
"""


@contextlib.contextmanager
def activation_sockets(
    socket_unit: dict[str, list[tuple[str, str]]],
) -> Iterator[list[socket.socket]]:
    """The sockets the .socket unit asks for, on free loopback ports."""
    kinds = {"ListenStream": socket.SOCK_STREAM, "ListenDatagram": socket.SOCK_DGRAM}
    with contextlib.ExitStack() as stack:
        sockets = []
        for key, value in socket_unit["Socket"]:
            if key not in kinds:
                continue
            assert re.fullmatch(r"([\d.]+:)?\d+", value), value
            sock = stack.enter_context(socket.socket(socket.AF_INET, kinds[key]))
            sock.bind(("127.0.0.1", 0))
            if kinds[key] == socket.SOCK_STREAM:
                sock.listen()  # systemd listens before any service runs
            sockets.append(sock)
        assert sockets, "the socket unit listens on nothing"
        yield sockets


def test_socket_activated_units_serve_across_restart() -> None:
    socket_unit = read_unit(ACTIVATED_SOCKET_UNIT)
    service_unit = read_unit(ACTIVATED_SERVICE_UNIT)
    assert unit_value(socket_unit, "Socket", "Accept") == "no"
    assert unit_value(service_unit, "Unit", "Requires") == ACTIVATED_SOCKET_UNIT.name
    check_stop_timing(service_unit)
    python, arguments = service_command(service_unit)
    listener_options = {"--tcp", "--udp", "--unix", "--unix-dgram", "--fd"}
    assert not listener_options & set(arguments), "those would replace systemd's"
    name = unit_value(socket_unit, "Socket", "FileDescriptorName")

    with activation_sockets(socket_unit) as sockets:
        stream = next(s for s in sockets if s.type == socket.SOCK_STREAM)
        datagram = next(s for s in sockets if s.type == socket.SOCK_DGRAM)
        fds = [sock.fileno() for sock in sockets]
        argv = [sys.executable, "-c", ACTIVATION_LAUNCHER, ",".join(map(str, fds))]
        argv += [":".join([name] * len(fds)), sys.executable]
        argv += ["-W", "error::ResourceWarning", *python[1:], *arguments]

        def start() -> contextlib.AbstractContextManager[EchoCLI]:
            return run_command(argv, pass_fds=fds)

        with start() as service:
            kinds = sorted(kind for kind, _, _ in service.listeners(len(sockets)))
            assert kinds == ["TCP", "UDP"]
            tcp_echo(
                stream.getsockname()[0], stream.getsockname()[1], b"socket activated\n"
            )
            udp_echo(
                datagram.getsockname()[0],
                datagram.getsockname()[1],
                b"socket activated",
            )
            rc, _, stderr = service.stop(signal.SIGTERM, timeout=PROMPT_EXIT)
        assert rc == 0, stderr
        assert_clean(stderr)

        # While the service is down, systemd still holds the sockets: a client
        # that connects now waits in the backlog, and the next start serves it.
        with socket.create_connection(
            stream.getsockname(), timeout=IO_TIMEOUT
        ) as early:
            early.sendall(b"sent while the service was down\n")
            with start() as service:
                service.listeners(len(sockets))
                assert early.recv(100) == b"sent while the service was down\n"
                rc, _, stderr = service.stop(signal.SIGTERM, timeout=PROMPT_EXIT)
        assert rc == 0, stderr
        assert_clean(stderr)
        if option(arguments, "--log-format") == "json":
            assert_json_logs(stderr)


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)
@pytest.mark.parametrize(
    "units",
    [[SERVICE_UNIT], [ACTIVATED_SOCKET_UNIT, ACTIVATED_SERVICE_UNIT]],
    ids=["service", "socket-activation"],
)
def test_units_pass_systemd_analyze_verify(units: list[Path], tmp_path: Path) -> None:
    # verify wants ExecStart's program to exist: point it at this Python.
    for unit in units:
        text = unit.read_text(encoding="utf-8")
        text = re.sub(r"^(ExecStart=)\S+", rf"\g<1>{sys.executable}", text, flags=re.M)
        (tmp_path / unit.name).write_text(text, encoding="utf-8")
    result = subprocess.run(
        ["systemd-analyze", "verify", *(unit.name for unit in units)],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # verify exits 0 even for unknown keys; it reports them with the path.
    complaints = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if any(unit.name in line for unit in units)
    ]
    assert result.returncode == 0, result.stdout + result.stderr
    assert not complaints, complaints


# -- README.md ----------------------------------------------------------------


def connect_when_serving(port: int, timeout: float = IO_TIMEOUT) -> socket.socket:
    """A connection to 127.0.0.1:port, retried until the server listens."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # another process: nothing to wait on but time


def test_readme_first_example_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    # The first thing a user pastes: run it, talk to it, press Ctrl-C.
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    code = re.search(r"^```python\n(.*?)^```", readme, re.DOTALL | re.MULTILINE)
    assert code, "README.md has no python code block"
    assert '("127.0.0.1", 9000)' in code[1]
    port = free_port()
    script = tmp_path / "first.py"
    script.write_text(code[1].replace('("127.0.0.1", 9000)', f'("127.0.0.1", {port})'))
    argv = [sys.executable, "-W", "error::ResourceWarning", str(script)]
    with running(EchoCLI, argv) as example:
        with connect_when_serving(port) as client:
            client.sendall(b"pasted\n")
            assert client.recv(100) == b"pasted\n"
        started = time.monotonic()
        rc, _, stderr = example.stop(signal.SIGINT)
        elapsed = time.monotonic() - started
    assert elapsed < PROMPT_EXIT, elapsed
    assert rc == 0, stderr
    assert "ExceptionGroup" not in stderr, stderr
    assert_clean(stderr)
    assert stderr.splitlines() == [
        "SIGINT: shutting down; 0 requests in flight and 0 idle connections, "
        "with up to 5.0 s to finish"
    ], stderr


def test_install_instructions_work_without_pypi() -> None:
    # trioserve is not published: "pip install trioserve" would fail (or,
    # worse, install someone else's package). The docs say how to install
    # from a checkout or a built wheel instead.
    from_pypi = re.compile(r"pip install trioserve(?![\w.*-])")
    pages = [*doc_pages(), REPO / "README.md"]
    offenders = [
        page.name for page in pages if from_pypi.search(page.read_text("utf-8"))
    ]
    assert not offenders, offenders
    index = " ".join((DOCS / "index.rst").read_text(encoding="utf-8").split())
    for way in ("pip install -e .", "pip install /path/to/trioserve", ".whl"):
        assert way in index, way


def test_docs_state_the_command_lines_timeouts_and_how_timeouts_are_logged() -> None:
    from trioserve._cli import DEFAULT_IDLE_TIMEOUT, DEFAULT_TIMEOUT

    for name in ("production.rst", "timeouts.rst", "deploying.rst"):
        text = " ".join((DOCS / name).read_text(encoding="utf-8").split())
        assert f"--idle-timeout {DEFAULT_IDLE_TIMEOUT:g}" in text, name
        assert f"--timeout {DEFAULT_TIMEOUT:g}" in text, name
    # handle_error logs a TimeoutError in one INFO line (its docstring, and
    # test_server.py, say so); the page on deadlines must agree.
    production = " ".join((DOCS / "production.rst").read_text("utf-8").split())
    said = production.partition("A :exc:`TimeoutError` that escapes the handler")[2]
    said = said[:300]  # the sentence that follows
    assert "in one line without a traceback, at INFO level" in said, said


# The script a page runs in a headless browser: every code block and table
# that reaches past the right edge of the text column, as "TAG WIDTH".
MEASURE_OVERFLOW = """
<script>
const column = document.querySelector("div.body").getBoundingClientRect();
const wide = [...document.querySelectorAll("div.body pre, div.body table")]
  .filter(e => e.getBoundingClientRect().right > column.right + 1)
  .map(e => e.tagName + " " + Math.round(e.getBoundingClientRect().width));
document.body.setAttribute("data-overflow", JSON.stringify(wide));
</script>
"""


def test_code_and_tables_stay_inside_the_text_column(tmp_path: Path) -> None:
    # At 1200 px wide a long code line must scroll inside the column, and a
    # table with long literals must wrap them, not run past the column.
    pytest.importorskip("sphinx")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("needs chromium")
    html = tmp_path / "html"
    build = subprocess.run(
        [sys.executable, "-m", "sphinx", "-q", "-W", "-b", "html", DOCS, html],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stderr
    for page in ("tutorial", "timeouts", "socketserver", "deploying"):
        measured = tmp_path / f"{page}.html"
        text = (html / f"{page}.html").read_text(encoding="utf-8")
        measured.write_text(text.replace("</body>", MEASURE_OVERFLOW + "</body>"))
        (tmp_path / "_static").mkdir(exist_ok=True)
        shutil.copytree(html / "_static", tmp_path / "_static", dirs_exist_ok=True)
        dom = subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={tmp_path / 'profile'}",
                "--window-size=1200,900",
                "--dump-dom",
                measured.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        found = re.search(r'data-overflow="([^"]*)"', dom)
        assert found, f"{page}: the measuring script did not run"
        assert json.loads(found[1].replace("&quot;", '"')) == [], page
