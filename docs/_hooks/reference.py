"""MkDocs hooks: the reference parts that come from the code are generated at build time.

A page holds ``<!-- isolate:NAME -->`` ... ``<!-- /isolate:NAME -->``; the build replaces
what is between with the generated text (``options``: the options table from
``isolate._config.OPTIONS``; ``cli``: ``python -m isolate`` help). The files in the
repository carry the same text, checked by ``tests/test_docs.py``, so they read the same on
a code host.
"""

from __future__ import annotations

import argparse
import functools
import re
from typing import Any

from isolate._cli import build_parser
from isolate._config import OPTIONS


def options_table() -> str:
    rows = ["| option | CLI | ini | env | default | meaning |", "|---|---|---|---|---|---|"]
    for opt in OPTIONS:
        default = f"`{opt.default}`" if opt.default else "`(unset)`"
        cli = f"`{opt.cli}` / `{opt.negative_cli}`" if opt.is_flag else f"`{opt.cli}`"
        rows.append(f"| `{opt.name}` | {cli} | `{opt.ini}` | `{opt.env}` | {default} | {opt.help} |")
    return "\n".join(rows)


def cli_help() -> str:
    parser = build_parser()
    parts = [("python -m isolate", parser)]
    for action in parser._actions:  # argparse keeps subparsers here
        if isinstance(action, argparse._SubParsersAction):
            parts += [(f"python -m isolate {name}", sub) for name, sub in action.choices.items()]
    out = []
    for title, sub in parts:
        sub.prog = title
        sub.formatter_class = functools.partial(argparse.HelpFormatter, width=88)  # not the terminal's
        out += [f"### `{title}`", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(out).rstrip()


GENERATED = {"options": options_table, "cli": cli_help}


def fill(markdown: str) -> str:
    """``markdown`` with every generated region rewritten."""
    for name, make in GENERATED.items():
        pattern = re.compile(rf"(<!-- isolate:{name} -->\n).*?(<!-- /isolate:{name} -->)", re.S)
        markdown = pattern.sub(lambda m, make=make: m.group(1) + make() + "\n" + m.group(2), markdown)  # type: ignore[misc]
    return markdown


def on_page_markdown(markdown: str, **_: Any) -> str:
    return fill(markdown)
