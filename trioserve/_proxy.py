"""The PROXY protocol, versions 1 and 2: the header a proxy sends first.

A proxy in front of a server (HAProxy, stunnel, cloud load balancers) can open
each connection it relays with a header naming the client it relays for. The
format is HAProxy's ``proxy-protocol.txt``:

- Version 1 is one line of ASCII text, at most 107 bytes with its CRLF::

      PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\\r\\n

- Version 2 is binary: a 12-byte signature, a version-and-command byte, a
  family-and-protocol byte, a 2-byte big-endian length, then that many bytes
  of addresses followed by type-length-value fields (TLVs).

:func:`parse_proxy_header` does no I/O, like h11's readers: bytes in; the
header and how many bytes it took, or ``None`` for "need more", out.
:func:`receive_proxy_header` reads a header off a stream socket by peeking,
so what follows stays in the socket for the TLS layer or the handler.

TLVs are checked (each must fit in the header) but not kept: nothing hands
the header to a handler, which gets only the client's address. Trusting
only known proxies, and a timeout, are the caller's job.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from typing import Literal, TypeAlias

import attrs
import trio

#: Which versions are accepted: ``"auto"`` tells them apart by the first byte
#: (``P`` for version 1, ``\\r`` for version 2).
ProxyMode: TypeAlias = Literal["v1", "v2", "auto"]

#: ``"PROXY"``: the connection is relayed for the client the header names.
#: ``"LOCAL"``: the proxy opened it for itself (a health check).
ProxyCommand: TypeAlias = Literal["PROXY", "LOCAL"]

#: The relayed connection's transport: ``"STREAM"`` (TCP, Unix stream) or
#: ``"DGRAM"`` (UDP, Unix datagram).
ProxyTransport: TypeAlias = Literal["STREAM", "DGRAM"]

#: An address as Python's socket module gives it: ``(host, port)`` for IPv4,
#: ``(host, port, flowinfo, scope_id)`` for IPv6, a ``str`` path for a Unix
#: socket, or ``bytes`` starting with NUL for Linux's abstract namespace.
ProxyAddress: TypeAlias = tuple[str, int] | tuple[str, int, int, int] | str | bytes

#: The longest version 1 line, counting its CRLF: ``PROXY UNKNOWN`` followed
#: by two full-length IPv6 addresses and two five-digit ports. A line with no
#: CRLF within this many bytes is invalid, so a peer cannot make the server
#: buffer an endless line.
V1_MAX_LENGTH = 107

#: What every version 1 header starts with.
V1_PREFIX = b"PROXY "

#: What every version 2 header starts with. The NUL and the lone ``QUIT``
#: make HTTP, TLS, SMTP and FTP servers reject it at once if it reaches them
#: by mistake.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

#: The fixed part of a version 2 header: signature, version-and-command
#: byte, family-and-protocol byte and the 2-byte length of what follows.
V2_FIXED_LENGTH = 16

#: The longest version 2 header accepted unless told otherwise. The format
#: allows 16 + 65535 bytes, but real headers are far shorter: Unix addresses
#: take 216 bytes, and the TLVs proxies send (ALPN, server name, a unique ID
#: of at most 128 bytes, TLS details) a few hundred more. This is how much one
#: connection may make the server hold before it has proved anything, so it
#: stays small.
DEFAULT_MAX_V2_HEADER_SIZE = 4096

_V1_WORDS = (b"TCP4", b"TCP6", b"UNKNOWN")

# The protocol word of a version 1 line, or as much of it as has arrived.
_V1_WORD = re.compile(rb"[^ \r\n]*")

# A version 1 port: decimal, without leading zeros (which could be read as
# octal, the specification says).
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")

# Where the fixed part of a version 2 header keeps what, after the signature.
_V2_VERSION_COMMAND_AT = 12
_V2_FAMILY_TRANSPORT_AT = 13
_V2_LENGTH_AT = slice(14, 16)

# Byte 13: the version in the high nibble (2 is the only one), the command in
# the low nibble.
_V2_VERSION = 0x2
_V2_COMMANDS: dict[int, ProxyCommand] = {0x0: "LOCAL", 0x1: "PROXY"}

# Byte 14: the address family in the high nibble, the transport in the low.
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_V2_FAMILY_NAMES = {
    _AF_UNSPEC: "AF_UNSPEC",
    _AF_INET: "AF_INET",
    _AF_INET6: "AF_INET6",
    _AF_UNIX: "AF_UNIX",
}
_V2_TRANSPORTS: dict[int, ProxyTransport | None] = {
    0x0: None,
    0x1: "STREAM",
    0x2: "DGRAM",
}

# One Unix address in a version 2 header: sun_path of Linux's struct
# sockaddr_un, padded with NULs.
_UNIX_PATH_LENGTH = 108

# The bytes each family's addresses take: two IP addresses and two 2-byte
# ports, or two Unix paths.
_V2_ADDRESS_LENGTHS = {
    _AF_UNSPEC: 0,
    _AF_INET: 2 * 4 + 2 * 2,
    _AF_INET6: 2 * 16 + 2 * 2,
    _AF_UNIX: 2 * _UNIX_PATH_LENGTH,
}

# Every TLV starts with a 1-byte type and a 2-byte length.
_TLV_HEAD_LENGTH = 3

# Error messages quote at most this much of what the peer sent.
_SHOW_LIMIT = 40


class ProxyProtocolError(ValueError):
    """The bytes received are not a valid PROXY protocol header.

    The message says what was wrong. The specification's answer is to close
    the connection: the peer is not the proxy the server expects, or the
    proxy is misconfigured.
    """


class ProxyHeaderIncomplete(ProxyProtocolError):
    """The input ended before the PROXY protocol header did.

    The peer closed the connection early, or a datagram holds only the start
    of a header. Made by :func:`ended_early`.
    """


@attrs.frozen
class ProxyHeader:
    """A parsed PROXY protocol header.

    When :attr:`source` is ``None`` the header carries no client address
    (version 1 ``UNKNOWN``; version 2 ``LOCAL``, or ``PROXY`` with the
    ``AF_UNSPEC`` family or the ``UNSPEC`` transport), and the specification
    says to use the real connection's addresses, as if there were no header.
    """

    #: 1 or 2.
    version: Literal[1, 2]
    #: ``"LOCAL"`` only in version 2, for connections the proxy makes for
    #: itself (health checks); a version 1 header is always ``"PROXY"``.
    command: ProxyCommand
    #: The client's address, as the socket module would give it for a direct
    #: connection (see :data:`ProxyAddress`), or ``None``.
    source: ProxyAddress | None
    #: The address the client connected to (usually the proxy's), or ``None``.
    destination: ProxyAddress | None
    #: ``"STREAM"`` or ``"DGRAM"``; ``None`` when the header does not say.
    protocol: ProxyTransport | None


# The headers that name no client.
_NO_CLIENT_V1 = ProxyHeader(
    version=1, command="PROXY", source=None, destination=None, protocol=None
)
_NO_CLIENT_V2 = attrs.evolve(_NO_CLIENT_V1, version=2)
_LOCAL = attrs.evolve(_NO_CLIENT_V2, command="LOCAL")


def parse_proxy_header(
    data: bytes | bytearray,
    mode: ProxyMode = "auto",
    *,
    max_v2_header_size: int = DEFAULT_MAX_V2_HEADER_SIZE,
) -> tuple[ProxyHeader, int] | None:
    """Parse the PROXY header at the start of ``data``, the bytes received so far.

    Args:
      data: What the peer has sent so far; it may run past the header.
      mode: ``"v1"`` or ``"v2"`` to accept only that version; ``"auto"`` to
        accept either, told apart by the first byte.
      max_v2_header_size: The longest version 2 header accepted, in bytes,
        counting its 16 fixed bytes: a longer one is an error as soon as its
        length field arrives. At least 232, so that any address fits.

    Returns:
      The header and how many bytes of ``data`` it takes; or ``None`` if
      ``data`` is a valid start of a header, but only its start. ``None``
      never comes for more than :data:`V1_MAX_LENGTH` or
      ``max_v2_header_size`` bytes, so a caller that keeps what it got and
      asks again holds no more than one header.

    Raises:
      ProxyProtocolError: ``data`` proves the header invalid. Errors come as
        soon as the bytes prove them, not when the header is complete.
      ValueError: ``mode`` or ``max_v2_header_size`` is invalid.

    Choices the specification leaves open:
      - Version 1 ``UNKNOWN`` lines may carry any text after the word, which
        is ignored; ``TCP4`` and ``TCP6`` lines are checked strictly (single
        spaces, no leading zeros, IPv6 without a ``%`` scope).
      - Version 2 ``LOCAL`` headers are accepted whatever their family byte
        and whatever follows it, which the specification says to discard.
      - A version 2 family with the ``UNSPEC`` transport (bytes 0x10, 0x20,
        0x30) has no defined layout, so it is handled as ``AF_UNSPEC``: no
        addresses, and the rest of the header skipped.
      - Otherwise TLVs must exactly fill the rest of the header; one that
        overruns it is an error, as it is for HAProxy.
    """
    if mode not in ("v1", "v2", "auto"):
        raise ValueError(f"mode must be 'v1', 'v2' or 'auto', not {mode!r}")
    smallest = V2_FIXED_LENGTH + _V2_ADDRESS_LENGTHS[_AF_UNIX]
    if max_v2_header_size < smallest:
        raise ValueError(
            f"max_v2_header_size must be at least {smallest} "
            "(a header with Unix addresses)"
        )
    if not data:
        return None
    if _version_of(data[0], mode) == 1:
        return _read_v1(bytes(data[:V1_MAX_LENGTH]))
    return _read_v2(bytes(data[:max_v2_header_size]), max_v2_header_size)


def ended_early(data: bytes | bytearray) -> ProxyHeaderIncomplete:
    """The error for input that ends with only the start of a header.

    ``data`` is everything received, for which :func:`parse_proxy_header`
    returned ``None``: the peer closed the connection, or the datagram ended.
    """
    if not data:
        return ProxyHeaderIncomplete("input ended before any PROXY header byte")
    if data[0] == V2_SIGNATURE[0] and len(data) >= V2_FIXED_LENGTH:
        length = V2_FIXED_LENGTH + int.from_bytes(data[_V2_LENGTH_AT], "big")
        return ProxyHeaderIncomplete(
            f"input ended after {len(data)} of the {length} bytes of a PROXY v2 header"
        )
    version = "v1" if data[0] == V1_PREFIX[0] else "v2"
    return ProxyHeaderIncomplete(
        f"input ended after {len(data)} bytes of an incomplete PROXY {version} header"
    )


async def receive_proxy_header(
    sock: trio.socket.SocketType, mode: ProxyMode
) -> ProxyHeader:
    """Receive the PROXY header a stream socket starts with, and not a byte more.

    It peeks at what has arrived and parses that; once the header is whole it
    receives exactly the header's bytes, so what follows stays in the socket
    for the TLS layer or the handler. While the header is incomplete, every
    byte peeked belongs to it, so it receives those and peeks again when more
    arrive.

    Raises:
      ProxyProtocolError: the header is invalid.
      ProxyHeaderIncomplete: the peer closed the connection before its end.
      OSError: the connection failed.
    """
    taken = bytearray()
    while True:
        peeked = await sock.recv(DEFAULT_MAX_V2_HEADER_SIZE, socket.MSG_PEEK)
        if not peeked:
            raise ended_early(taken)
        parsed = parse_proxy_header(taken + peeked, mode)
        wanted = len(peeked) if parsed is None else parsed[1] - len(taken)
        while wanted:
            # Never blocks: these bytes were peeked, so they have arrived.
            received = await sock.recv(wanted)
            taken += received
            wanted -= len(received)
        if parsed is not None:
            return parsed[0]


def _show(data: bytes | bytearray) -> str:
    """Quote bytes from the peer for an error message: escaped, and not too many."""
    shown = repr(bytes(data[:_SHOW_LIMIT]))[1:]
    return shown + "..." if len(data) > _SHOW_LIMIT else shown


def _version_of(first: int, mode: ProxyMode) -> Literal[1, 2]:
    """The version a header starting with the byte ``first`` must be."""
    if first == V1_PREFIX[0] and mode != "v2":
        return 1
    if first == V2_SIGNATURE[0] and mode != "v1":
        return 2
    got = _show(bytes([first]))
    if mode == "v1":
        hint = " (a v2 header?)" if first == V2_SIGNATURE[0] else ""
        raise ProxyProtocolError(
            f"not a PROXY v1 header: it must start with 'PROXY ', not with {got}{hint}"
        )
    if mode == "v2":
        hint = " (a v1 header?)" if first == V1_PREFIX[0] else ""
        raise ProxyProtocolError(
            f"PROXY v2 signature mismatch: the first byte is {got}, not '\\r'{hint}"
        )
    raise ProxyProtocolError(
        f"not a PROXY protocol header: the first byte is {got}, but a v1 "
        "header starts with 'PROXY ' and a v2 header with '\\r' "
        "(is the client connecting directly, not through the proxy?)"
    )


# --- Version 1 ---------------------------------------------------------------


def _read_v1(data: bytes) -> tuple[ProxyHeader, int] | None:
    """Read a version 1 line from ``data``, at most its first 107 bytes."""
    end = data.find(b"\n")
    _check_v1_start(data if end < 0 else data[: end + 1])
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyProtocolError(
                f"PROXY v1 header longer than {V1_MAX_LENGTH} bytes: "
                f"no CRLF in {_show(data)}"
            )
        return None
    if data[end - 1] != ord("\r"):
        raise ProxyProtocolError(
            "PROXY v1 line ends with a bare LF; it must end with CRLF"
        )
    return _parse_v1_line(data[: end - 1]), end + 1


def _check_v1_start(line: bytes) -> None:
    """Fail early if the start of a version 1 line cannot begin a valid one."""
    start = line[: len(V1_PREFIX)]
    if start != V1_PREFIX[: len(start)]:
        raise ProxyProtocolError(
            f"not a PROXY v1 header: it must start with 'PROXY ', not {_show(start)}"
        )
    match = _V1_WORD.match(line, len(V1_PREFIX))
    if match is None:
        return
    word, complete = match.group(), match.end() < len(line)
    if complete and word in _V1_WORDS:
        return
    if not complete and any(known.startswith(word) for known in _V1_WORDS):
        return
    starting = "" if complete else "starting "
    raise ProxyProtocolError(
        f"unknown PROXY v1 protocol {starting}{_show(word)}: "
        "expected TCP4, TCP6 or UNKNOWN"
    )


def _parse_v1_line(line: bytes) -> ProxyHeader:
    """Parse a version 1 line, given without its CRLF."""
    fields = line.split(b" ")
    word = fields[1]
    if word not in _V1_WORDS:
        # The start was checked, but not what ends the word: "UNKNOWN\r" is
        # not "UNKNOWN".
        raise ProxyProtocolError(
            f"unknown PROXY v1 protocol {_show(word)}: expected TCP4, TCP6 or UNKNOWN"
        )
    if word == b"UNKNOWN":
        # The proxy could not say (or chose not to): anything after the word
        # is to be ignored, and the real connection's addresses used.
        return _NO_CLIENT_V1
    if len(fields) != 6:
        raise ProxyProtocolError(
            f"PROXY v1 {word.decode()} line must give source address, destination "
            "address, source port and destination port, separated by single "
            f"spaces: got {_show(line)}"
        )
    source_ip = _parse_v1_ip(fields[2], word, "source")
    destination_ip = _parse_v1_ip(fields[3], word, "destination")
    source_port = _parse_v1_port(fields[4], "source")
    destination_port = _parse_v1_port(fields[5], "destination")
    ipv6 = word == b"TCP6"
    return ProxyHeader(
        version=1,
        command="PROXY",
        source=_endpoint(source_ip, source_port, ipv6=ipv6),
        destination=_endpoint(destination_ip, destination_port, ipv6=ipv6),
        protocol="STREAM",
    )


def _parse_v1_ip(text: bytes, word: bytes, role: str) -> str:
    """An address of a version 1 line, in the form the socket module gives it."""
    kind, family, parse = (
        ("IPv4", socket.AF_INET, ipaddress.IPv4Address)
        if word == b"TCP4"
        else ("IPv6", socket.AF_INET6, ipaddress.IPv6Address)
    )
    try:
        packed: bytes | None = parse(text.decode("ascii")).packed
    except ValueError:  # including UnicodeDecodeError
        packed = None
    # A scope ("fe80::1%eth0") means nothing on another host, and the
    # specification's grammar has none.
    if packed is None or b"%" in text:
        raise ProxyProtocolError(
            f"PROXY v1 {role} address {_show(text)} is not a valid {kind} address"
        )
    return socket.inet_ntop(family, packed)


def _parse_v1_port(text: bytes, role: str) -> int:
    if _V1_PORT.fullmatch(text) is None or int(text) > 65535:
        raise ProxyProtocolError(
            f"PROXY v1 {role} port {_show(text)} is not a port number: expected "
            "0 to 65535 in decimal, without leading zeros"
        )
    return int(text)


# --- Version 2 ---------------------------------------------------------------


def _read_v2(data: bytes, max_size: int) -> tuple[ProxyHeader, int] | None:
    """Read a version 2 header from ``data``, at most its first ``max_size`` bytes."""
    _check_v2_fixed(data[:V2_FIXED_LENGTH])
    if len(data) < V2_FIXED_LENGTH:
        return None
    length = V2_FIXED_LENGTH + int.from_bytes(data[_V2_LENGTH_AT], "big")
    if length > max_size:
        raise ProxyProtocolError(
            f"PROXY v2 header of {length} bytes is longer than the limit of "
            f"{max_size} bytes"
        )
    if len(data) < length:
        return None
    return _parse_v2(data[:length]), length


def _check_v2_fixed(fixed: bytes) -> None:
    """Fail early if the start of a version 2 header's fixed part is invalid."""
    signature = fixed[: len(V2_SIGNATURE)]
    if signature != V2_SIGNATURE[: len(signature)]:
        raise ProxyProtocolError(
            f"PROXY v2 signature mismatch: got {_show(signature)}, "
            f"expected {_show(V2_SIGNATURE)}"
        )
    if len(fixed) > _V2_VERSION_COMMAND_AT:
        _check_v2_version_command(fixed[_V2_VERSION_COMMAND_AT])
    # LOCAL discards the family and everything after it.
    if len(fixed) > _V2_FAMILY_TRANSPORT_AT and not _is_local(fixed):
        family, transport = _family_transport(fixed)
        if len(fixed) == V2_FIXED_LENGTH:
            length = int.from_bytes(fixed[_V2_LENGTH_AT], "big")
            needed = 0 if transport is None else _V2_ADDRESS_LENGTHS[family]
            if length < needed:
                raise ProxyProtocolError(
                    f"PROXY v2 length {length} is too short for "
                    f"{_V2_FAMILY_NAMES[family]} addresses, which take "
                    f"{needed} bytes"
                )


