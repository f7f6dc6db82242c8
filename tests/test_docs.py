"""The docs cannot drift from the CLI: docs/cli.md is click's own help of every
subcommand, every command line in README.md and docs/ names commands and options that
exist and parses, and every lssf recipe shown in them validates.

Regenerate docs/cli.md after changing an option: ``python tests/test_docs.py``.
"""

import glob
import os
import re
import shlex

import click
import pytest
import yaml
from mergekit.config import MergeConfiguration
from mergekit.scripts.run_yaml import main as mergekit_yaml

from mergekit_lssf.cli import main
from mergekit_lssf.parameters import PER_MODEL_PARAMETERS, SHARED_PARAMETERS

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


DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _blocks(path, language):
    with open(path, encoding="utf-8") as fp:
        return [body for lang, body in BLOCK.findall(fp.read()) if lang == language]


def _command_lines(path):
    """Every ``mergekit-yaml`` / ``mergekit-lssf`` command in the doc's bash blocks, as
    argument lists (comments dropped, backslash continuations joined, ``&&`` chains split)."""
    for body in _blocks(path, "bash"):
        for line in body.replace("\\\n", " ").splitlines():
            for part in line.split("#")[0].split("&&"):
                words = shlex.split(part)
                if words and words[0] in ("mergekit-yaml", "mergekit-lssf"):
                    yield words


def _parse(words):
    """Parse ``words`` with the real click command, as the shell would run it; [x|y] and
    [--opt ...] placeholders of a usage line are not commands and are skipped."""
    command, args = (mergekit_yaml, words[1:]) if words[0] == "mergekit-yaml" else (main, words[1:])
    if any(w.startswith("[") for w in args):
        return None
    if command is main and args and not args[0].startswith("-"):
        sub = main.get_command(click.Context(main), args[0])
        assert sub is not None, f"no subcommand {args[0]!r}"
        command, args = sub, args[1:]
    params = {o: p for p in command.params for o in getattr(p, "opts", [])}
    for w in args:
        if w.startswith("--"):
            assert w.split("=")[0] in params or w in ("--help", "--version"), f"{' '.join(words)}: no option {w}"
    command.make_context(words[0], list(args), resilient_parsing=False)
    return command


@pytest.mark.parametrize("path", DOCS, ids=os.path.basename)
def test_every_command_line_in_the_docs_parses(path, monkeypatch):
    # the files a command names (recipe.yml, ./my-finetune) need not exist here
    monkeypatch.setattr(click.Path, "convert", lambda self, value, param, ctx: value)
    lines = list(_command_lines(path))
    if os.path.basename(path) == "README.md":
        assert any(w[0] == "mergekit-yaml" for w in lines) and any(w[0] == "mergekit-lssf" for w in lines)
    for words in lines:
        try:
            _parse(words)
        except click.exceptions.Exit:
            pass
        except click.UsageError as error:
            raise AssertionError(f"{os.path.basename(path)}: `{' '.join(words)}` does not parse: {error}")


@pytest.mark.parametrize("path", DOCS, ids=os.path.basename)
def test_every_lssf_recipe_in_the_docs_validates(path):
    for body in _blocks(path, "yaml"):
        doc = yaml.safe_load(body)
        if not isinstance(doc, dict) or doc.get("merge_method") != "lssf":
            continue
        config = MergeConfiguration.model_validate(doc)
        assert set(config.parameters or {}) <= set(SHARED_PARAMETERS), (path, config.parameters)
        roles = sorted(m.parameters.get("role") for m in config.models)
        needed = ["aligned"] if (config.parameters or {}).get("fusion") == "contrastive" else ["aligned", "unaligned"]
        assert roles == needed, (path, roles)
        assert all(set(m.parameters) <= set(PER_MODEL_PARAMETERS) for m in config.models), path


def test_every_mergekit_lssf_subcommand_in_the_readme_exists():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fp:
        text = fp.read()
    top = click.Context(main, info_name="mergekit-lssf")
    named = set(re.findall(r"mergekit-lssf ([a-z-]+)", text))
    assert named <= set(main.list_commands(top)), named - set(main.list_commands(top))
    assert set(main.list_commands(top)) <= named, "a subcommand the README does not name"
    for option in set(re.findall(r"`(--[a-z-]+)", text)):
        known = {o for c in main.list_commands(top) for p in main.get_command(top, c).params for o in getattr(p, "opts", [])}
        known |= {o for p in mergekit_yaml.params for o in getattr(p, "opts", [])}
        assert option in known, f"README names {option}, which no command has"


if __name__ == "__main__":
    with open(CLI_DOC, "w", encoding="utf-8") as fp:
        fp.write(render_cli_doc())
    print(f"wrote {CLI_DOC}")
