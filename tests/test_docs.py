"""The reference parts generated from the code at site build time are also in the
repository's Markdown, identical, so the files read the same on a code host."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DOCS = Path(__file__).parent.parent / "docs"


def _hooks():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("isolate_docs_hooks", DOCS / "_hooks" / "reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_options_page_matches_the_code() -> None:
    text = (DOCS / "options.md").read_text()
    assert _hooks().fill(text) == text, "regenerate it with docs/_hooks/reference.py's fill()"


def test_the_cli_page_names_every_command_and_flag() -> None:
    # argparse's layout differs between Python versions: the site build regenerates it
    text = (DOCS / "reference" / "cli.md").read_text()
    for needle in ("### `python -m isolate cleanup`", "### `python -m isolate status`", "--caches", "--dry-run"):
        assert needle in text



def test_every_fixture_is_in_the_fixtures_table() -> None:
    import re

    source = (DOCS.parent / "isolate" / "plugin" / "_fixtures.py").read_text()
    table = (DOCS / "reference" / "fixtures.md").read_text().split("## From the code")[0]
    for name in re.findall(r"^def (isolate_\w+)\(", source, re.M):
        assert f"`{name}`" in table, name


def test_the_api_page_names_every_public_name() -> None:
    import isolate

    text = (DOCS / "reference" / "api.md").read_text()
    missing = [name for name in isolate.__all__ if f"::: isolate.{name}\n" not in text + "\n"]
    assert missing == [], f"add them to docs/reference/api.md: {missing}"