def _check_v2_version_command(byte: int) -> None:
    version, command = byte >> 4, byte & 0xF
    if version != _V2_VERSION:
        raise ProxyProtocolError(
            f"unsupported PROXY v2 version 0x{version:x} "
            f"(byte 13 is 0x{byte:02x}; the version nibble must be 0x2)"
        )
    if command not in _V2_COMMANDS:
        raise ProxyProtocolError(
            f"unknown PROXY v2 command 0x{command:x}: "
            "expected 0x0 (LOCAL) or 0x1 (PROXY)"
        )


def _is_local(header: bytes) -> bool:
    return _V2_COMMANDS[header[_V2_VERSION_COMMAND_AT] & 0xF] == "LOCAL"


def _family_transport(header: bytes) -> tuple[int, ProxyTransport | None]:
    """The address family and transport of a ``PROXY`` header, checked."""
    byte = header[_V2_FAMILY_TRANSPORT_AT]
    family, transport = byte >> 4, byte & 0xF
    if family not in _V2_FAMILY_NAMES:
        raise ProxyProtocolError(
            f"unsupported address family 0x{family:x} in PROXY v2 header: expected "
            "0x0 (AF_UNSPEC), 0x1 (AF_INET), 0x2 (AF_INET6) or 0x3 (AF_UNIX)"
        )
    if transport not in _V2_TRANSPORTS:
        raise ProxyProtocolError(
            f"unsupported transport protocol 0x{transport:x} in PROXY v2 header: "
            "expected 0x0 (UNSPEC), 0x1 (STREAM) or 0x2 (DGRAM)"
        )
    return family, _V2_TRANSPORTS[transport]


