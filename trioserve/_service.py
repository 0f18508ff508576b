"""A service as plain data, and the servers that serve it.

The command line turns its arguments into a :class:`Service`: frozen data
with nothing open and nothing imported, which pickles. :func:`make_servers`
makes the servers one describes: it imports the handler, loads the TLS files
and builds a server for each kind of listener. The supervisor of
``--workers`` and each worker process make their servers from the same
description, so they cannot differ.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import ssl
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NoReturn

import attrs
import trio

from ._echo import EchoDatagramHandler, EchoStreamHandler
from ._handlers import (
    BaseRequestHandler,
    DatagramRequestHandler,
    StreamRequestHandler,
    SyncHookError,
)
from ._server import BaseServer
from ._socket_servers import TCPServer, UDPServer

# The listener options of each kind. Stream listeners take stream handlers,
# datagram listeners datagram handlers; each kind makes one server, so its
# listeners share one concurrency bound, one shutdown and one set of counters.
STREAM_LISTENERS = ("tcp", "unix")
DATAGRAM_LISTENERS = ("udp", "unix_dgram")

ProxyProtocol = Literal["off", "v1", "v2", "auto"]

LOGGER = logging.getLogger("trioserve")


class UsageError(Exception):
    """A mistake in what the service asks for: one line, exit status 2."""


class HandlerImportError(Exception):
    """The handler's module raised while it was imported: the user's bug."""

    def __init__(self, module_name: str, error: BaseException) -> None:
        super().__init__(module_name, error)
        self.module_name = module_name
        self.error = error


@attrs.frozen(kw_only=True)
class Service:
    """What to serve, and how: everything the command line's options say.

    Listener addresses are as given (``("", port)`` is every interface);
    ``sockets`` are inherited file descriptors, each with where it came from
    (``--fd 5``, or a socket from systemd) for error messages.
    """

    #: ``package.module:ClassName``, or None for the built-in echo.
    handler: str | None
    tcp: tuple[tuple[str, int], ...] = ()
    udp: tuple[tuple[str, int], ...] = ()
    unix: tuple[str, ...] = ()
    unix_dgram: tuple[str, ...] = ()
    sockets: tuple[tuple[str, int], ...] = ()
    #: Where to listen when nothing else is given: over TCP for a stream
    #: handler, UDP for a datagram handler, both for the echo.
    default_address: tuple[str, int] | None = None
    #: Keyword options for every server's constructor.
    server_options: Mapping[str, Any] = attrs.field(factory=dict, hash=False)
    proxy_protocol: ProxyProtocol = "off"
    trusted_proxies: tuple[str, ...] = ()
    handshake_timeout: float | None = None
    tcp_keepalive: tuple[int, int, int] | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    #: A stream handler's ``timeout``; unless ``timeout_given``, a handler
    #: class with a timeout of its own keeps it.
    timeout: float | None = None
    timeout_given: bool = False
    #: Where to serve Prometheus metrics (by the main process), if anywhere.
    metrics: tuple[str, int] | None = None

    def __attrs_post_init__(self) -> None:
        if self.proxy_protocol != "off" and not self.trusted_proxies:
            raise UsageError("--proxy-protocol needs --trusted-proxy")
        if self.tls_key is not None and self.tls_cert is None:
            raise UsageError("--tls-key needs --tls-cert")


def make_servers(service: Service) -> list[BaseServer]:
    """The servers ``service`` describes, made but not yet bound.

    Raises:
      UsageError: The handler or a TLS file cannot be used, or a listener
        needs a handler of the other kind.
      HandlerImportError: The handler's module raised while it was imported.
    """
    if service.handler is None:
        stream: type[BaseRequestHandler] | None = EchoStreamHandler
        datagram: type[BaseRequestHandler] | None = EchoDatagramHandler
        default_kinds: tuple[str, ...] = ("tcp", "udp")
    else:
        handler = load_handler(service.handler)
        is_datagram = issubclass(handler, DatagramRequestHandler)
        stream = None if is_datagram else handler
        datagram = None if issubclass(handler, StreamRequestHandler) else handler
        default_kinds = ("udp",) if is_datagram else ("tcp",)
    if stream is not None and issubclass(stream, StreamRequestHandler):
        stream = _with_timeout(stream, service)
    listeners: dict[str, tuple[Any, ...]] = {
        name: getattr(service, name) for name in STREAM_LISTENERS + DATAGRAM_LISTENERS
    }
    if service.default_address is not None:
        listeners.update((name, (service.default_address,)) for name in default_kinds)
    servers: list[BaseServer] = []
    for names, handler_class, is_stream in (
        (STREAM_LISTENERS, stream, True),
        (DATAGRAM_LISTENERS, datagram, False),
    ):
        addresses = [address for name in names for address in listeners[name]]
        if not addresses:
            continue
        given = next(name for name in names if listeners[name])
        flag = "--" + given.replace("_", "-")
        handler_class = _needed(handler_class, flag, stream=is_stream)
        server_class = TCPServer if is_stream else UDPServer
        first, *extra = addresses
        options = _options(service, server_class)
        servers.append(
            server_class(first, handler_class, extra_addresses=extra, **options)
        )
    for source, fd in service.sockets:
        sock = socket.socket(fileno=fd)
        stream_socket = sock.type == socket.SOCK_STREAM
        server_class = TCPServer if stream_socket else UDPServer
        try:
            handler_class = _needed(
                stream if stream_socket else datagram, source, stream=stream_socket
            )
        except UsageError:
            sock.close()
            raise
        options = _options(service, server_class)
        servers.append(server_class.from_socket(sock, handler_class, **options))
    return servers


def _needed(
    handler: type[BaseRequestHandler] | None, source: str, *, stream: bool
) -> type[BaseRequestHandler]:
    """The handler for a listener from ``source``: there must be one."""
    if handler is None:
        needed = "StreamRequestHandler" if stream else "DatagramRequestHandler"
        raise UsageError(f"{source} needs a {needed}; the handler is not one")
    return handler


def _with_timeout(
    handler: type[StreamRequestHandler], service: Service
) -> type[StreamRequestHandler]:
    """``handler``, or a subclass of it with the timeout ``service`` asks for."""
    own = handler.timeout
    timeout = service.timeout
    if not service.timeout_given and own is not None:
        timeout = own
    if timeout == own:
        return handler
    return type(handler.__name__, (handler,), {"timeout": timeout})


def _options(service: Service, server_class: type[TCPServer]) -> dict[str, Any]:
    """The keyword options for one of ``service``'s servers."""
    options = dict(service.server_options)
    stream = server_class is TCPServer
    if service.proxy_protocol != "off":
        if service.proxy_protocol == "v1" and not stream:
            raise UsageError(
                "--proxy-protocol v1 cannot serve datagram listeners (PROXY "
                "version 1 is text for TCP only): use v2 or auto, or give only "
                "stream listeners"
            )
        options["proxy_protocol"] = service.proxy_protocol
        options["trusted_proxies"] = list(service.trusted_proxies)
    if not stream:
        return options
    if service.handshake_timeout is not None:
        options["handshake_timeout"] = service.handshake_timeout
    if service.tcp_keepalive is not None:
        options["tcp_keepalive"] = service.tcp_keepalive
    if service.tls_cert is not None:
        options["ssl_context"] = tls_context(service.tls_cert, service.tls_key)
    return options


