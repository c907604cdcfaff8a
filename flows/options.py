"""docs/options.md: every option of the four command-line flows, one table per flow, made from
the flows' own argparse parsers (so the page says what ``--help`` says, and cannot drift from it).

``python -m flows.options`` prints the page; ``python -m flows.options --write`` rewrites
docs/options.md (tests/test_options_doc.py fails when the two differ).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

PAGE = Path(__file__).resolve().parent.parent / "docs" / "options.md"

# Each flow's module, its flow function's name (the UI form's parameters) and what it is for.
FLOWS = {
    "backup": ("undercloud_backup", "back this undercloud up into Swift"),
    "restore": ("undercloud_restore", "put files and databases back from a backup"),
    "verify": ("verify_backup", "prove a backup restores"),
    "prune": ("prune_backups", "delete the backups the retention policy does not keep"),
}

HEADER = """\
# Options of the command-line flows

<!-- made by `python -m flows.options --write` from the flows' own parsers; do not edit -->

Every option of `python -m flows.backup`, `flows.restore`, `flows.verify` and `flows.prune`,
as their `--help` gives it, one table per flow. *Parameter* is the field of the flow's run
form in the Prefect UI that the option sets (`section.field` where the form groups them; a
flag that turns something off, such as `--no-files` or `--skip-database`, sets its field to
false); *CLI only* options change what the command prints or does around the flow. *Default*
is what applies when the option is not given. The backup's form, section by section, is in
[backup.md](backup.md#in-prefect); what each exit status means is in
[exit-statuses.md](exit-statuses.md).
"""


def _form_fields(flow: Callable[..., Any]) -> dict[str, str]:
    """The flow's form parameters by field name: ``name`` or ``section.name`` for a group's."""
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(flow).model_dump()
    fields: dict[str, str] = {}
    for name, prop in schema["properties"].items():
        ref = prop.get("$ref") or (prop.get("allOf") or [{}])[0].get("$ref")
        if ref:
            definition = schema["definitions"][ref.rsplit("/", 1)[-1]]
            fields.update({field: f"{name}.{field}" for field in definition["properties"]})
        else:
            fields[name] = name
    return fields


def _default(action: argparse.Action) -> str:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "off"
    value = action.default
    if value is None:
        return "unset"
    if value == []:
        return "none"
    return f"`{value:g}`" if isinstance(value, float) else f"`{value}`"


def _cell(text: str) -> str:
    """One table cell: one line, its bars and angle brackets escaped (``<backup_id>`` would
    otherwise be taken for an HTML tag and vanish)."""
    return " ".join(text.split()).replace("|", "\\|").replace("<", "\\<")


def flow_table(name: str) -> str:
    """One flow's section: its description and a row per option, in ``--help``'s order."""
    module = importlib.import_module(f"flows.{name}")
    fn_name, purpose = FLOWS[name]
    fields = _form_fields(getattr(module, fn_name))
    parser: argparse.ArgumentParser = module._parser()
    formatter = parser._get_formatter()
    rows = [f"## `python -m flows.{name}`: {purpose}", "", _cell(parser.description or ""), "",
            "| section | option | parameter | default | what it does |",
            "|---|---|---|---|---|"]
    for group in parser._action_groups:
        title = group.title or "options"
        section = "general" if title in ("options", "optional arguments") else title
        for action in group._group_actions:
            if isinstance(action, argparse._HelpAction):
                continue
            invocation = formatter._format_action_invocation(action)
            field = fields.get(action.dest)
            parameter = f"`{field}`" if field else "CLI only"
            what = _cell(formatter._expand_help(action)) if action.help else ""
            rows.append(f"| {_cell(section)} | `{invocation}` | {parameter} | {_default(action)} "
                        f"| {what} |")
    return "\n".join(rows)


def page() -> str:
    return "\n\n".join([HEADER.rstrip("\n"), *(flow_table(name) for name in FLOWS)]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.options", description=__doc__)
    parser.add_argument("--write", action="store_true", help=f"rewrite {PAGE.name} in place")
    args = parser.parse_args(argv)
    if args.write:
        PAGE.write_text(page())
    else:
        sys.stdout.write(page())
    return 0


if __name__ == "__main__":
    sys.exit(main())
