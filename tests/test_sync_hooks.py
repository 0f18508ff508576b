"""A plain ``def`` where trioserve awaits a hook is refused before any request."""

from __future__ import annotations

import functools
import shutil
import tempfile
import textwrap
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import pytest
from support.cli import assert_clean, run_echo

import trioserve
from trioserve._plan import skippable
from trioserve._shielding import shieldable_from_first_wait

# The contract's list of the server hooks that a server awaits.
SERVER_HOOKS = [
    "verify_request",
    "process_request",
    "finish_request",
    "shutdown_request",
    "close_request",
    "handle_error",
    "handle_timeout",
    "service_actions",
    "server_bind",
    "server_activate",
    "server_close",
    "get_request",
    "serve_forever",
    "handle_request",
    "shutdown",
]


def plain(*args: Any, **kwargs: Any) -> None:
    """socketserver's habit: a hook that is not a coroutine function."""


@pytest.mark.parametrize("name", ["setup", "handle", "finish"])
def test_a_handler_with_a_plain_def_hook_is_refused_when_defined(name: str) -> None:
    with pytest.raises(TypeError, match=rf"^Sync\.{name}\(\) must be async def"):
        type("Sync", (trioserve.StreamRequestHandler,), {name: plain})


@pytest.mark.parametrize("name", SERVER_HOOKS)
def test_a_server_with_a_plain_def_hook_is_refused_when_defined(name: str) -> None:
    with pytest.raises(TypeError, match=rf"^SyncServer\.{name}\(\) must be async def"):
        type("SyncServer", (trioserve.TCPServer,), {name: plain})


def test_a_hook_made_plain_after_definition_is_refused_by_the_server() -> None:
    class Late(trioserve.StreamRequestHandler):
        pass

    Late.handle = plain  # type: ignore[method-assign,assignment]
    with pytest.raises(TypeError, match=r"^Late\.handle\(\) must be async def"):
        trioserve.TCPServer(("127.0.0.1", 0), Late)

    class LateServer(trioserve.TCPServer):
        pass

    LateServer.verify_request = plain  # type: ignore[method-assign,assignment]
    with pytest.raises(
        TypeError, match=r"^LateServer\.verify_request\(\) must be async def"
    ):
        LateServer(("127.0.0.1", 0), trioserve.StreamRequestHandler)


P = ParamSpec("P")
T = TypeVar("T")


def _passes_through(
    function: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """A decorator whose wrapper is a plain def that returns the coroutine."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, T]:
        return function(*args, **kwargs)

    return wrapper


def test_async_hooks_count_as_async_however_they_are_decorated() -> None:
    # The library's own servers and handlers, whose hooks are marked by
    # @skippable, @forwarding and @shieldable_from_first_wait, and users'
    # decorated ones.
    for server_class, handler_class in [
        (trioserve.TCPServer, trioserve.StreamRequestHandler),
        (trioserve.UDPServer, trioserve.DatagramRequestHandler),
        (trioserve.UnixStreamServer, trioserve.BaseRequestHandler),
        (trioserve.UnixDatagramServer, trioserve.DatagramRequestHandler),
    ]:
        address: Any = ("127.0.0.1", 0)
        if issubclass(
            server_class, trioserve.UnixStreamServer | trioserve.UnixDatagramServer
        ):
            address = "/nonexistent/socket"
        server_class(address, handler_class)

    class Decorated(trioserve.StreamRequestHandler):
        @_passes_through
        async def handle(self) -> None:
            pass

        @shieldable_from_first_wait
        async def finish(self) -> None:
            pass

    class DecoratedServer(trioserve.TCPServer):
        @skippable
        async def close_request(self, request: Any) -> None:
            pass

        @_passes_through
        async def verify_request(self, request: Any, client_address: Any) -> bool:
            return True

    DecoratedServer(("127.0.0.1", 0), Decorated)


SYNC_HANDLER = """
import trioserve


class Legacy(trioserve.StreamRequestHandler):
    def handle(self):
        self.wfile.write(self.rfile.readline())
"""


def test_the_command_line_refuses_a_plain_def_handler_in_one_line() -> None:
    workdir = Path(tempfile.mkdtemp(dir="/tmp", prefix="tss"))
    try:
        (workdir / "legacy_handlers.py").write_text(textwrap.dedent(SYNC_HANDLER))
        with run_echo(
            "legacy_handlers:Legacy",
            "--tcp",
            "127.0.0.1:0",
            command="serve",
            cwd=str(workdir),
        ) as cli:
            rc, stdout, stderr = cli.finish()
    finally:
        shutil.rmtree(workdir)
    assert rc == 2
    assert stdout == ""
    assert stderr.count("\n") == 1, stderr
    assert stderr.startswith("trioserve: error: ")
    assert "Legacy.handle() must be async def" in stderr
    assert_clean(stderr)
