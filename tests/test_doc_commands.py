"""Every ``python -m flows.X ...`` line the README and docs/ quote in a shell block is one the
flow's CLI accepts: an option renamed or dropped in the code, or mistyped in a page, fails here
(the operator copying it would meet the same usage error on the day of a restore).

Placeholders stand for values the reader fills in (``<backup_id>``, ``"$ID"``, ``${X:?}``,
``$(...)``): each becomes a dummy value its option's type takes. A usage synopsis
(``[--node NAME]... [--json]``) is checked with every option it shows."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from unittest import mock

import pytest
from conftest import REPO

pytestmark = pytest.mark.unit

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console", ""}
COMMAND = re.compile(r"(?:^|[\s;|&(`])(?:[\w./-]*/)?python3?\s+-m\s+flows\.(\w+)\b(.*)$")
PLACEHOLDER = re.compile(r"\$\([^()]*\)|\$\{[^}]*\}|\$\w+|<[\w.-]+>")
DUMMY = "PLACEHOLDER"
# What ends the command's own words on a shell line.
STOP = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>&1", ")"}


def shell_blocks(text: str) -> Iterator[tuple[int, str]]:
    """Each fenced shell block's logical lines (continuations joined), with the line number."""
    for found in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if found.group(1) not in SHELL:
            continue
        first = text[:found.start(2)].count("\n") + 1
        lines = found.group(2).split("\n")
        number = 0
        while number < len(lines):
            start, line = number, lines[number]
            while line.endswith("\\") and number + 1 < len(lines):
                number += 1
                line = line[:-1] + " " + lines[number].strip()
            if line.strip():
                yield first + start, line
            number += 1


def quoted_commands() -> list[tuple[str, str, str]]:
    """(where, module, the words after ``python -m flows.X``) for every quoted command."""
    found = []
    for doc in DOCS:
        for number, line in shell_blocks(doc.read_text()):
            command = COMMAND.search(line)
            if command:
                found.append((f"{doc.relative_to(REPO)}:{number}", command.group(1),
                               command.group(2)))
    return found


def words(rest: str) -> list[str]:
    """The command's own arguments: placeholders made dummies, the shell's pipes, lists,
    redirections and comments cut off, a synopsis's brackets and ellipses dropped."""
    text = PLACEHOLDER.sub(DUMMY, rest)
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|<>()")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    out = []
    synopsis = False
    for word in lexer:
        if word in STOP or word.startswith(">") or word.startswith("2>"):
            break
        synopsis = synopsis or word.startswith("[")
        word = word.replace("...", "").strip("[]")
        if synopsis and re.fullmatch(r"[A-Z][A-Z_]*", word):
            word = DUMMY  # a metavar of the synopsis
        if word:
            out.append(word)
    return out


def _accepting(action: argparse.Action | None) -> str:
    """A value ``action`` takes for a placeholder: its type decides."""
    convert = getattr(action, "type", None)
    if convert is None:
        return "value"
    for candidate in ("1", "64MiB", "7d", "2026-01-01T00:00:00", "value"):
        try:
            convert(candidate)
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            continue
        return candidate
    raise AssertionError(f"no dummy value suits {action}")


