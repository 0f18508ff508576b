"""The PROXY protocol, versions 1 and 2: a parser for the header a proxy sends first.

A proxy in front of a server (HAProxy, stunnel, cloud load balancers) can open
each connection it relays with a header saying whom it relays: the client's
address, the address the client connected to and, in version 2, extra
type-length-value fields (TLVs). The format is HAProxy's ``proxy-protocol.txt``:

- Version 1 is one line of ASCII text, at most 107 bytes with its CRLF::

      PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\\r\\n

- Version 2 is binary: a 12-byte signature, a version-and-command byte, a
  family-and-protocol byte, a 2-byte big-endian length, then that many bytes
  of addresses followed by TLVs.

This module does no I/O. A :class:`ProxyHeaderParser` is fed bytes as they
arrive, in chunks of any size, keeps only the header's bytes and hands back
whatever followed them. It also says how many more bytes it can take without
any of them being past the header (:attr:`ProxyHeaderParser.next_needed`),
which matters when the bytes after the header go to something that cannot be
given bytes already read, such as a TLS handshake. A server reads the header
like this::

    parser = ProxyHeaderParser("auto")
    header = None
    while header is None:
        # At end of stream receive_some() returns b"", and feed(b"") raises
        # ProxyHeaderIncomplete.
        header = parser.feed(await stream.receive_some(parser.next_needed))
    peer = header.source if header.source is not None else stream_peer_address

The specification asks receivers to put a timeout on reading the header (a
few seconds) and to accept it only on listeners configured for it, from
trusted proxies: whoever may send the header chooses the address the server
believes. Both are the caller's job.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Iterable
from typing import Literal, TypeAlias

import attrs

#: Which versions a parser accepts: ``"auto"`` tells them apart by the first
#: byte (``P`` for version 1, ``\\r`` for version 2).
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

#: The longest version 1 line, counting its CRLF: the specification's worst
#: case, ``PROXY UNKNOWN`` followed by two full-length IPv6 addresses and two
#: five-digit ports. A line with no CRLF within this many bytes is invalid, so
#: a peer cannot make the parser buffer an endless line.
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

#: The longest version 2 header a parser accepts unless told otherwise. The
#: format allows 16 + 65535 bytes, but real headers are far shorter: Unix
#: addresses take 216 bytes, and the TLVs proxies send (ALPN, server name, a
#: unique ID of at most 128 bytes, TLS version, cipher and certificate common
#: name) a few hundred more. This is how much one connection may make the
#: server hold before it has proved anything, so it stays small.
DEFAULT_MAX_V2_HEADER_SIZE = 4096

# TLV types the specification registers, for ProxyHeader.tlv(). Types
# 0xE0-0xEF are left to applications (AWS, for one, uses 0xEA).
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_TYPE_NETNS = 0x30

# For each protocol word of a version 1 line, the shortest each of the fields
# after it can be: "0.0.0.0", "::" and "0". next_needed adds them up to know
# how much of a line must still come. UNKNOWN takes no fields (any it has are
# ignored).
_V1_FIELD_MIN_LENGTHS: dict[bytes, tuple[int, ...]] = {
    b"TCP4": (7, 7, 1, 1),
    b"TCP6": (2, 2, 1, 1),
    b"UNKNOWN": (),
}


def _v1_min_line_length(word: bytes) -> int:
    fields = _V1_FIELD_MIN_LENGTHS[word]
    return len(V1_PREFIX) + len(word) + sum(1 + n for n in fields) + len(b"\r\n")


# "PROXY UNKNOWN\r\n": no header of either version is shorter (a version 2
# header has at least its 16 fixed bytes), so it is safe to ask for this many
# bytes before knowing which version is coming.
_SHORTEST_HEADER = min(_v1_min_line_length(word) for word in _V1_FIELD_MIN_LENGTHS)

# The protocol word of a version 1 line, or as much of it as has arrived.
_V1_WORD = re.compile(rb"[^ \r\n]*")

# A version 1 port: decimal, without leading zeros (which could be read as
# octal, the specification says).
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")

# Where the fixed part of a version 2 header keeps what, after the signature:
# byte 13 (index 12) the version and command, byte 14 the family and
# transport, bytes 15 and 16 the length of the rest of the header.
_V2_VERSION_COMMAND_AT = 12
_V2_FAMILY_TRANSPORT_AT = 13
_V2_LENGTH_AT = slice(14, 16)

# Version 2, byte 13: the version in the high nibble (2 is the only one), the
# command in the low nibble.
_V2_VERSION = 0x2
_V2_COMMANDS: dict[int, ProxyCommand] = {0x0: "LOCAL", 0x1: "PROXY"}
_V2_COMMAND_CODES = {name: code for code, name in _V2_COMMANDS.items()}

# Version 2, byte 14: the address family in the high nibble, the transport
# protocol in the low one.
_AF_UNSPEC = 0x0
_AF_INET = 0x1
_AF_INET6 = 0x2
_AF_UNIX = 0x3
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
_V2_TRANSPORT_CODES = {name: code for code, name in _V2_TRANSPORTS.items()}

# The bytes one Unix socket address takes in a version 2 header: sun_path of
# Linux's struct sockaddr_un, padded with NULs.
_UNIX_PATH_LENGTH = 108

# How many bytes each family's addresses take in a version 2 header: two IP
# addresses and two 2-byte ports, or two Unix paths.
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

    Raised by :meth:`ProxyHeaderParser.feed` and :func:`parse_proxy_header`
    as soon as the bytes so far prove the header invalid, with a message
    saying what was wrong. The specification's answer is to close the
    connection: the peer is not the proxy the server expects, or the proxy
    is misconfigured.
    """


