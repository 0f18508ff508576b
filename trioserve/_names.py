"""How a listener is named to people: the start-up lines and metrics labels."""

from __future__ import annotations

import os
from typing import Any

from ._server import BaseServer
from ._socket_servers import UDPServer


def listener_kind(server: BaseServer, address: Any) -> str:
    """How a listener is named: TCP, UDP, UNIX or UNIX-DGRAM, +TLS if so."""
    stream = not isinstance(server, UDPServer)
    if isinstance(address, tuple):
        kind = "TCP" if stream else "UDP"
    else:
        kind = "UNIX" if stream else "UNIX-DGRAM"
    if getattr(server, "ssl_context", None) is not None:
        kind += "+TLS"
    return kind


def format_address(address: Any) -> str:
    """An address as the start-up line shows it: ``HOST:PORT``, ``[V6]:PORT``, path."""
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return os.fsdecode(address)