def _parse_v2(header: bytes) -> ProxyHeader:
    """Parse a whole version 2 header, whose fixed part has been checked."""
    if _is_local(header):
        # The proxy's own connection: use the real endpoints, discard the rest.
        return _LOCAL
    family, transport = _family_transport(header)
    if transport is None and family != _AF_UNSPEC:
        # A family without a transport has no defined layout: fall back to
        # AF_UNSPEC, and skip it all.
        return _NO_CLIENT_V2
    addresses_end = V2_FIXED_LENGTH + _V2_ADDRESS_LENGTHS[family]
    _check_tlvs(header, addresses_end)
    rest = header[V2_FIXED_LENGTH:addresses_end]
    if family == _AF_UNSPEC:
        return attrs.evolve(_NO_CLIENT_V2, protocol=transport)
    if family == _AF_UNIX:
        source = _unix_address(rest[:_UNIX_PATH_LENGTH])
        destination = _unix_address(rest[_UNIX_PATH_LENGTH:])
        return ProxyHeader(2, "PROXY", source, destination, transport)
    size, socket_family = (
        (4, socket.AF_INET) if family == _AF_INET else (16, socket.AF_INET6)
    )
    ips = [socket.inet_ntop(socket_family, rest[i : i + size]) for i in (0, size)]
    ports = [int.from_bytes(rest[i : i + 2], "big") for i in (2 * size, 2 * size + 2)]
    ipv6 = family == _AF_INET6
    return ProxyHeader(
        version=2,
        command="PROXY",
        source=_endpoint(ips[0], ports[0], ipv6=ipv6),
        destination=_endpoint(ips[1], ports[1], ipv6=ipv6),
        protocol=transport,
    )


