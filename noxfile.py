"""The test suite on every supported Python, and on the oldest supported Trio.

``nox`` runs every session; ``nox -s tests-3.12`` one of them, and
``nox -s oldest_trio -- tests/test_server.py -x`` passes pytest its arguments.
Install nox with ``pip install -e ".[matrix]"``.

Both lists come from pyproject.toml, so there is one of each: the Pythons
are its ``Programming Language :: Python :: 3.X`` classifiers, and the
oldest Trio is the floor of its ``trio>=`` dependency. An interpreter that
is not on this machine is skipped with a message, not an error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nox

PYPROJECT = nox.project.load_toml("pyproject.toml")
PYTHONS = nox.project.python_versions(PYPROJECT)
# The Python the README's test command uses, where the oldest Trio runs.
README_PYTHON = "3.11"


def _oldest_trio() -> str:
    for requirement in PYPROJECT["project"]["dependencies"]:
        match = re.fullmatch(r"trio\s*>=\s*([\w.]+)", requirement)
        if match:
            return match[1]
    raise RuntimeError("pyproject.toml names no trio>=X.Y dependency")


OLDEST_TRIO = _oldest_trio()


def _find_pyenv_pythons() -> None:
    # pyenv's shims answer "python3.10" only for the versions pyenv has
    # activated, and fail for the rest: put each installed version's own
    # bin directory first on PATH so nox finds the real interpreter.
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    found = []
    for version in PYTHONS:
        installed = sorted(
            (root / "versions").glob(f"{version}.*/bin/python{version}"),
            key=lambda path: [
                int(part) for part in re.findall(r"\d+", path.parent.parent.name)
            ],
        )
        if installed:
            found.append(str(installed[-1].parent))
    if found:
        os.environ["PATH"] = os.pathsep.join([*found, os.environ.get("PATH", "")])


_find_pyenv_pythons()

# A missing interpreter skips its session (nox's default errors on CI).
nox.options.error_on_missing_interpreters = False
nox.options.sessions = ["tests", "oldest_trio"]


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The test suite on one supported Python, with the newest Trio."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=README_PYTHON)
def oldest_trio(session: nox.Session) -> None:
    """The test suite on the oldest Trio pyproject.toml allows."""
    session.install("-e", ".[test]", f"trio=={OLDEST_TRIO}")
    session.run("python", "-c", "import trio; print('trio', trio.__version__)")
    session.run("python", "-m", "pytest", *session.posargs)