class ProxyHeaderIncomplete(ProxyProtocolError):
    """The input ended before the PROXY protocol header did.

    Raised by :func:`parse_proxy_header` when its buffer holds only the start
    of a header, and by :meth:`ProxyHeaderParser.feed` when fed ``b""`` (end
    of stream) before the header is complete: the peer closed the connection
    early.
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
    #: Version 2's TLVs as ``(type, value)`` pairs, in the order sent, none
    #: dropped (not even ``PP2_TYPE_NOOP``) and none checked (not even
    #: ``PP2_TYPE_CRC32C``). Empty for version 1 and ``LOCAL``.
    tlvs: tuple[tuple[int, bytes], ...] = ()

    def tlv(self, tlv_type: int) -> bytes | None:
        """The value of the first TLV of this type, or ``None`` if there is none.

        For example ``header.tlv(PP2_TYPE_AUTHORITY)`` is the server name the
        client asked for, UTF-8 encoded.
        """
        for sent_type, value in self.tlvs:
            if sent_type == tlv_type:
                return value
        return None


def _show(data: bytes | bytearray) -> str:
    """Quote bytes from the peer for an error message: escaped, and not too many."""
    shown = repr(bytes(data[:_SHOW_LIMIT]))[1:]
    return shown + "..." if len(data) > _SHOW_LIMIT else shown


class ProxyHeaderParser:
    """An incremental PROXY protocol header parser, in the manner of h11.

    Feed it bytes with :meth:`feed` until it returns the header. It never
    takes a byte past the header: whatever followed the header in the bytes
    fed is kept, untouched, in :attr:`trailing`. It holds at most the
    header's bytes, so at most :data:`V1_MAX_LENGTH` or
    ``max_v2_header_size`` bytes, whatever it is fed.

    Args:
      mode: ``"v1"`` or ``"v2"`` to accept only that version; ``"auto"`` (the
        default) to accept either, told apart by the first byte.
      max_v2_header_size: The longest version 2 header accepted, in bytes,
        counting its 16 fixed bytes; a longer one is an error as soon as its
        length field arrives. At least 232, so that any address fits.

    Errors:
      :exc:`ProxyProtocolError` from :meth:`feed` as soon as the bytes prove
      the header invalid, :exc:`ProxyHeaderIncomplete` when fed end of stream
      (``b""``) early. After an error the parser is spent: every later
      :meth:`feed` raises :exc:`ProxyProtocolError` again.

    Choices the specification leaves open:
      - Version 1 ``UNKNOWN`` lines may carry any text after the word, which
        is ignored; ``TCP4`` and ``TCP6`` lines are checked strictly (single
        spaces, no leading zeros, IPv6 without a ``%`` scope).
      - Version 2 ``LOCAL`` headers are accepted whatever their family byte
        and whatever follows it, which the specification says to discard.
      - Version 2 ``PROXY`` headers with the ``AF_UNSPEC`` family carry no
        addresses; what follows the fixed part is parsed as TLVs, which is
        what HAProxy sends. A family with the ``UNSPEC`` protocol (bytes 0x10,
        0x20, 0x30) has no defined layout, so it falls back to ``AF_UNSPEC``
        handling as the specification asks: no addresses, and the rest of
        the header skipped.
      - TLVs must exactly fill the rest of a header; one that overruns it is
        an error, as it is for HAProxy.
    """

    def __init__(
        self,
        mode: ProxyMode = "auto",
        *,
        max_v2_header_size: int = DEFAULT_MAX_V2_HEADER_SIZE,
    ) -> None:
        if mode not in ("v1", "v2", "auto"):
            raise ValueError(f"mode must be 'v1', 'v2' or 'auto', not {mode!r}")
        smallest = V2_FIXED_LENGTH + _V2_ADDRESS_LENGTHS[_AF_UNIX]
        if max_v2_header_size < smallest:
            raise ValueError(
                f"max_v2_header_size must be at least {smallest} "
                "(a header with Unix addresses)"
            )
        self.mode: ProxyMode = mode
        self.max_v2_header_size = max_v2_header_size
        # START: nothing yet. V1, V2: reading a header of that version.
        # DONE: self._header is set. ERROR: self._error says why.
        self._state: Literal["START", "V1", "V2", "DONE", "ERROR"] = "START"
        # The header's bytes received so far, and never a byte more.
        self._buffer = bytearray()
        self._header: ProxyHeader | None = None
        self._trailing = b""
        self._error = ""

    @property
    def header(self) -> ProxyHeader | None:
        """The header once complete, else ``None``."""
        return self._header

    @property
    def trailing(self) -> bytes:
        """The bytes fed after the header's end: the start of the connection's data.

        Empty until the header is complete, and empty after it if the caller
        never fed more than :attr:`next_needed`.
        """
        return self._trailing

    @property
    def next_needed(self) -> int:
        """How many bytes may be fed next without any being past the header.

        At least 1 while the header is incomplete; 0 once it is complete (or
        the parser has failed). For version 2 it is exact once the 16 fixed
        bytes are in. A version 1 line shows its length only at its CRLF, so
        this is what the shortest valid line the bytes so far could begin
        still lacks: a typical line arrives in two or three reads, and no
        read goes past it.
        """
        if self._state == "START":
            return V2_FIXED_LENGTH if self.mode == "v2" else _SHORTEST_HEADER
        if self._state == "V1":
            return _v1_min_length(self._buffer) - len(self._buffer)
        if self._state == "V2":
            return self._v2_length() - len(self._buffer)
        return 0

    def feed(self, data: bytes | bytearray) -> ProxyHeader | None:
        """Take the next bytes received; return the header once it is complete.

        ``data`` may be any number of bytes; ``b""`` means end of stream.
        Bytes past the header's end are not taken: they are kept in
        :attr:`trailing`.

        Returns:
          The :class:`ProxyHeader` once complete, ``None`` while more bytes
          are needed.

        Raises:
          ProxyProtocolError: the bytes so far prove the header invalid.
          ProxyHeaderIncomplete: ``data`` is ``b""`` and the header is not
            complete.
          RuntimeError: the header was already complete: the connection's
            bytes belong to the caller now.
        """
        if self._state == "DONE":
            raise RuntimeError(
                "feed() after the PROXY header was complete; "
                "the bytes after it belong to the connection"
            )
        if self._state == "ERROR":
            raise ProxyProtocolError(f"the parser has already failed: {self._error}")
        try:
            if not data:
                raise self._incomplete()
            position = 0
            while position < len(data) and self._header is None:
                taken = self._header_bytes_in(data, position)
                self._buffer += data[position : position + taken]
                position += taken
                self._advance()
        except ProxyProtocolError as exc:
            self._state = "ERROR"
            self._error = str(exc)
            raise
        if self._header is not None:
            self._trailing = bytes(data[position:])
        return self._header

    def _header_bytes_in(self, data: bytes | bytearray, position: int) -> int:
        """How many bytes of ``data`` from ``position`` on belong to the header.

        At least 1, and possibly more than ``data`` has left.
        """
        if self._state == "START":
            # The first byte alone tells the versions apart.
            return 1
        if self._state == "V1":
            # Up to the line's LF, and never past the longest line allowed.
            room = V1_MAX_LENGTH - len(self._buffer)
            end = data.find(b"\n", position, position + room)
            return room if end < 0 else end + 1 - position
        return self._v2_length() - len(self._buffer)

    def _advance(self) -> None:
        """Check the bytes buffered so far; finish the header if they complete it."""
        if self._state == "START":
            self._state = self._version_from_first_byte(self._buffer[0])
        if self._state == "V1":
            self._advance_v1()
        else:
            self._advance_v2()

    def _version_from_first_byte(self, first: int) -> Literal["V1", "V2"]:
        if first == V1_PREFIX[0] and self.mode != "v2":
            return "V1"
        if first == V2_SIGNATURE[0] and self.mode != "v1":
            return "V2"
        got = _show(bytes([first]))
        if self.mode == "v1":
            hint = " (a v2 header?)" if first == V2_SIGNATURE[0] else ""
            raise ProxyProtocolError(
                f"not a PROXY v1 header: it must start with 'PROXY ', "
                f"not with {got}{hint}"
            )
        if self.mode == "v2":
            hint = " (a v1 header?)" if first == V1_PREFIX[0] else ""
            raise ProxyProtocolError(
                f"PROXY v2 signature mismatch: the first byte is {got}, not '\\r'{hint}"
            )
        raise ProxyProtocolError(
            f"not a PROXY protocol header: the first byte is {got}, but a v1 "
            "header starts with 'PROXY ' and a v2 header with '\\r' "
            "(is the client connecting directly, not through the proxy?)"
        )

    def _advance_v1(self) -> None:
        line = bytes(self._buffer)
        _check_v1_start(line)
        if line.endswith(b"\n"):
            if not line.endswith(b"\r\n"):
                raise ProxyProtocolError(
                    "PROXY v1 line ends with a bare LF; it must end with CRLF"
                )
            self._finish(_parse_v1_line(line[:-2]))
        elif len(line) >= V1_MAX_LENGTH:
            raise ProxyProtocolError(
                f"PROXY v1 header longer than {V1_MAX_LENGTH} bytes: "
                f"no CRLF in {_show(line)}"
            )

    def _v2_length(self) -> int:
        """The length of the whole version 2 header, or 16 until that is known."""
        if len(self._buffer) < V2_FIXED_LENGTH:
            return V2_FIXED_LENGTH
        return V2_FIXED_LENGTH + int.from_bytes(self._buffer[_V2_LENGTH_AT], "big")

    def _advance_v2(self) -> None:
        fixed = bytes(self._buffer[:V2_FIXED_LENGTH])
        _check_v2_fixed(fixed)
        if len(fixed) < V2_FIXED_LENGTH:
            return
        length = self._v2_length()
        if length > self.max_v2_header_size:
            raise ProxyProtocolError(
                f"PROXY v2 header of {length} bytes is longer than the limit of "
                f"{self.max_v2_header_size} bytes"
            )
        if len(self._buffer) == length:
            self._finish(_parse_v2_header(bytes(self._buffer)))

    def _finish(self, header: ProxyHeader) -> None:
        self._header = header
        self._state = "DONE"

    def _incomplete(self) -> ProxyHeaderIncomplete:
        got = len(self._buffer)
        if self._state == "START":
            return ProxyHeaderIncomplete("input ended before any PROXY header byte")
        if self._state == "V2" and got >= V2_FIXED_LENGTH:
            return ProxyHeaderIncomplete(
                f"input ended after {got} of the {self._v2_length()} bytes "
                "of a PROXY v2 header"
            )
        version = "v1" if self._state == "V1" else "v2"
        return ProxyHeaderIncomplete(
            f"input ended after {got} bytes of an incomplete PROXY {version} header"
        )


def parse_proxy_header(
    data: bytes | bytearray,
    mode: ProxyMode = "auto",
    *,
    max_v2_header_size: int = DEFAULT_MAX_V2_HEADER_SIZE,
) -> tuple[ProxyHeader, bytes]:
    """Parse the PROXY header at the start of ``data``, all of which is in hand.

    Args:
      data: The header and, optionally, what followed it.
      mode, max_v2_header_size: As for :class:`ProxyHeaderParser`.

    Returns:
      The header, and the bytes of ``data`` after it.

    Raises:
      ProxyHeaderIncomplete: ``data`` holds only the start of a valid header.
      ProxyProtocolError: ``data`` does not start with a valid header.
    """
    parser = ProxyHeaderParser(mode, max_v2_header_size=max_v2_header_size)
    header = parser.feed(data) if data else None
    if header is None:
        raise parser._incomplete()
    return header, parser.trailing


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
    if complete and word in _V1_FIELD_MIN_LENGTHS:
        return
    if not complete and _v1_words_from(word):
        return
    starting = "" if complete else "starting "
    raise ProxyProtocolError(
        f"unknown PROXY v1 protocol {starting}{_show(word)}: "
        "expected TCP4, TCP6 or UNKNOWN"
    )


def _v1_words_from(start: bytes) -> list[bytes]:
    """The protocol words that begin with ``start``."""
    return [word for word in _V1_FIELD_MIN_LENGTHS if word.startswith(start)]


def _v1_min_length(line: bytes | bytearray) -> int:
    """A lower bound on the length of a version 1 line that starts with ``line``.

    It is the length of the shortest valid line ``line`` could begin, or a
    smaller number when that is hard to know (such as for a line that can no
    longer be valid), but never less than ``len(line) + 1``.
    """
    if line.endswith(b"\r"):
        # The LF may be next.
        return len(line) + 1
    least = len(line) + len(b"\r\n")
    match = _V1_WORD.match(line, len(V1_PREFIX))
    if match is None or match.end() == len(line):
        # The protocol word is still arriving: any word it could become.
        word = match.group() if match else b""
        lengths = [_v1_min_line_length(w) for w in _v1_words_from(word)]
        return max(least, min(lengths, default=least))
    mins = _V1_FIELD_MIN_LENGTHS.get(match.group(), ())
    fields = line[match.end() + 1 :].split(b" ")
    current = len(fields) - 1
    if line[match.end()] != ord(" ") or current >= len(mins):
        return least
    # The field arriving may need more bytes; every later one needs at least
    # its shortest, and a space before it; then the CRLF.
    missing = max(0, mins[current] - len(fields[current]))
    missing += sum(1 + n for n in mins[current + 1 :]) + len(b"\r\n")
    return max(least, len(line) + missing)


def _parse_v1_line(line: bytes) -> ProxyHeader:
    """Parse a version 1 line, given without its CRLF."""
    fields = line.split(b" ")
    word = fields[1]
    if word == b"UNKNOWN":
        # The proxy could not say (or chose not to): anything after the word
        # is to be ignored, and the real connection's addresses used.
        return ProxyHeader(
            version=1, command="PROXY", source=None, destination=None, protocol=None
        )
    if word not in _V1_FIELD_MIN_LENGTHS:
        raise ProxyProtocolError(
            f"unknown PROXY v1 protocol {_show(word)}: expected TCP4, TCP6 or UNKNOWN"
        )
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
    source: ProxyAddress
    destination: ProxyAddress
    if word == b"TCP4":
        source = (source_ip, source_port)
        destination = (destination_ip, destination_port)
    else:
        source = (source_ip, source_port, 0, 0)
        destination = (destination_ip, destination_port, 0, 0)
    return ProxyHeader(
        version=1,
        command="PROXY",
        source=source,
        destination=destination,
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


def _check_v2_fixed(fixed: bytes) -> None:
    """Fail early if the start of a version 2 header's fixed part is invalid."""
    signature = fixed[: len(V2_SIGNATURE)]
    if signature != V2_SIGNATURE[: len(signature)]:
        raise ProxyProtocolError(
            f"PROXY v2 signature mismatch: got {_show(signature)}, "
            f"expected {_show(V2_SIGNATURE)}"
        )
    if len(fixed) <= _V2_VERSION_COMMAND_AT:
        return
    version_command = fixed[_V2_VERSION_COMMAND_AT]
    version, command = version_command >> 4, version_command & 0xF
    if version != _V2_VERSION:
        raise ProxyProtocolError(
            f"unsupported PROXY v2 version 0x{version:x} "
            f"(byte 13 is 0x{version_command:02x}; the version nibble must be 0x2)"
        )
    if command not in _V2_COMMANDS:
        raise ProxyProtocolError(
            f"unknown PROXY v2 command 0x{command:x}: "
            "expected 0x0 (LOCAL) or 0x1 (PROXY)"
        )
    if len(fixed) <= _V2_FAMILY_TRANSPORT_AT or _V2_COMMANDS[command] == "LOCAL":
        # LOCAL discards the family and everything after it.
        return
    family_transport = fixed[_V2_FAMILY_TRANSPORT_AT]
    family, transport = family_transport >> 4, family_transport & 0xF
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
    if len(fixed) < V2_FIXED_LENGTH:
        return
    length = int.from_bytes(fixed[_V2_LENGTH_AT], "big")
    needed = _v2_address_length(family, _V2_TRANSPORTS[transport])
    if length < needed:
        raise ProxyProtocolError(
            f"PROXY v2 length {length} is too short for {_V2_FAMILY_NAMES[family]} "
            f"addresses, which take {needed} bytes"
        )


