"""uvloop: asyncio_protocol_peer's line echo Protocol and DatagramProtocol,
run on uvloop's event loop instead of asyncio's."""

from __future__ import annotations

import uvloop

from benchmarks.peers import asyncio_protocol_peer


def main() -> None:
    asyncio_protocol_peer.main(uvloop.run, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
