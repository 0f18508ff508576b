"""What every peer server shares: its command line and its ready line.

Each peer is run as ``python PEER.py --tcp HOST:PORT`` or
``python PEER.py --udp HOST:PORT`` (port 0 picks a free port), with the
repository on ``PYTHONPATH`` for this module. Once
listening it prints ``serving TCP on HOST:PORT`` (or ``UDP``), the line
``python -m trioserve echo`` prints, so the runner reads the real port from
every server the same way. A peer serves until it is killed.
"""

from __future__ import annotations

import argparse


def parse_args(description: str) -> tuple[str, tuple[str, int]]:
    """Return ``("tcp" or "udp", (host, port))`` from the command line."""
    parser = argparse.ArgumentParser(description=description)
    kind = parser.add_mutually_exclusive_group(required=True)
    kind.add_argument("--tcp", metavar="HOST:PORT", help="serve TCP line echo")
    kind.add_argument("--udp", metavar="HOST:PORT", help="serve UDP echo")
    args = parser.parse_args()
    text = args.tcp or args.udp
    host, _, port = text.rpartition(":")
    return ("tcp" if args.tcp else "udp"), (host, int(port))


def announce(kind: str, address: tuple[object, ...] | str) -> None:
    """Print the ready line the runner waits for.

    address is the bound IP socket address, as the server library gives it.
    """
    assert isinstance(address, tuple), f"not an IP address: {address!r}"
    print(f"serving {kind.upper()} on {address[0]}:{address[1]}", flush=True)


#: The receive size the asyncio peers use: uvloop's and Trio's, not asyncio's
#: 256 KiB (see :func:`receive_like_uvloop`).
ASYNCIO_RECEIVE_SIZE = 64 * 1024


def receive_like_uvloop() -> None:
    """Make asyncio's selector transports receive at most 64 KiB at a time.

    asyncio receives into a new 256 KiB ``bytes`` on every read. With this
    machine's glibc that is above the allocator's trim threshold, so each
    receive of a 64-byte line maps and unmaps memory: the asyncio Protocol
    peer made 36k round trips a second at ``tcp-100`` so, and 166k with
    64 KiB receives (benchmarks/README.md, "Fairness and what the numbers
    mean"). The peers are tuned so that the ratios measure the event loop,
    not the allocator: it only makes them faster.
    """
    from asyncio import selector_events

    for transport in ("_SelectorSocketTransport", "_SelectorDatagramTransport"):
        cls = getattr(selector_events, transport)
        cls.max_size = ASYNCIO_RECEIVE_SIZE