def _options(parser: argparse.ArgumentParser, args: list[str]) -> dict[str, argparse.Action]:
    """The options ``args`` can use: the parser's, and its subcommand's if it names one."""
    actions = dict(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for word in args:
                if word in action.choices:
                    actions.update(action.choices[word]._option_string_actions)
                    break
    return actions


def filled(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    actions = _options(parser, args)
    out: list[str] = []
    for word in args:
        flag, equals, value = word.partition("=")
        if equals and flag.startswith("--") and DUMMY in value:
            out.append(f"{flag}={_accepting(actions.get(flag))}")
        elif DUMMY in word:
            out.append(_accepting(actions.get(out[-1]) if out else None))
        else:
            out.append(word)
    return out


class _Parsed(Exception):
    """Raised right after a ``main`` parsed its arguments: nothing of the command runs."""


def parse(module: ModuleType, args: list[str]) -> str:
    """argparse's complaint about ``args`` (empty: accepted)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            if hasattr(module, "_parser"):
                module._parser().parse_args(filled(module._parser(), args))
            else:  # a CLI whose parser lives in its main(): stop it as soon as it has parsed
                original = argparse.ArgumentParser.parse_args

                def parse_only(self: argparse.ArgumentParser, argv: list[str] | None = None,
                               namespace: argparse.Namespace | None = None) -> None:
                    raise _Parsed(original(self, filled(self, argv or []), namespace))

                with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_only):
                    module.main(args)
        except _Parsed:
            pass
        except SystemExit as stop:
            if stop.code:
                return err.getvalue().strip().splitlines()[-1]
    return ""


def test_every_quoted_flow_command_is_one_its_cli_accepts():
    commands = quoted_commands()
    assert len(commands) >= 30, commands  # the README's and the restore page's at least
    refused = []
    for where, name, rest in commands:
        module = importlib.import_module(f"flows.{name}")
        assert hasattr(module, "_parser") or hasattr(module, "main"), (where, name)
        complaint = parse(module, words(rest))
        if complaint:
            refused.append(f"{where}: python -m flows.{name}{rest}\n    {complaint}")
    assert refused == [], "\n".join(refused)


def test_the_extraction_sees_what_a_reader_copies():
    lines = dict((number, line) for number, line in shell_blocks(
        "```bash\npython -m flows.verify --backup-id \"$ID\" \\\n    --json  # note\n```\n"))
    assert lines == {2: 'python -m flows.verify --backup-id "$ID"  --json  # note'}
    assert words(' --backup-id "$ID" --json  # note') == ["--backup-id", DUMMY, "--json"]
    assert words(" --json | jq .backup_id > out") == ["--json"]
    assert words(" backup [--node NAME]... [--json]") == ["backup", "--node", DUMMY, "--json"]
    assert words(" --target <dir> --until-gtid ${GTID:?}") == ["--target", DUMMY,
                                                               "--until-gtid", DUMMY]
    prune = importlib.import_module("flows.prune")
    assert filled(prune._parser(), ["--keep-last", DUMMY]) == ["--keep-last", "1"]
    assert parse(prune, ["--keep-last", "many"]).endswith("invalid int value: 'many'")
    assert parse(prune, ["--keep-lats", "1"]) != ""
    assert parse(importlib.import_module("flows.fleet"), ["status", "--json"]) == ""
    assert parse(importlib.import_module("flows.fleet"), ["backup", "--max-parallel", DUMMY]) == ""
    assert parse(importlib.import_module("flows.fleet"), ["status", "--node", "x"]) != ""


def test_every_flow_command_quoted_in_running_text_uses_options_its_cli_has():
    """An inline ``python -m flows.X ...`` may name a command without all it requires (the
    fleet worker's ``--pool`` and ``--name``), but what it does show must parse."""
    refused, seen = [], 0
    for doc in DOCS:
        for found in re.finditer(r"`[^`\n]*?python3? -m flows\.(\w+)([^`\n]*)`", doc.read_text()):
            module = importlib.import_module(f"flows.{found.group(1)}")
            if not (hasattr(module, "_parser") or hasattr(module, "main")):
                continue  # python -m flows.params: prints a table, takes no arguments
            seen += 1
            complaint = parse(module, words(found.group(2)))
            if complaint and "the following arguments are required" not in complaint:
                refused.append(f"{doc.relative_to(REPO)}: {found.group(0)}\n    {complaint}")
    assert seen >= 10
    assert refused == [], "\n".join(refused)


def test_quoted_commands_cover_every_flow_page():
    where = {w.split(":")[0] for w, _, _ in quoted_commands()}
    assert {"README.md", "docs/backup.md", "docs/restore.md"} <= where, where
    assert all(Path(REPO / w).exists() for w in where)