def _endpoint(ip: str, port: int, *, ipv6: bool) -> ProxyAddress:
    """An IP address and port as the socket module gives them."""
    return (ip, port, 0, 0) if ipv6 else (ip, port)


def _unix_address(field: bytes) -> str | bytes:
    """A NUL-padded Unix socket address, in the form the socket module gives it."""
    if field.startswith(b"\x00") and field.strip(b"\x00"):
        # Linux's abstract namespace: a name after a NUL, given as bytes.
        return field.rstrip(b"\x00")
    return os.fsdecode(field.split(b"\x00", 1)[0])


def _check_tlvs(header: bytes, position: int) -> None:
    """Check that the TLVs from ``position`` on exactly fill the header.

    Their contents are not kept: see the module's docstring.
    """
    while position < len(header):
        left = len(header) - position
        if left < _TLV_HEAD_LENGTH:
            raise ProxyProtocolError(
                f"PROXY v2 TLV at byte {position} is cut short: "
                f"a TLV takes at least 3 bytes, and the header has {left} left"
            )
        length = int.from_bytes(header[position + 1 : position + 3], "big")
        if length > left - _TLV_HEAD_LENGTH:
            raise ProxyProtocolError(
                f"PROXY v2 TLV of type 0x{header[position]:02x} at byte {position} "
                f"says its value is {length} bytes, but the header has "
                f"{left - _TLV_HEAD_LENGTH} left"
            )
        position += _TLV_HEAD_LENGTH + length
