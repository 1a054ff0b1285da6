"""Checks a ``zserve`` command line against the typer app: the command exists
and every ``--option`` is one of its own (``run`` also passes the worker's).
Shared by the documentation and deployment checks."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import typer


@functools.cache
def commands() -> dict[str, frozenset[str]]:
    """Each zserve command and its options."""
    from zserve.cli import app

    group = typer.main.get_command(app)
    out = {}
    for name, cmd in group.commands.items():
        opts = {"--help"}
        for prm in cmd.params:
            if prm.param_type_name == "option":
                opts.update(prm.opts)
                opts.update(prm.secondary_opts)
        out[name] = frozenset(opts)
    return out


def problems(words: Sequence[str]) -> list[str]:
    """What is wrong with ``zserve CMD ...`` given as words after ``zserve``
    (empty: nothing)."""
    cmds = commands()
    if not words:
        return ["no command"]
    name = words[0]
    if name not in cmds:
        return [f"zserve {name}: no such command"]
    allowed = cmds[name] | (cmds["worker"] if name == "run" else frozenset())
    bad = []
    for w in words[1:]:
        flag = w.strip("[]").split("=", 1)[0]
        if flag.startswith("--") and flag not in allowed:
            bad.append(f"zserve {name} {flag}: no such option")
    return bad
