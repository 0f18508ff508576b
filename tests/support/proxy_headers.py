"""PROXY protocol headers for tests to send: builders, and TLV types.

The library only reads headers; tests need to write them, as a proxy would.
``build_v1`` and ``build_v2`` check their arguments so that a test cannot
send an invalid header by mistake (tests of invalid headers write their bytes
out by hand).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable

from trioserve._proxy import (
    V2_SIGNATURE,
    ProxyAddress,
    ProxyCommand,
    ProxyTransport,
)

# TLV types the specification registers. Types 0xE0-0xEF are left to
# applications (AWS, for one, uses 0xEA).
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05

# Byte 13 of a version 2 header: version 2 in the high nibble, the command in
# the low one. Byte 14: the family in the high nibble, the transport in the
# low one.
_COMMAND_CODES: dict[ProxyCommand, int] = {"LOCAL": 0x0, "PROXY": 0x1}
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_TRANSPORT_CODES: dict[ProxyTransport | None, int] = {
    None: 0x0,
    "STREAM": 0x1,
    "DGRAM": 0x2,
}
_UNIX_PATH_LENGTH = 108


def build_v1(
    source: tuple[str, int] | tuple[str, int, int, int] | None = None,
    destination: tuple[str, int] | tuple[str, int, int, int] | None = None,
) -> bytes:
    """A version 1 header: ``TCP4`` or ``TCP6`` from the addresses, else ``UNKNOWN``.

    Args:
      source, destination: ``(host, port)`` or ``(host, port, flowinfo,
        scope_id)`` with numeric hosts, both IPv4 or both IPv6; or both
        ``None`` for ``PROXY UNKNOWN``.

    Raises:
      ValueError: an address is not numeric, the families differ, a port is
        out of range, or only one address is given.
    """
    if source is None and destination is None:
        return b"PROXY UNKNOWN\r\n"
    if source is None or destination is None:
        raise ValueError("give both source and destination, or neither (UNKNOWN)")
    source_ip, source_port = _ip_endpoint(source, "source")
    destination_ip, destination_port = _ip_endpoint(destination, "destination")
    if source_ip.version != destination_ip.version:
        raise ValueError("source and destination must both be IPv4 or both IPv6")
    word = "TCP4" if source_ip.version == 4 else "TCP6"
    line = f"PROXY {word} {source_ip} {destination_ip} {source_port} {destination_port}"
    return line.encode("ascii") + b"\r\n"


def build_v2(
    source: ProxyAddress | None = None,
    destination: ProxyAddress | None = None,
    *,
    command: ProxyCommand = "PROXY",
    protocol: ProxyTransport | None = "STREAM",
    tlvs: Iterable[tuple[int, bytes]] = (),
) -> bytes:
    """A version 2 header.

    Args:
      source, destination: Addresses in the socket module's form (see
        :data:`ProxyAddress`), both of one family; or both ``None`` for the
        ``AF_UNSPEC`` family. Must be ``None`` for ``LOCAL``.
      command: ``"PROXY"``, or ``"LOCAL"`` for a health check.
      protocol: The transport; ``None`` for ``UNSPEC``, allowed only without
        addresses. Ignored for ``LOCAL``, which is always sent as ``UNSPEC``.
      tlvs: ``(type, value)`` pairs to send after the addresses. Must be
        empty for ``LOCAL``, whose receiver discards them.

    Raises:
      ValueError: the arguments do not make a valid header.
    """
    tlvs = tuple(tlvs)
    if command not in _COMMAND_CODES:
        raise ValueError(f"command must be 'PROXY' or 'LOCAL', not {command!r}")
    if protocol not in _TRANSPORT_CODES:
        raise ValueError(
            f"protocol must be 'STREAM', 'DGRAM' or None, not {protocol!r}"
        )
    if command == "LOCAL":
        if source is not None or destination is not None or tlvs:
            raise ValueError("a LOCAL header carries no addresses and no TLVs")
        return _v2_header("LOCAL", _AF_UNSPEC, None, b"")
    family, addresses = _v2_addresses(source, destination, protocol)
    rest = addresses + b"".join(_tlv_bytes(t, v) for t, v in tlvs)
    return _v2_header("PROXY", family, protocol, rest)


def _v2_header(
    command: ProxyCommand, family: int, protocol: ProxyTransport | None, rest: bytes
) -> bytes:
    if len(rest) > 0xFFFF:
        raise ValueError("a PROXY v2 header holds at most 65535 bytes after its 16th")
    version_command = 0x2 << 4 | _COMMAND_CODES[command]
    family_transport = family << 4 | _TRANSPORT_CODES[protocol]
    head = bytes([version_command, family_transport]) + len(rest).to_bytes(2, "big")
    return V2_SIGNATURE + head + rest


def _v2_addresses(
    source: ProxyAddress | None,
    destination: ProxyAddress | None,
    protocol: ProxyTransport | None,
) -> tuple[int, bytes]:
    """The family and address bytes of a version 2 ``PROXY`` header."""
    if source is None and destination is None:
        return _AF_UNSPEC, b""
    if source is None or destination is None:
        raise ValueError("give both source and destination, or neither (AF_UNSPEC)")
    if protocol is None:
        raise ValueError("addresses need protocol 'STREAM' or 'DGRAM'")
    if isinstance(source, str | bytes) and isinstance(destination, str | bytes):
        return _AF_UNIX, _unix_field(source) + _unix_field(destination)
    if isinstance(source, tuple) and isinstance(destination, tuple):
        source_ip, source_port = _ip_endpoint(source, "source")
        destination_ip, destination_port = _ip_endpoint(destination, "destination")
        if source_ip.version != destination_ip.version:
            raise ValueError("source and destination must both be IPv4 or both IPv6")
        family = _AF_INET if source_ip.version == 4 else _AF_INET6
        ports = source_port.to_bytes(2, "big") + destination_port.to_bytes(2, "big")
        return family, source_ip.packed + destination_ip.packed + ports
    raise ValueError("source and destination must both be IP or both Unix addresses")


def _ip_endpoint(
    address: tuple[str, int] | tuple[str, int, int, int], role: str
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    if len(address) not in (2, 4):
        raise ValueError(f"{role} must be (host, port) or (host, port, 0, 0)")
    host, port = address[0], address[1]
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise ValueError(
            f"{role} host {host!r} has a scope, which a header cannot carry"
        )
    if len(address) == 4 and ip.version == 4:
        raise ValueError(
            f"{role} is a 4-tuple, which is for IPv6, but {host!r} is IPv4"
        )
    if isinstance(port, bool) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"{role} port must be 0 to 65535, not {port!r}")
    return ip, port


def _unix_field(path: str | bytes) -> bytes:
    raw = os.fsencode(path)
    if len(raw) > _UNIX_PATH_LENGTH:
        raise ValueError(f"Unix address {path!r} is over {_UNIX_PATH_LENGTH} bytes")
    # An abstract name (after a leading NUL) may hold NULs; a path may not.
    if not raw.startswith(b"\x00") and b"\x00" in raw:
        raise ValueError(f"Unix socket path {path!r} contains a NUL")
    return raw.ljust(_UNIX_PATH_LENGTH, b"\x00")


def _tlv_bytes(tlv_type: int, value: bytes) -> bytes:
    if not 0 <= tlv_type <= 0xFF:
        raise ValueError(f"TLV type must be 0 to 255, not {tlv_type!r}")
    if len(value) > 0xFFFF:
        raise ValueError("a TLV value holds at most 65535 bytes")
    return bytes([tlv_type]) + len(value).to_bytes(2, "big") + value