def _v2_address_length(family: int, transport: ProxyTransport | None) -> int:
    # Without a transport, no layout is defined, so no addresses are read.
    return 0 if transport is None else _V2_ADDRESS_LENGTHS[family]


def _parse_v2_header(header: bytes) -> ProxyHeader:
    """Parse a whole version 2 header, whose fixed part has been checked."""
    if _V2_COMMANDS[header[_V2_VERSION_COMMAND_AT] & 0xF] == "LOCAL":
        # The proxy's own connection: use the real endpoints, discard the rest.
        return ProxyHeader(
            version=2, command="LOCAL", source=None, destination=None, protocol=None
        )
    family_transport = header[_V2_FAMILY_TRANSPORT_AT]
    family, transport = family_transport >> 4, _V2_TRANSPORTS[family_transport & 0xF]
    rest = header[V2_FIXED_LENGTH:]
    if family != _AF_UNSPEC and transport is None:
        # A family without a transport has no defined layout: fall back to
        # AF_UNSPEC, and skip it all.
        return ProxyHeader(
            version=2, command="PROXY", source=None, destination=None, protocol=None
        )
    if family == _AF_UNSPEC:
        # No addresses: TLVs, if any, follow the fixed part at once.
        return ProxyHeader(
            version=2,
            command="PROXY",
            source=None,
            destination=None,
            protocol=transport,
            tlvs=_parse_tlvs(rest, V2_FIXED_LENGTH),
        )
    source: ProxyAddress
    destination: ProxyAddress
    if family == _AF_UNIX:
        source = _unix_address(rest[:_UNIX_PATH_LENGTH])
        destination = _unix_address(rest[_UNIX_PATH_LENGTH : 2 * _UNIX_PATH_LENGTH])
    else:
        size, socket_family = (
            (4, socket.AF_INET) if family == _AF_INET else (16, socket.AF_INET6)
        )
        source_ip = socket.inet_ntop(socket_family, rest[:size])
        destination_ip = socket.inet_ntop(socket_family, rest[size : 2 * size])
        source_port = int.from_bytes(rest[2 * size : 2 * size + 2], "big")
        destination_port = int.from_bytes(rest[2 * size + 2 : 2 * size + 4], "big")
        if family == _AF_INET:
            source = (source_ip, source_port)
            destination = (destination_ip, destination_port)
        else:
            source = (source_ip, source_port, 0, 0)
            destination = (destination_ip, destination_port, 0, 0)
    address_length = _V2_ADDRESS_LENGTHS[family]
    return ProxyHeader(
        version=2,
        command="PROXY",
        source=source,
        destination=destination,
        protocol=transport,
        tlvs=_parse_tlvs(rest[address_length:], V2_FIXED_LENGTH + address_length),
    )


