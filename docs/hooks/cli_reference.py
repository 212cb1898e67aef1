"""mkdocs hook: the CLI page's reference is the ``--help`` text of the argparse definitions.

``docs/cli.md`` holds the marker ``<!-- cli-reference -->``; this hook replaces it with the help of
``diffattn.cli.build_parser()`` and of every subcommand, nested ones included (``diffattn testbed
train``), one section each. ``diffattn train`` forwards its arguments to the training parser
(``diffattn.lora.cli.build_parser``, shared with ``python -m diffattn.lora``), whose help is shown there.
Both modules are light to import (argparse definitions; torch, no diffusers or peft). The page
therefore always matches the parser, whoever extends it.
"""

from __future__ import annotations

import argparse
import os
from contextlib import contextmanager

MARKER = "<!-- cli-reference -->"
PAGE = "cli.md"
WIDTH = "100"  # argparse wraps help at $COLUMNS; fixed so the page does not depend on the terminal


@contextmanager
def _columns(width: str):
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = width
    try:
        yield
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def _subcommands(parser: argparse.ArgumentParser):
    """(one-line help, subparser) for each subcommand, in definition order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield helps.get(name) or "", sub


def _forwarded_help(prog: str) -> str | None:
    """Help of a subcommand that hands its arguments to another parser (``add_help=False``)."""
    if prog == "diffattn train":
        from diffattn.lora.cli import build_parser as train_parser

        return train_parser(prog=prog).format_help()
    return None


def _sections(parser: argparse.ArgumentParser, level: int) -> list[str]:
    out = []
    for summary, sub in _subcommands(parser):
        text = _forwarded_help(sub.prog) if not sub.add_help else None
        out.append(f"{'#' * level} `{sub.prog}`\n")
        if summary:
            out.append(f"{summary[0].upper()}{summary[1:].rstrip('.')}.\n")
        out.append(f"```text\n{(text or sub.format_help()).rstrip()}\n```\n")
        out.extend(_sections(sub, level + 1))
    return out


def reference() -> str:
    from diffattn.cli import build_parser

    with _columns(WIDTH):
        parser = build_parser()
        parts = ["## `diffattn`\n", f"```text\n{parser.format_help().rstrip()}\n```\n"]
        parts.extend(_sections(parser, 3))
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"docs/{PAGE} lost its {MARKER} marker")
    return markdown.replace(MARKER, reference())
