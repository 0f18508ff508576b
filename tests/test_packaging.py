"""The version has one source, and the changelog names it.

CI (.ci/run) builds the sdist and the wheel, checks them with twine, and
serves echo from the wheel installed in a fresh venv (.ci/wheel_smoke.py).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import trioserve

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - pytest itself needs tomli before 3.11
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent

# A release heading in docs/changelog.rst: "0.2.0" underlined with dashes.
RELEASE_HEADING = re.compile(r"^(\d+\.\d+\.\d+\S*)\n-+$", re.MULTILINE)


def test_version_is_the_changelogs_newest_release() -> None:
    changelog = (REPO / "docs" / "changelog.rst").read_text()
    releases = RELEASE_HEADING.findall(changelog)
    assert releases, "docs/changelog.rst has no release heading"
    assert trioserve.__version__ == releases[0], (
        f"trioserve.__version__ is {trioserve.__version__}, but the newest "
        f"release in docs/changelog.rst is {releases[0]}"
    )


def test_pyproject_takes_the_version_from_the_package() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"]
    assert "version" in pyproject["project"]["dynamic"]
    source = pyproject["tool"]["hatch"]["version"]["path"]
    assert (REPO / source).resolve() == Path(trioserve.__file__).resolve()


def supported() -> tuple[list[str], str]:
    """The Pythons and the oldest Trio that pyproject.toml claims."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    prefix = "Programming Language :: Python :: 3."
    pythons = [
        "3." + classifier.removeprefix(prefix)
        for classifier in project["classifiers"]
        if classifier.startswith(prefix) and classifier.removeprefix(prefix).isdigit()
    ]
    (trio,) = [
        match[1]
        for requirement in project["dependencies"]
        if (match := re.fullmatch(r"trio>=([\d.]+)", requirement))
    ]
    return pythons, trio


def test_readme_and_docs_state_the_supported_pythons_and_oldest_trio() -> None:
    pythons, trio = supported()
    assert pythons == ["3.10", "3.11", "3.12", "3.13"]
    listed = ", ".join(pythons[:-1]) + f" and {pythons[-1]}"
    for page in (REPO / "README.md", REPO / "docs" / "index.rst"):
        text = " ".join(page.read_text(encoding="utf-8").split())
        assert f"Python {listed}" in text, page.name
        assert f"Trio {trio} or newer" in text, page.name