def _unix_address(field: bytes) -> str | bytes:
    """A NUL-padded Unix socket address, in the form the socket module gives it."""
    if field.startswith(b"\x00") and field.strip(b"\x00"):
        # Linux's abstract namespace: a name after a NUL, given as bytes.
        return field.rstrip(b"\x00")
    return os.fsdecode(field.split(b"\x00", 1)[0])


def _parse_tlvs(data: bytes, offset: int) -> tuple[tuple[int, bytes], ...]:
    """The TLVs filling ``data``, which starts ``offset`` bytes into the header."""
    tlvs = []
    position = 0
    while position < len(data):
        left = len(data) - position
        if left < _TLV_HEAD_LENGTH:
            raise ProxyProtocolError(
                f"PROXY v2 TLV at byte {offset + position} is cut short: "
                f"a TLV takes at least 3 bytes, and the header has {left} left"
            )
        tlv_type = data[position]
        length = int.from_bytes(data[position + 1 : position + 3], "big")
        start = position + _TLV_HEAD_LENGTH
        if start + length > len(data):
            raise ProxyProtocolError(
                f"PROXY v2 TLV of type 0x{tlv_type:02x} at byte {offset + position} "
                f"says its value is {length} bytes, but the header has "
                f"{len(data) - start} left"
            )
        tlvs.append((tlv_type, data[start : start + length]))
        position = start + length
    return tuple(tlvs)


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
    if command not in _V2_COMMAND_CODES:
        raise ValueError(f"command must be 'PROXY' or 'LOCAL', not {command!r}")
    if protocol not in _V2_TRANSPORT_CODES:
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
    version_command = _V2_VERSION << 4 | _V2_COMMAND_CODES[command]
    family_transport = family << 4 | _V2_TRANSPORT_CODES[protocol]
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
