import collections
import gc
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    # A socket that leaks is only noticed when it is collected; collecting at
    # the end of every test blames its ResourceWarning on the test that
    # leaked it (warnings are errors in this suite).
    yield
    gc.collect()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path, under ``/tmp``.

    For Unix sockets, whose paths are limited to 108 bytes, which pytest's
    ``tmp_path`` may exceed.
    """
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="ts-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def readable_waits(monkeypatch: pytest.MonkeyPatch) -> collections.Counter[int]:
    """How many times each file descriptor was waited on to become readable.

    Counts the calls to ``trio.lowlevel.wait_readable``, which still waits:
    for tests of when a reader waits and when it reads without waiting.
    """
    waits: collections.Counter[int] = collections.Counter()
    wait_readable = trio.lowlevel.wait_readable

    async def counting_wait_readable(sock: Any) -> None:
        waits[sock if isinstance(sock, int) else sock.fileno()] += 1
        await wait_readable(sock)

    monkeypatch.setattr(trio.lowlevel, "wait_readable", counting_wait_readable)
    return waits
