"""The README and the documentation site in docs/ stay in step with the code.

`mkdocs build --strict` (CI) fails on a broken link inside docs/; these tests cover what it
cannot see: the README's links into docs/, and the reference tables that must list every
registered modification and every option.
"""

from __future__ import annotations

import re
from pathlib import Path

from pytest_hemorrhage.modifications import get, names
from pytest_hemorrhage.settings import OPTIONS

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _first_column(page: str) -> set[str]:
    """The code spans in the first column of every table row of a docs page."""
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    cells = re.findall(r"^\| `([^`]+)` \|", text, flags=re.MULTILINE)
    return set(cells)


def test_every_relative_link_in_the_readme_exists():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = [t for t in LINK.findall(readme) if "://" not in t and not t.startswith("#")]
    assert targets, "the README's tour links to the docs pages"
    missing = [t for t in targets if not (ROOT / t.split("#")[0]).is_file()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_the_catalogue_page_lists_every_registered_modification():
    listed = _first_column("catalogue.md")
    # the built-ins: other test modules register their own in the same process
    registered = {n for n in names() if get(n)[1].__module__.startswith("pytest_hemorrhage.")}
    assert listed == registered, (
        f"docs/catalogue.md misses {sorted(registered - listed)}, "
        f"lists unregistered {sorted(listed - registered)}"
    )


def test_the_options_page_lists_every_option():
    listed = {cell.split("=")[0] for cell in _first_column("options.md")}
    declared = {f"--hemorrhage-{option.name}" for option in OPTIONS}
    assert declared - listed == set(), f"docs/options.md misses {sorted(declared - listed)}"