async def reload_tls(service: Service, servers: Sequence[BaseServer]) -> None:
    """Load ``service``'s TLS files again: new handshakes use them.

    The files are checked first, in a new context, and loaded into the
    servers' own contexts only if they are usable: a bad certificate or key
    is logged, and the old one kept.
    """
    cert, key = service.tls_cert, service.tls_key
    assert cert is not None, "a service without TLS has nothing to reload"
    try:
        await trio.to_thread.run_sync(tls_context, cert, key)
    except UsageError as exc:
        LOGGER.error("keeping the old TLS certificate: %s", exc)
        return
    for server in servers:
        context = getattr(server, "ssl_context", None)
        if context is not None:
            context.load_cert_chain(cert, key)
    LOGGER.warning("reloaded the TLS certificate from %s", cert)


def _is_missing(module_name: str, error: ImportError) -> bool:
    """Whether ``error`` says ``module_name`` (or a package of it) is absent.

    Not an import that fails inside the module: that is the module's bug.
    """
    if not isinstance(error, ModuleNotFoundError) or error.name is None:
        return False
    return module_name == error.name or module_name.startswith(error.name + ".")


def load_handler(spec: str) -> type[BaseRequestHandler]:
    """Import ``package.module:ClassName`` and check it is a handler class.

    Raises:
      UsageError: ``spec`` names no module, or no handler class in it.
      HandlerImportError: The module raised while it was imported.
    """
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise UsageError(f"handler {spec!r} is not package.module:ClassName")
    # Like `python -m`, let handlers in the current directory be found even
    # when we run as the installed `trioserve` script.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except SyncHookError as exc:
        raise UsageError(str(exc)) from None
    except ImportError as exc:
        if not _is_missing(module_name, exc):
            raise HandlerImportError(module_name, exc) from None
        raise UsageError(f"cannot import {module_name!r}: {exc}") from None
    except Exception as exc:  # SyntaxError too: whatever the module raised
        raise HandlerImportError(module_name, exc) from None
    handler = getattr(module, class_name, None)
    if handler is None:
        raise UsageError(f"module {module_name!r} has no {class_name!r}")
    if not (isinstance(handler, type) and issubclass(handler, BaseRequestHandler)):
        raise UsageError(f"{spec!r} is not a trioserve request handler class")
    if handler.handle is BaseRequestHandler.handle:
        raise UsageError(
            f"{spec!r} does not override handle(), so it would close every "
            "connection at once"
        )
    return handler


