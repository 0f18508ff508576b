import gc
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    # A socket that leaks is only noticed when it is collected; collecting at
    # the end of every test blames its ResourceWarning on the test that
    # leaked it (warnings are errors in this suite).
    yield
    gc.collect()
