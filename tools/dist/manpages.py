"""A manual page for a console script, from its argparse parser.

Run by the package's own interpreter (`<venv>/bin/python manpages.py MODULE:FUNCTION PROG VERSION`), so the
page describes the code the package installs; it imports nothing from tools/. The page holds the parser's
description, the commands with their one-line help, and each command's full --help as argparse prints it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys


def roff_text(text: str) -> str:
    """`text` safe in roff: backslashes and minus signs escaped, no line taken for a request."""
    lines = []
    for line in text.replace("\\", "\\e").replace("-", "\\-").splitlines():
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(lines)


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of each subcommand, in the order --help lists them."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                found.append((name, helps.get(name, ""), sub))
    return found


def manpage(parser: argparse.ArgumentParser, prog: str, version: str) -> str:
    title = prog.upper()
    out = [f'.TH "{title}" 1 "" "onprem {version}" "onprem"',
           ".SH NAME", f"{roff_text(prog)} \\- {roff_text((parser.description or prog).splitlines()[0])}",
           ".SH SYNOPSIS", ".nf", roff_text(parser.format_usage().removeprefix("usage: ").strip()), ".fi",
           ".SH OPTIONS", ".nf", roff_text(parser.format_help()), ".fi"]
    commands = subcommands(parser)
    if commands:
        out += [".SH COMMANDS"]
        for name, summary, sub in commands:
            out += [f".SS {roff_text(name)}", roff_text(summary) if summary else "", ".nf",
                    roff_text(sub.format_help()), ".fi"]
    package = "onprem-control-plane" if prog == "onprem" else prog
    out += [".SH SEE ALSO", f"/usr/share/doc/{package}/install.md, https://github.com/onprem/onprem"]
    return "\n".join(line for line in out if line) + "\n"


def main() -> None:
    target, prog, version = sys.argv[1:4]
    module_name, function = target.split(":")
    os.environ["COLUMNS"] = "78"  # argparse wraps its help to this width
    parser = getattr(importlib.import_module(module_name), function)()
    parser.prog = prog
    sys.stdout.write(manpage(parser, prog, version))


if __name__ == "__main__":
    main()
