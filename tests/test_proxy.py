"""Tests for the PROXY protocol parser, ``trioserve._proxy``.

Examples follow HAProxy's ``proxy-protocol.txt``. Headers under test are
written out by hand (text for version 1, packed bytes for version 2), not
made by ``build_v1``/``build_v2`` (``support.proxy_headers``), so that a bug shared by
builder and parser cannot hide; the builders have round-trip tests here.

The property tests check what must hold for every header however it arrives:
every start of it is "need more" and the whole of it the same header, taking
exactly its own bytes; "need more" never comes for more than the longest
header allowed, so a caller never holds more; a truncated header is
"incomplete" and never an error; and garbage raises nothing but
ProxyProtocolError. The stream reader is tested on real sockets: it never
takes a byte past the header, however the header arrives.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from collections.abc import Callable
from typing import Literal

import hypothesis
import hypothesis.strategies as st
import pytest
import trio
import trio.testing
from support.proxy_headers import (
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_NOOP,
    build_v1,
    build_v2,
)

from trioserve._proxy import (
    DEFAULT_MAX_V2_HEADER_SIZE,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyAddress,
    ProxyCommand,
    ProxyHeader,
    ProxyHeaderIncomplete,
    ProxyMode,
    ProxyProtocolError,
    ProxyTransport,
    ended_early,
    parse_proxy_header,
    receive_proxy_header,
)

# Each example is parsed in microseconds; a few hundred keep the suite fast.
# No example database: a failure is reported with its example, and the
# project does not keep .hypothesis/.
PROPERTY_SETTINGS = hypothesis.settings(max_examples=150, deadline=None, database=None)

# What a typical connection sends after the header.
REQUEST = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"


def v2(
    version_command: int,
    family_transport: int,
    rest: bytes = b"",
    *,
    length: int | None = None,
) -> bytes:
    """A version 2 header, packed by hand; ``length`` overrides the true length."""
    size = len(rest) if length is None else length
    return (
        V2_SIGNATURE
        + bytes([version_command, family_transport])
        + size.to_bytes(2, "big")
        + rest
    )


def tlv(tlv_type: int, value: bytes) -> bytes:
    return bytes([tlv_type]) + len(value).to_bytes(2, "big") + value


def ipv4_block(source: str, destination: str, sport: int, dport: int) -> bytes:
    return (
        socket.inet_pton(socket.AF_INET, source)
        + socket.inet_pton(socket.AF_INET, destination)
        + sport.to_bytes(2, "big")
        + dport.to_bytes(2, "big")
    )


def ipv6_block(source: str, destination: str, sport: int, dport: int) -> bytes:
    return (
        socket.inet_pton(socket.AF_INET6, source)
        + socket.inet_pton(socket.AF_INET6, destination)
        + sport.to_bytes(2, "big")
        + dport.to_bytes(2, "big")
    )


def unix_field(path: bytes) -> bytes:
    return path.ljust(108, b"\x00")


def header(
    version: Literal[1, 2],
    source: ProxyAddress | None = None,
    destination: ProxyAddress | None = None,
    protocol: ProxyTransport | None = "STREAM",
    *,
    command: ProxyCommand = "PROXY",
) -> ProxyHeader:
    """The ProxyHeader a test expects, with the defaults most tests want."""
    return ProxyHeader(
        version=version,
        command=command,
        source=source,
        destination=destination,
        protocol=protocol,
    )


UNKNOWN_V1 = header(1, protocol=None)
LOCAL_V2 = header(2, protocol=None, command="LOCAL")


def parse(
    data: bytes,
    mode: ProxyMode = "auto",
    max_v2_header_size: int = DEFAULT_MAX_V2_HEADER_SIZE,
) -> tuple[ProxyHeader, int] | None:
    """parse_whole(), checking that "need more" holds at most one header.

    A caller keeps what it got while the answer is "need more", so that
    answer must never come for more bytes than the longest header allowed,
    however many bytes it is given.
    """
    found = parse_proxy_header(data, mode, max_v2_header_size=max_v2_header_size)
    if found is None:
        limit = V1_MAX_LENGTH if data.startswith(b"P") else max_v2_header_size
        assert len(data) < limit
    return found


def parse_whole(
    data: bytes,
    mode: ProxyMode = "auto",
    max_v2_header_size: int = DEFAULT_MAX_V2_HEADER_SIZE,
) -> tuple[ProxyHeader, bytes]:
    """The header at the start of ``data``, all there is, and the bytes after it."""
    found = parse(data, mode, max_v2_header_size)
    if found is None:
        raise ended_early(data)
    return found[0], data[found[1] :]


def parse_every_start(data: bytes, mode: ProxyMode = "auto") -> None:
    """Parse every start of ``data``, shortest first, as bytes may arrive."""
    for end in range(1, len(data) + 1):
        if parse(data[:end], mode) is not None:
            return


# --- Examples: version 1 -----------------------------------------------------

V1_EXAMPLES = [
    pytest.param(
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        header(1, ("192.168.0.1", 56324), ("192.168.0.11", 443)),
        id="tcp4-spec-example",
    ),
    pytest.param(
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
        header(1, ("255.255.255.255", 65535), ("255.255.255.255", 65535)),
        id="tcp4-longest",
    ),
    pytest.param(
        b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n",
        header(1, ("0.0.0.0", 0), ("0.0.0.0", 0)),
        id="tcp4-shortest",
    ),
    pytest.param(
        b"PROXY TCP6 2001:db8::1 ::1 4242 80\r\n",
        header(1, ("2001:db8::1", 4242, 0, 0), ("::1", 80, 0, 0)),
        id="tcp6",
    ),
    pytest.param(
        b"PROXY TCP6 2001:0DB8:0000:0000:0000:0000:0000:0001 "
        b"FFFF:FFFF:FFFF:FFFF:FFFF:FFFF:FFFF:FFFF 65535 65535\r\n",
        header(
            1,
            ("2001:db8::1", 65535, 0, 0),
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535, 0, 0),
        ),
        id="tcp6-longest-uppercase",
    ),
    pytest.param(
        b"PROXY TCP6 ::ffff:192.0.2.1 :: 1 2\r\n",
        header(1, ("::ffff:192.0.2.1", 1, 0, 0), ("::", 2, 0, 0)),
        id="tcp6-ipv4-mapped",
    ),
    pytest.param(b"PROXY UNKNOWN\r\n", UNKNOWN_V1, id="unknown-short"),
    pytest.param(
        b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
        b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
        UNKNOWN_V1,
        id="unknown-worst-case-107-bytes",
    ),
    pytest.param(
        b"PROXY UNKNOWN whatever \x00\xff\r\n", UNKNOWN_V1, id="unknown-ignores-rest"
    ),
]


@pytest.mark.parametrize(("data", "expected"), V1_EXAMPLES)
@pytest.mark.parametrize("mode", ["v1", "auto"])
def test_v1_examples(data: bytes, expected: ProxyHeader, mode: ProxyMode) -> None:
    assert len(data) <= V1_MAX_LENGTH
    assert parse_whole(data + REQUEST, mode) == (expected, REQUEST)


# --- Examples: version 2 -----------------------------------------------------

V2_EXAMPLES = [
    pytest.param(
        v2(0x21, 0x11, ipv4_block("192.168.0.1", "192.168.0.11", 56324, 443)),
        header(2, ("192.168.0.1", 56324), ("192.168.0.11", 443)),
        id="tcp4",
    ),
    pytest.param(
        v2(0x21, 0x12, ipv4_block("10.0.0.1", "10.0.0.2", 53, 5353)),
        header(2, ("10.0.0.1", 53), ("10.0.0.2", 5353), "DGRAM"),
        id="udp4",
    ),
    pytest.param(
        v2(0x21, 0x21, ipv6_block("2001:db8::1", "::1", 4242, 443)),
        header(2, ("2001:db8::1", 4242, 0, 0), ("::1", 443, 0, 0)),
        id="tcp6",
    ),
    pytest.param(
        v2(0x21, 0x22, ipv6_block("fe80::1", "fe80::2", 1, 2)),
        header(2, ("fe80::1", 1, 0, 0), ("fe80::2", 2, 0, 0), "DGRAM"),
        id="udp6",
    ),
    pytest.param(
        v2(0x21, 0x31, unix_field(b"/run/client.sock") + unix_field(b"/run/app.sock")),
        header(2, "/run/client.sock", "/run/app.sock"),
        id="unix-stream",
    ),
    pytest.param(
        v2(0x21, 0x32, unix_field(b"\x00abstract\x00name") + unix_field(b"")),
        header(2, b"\x00abstract\x00name", "", "DGRAM"),
        id="unix-dgram-abstract-and-unnamed",
    ),
    pytest.param(
        v2(0x21, 0x31, b"p" * 108 + b"q" * 108),
        header(2, "p" * 108, "q" * 108),
        id="unix-paths-without-nul",
    ),
    pytest.param(
        v2(0x21, 0x00),
        header(2, protocol=None),
        id="proxy-unspec",
    ),
    pytest.param(
        v2(0x21, 0x01, tlv(PP2_TYPE_AUTHORITY, b"example.com")),
        header(2, protocol="STREAM"),
        id="proxy-unspec-family-with-tlvs",
    ),
    pytest.param(
        v2(0x21, 0x10, b"\x01" * 30),
        header(2, protocol=None),
        id="inet-without-transport-falls-back-to-unspec",
    ),
    pytest.param(v2(0x20, 0x00), LOCAL_V2, id="local"),
    pytest.param(
        v2(0x20, 0x11, ipv4_block("1.2.3.4", "5.6.7.8", 1, 2) + b"\xff\xff"),
        LOCAL_V2,
        id="local-discards-addresses-and-junk",
    ),
    pytest.param(v2(0x20, 0xFF, b"x" * 5), LOCAL_V2, id="local-ignores-family"),
    pytest.param(
        v2(
            0x21,
            0x11,
            ipv4_block("1.2.3.4", "5.6.7.8", 1, 2)
            + tlv(PP2_TYPE_ALPN, b"h2")
            + tlv(PP2_TYPE_NOOP, b"")
            + tlv(0xEA, b"\x01vpce-0123")
            + tlv(PP2_TYPE_ALPN, b"http/1.1"),
        ),
        header(
            2,
            ("1.2.3.4", 1),
            ("5.6.7.8", 2),
        ),
        id="tlvs",
    ),
]


@pytest.mark.parametrize(("data", "expected"), V2_EXAMPLES)
@pytest.mark.parametrize("mode", ["v2", "auto"])
def test_v2_examples(data: bytes, expected: ProxyHeader, mode: ProxyMode) -> None:
    assert parse_whole(data + REQUEST, mode) == (expected, REQUEST)


def test_max_v2_header_size_is_adjustable() -> None:
    data = v2(0x21, 0x00, tlv(0xE0, b"x" * 5000))
    with pytest.raises(ProxyProtocolError, match="limit of 4096 bytes"):
        parse_whole(data)
    assert parse_whole(data, max_v2_header_size=8192) == (header(2, protocol=None), b"")


# --- Malformed headers -------------------------------------------------------

V1_TCP4_TAIL = b" 1.2.3.4 5.6.7.8 1 2\r\n"

MALFORMED = [
    # What comes first.
    pytest.param(
        b"GET / HTTP/1.1\r\n",
        "auto",
        r"not a PROXY protocol header: the first byte is 'G'.*connecting directly",
        id="http-request",
    ),
    pytest.param(
        b"\x16\x03\x01\x02\x00",
        "auto",
        r"not a PROXY protocol header: the first byte is '\\x16'",
        id="tls-client-hello",
    ),
    pytest.param(
        b"PRIXY TCP4" + V1_TCP4_TAIL,
        "auto",
        r"must start with 'PROXY ', not 'PRI",
        id="v1-misspelled",
    ),
    pytest.param(
        v2(0x21, 0x00),
        "v1",
        r"not a PROXY v1 header.*\(a v2 header\?\)",
        id="v2-header-in-v1-mode",
    ),
    pytest.param(
        b"PROXY UNKNOWN\r\n",
        "v2",
        r"PROXY v2 signature mismatch.*\(a v1 header\?\)",
        id="v1-header-in-v2-mode",
    ),
    # Version 1.
    pytest.param(
        b"PROXY TCP4 " + b"1" * 100,
        "auto",
        r"PROXY v1 header longer than 107 bytes",
        id="v1-no-crlf",
    ),
    pytest.param(
        b"PROXY UNKNOWN " + b"x" * 93 + b"\r\n",
        "v1",
        r"PROXY v1 header longer than 107 bytes",
        id="v1-crlf-at-108",
    ),
    pytest.param(
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
        "auto",
        r"bare LF",
        id="v1-bare-lf",
    ),
    pytest.param(b"PROXY UNKNOWN\n", "auto", r"bare LF", id="v1-unknown-bare-lf"),
    pytest.param(b"PROXY\r\n", "auto", r"must start with 'PROXY '", id="v1-no-word"),
    pytest.param(
        b"PROXY TCP5" + V1_TCP4_TAIL,
        "auto",
        r"unknown PROXY v1 protocol (starting )?'TCP5': expected TCP4, TCP6 or UNKNOWN",
        id="v1-tcp5",
    ),
    pytest.param(
        b"PROXY tcp4" + V1_TCP4_TAIL,
        "auto",
        r"unknown PROXY v1 protocol (starting )?'t",
        id="v1-lowercase",
    ),
    pytest.param(
        b"PROXY UDP4" + V1_TCP4_TAIL, "auto", r"unknown PROXY v1 protocol", id="v1-udp"
    ),
    pytest.param(
        b"PROXY TCP4\r\n",
        "auto",
        r"TCP4 line must give source address, destination address",
        id="v1-tcp4-no-fields",
    ),
    pytest.param(
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
        "auto",
        r"TCP4 line must give .* separated by single spaces",
        id="v1-missing-port",
    ),
    pytest.param(
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
        "auto",
        r"TCP4 line must give",
        id="v1-extra-field",
    ),
    pytest.param(
        b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
        "auto",
        r"TCP4 line must give",
        id="v1-double-space",
    ),
    pytest.param(
        b"PROXY TCP4 256.1.1.1 5.6.7.8 1 2\r\n",
        "auto",
        r"source address '256.1.1.1' is not a valid IPv4 address",
        id="v1-octet-too-big",
    ),
    pytest.param(
        b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
        "auto",
        r"source address '01.2.3.4' is not a valid IPv4",
        id="v1-ipv4-leading-zero",
    ),
    pytest.param(
        b"PROXY TCP4 1.2.3.4 5.6.7 1 2\r\n",
        "auto",
        r"destination address '5.6.7' is not a valid IPv4",
        id="v1-three-octets",
    ),
    pytest.param(
        b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
        "auto",
        r"source address '::1' is not a valid IPv4",
        id="v1-ipv6-in-tcp4",
    ),
    pytest.param(
        b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
        "auto",
        r"source address '1.2.3.4' is not a valid IPv6",
        id="v1-ipv4-in-tcp6",
    ),
    pytest.param(
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
        "auto",
        r"source address 'fe80::1%eth0' is not a valid IPv6",
        id="v1-ipv6-scope",
    ),
    pytest.param(
        b"PROXY TCP6 ::1 1::2::3 1 2\r\n",
        "auto",
        r"destination address '1::2::3' is not a valid IPv6",
        id="v1-ipv6-two-double-colons",
    ),
    pytest.param(
        b"PROXY TCP4 1.2.3.\xff 5.6.7.8 1 2\r\n",
        "auto",
        r"source address '1.2.3.\\xff' is not a valid IPv4",
        id="v1-non-ascii",
    ),
    pytest.param(
        b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
        "auto",
        r"source port '65536' is not a port number: expected 0 to 65535",
        id="v1-port-too-big",
    ),
    pytest.param(
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 080\r\n",
        "auto",
        r"destination port '080' is not a port number.*without leading zeros",
        id="v1-port-leading-zero",
    ),
    pytest.param(
        b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
        "auto",
        r"source port '-1'",
        id="v1-port-negative",
    ),
    pytest.param(
        b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
        "auto",
        r"source port '\+1'",
        id="v1-port-plus",
    ),
    pytest.param(
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n",
        "auto",
        r"destination port '2\\r'",
        id="v1-stray-cr",
    ),
    # Version 2.
    pytest.param(
        b"\r\n\r\n\x00\r\nQUIT\r" + b"\x21\x00\x00\x00",
        "auto",
        r"PROXY v2 signature mismatch",
        id="v2-signature-last-byte",
    ),
    pytest.param(
        b"\r\n\r\n\x01\r\nQUIT\n" + b"\x21\x00\x00\x00",
        "v2",
        r"PROXY v2 signature mismatch",
        id="v2-signature-nul",
    ),
    pytest.param(
        v2(0x11, 0x00),
        "auto",
        r"unsupported PROXY v2 version 0x1 .*must be 0x2",
        id="v2-version-1",
    ),
    pytest.param(
        v2(0x31, 0x00), "auto", r"unsupported PROXY v2 version 0x3", id="v2-version-3"
    ),
    pytest.param(
        v2(0x22, 0x00),
        "auto",
        r"unknown PROXY v2 command 0x2: expected 0x0 \(LOCAL\) or 0x1 \(PROXY\)",
        id="v2-command-2",
    ),
    pytest.param(
        v2(0x2F, 0x00), "auto", r"unknown PROXY v2 command 0xf", id="v2-command-f"
    ),
    pytest.param(
        v2(0x21, 0x51, b"\x00" * 12),
        "auto",
        r"unsupported address family 0x5",
        id="v2-family-5",
    ),
    pytest.param(
        v2(0x21, 0x41), "auto", r"unsupported address family 0x4", id="v2-family-4"
    ),
    pytest.param(
        v2(0x21, 0x13, b"\x00" * 12),
        "auto",
        r"unsupported transport protocol 0x3",
        id="v2-transport-3",
    ),
    pytest.param(
        v2(0x21, 0x11, b"\x00" * 11),
        "auto",
        r"length 11 is too short for AF_INET addresses, which take 12 bytes",
        id="v2-inet-short",
    ),
    pytest.param(
        v2(0x21, 0x22, b"\x00" * 35),
        "auto",
        r"length 35 is too short for AF_INET6 addresses, which take 36 bytes",
        id="v2-inet6-short",
    ),
    pytest.param(
        v2(0x21, 0x31, b"\x00" * 215),
        "auto",
        r"length 215 is too short for AF_UNIX addresses, which take 216 bytes",
        id="v2-unix-short",
    ),
    pytest.param(
        v2(0x21, 0x12),
        "auto",
        r"length 0 is too short for AF_INET addresses",
        id="v2-inet-empty",
    ),
    pytest.param(
        v2(0x21, 0x00, length=4081),
        "auto",
        r"PROXY v2 header of 4097 bytes is longer than the limit of 4096 bytes",
        id="v2-over-cap",
    ),
    pytest.param(
        v2(0x20, 0x00, length=0xFFFF),
        "auto",
        r"header of 65551 bytes is longer than the limit",
        id="v2-local-over-cap",
    ),
    pytest.param(
        # Found by hypothesis: the word's start is known, but a byte that is
        # not a space ends it.
        b"PROXY UNKNOWN\r\x80\r\n",
        "v1",
        r"unknown PROXY v1 protocol 'UNKNOWN\\r\\x80'",
        id="v1-word-ended-by-cr",
    ),
    pytest.param(
        v2(0x21, 0x11, ipv4_block("1.2.3.4", "5.6.7.8", 1, 2) + b"\x01\x00"),
        "auto",
        r"PROXY v2 TLV at byte 28 is cut short.*2 left",
        id="v2-tlv-cut-short",
    ),
    pytest.param(
        v2(0x21, 0x00, b"\x02\x00\x0a" + b"ab"),
        "auto",
        r"TLV of type 0x02 at byte 16 says its value is 10 bytes.*has 2 left",
        id="v2-tlv-overruns",
    ),
]


@pytest.mark.parametrize(("data", "mode", "message"), MALFORMED)
def test_malformed_whole(data: bytes, mode: ProxyMode, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message) as caught:
        parse_whole(data + REQUEST, mode)
    assert not isinstance(caught.value, ProxyHeaderIncomplete)


@pytest.mark.parametrize(("data", "mode", "message"), MALFORMED)
def test_malformed_byte_by_byte(data: bytes, mode: ProxyMode, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message):
        parse_every_start(data, mode)


# How many bytes it takes to prove a header invalid: the parser must fail on
# that byte, not wait for more.
EARLY_ERRORS = [
    pytest.param(b"GET / HTTP/1.1\r\n", 1, id="first-byte"),
    pytest.param(b"PROXY TCP4 " + b"1" * 200, V1_MAX_LENGTH, id="v1-107-bytes"),
    pytest.param(b"PROXY TCP5" + V1_TCP4_TAIL, 10, id="v1-word"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", 31, id="v1-bare-lf"),
    pytest.param(b"\r\n\r\nX" + b"\x00" * 20, 5, id="v2-signature"),
    pytest.param(v2(0x11, 0x00), 13, id="v2-version"),
    pytest.param(v2(0x23, 0x00), 13, id="v2-command"),
    pytest.param(v2(0x21, 0x71, b"\x00" * 12), 14, id="v2-family"),
    pytest.param(v2(0x21, 0x11, b"\x00" * 8), 16, id="v2-too-short"),
    pytest.param(v2(0x21, 0x00, b"\x00" * 5000), 16, id="v2-over-cap"),
]


@pytest.mark.parametrize(("data", "proof"), EARLY_ERRORS)
def test_errors_come_as_soon_as_the_bytes_prove_them(data: bytes, proof: int) -> None:
    for end in range(1, proof):
        assert parse(data[:end]) is None
    with pytest.raises(ProxyProtocolError):
        parse(data[:proof])


def test_v1_line_of_107_bytes_is_accepted_and_108_is_not() -> None:
    line = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
    assert len(line) == V1_MAX_LENGTH
    assert parse_whole(line) == (UNKNOWN_V1, b"")
    with pytest.raises(ProxyProtocolError, match="longer than 107 bytes"):
        parse_whole(line[:-2] + b"x\r\n")


# --- Incomplete input and parser state --------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(b"", r"input ended before any PROXY header byte", id="empty"),
        pytest.param(
            b"PROXY TCP4 1.2",
            r"input ended after 14 bytes of an incomplete PROXY v1 header",
            id="v1",
        ),
        pytest.param(
            V2_SIGNATURE[:5],
            r"after 5 bytes of an incomplete PROXY v2 header",
            id="v2-fixed-part",
        ),
        pytest.param(
            v2(0x21, 0x11, b"\x00" * 12)[:20],
            r"input ended after 20 of the 28 bytes of a PROXY v2 header",
            id="v2-addresses",
        ),
    ],
)
def test_incomplete_input(data: bytes, message: str) -> None:
    assert parse(data) is None
    with pytest.raises(ProxyHeaderIncomplete, match=message):
        parse_whole(data)


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="mode must be 'v1', 'v2' or 'auto'"):
        parse_proxy_header(b"PROXY", "v3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 232"):
        parse_proxy_header(b"PROXY", max_v2_header_size=100)


# --- Properties --------------------------------------------------------------

ports = st.integers(0, 65535)
ip_versions: st.SearchStrategy[Literal[4, 6]] = st.sampled_from([4, 6])
transports: st.SearchStrategy[ProxyTransport] = st.sampled_from(["STREAM", "DGRAM"])


def socket_form(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
) -> ProxyAddress:
    """An address as the socket module gives it."""
    if ip.version == 4:
        return (str(ip), port)
    return (socket.inet_ntop(socket.AF_INET6, ip.packed), port, 0, 0)


@st.composite
def v1_headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    """A valid version 1 line, written out by hand, and what it means."""
    version = draw(st.one_of(ip_versions, st.none()))
    if version is None:
        # The short form, or anything but LF after the word, which is ignored.
        rest = st.binary(max_size=91).map(lambda b: b.replace(b"\n", b""))
        ignored = draw(st.one_of(st.just(b""), rest.map(lambda b: b" " + b)))
        return b"PROXY UNKNOWN" + ignored + b"\r\n", UNKNOWN_V1
    ips = st.ip_addresses(v=version)
    source_ip, destination_ip = draw(ips), draw(ips)
    source_port, destination_port = draw(ports), draw(ports)
    # The spec's form for IPv6 is groups of hex digits: compressed, exploded,
    # upper or lower case.
    spelling = draw(st.sampled_from(["compressed", "exploded", "upper"]))

    def show(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
        if spelling == "compressed" or ip.version == 4:
            return ip.compressed
        # Eight groups of four hex digits, from the bytes: Python 3.13's
        # `exploded` writes an IPv4-mapped address with a dotted quad,
        # which is not the spec's form and overruns its 107 bytes.
        groups = ":".join(ip.packed[i : i + 2].hex() for i in range(0, 16, 2))
        return groups.upper() if spelling == "upper" else groups

    word = b"TCP4" if version == 4 else b"TCP6"
    line = b"PROXY %s %s %s %d %d\r\n" % (
        word,
        show(source_ip).encode(),
        show(destination_ip).encode(),
        source_port,
        destination_port,
    )
    expected = header(
        1,
        socket_form(source_ip, source_port),
        socket_form(destination_ip, destination_port),
    )
    return line, expected


tlv_lists = st.lists(
    st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=5
).map(tuple)

# At most 4 bytes a character in UTF-8: 27 characters always fit in 108 bytes.
unix_paths = st.text(
    st.characters(codec="utf-8", exclude_characters="\x00"), max_size=27
)

abstract_names = st.builds(
    lambda name, last: b"\x00" + name + bytes([last]),
    st.binary(max_size=100),
    st.integers(1, 255),
)


@st.composite
def v2_headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    """A valid version 2 header, packed by hand, and what it means."""
    kind = draw(st.sampled_from(["inet", "inet6", "unix", "unspec", "local"]))
    protocol = draw(transports)
    transport = 0x1 if protocol == "STREAM" else 0x2
    tlvs: tuple[tuple[int, bytes], ...] = draw(tlv_lists)
    tlv_bytes = b"".join(tlv(t, v) for t, v in tlvs)
    if kind == "local":
        # Whatever follows the command is discarded, family included.
        family_byte = draw(st.integers(0, 255))
        junk = draw(st.binary(max_size=300))
        return v2(0x20, family_byte, junk), LOCAL_V2
    if kind == "unspec":
        return (
            v2(0x21, transport, tlv_bytes),
            header(2, protocol=protocol),
        )
    if kind == "unix":
        source: str | bytes = draw(st.one_of(unix_paths, abstract_names))
        destination: str | bytes = draw(st.one_of(unix_paths, abstract_names))
        fields = b"".join(
            unix_field(os.fsencode(path)) for path in (source, destination)
        )
        return (
            v2(0x21, 0x30 | transport, fields + tlv_bytes),
            header(2, source, destination, protocol),
        )
    version: Literal[4, 6] = 4 if kind == "inet" else 6
    source_ip = draw(st.ip_addresses(v=version))
    destination_ip = draw(st.ip_addresses(v=version))
    source_port, destination_port = draw(ports), draw(ports)
    block = (
        source_ip.packed
        + destination_ip.packed
        + source_port.to_bytes(2, "big")
        + destination_port.to_bytes(2, "big")
    )
    family = 0x10 if version == 4 else 0x20
    return (
        v2(0x21, family | transport, block + tlv_bytes),
        header(
            2,
            socket_form(source_ip, source_port),
            socket_form(destination_ip, destination_port),
            protocol,
        ),
    )


all_headers = st.one_of(v1_headers(), v2_headers())


@PROPERTY_SETTINGS
@hypothesis.given(all_headers, st.binary(max_size=64))
def test_every_start_needs_more_and_the_whole_takes_exactly_the_header(
    example: tuple[bytes, ProxyHeader], after: bytes
) -> None:
    # However the bytes arrive, the caller asks with all it has so far.
    encoded, expected = example
    stream = encoded + after
    for end in range(len(stream) + 1):
        found = parse(stream[:end])
        assert found == (None if end < len(encoded) else (expected, len(encoded)))


@pytest.mark.parametrize(
    ("data", "expected"),
    [*V1_EXAMPLES, *V2_EXAMPLES],
)
def test_one_byte_at_a_time(data: bytes, expected: ProxyHeader) -> None:
    for end in range(1, len(data)):
        assert parse(data[:end]) is None
    assert parse(data) == (expected, len(data))


@PROPERTY_SETTINGS
@hypothesis.given(all_headers)
def test_every_truncation_is_incomplete_not_an_error(
    example: tuple[bytes, ProxyHeader],
) -> None:
    encoded, _ = example
    for end in range(len(encoded)):
        assert parse(encoded[:end]) is None
        with pytest.raises(ProxyHeaderIncomplete):
            parse_whole(encoded[:end])


# --- Reading from a stream socket --------------------------------------------

STREAM_EXAMPLES = [
    pytest.param(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n", id="v1"),
    pytest.param(b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n", id="v1-longest"),
    pytest.param(
        v2(
            0x21,
            0x11,
            ipv4_block("1.2.3.4", "5.6.7.8", 1, 2) + tlv(PP2_TYPE_ALPN, b"h2"),
        ),
        id="v2-tlv",
    ),
    pytest.param(
        v2(0x21, 0x31, unix_field(b"/run/client.sock") + unix_field(b"/run/app.sock")),
        id="v2-unix",
    ),
    pytest.param(v2(0x20, 0x00), id="v2-local"),
]


async def send_in_chunks(sock: trio.socket.SocketType, data: bytes, size: int) -> None:
    """Send ``data`` in chunks, each arriving after the reader has seen the last."""
    for start in range(0, len(data), size):
        await trio.testing.wait_all_tasks_blocked()
        await sock.send(data[start : start + size])


@pytest.mark.parametrize("size", [1, 7, 10_000])
@pytest.mark.parametrize("encoded", STREAM_EXAMPLES)
async def test_the_stream_reader_takes_the_header_and_not_a_byte_more(
    encoded: bytes, size: int
) -> None:
    # What follows the header (a TLS handshake, say) must stay in the socket
    # for whatever reads next, however the header arrives: whole with what
    # follows, or in pieces.
    expected = parse_whole(encoded)[0]
    proxy, server = trio.socket.socketpair()
    with proxy, server, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_in_chunks, proxy, encoded + REQUEST, size)
            assert await receive_proxy_header(server, "auto") == expected
        assert await server.recv(1000) == REQUEST


@pytest.mark.parametrize(
    ("sent", "error", "message"),
    [
        pytest.param(
            b"PROXY TCP4 1.2",
            ProxyHeaderIncomplete,
            r"input ended after 14 bytes of an incomplete PROXY v1 header",
            id="hangs-up-early",
        ),
        pytest.param(
            b"",
            ProxyHeaderIncomplete,
            r"before any PROXY header byte",
            id="says-nothing",
        ),
        pytest.param(
            b"PROXY TCP4 " + b"1" * 5000,
            ProxyProtocolError,
            r"longer than 107 bytes",
            id="endless-line",
        ),
    ],
)
async def test_the_stream_reader_refuses_what_is_not_a_whole_header(
    sent: bytes, error: type[ProxyProtocolError], message: str
) -> None:
    proxy, server = trio.socket.socketpair()
    with proxy, server, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_and_hang_up, proxy, sent)
            with pytest.raises(error, match=message):
                await receive_proxy_header(server, "auto")


async def send_and_hang_up(sock: trio.socket.SocketType, data: bytes) -> None:
    await send_in_chunks(sock, data, 50)
    await trio.testing.wait_all_tasks_blocked()
    sock.shutdown(socket.SHUT_WR)


# Starts that lead random bytes deeper into the parser than the first byte.
PREFIXES = [
    b"",
    b"PROXY ",
    b"PROXY TCP4 ",
    b"PROXY TCP6 ",
    b"PROXY UNKNOWN",
    V2_SIGNATURE,
    V2_SIGNATURE + b"\x21",
    V2_SIGNATURE + b"\x21\x11",
    V2_SIGNATURE + b"\x20",
]


@PROPERTY_SETTINGS
@hypothesis.given(
    st.sampled_from(PREFIXES),
    st.binary(max_size=300),
    st.sampled_from(["v1", "v2", "auto"]),
)
def test_random_bytes_raise_nothing_but_proxy_protocol_error(
    prefix: bytes, tail: bytes, mode: ProxyMode
) -> None:
    with contextlib.suppress(ProxyProtocolError):
        parse_every_start(prefix + tail, mode)


@PROPERTY_SETTINGS
@hypothesis.given(all_headers, st.data())
def test_damaged_headers_raise_nothing_but_proxy_protocol_error(
    example: tuple[bytes, ProxyHeader], data: st.DataObject
) -> None:
    encoded, _ = example
    damaged = bytearray(encoded)
    for _ in range(data.draw(st.integers(1, 3), label="damages")):
        index = data.draw(st.integers(0, len(damaged) - 1), label="index")
        damaged[index] = data.draw(st.integers(0, 255), label="byte")
    stream = bytes(damaged) + data.draw(st.binary(max_size=200), label="after")
    with contextlib.suppress(ProxyProtocolError):
        parse_every_start(stream)


@PROPERTY_SETTINGS
@hypothesis.given(st.binary(min_size=200, max_size=5000))
def test_one_huge_chunk_leaves_the_buffer_bounded(tail: bytes) -> None:
    prefixes = (b"PROXY ", b"PROXY UNKNOWN ", V2_SIGNATURE + b"\x21\x00\xff\xff")
    for prefix in prefixes:
        with contextlib.suppress(ProxyProtocolError):
            parse(prefix + tail)


# --- Builders ----------------------------------------------------------------


@PROPERTY_SETTINGS
@hypothesis.given(
    ip_versions.flatmap(
        lambda v: st.tuples(st.ip_addresses(v=v), st.ip_addresses(v=v))
    ),
    ports,
    ports,
)
def test_build_v1_round_trips(
    ips: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]
    | tuple[ipaddress.IPv6Address, ipaddress.IPv6Address],
    source_port: int,
    destination_port: int,
) -> None:
    source = socket_form(ips[0], source_port)
    destination = socket_form(ips[1], destination_port)
    assert isinstance(source, tuple)
    assert isinstance(destination, tuple)
    line = build_v1(source, destination)
    assert len(line) <= V1_MAX_LENGTH
    assert parse_whole(line + REQUEST, "v1") == (
        header(1, source, destination),
        REQUEST,
    )


def test_build_v1_unknown() -> None:
    assert build_v1() == b"PROXY UNKNOWN\r\n"


@st.composite
def v2_arguments(
    draw: st.DrawFn,
) -> tuple[ProxyAddress | None, ProxyAddress | None, ProxyTransport | None]:
    """Addresses of one family (or none) and a protocol for build_v2()."""
    family = draw(st.sampled_from(["inet", "inet6", "unix", "unspec"]))
    protocol = draw(transports)
    if family == "unspec":
        return None, None, draw(st.one_of(st.none(), transports))
    if family == "unix":
        paths = st.one_of(unix_paths, abstract_names)
        return draw(paths), draw(paths), protocol
    ips = st.ip_addresses(v=4 if family == "inet" else 6)
    return (
        socket_form(draw(ips), draw(ports)),
        socket_form(draw(ips), draw(ports)),
        protocol,
    )


@PROPERTY_SETTINGS
@hypothesis.given(v2_arguments(), tlv_lists)
def test_build_v2_round_trips(
    arguments: tuple[ProxyAddress | None, ProxyAddress | None, ProxyTransport | None],
    tlvs: tuple[tuple[int, bytes], ...],
) -> None:
    source, destination, protocol = arguments
    encoded = build_v2(source, destination, protocol=protocol, tlvs=tlvs)
    assert parse_whole(encoded + REQUEST, "v2") == (
        header(2, source, destination, protocol),
        REQUEST,
    )


def test_build_v2_local() -> None:
    assert build_v2(command="LOCAL") == V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert parse_whole(build_v2(command="LOCAL")) == (LOCAL_V2, b"")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(
            lambda: build_v1(("1.2.3.4", 1), None), "both source and destination"
        ),
        pytest.param(
            lambda: build_v1(("1.2.3.4", 1), ("::1", 2, 0, 0)),
            "must both be IPv4 or both IPv6",
        ),
        pytest.param(lambda: build_v1(("1.2.3.4", 65536), ("1.2.3.4", 1)), "port"),
        pytest.param(
            lambda: build_v1(("fe80::1%eth0", 1, 0, 0), ("::1", 1, 0, 0)), "scope"
        ),
        pytest.param(
            lambda: build_v1(("localhost", 1), ("1.2.3.4", 1)),
            "does not appear to be an IPv4 or IPv6 address",
        ),
        pytest.param(
            lambda: build_v2(("1.2.3.4", 1), "/tmp/socket"),
            "must both be IP or both Unix",
        ),
        pytest.param(
            lambda: build_v2(("1.2.3.4", 1), ("1.2.3.4", 2), protocol=None),
            "addresses need protocol",
        ),
        pytest.param(lambda: build_v2("/" + "x" * 108, "/y"), "over 108 bytes"),
        pytest.param(lambda: build_v2("/tmp/a\x00b", "/y"), "contains a NUL"),
        pytest.param(
            lambda: build_v2(command="LOCAL", tlvs=[(1, b"")]),
            "no addresses and no TLVs",
        ),
        pytest.param(lambda: build_v2(tlvs=[(256, b"")]), "TLV type must be 0 to 255"),
        pytest.param(
            lambda: build_v2(tlvs=[(1, b"x" * 40000), (2, b"x" * 40000)]),
            "at most 65535 bytes",
        ),
    ],
)
def test_builders_refuse_what_cannot_be_sent(
    call: Callable[[], bytes], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        call()