class _EncryptedKey(Exception):
    pass


def _no_password() -> NoReturn:
    # Asked only for an encrypted key; without this OpenSSL would prompt on
    # the terminal, which a service does not have.
    raise _EncryptedKey


def tls_context(cert: str, key: str | None) -> ssl.SSLContext:
    """A server context from ``--tls-cert`` and ``--tls-key``.

    A failure names the file at fault and what is wrong with it; OpenSSL's
    own errors ("PEM lib") say neither.
    """
    cert_file = f"{cert} (--tls-cert)"
    key_file = cert_file if key is None else f"{key} (--tls-key)"
    contents = {}
    for path, name in ((cert, cert_file), (key, key_file)):
        if path is None:
            continue
        try:
            with open(path, "rb") as file:
                contents[path] = file.read()
        except OSError as exc:
            raise UsageError(
                f"cannot load the TLS certificate: cannot read {name}: "
                f"{exc.strerror or exc}"
            ) from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except _EncryptedKey:
        problem = f"the private key in {key_file} is encrypted; give it unencrypted"
    except ssl.SSLError as exc:
        problem = _tls_problem(exc, cert, cert_file, contents[key or cert], key_file)
    else:
        return context
    raise UsageError(f"cannot load the TLS certificate: {problem}")


def _tls_problem(
    error: ssl.SSLError, cert: str, cert_file: str, key_pem: bytes, key_file: str
) -> str:
    """What is wrong, in words, when ``load_cert_chain`` failed."""
    if error.reason == "KEY_VALUES_MISMATCH":
        return (
            f"the private key in {key_file} does not match the certificate "
            f"in {cert_file}"
        )
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=cert)
    except ssl.SSLError:
        return f"{cert_file} holds no valid PEM certificate"
    if b"PRIVATE KEY-----" not in key_pem:
        if key_file == cert_file:
            return f"{cert_file} holds no private key; give it with --tls-key"
        return f"{key_file} holds no PEM private key"
    return f"{cert_file} with the key in {key_file}: {error}"
