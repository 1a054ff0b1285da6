"""``docs/cli.md``, written from the typer app itself so that it cannot drift.

``python -m zserve.cli_docs > docs/cli.md`` (``make docs``) writes it again;
``tests/test_docs.py`` fails when the committed page differs from what this
module renders from today's ``zserve.cli``.

The page is plain Markdown built from the parameter objects (names, types,
defaults, help) of the click that typer carries (typer 0.29 vendors its own,
so they are duck-typed here), not from the terminal help, so the terminal's
width and colours never change it.
"""

from __future__ import annotations

import sys
from typing import Any

import typer

from zserve.cli import app

_HEAD = """\
# The `zserve` command

<!-- Written by `python -m zserve.cli_docs` (`make docs`) from zserve/cli.py;
     tests/test_docs.py fails when this page is stale. Do not edit by hand. -->

Every command prints its own help with `--help`. Exit statuses of the
commands that talk to a broker (`generate`, `chat`, `status`): 0 success,
2 bad request (or context overflow), 3 model not found, 4 overloaded,
5 worker lost, 6 timeout, 7 cancelled, 8 broker unreachable, 9 engine error.

"""


def _default(p: Any) -> str:
    if _is_option(p) and p.is_flag:
        return "on" if p.default else "off"
    d = p.default
    if d is None or d == () or d == []:
        return ""
    if callable(d):
        return ""
    return f"`{d}`"


def _is_option(p: Any) -> bool:
    return p.param_type_name == "option"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _type(p: Any, ctx: Any) -> str:
    if _is_option(p) and p.is_flag:
        return "flag"
    t = p.display_type(ctx).strip("<>")
    return f"{t}, repeatable" if p.multiple else t


def command_page(name: str, cmd: Any) -> str:
    """One command's section: summary, usage, arguments, options."""
    ctx = cmd.context_class(cmd, info_name=f"zserve {name}")
    usage = " ".join(cmd.collect_usage_pieces(ctx))
    out = [f"## `zserve {name}`", ""]
    if cmd.help:
        out += [" ".join(cmd.help.split()), ""]
    out += ["```", f"zserve {name} {usage}".rstrip(), "```", ""]
    args = [p for p in cmd.params if p.param_type_name == "argument"]
    opts = [p for p in cmd.params if _is_option(p) and not p.hidden]
    if args:
        out += ["| argument | help |", "|---|---|"]
        for a in args:
            out.append(f"| `{a.name.upper()}` | {_cell(getattr(a, 'help', '') or '')} |")
        out.append("")
    if opts:
        out += ["| option | type | default | help |", "|---|---|---|---|"]
        for o in opts:
            flags = ", ".join(f"`{f}`" for f in [*o.opts, *o.secondary_opts])
            out.append(f"| {flags} | {_type(o, ctx)} | {_default(o)} | {_cell(o.help or '')} |")
        out.append("")
    return "\n".join(out)


def render() -> str:
    """The whole page."""
    group = typer.main.get_command(app)
    names = sorted(group.commands)
    body = [
        _HEAD.rstrip("\n"),
        "",
        "Commands: " + ", ".join(f"[`{n}`](#zserve-{n})" for n in names) + ".",
        "",
    ]
    for n in names:
        body.append(command_page(n, group.commands[n]))
    return "\n".join(body).rstrip("\n") + "\n"


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
