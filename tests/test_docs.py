"""docs/cli.md is click's own help of every subcommand, so it cannot drift from the CLI.

Regenerate it after changing an option: ``python tests/test_docs.py``.
"""

import os

import click

from mergekit_lssf.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI_DOC = os.path.join(ROOT, "docs", "cli.md")
HEAD = """# `mergekit-lssf` command reference

The merge itself is `mergekit-yaml recipe.yml out/` with `merge_method: lssf` (see the
[README](../README.md)); these subcommands are the helpers around it. Each section is the
command's own `--help`, checked against the installed CLI by `tests/test_docs.py`.
"""


def _help(command: click.Command, name: str, parent=None) -> str:
    ctx = click.Context(command, info_name=name, parent=parent, terminal_width=88, max_content_width=88)
    return command.get_help(ctx)


def render_cli_doc() -> str:
    """docs/cli.md as the CLI describes itself."""
    parts = [HEAD, "## `mergekit-lssf`", "", "```text", _help(main, "mergekit-lssf"), "```", ""]
    top = click.Context(main, info_name="mergekit-lssf", terminal_width=88, max_content_width=88)
    for name in main.list_commands(top):
        parts += [f"## `mergekit-lssf {name}`", "", "```text", _help(main.get_command(top, name), name, top), "```", ""]
    return "\n".join(parts)


def test_cli_doc_is_the_cli_help():
    with open(CLI_DOC, encoding="utf-8") as fp:
        assert fp.read() == render_cli_doc(), "docs/cli.md is stale: run `python tests/test_docs.py`"


def test_every_option_appears_in_the_cli_doc():
    """The check above cannot pass with an option missing; this names it when it fails."""
    with open(CLI_DOC, encoding="utf-8") as fp:
        doc = fp.read()
    top = click.Context(main, info_name="mergekit-lssf")
    for name in main.list_commands(top):
        for param in main.get_command(top, name).params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("-"):
                    assert opt in doc, f"mergekit-lssf {name} {opt} is not in docs/cli.md"


if __name__ == "__main__":
    with open(CLI_DOC, "w", encoding="utf-8") as fp:
        fp.write(render_cli_doc())
    print(f"wrote {CLI_DOC}")
