"""Help lint: every command and option explains itself, every command shows an example, and every
`--flag` an error message, hint, planner suggestion or help text tells the user to pass exists on
some command."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import click

from lance_deploy.cli import cli

PACKAGE = Path(__file__).resolve().parents[2] / "lance_deploy"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
OTHER_TOOLS = {
    "--extra-index-url": "`pip install tensorrt --extra-index-url ...` (pip's option, in core/optional.py's hint)",
}


def _commands(group: click.Group = cli, prefix: str = "lance-deploy"):
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        yield f"{prefix} {name}", cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, f"{prefix} {name}")


def _all_flags() -> set[str]:
    flags = {"--help", "--debug", "--version"}
    for _, cmd in _commands():
        for p in cmd.params:
            if isinstance(p, click.Option):
                flags.update(o for o in p.opts + p.secondary_opts if o.startswith("--"))
    return flags


def test_every_command_and_option_has_help_and_every_command_an_example():
    missing = []
    for name, cmd in _commands():
        if not (cmd.help or cmd.short_help):
            missing.append(f"{name}: no help text")
        if not isinstance(cmd, click.Group) and "Examples:" not in (cmd.epilog or ""):
            missing.append(f"{name}: no Examples: in its epilog")
        for p in cmd.params:
            if isinstance(p, click.Option) and not p.hidden and not (p.help or "").strip():
                missing.append(f"{name} {p.opts[0]}: no help text")
    assert not missing, "\n".join(missing)


def _docstrings(tree: ast.AST) -> set[int]:
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))]
    return {id(n.body[0].value) for n in nodes if n.body and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant) and isinstance(n.body[0].value.value, str)}


def _user_strings() -> list[tuple[str, int, str]]:
    """(file, line, text) of every string literal under lance_deploy/ that is not a docstring: error
    messages (also those built in a variable first), hints, planner suggestions (planning/advice.py),
    help texts and epilogs."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        rel, skip = str(path.relative_to(PACKAGE.parent)), _docstrings(tree)
        found += [(rel, n.lineno, n.value) for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip]
    return found


def test_every_flag_named_in_an_error_exists():
    known = _all_flags()
    named = [(rel, line, flag) for rel, line, text in _user_strings() for flag in FLAG.findall(text)]
    unknown = sorted({f"{rel}:{line}: {flag}" for rel, line, flag in named if flag not in known | set(OTHER_TOOLS)})
    assert not unknown, "flags named in messages that no command has:\n" + "\n".join(unknown)
    stale = set(OTHER_TOOLS) - {flag for _, _, flag in named}
    assert not stale, f"allow-listed flags no message names any more: {sorted(stale)}"


def test_the_lint_sees_errors_and_known_flags():
    """The lint cannot pass vacuously: it finds the messages and the options it checks."""
    texts = [t for _, _, t in _user_strings()]
    assert len(texts) > 500 and any("out of GPU memory during" in t for t in texts)
    assert not any(t.startswith("Help lint: every command") for t in texts)  # docstrings are not messages
    assert {"--prompt-file", "--seeds", "--preset", "--variant", "--gpu-memory"} <= _all_flags()
    assert FLAG.findall("try --gpu-memory 8GiB or --weights int4; not foo--bar") == ["--gpu-memory", "--weights"]
