"""The backup's parameters, written once: the UI form's sections and the CLI's flags.

Each group is a pydantic model; Prefect renders a model parameter as a section of the run form,
with each field's description under its name. :func:`add_arguments` builds the argparse flags of
a group from the same fields, and :func:`from_args` turns parsed flags back into the groups, so
``python -m flows.backup`` and a run started from the UI take the same parameters.

Defaults are ``Field([])``, never ``default_factory``: the UI marks a factory field required.
Descriptions contain no angle brackets: the classic UI takes them for HTML tags.
"""

from __future__ import annotations

import argparse
import inspect
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from blocks.sources import DatabaseSource
from undercloud_backup.core import defaults
from undercloud_backup.core.errors import ConfigError
from undercloud_backup.core.sizes import parse_size
from undercloud_backup.files.chain import parse_duration
from undercloud_backup.trust import signing


def segment_size_bytes(text: str | None) -> int | None:
    """The bytes of a ``--segment-size``/``segment_size`` value; 0 and nonsense are refused."""
    if text is None or text == "":
        return None
    size = parse_size(text)
    if size <= 0:
        raise ValueError(f"segment size must be more than 0 bytes, not {text!r} "
                         "(leave it unset for the automatic size)")
    return size


def duration_seconds(text: str) -> float:
    """``full_every``: 7d, 36h, 90m, 2w or 0 in seconds; nonsense is a ValueError."""
    return parse_duration(text)


# The retention counts' meaning: the backup's Retention section and the prune flow say it alike.
KEEP_LAST = "Keep the N most recent complete backups."
KEEP_DAILY = "Keep the newest backup of each of the last N days that have backups (UTC)."
KEEP_WEEKLY = "Keep the newest backup of each of the last N ISO weeks that have backups."


def _plain_optional_fields(schema: dict[str, typing.Any]) -> None:
    """The form's schema: an optional field (``str | None``) as a plain field of its type,
    not ``anyOf`` a type and null (which the UI shows as a type switch, "Property is type
    None"). Left empty it is None: the server still accepts null for a field with no default
    and not required (Prefect's validation adds the null itself)."""
    for prop in schema.get("properties", {}).values():
        choices = prop.get("anyOf")
        if not choices or len(choices) != 2 or {"type": "null"} not in choices:
            continue
        prop.update(next(c for c in choices if c != {"type": "null"}))
        del prop["anyOf"]
        if prop.get("default", ...) is None:
            del prop["default"]


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_plain_optional_fields)

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object, info) -> object:
        """An optional field the form sends empty is unset, as one it leaves out."""
        field = cls.model_fields.get(info.field_name or "")
        if value == "" and field is not None and field.default is None:
            return None
        return value


class WhatToBackUp(_Group):
    """What to back up: the default paths, plus and minus yours; or the databases only."""
    model_config = ConfigDict(extra="forbid", title="What to back up",
                              json_schema_extra=_plain_optional_fields)

    add_paths: list[str] = Field(
        [], description="Extra absolute paths to archive, besides /etc, /root, /home/stack, "
                        "/srv/node and /var/lib/glance/images. A missing added path is an error. "
                        "On an installed worker (privileged) each needs a path = line in "
                        "/etc/undercloud-backup/privileged.conf first, added as root.")
    exclude_paths: list[str] = Field(
        [], description="Absolute paths or patterns (anchored at root) to leave out, e.g. "
                        "/home/stack/.cache or /srv/node/*/tmp. Excluding everything is an "
                        "error.")
    exclude_tables: list[str] = Field(
        [], description="Tables or views to leave out of the database dump, as DATABASE.NAME "
                        "(e.g. a view whose table was dropped, which fails the dump); the run "
                        "says so and the manifest records them.")
    db_only: bool = Field(False, description="Only dump the databases; archive no files.")
    binlogs_only: bool = Field(
        False, description="Only ship MariaDB's binary log since this host's last backup (a "
                           "small backup of its own, no files); refused when the log cannot be "
                           "shipped (no binary log, a gap, another server).")
    root: str = Field("/", description="Directory the paths are resolved under: / on the "
                                       "undercloud, a scratch tree in tests.")
    full: bool = Field(False, description="Take a full backup of the files (tar level 0) even "
                                          "when an incremental would do, and dump the "
                                          "databases in full rather than ship the binary log.")
    full_every: str = Field(
        defaults.FULL_EVERY,
        description="Files: take an incremental (only what changed since this host's previous "
                    "backup) while the chain's full is younger than this, e.g. 7d, 36h; then a "
                    "full. 0: every backup is a full.")

    @field_validator("full_every")
    @classmethod
    def _full_every(cls, value: str) -> str:
        duration_seconds(value)
        return value

    @field_validator("exclude_tables")
    @classmethod
    def _tables(cls, value: list[str]) -> list[str]:
        for name in value:
            schema, _, table = name.partition(".")
            if not schema or not table:
                raise ValueError(f"{name!r} is not DATABASE.NAME")
        return value


class DatabaseParams(_Group):
    """Which MariaDB, and how to log in (default: the option file ~/.my.cnf)."""
    model_config = ConfigDict(extra="forbid", title="Database",
                              json_schema_extra=_plain_optional_fields)

    db_block: str | None = Field(None, description="Name of a saved MariaDB Connection block "
                                                   "(otherwise the option file).")
    db_defaults_file: str | None = Field(
        None, description="MariaDB option file with a [client] group (default ~/.my.cnf).")
    db_host: str | None = Field(None, description="Database host, over the block or option "
                                                  "file.")
    db_port: int | None = Field(None, description="Database TCP port, over the block or "
                                                  "option file.")
    db_user: str | None = Field(None, description="Database user, over the block or option "
                                                  "file.")
    db_socket: str | None = Field(None, description="Database unix socket, over the block or "
                                                    "option file.")

    def source(self) -> DatabaseSource:
        return DatabaseSource(block=self.db_block, defaults_file=self.db_defaults_file,
                              host=self.db_host, port=self.db_port, user=self.db_user,
                              socket=self.db_socket)


class SwiftParams(_Group):
    """Where the backup goes: the Swift container, and how long Swift may take."""
    model_config = ConfigDict(extra="forbid", title="Swift",
                              json_schema_extra=_plain_optional_fields)

    container: str | None = Field(
        None, description="Swift container for the backup (default: the Swift block's, or "
                          "undercloud-backups); segments go to the container of the same name "
                          "with _segments appended.")
    swift_block: str | None = Field(
        None, description="Name of a saved Swift Backup Target block (otherwise the OS_* "
                          "environment).")
    segment_size: str | None = Field(
        None, description="Objects larger than this become Static Large Objects of segments "
                          "this big, e.g. 64MiB or 1GiB (default: the Swift block's, or chosen "
                          "per stream from its estimated size: 64MiB, more for a stream that "
                          "would need over 900 segments).")
    swift_retries: int | None = Field(
        None, ge=0, description="Retries of one Swift request before a stage fails "
                                f"(default {defaults.SWIFT_RETRIES}).")
    swift_timeout: float | None = Field(
        None, gt=0, description="Seconds one Swift request may wait for an answer before it "
                                f"is retried (default {defaults.SWIFT_TIMEOUT_S:g}).")
    swift_retry_budget: float | None = Field(
        None, ge=0, description="Seconds one Swift request may spend retrying: a dead Swift "
                                "fails after about this plus the timeout (default "
                                f"{defaults.SWIFT_RETRY_BUDGET_S:g}).")
    link_lifetime_hours: float = Field(
        defaults.LINK_LIFETIME_HOURS, gt=0, le=366 * 24,
        description="Hours the download links (Swift TempURLs) in the run's artifact work, "
                    f"e.g. 0.5 or 168 (default {defaults.LINK_LIFETIME_HOURS:g}).")

    @field_validator("segment_size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        segment_size_bytes(value)
        return value


class RetentionParams(_Group):
    """What to delete once the backup is complete (manifest first)."""
    model_config = ConfigDict(extra="forbid", title="Retention",
                              json_schema_extra=_plain_optional_fields)

    prune: bool = Field(True, description="Once the backup is complete, delete the backups "
                                          "the policy below no longer keeps, and incomplete "
                                          "ones untouched for a day.")
    keep_last: int = Field(defaults.KEEP_LAST, ge=0, description=KEEP_LAST)
    keep_daily: int = Field(defaults.KEEP_DAILY, ge=0, description=KEEP_DAILY)
    keep_weekly: int = Field(defaults.KEEP_WEEKLY, ge=0, description=KEEP_WEEKLY)


class AdvancedParams(_Group):
    """Staging, privileges, compression and retries: the defaults suit most runs."""
    model_config = ConfigDict(extra="forbid", title="Advanced",
                              json_schema_extra=_plain_optional_fields)

    staging_dir: str = Field(defaults.STAGING_DIR, description="Where segments are spooled on "
                                                               "their way to Swift (up to two "
                                                               "per stream).")
    privileged: bool = Field(False, description="Run tar and the dump as root through the "
                                                "project's sudo wrappers (a worker running as "
                                                "an unprivileged user); the database is then "
                                                "reached as root through its unix socket.")
    allow_unreadable: bool = Field(False, description="Complete the backup even if some files "
                                                      "could not be read; they are listed in "
                                                      "the manifest.")
    allow_partial_database: bool = Field(
        False, description="Back up what the database account can see even when its grants "
                           "leave something out (a database, triggers, views); the run warns "
                           "and the manifest records the grants. Off: such a run fails first.")
    compression_level: int = Field(defaults.COMPRESSION_LEVEL, ge=1, le=19,
                                   description="zstd level (1-19) of both streams; 3 is the "
                                   "zstd default, 1 takes about half the CPU for 10-20 % more "
                                   "bytes on text.")
    table_checksums: bool = Field(True, description="Record CHECKSUM TABLE of every table "
                                  "besides its row count, read while the dump runs (on a "
                                  "second connection, a third watches the dump's lock "
                                  "waits: the database user needs three). Off: row "
                                  "counts only.")
    task_retries: int = Field(defaults.TASK_RETRIES, ge=0,
                              description="Retries of a stage after a transient failure (Swift "
                                          "or database down).")
    recipients_file: str | None = Field(
        None, description="age recipients file (one public key a line, age1... or ssh-ed25519): "
                          "every object is encrypted to all of them and named .age. Unset: "
                          "the recipients install configured (/etc/undercloud-backup/"
                          "recipients), if any; else plain text, said so in the manifest.")
    signing_key: str | None = Field(
        None, description="SSH private key file that signs the manifest (ssh-keygen -Y sign, "
                          "namespace undercloud-backup) into manifest.json.sig. Unset: the "
                          "key install made (/etc/undercloud-backup/signing-key), if any.")
    no_encryption: str | None = Field(
        None, description="Store this backup in plain text on purpose, giving the reason (the "
                          "manifest and the artifact record it). Without it, a backup is "
                          "encrypted to recipients_file, else to the recipients install "
                          "configured (/etc/undercloud-backup/recipients) if any.")


@dataclass(frozen=True)
class Flag:
    """How a field is written on the command line (``invert``: a --no-x flag for x)."""

    flag: str
    metavar: str | None = None
    invert: bool = False
    help: str | None = None  # shorter than the description, where that is too long
    type: Callable[[str], object] | None = None  # argparse's; by default from the annotation


FLAGS: dict[str, Flag] = {
    "add_paths": Flag("--add-path", "PATH"), "exclude_paths": Flag("--exclude-path", "PATTERN"),
    "exclude_tables": Flag("--exclude-table", "DB.NAME"),
    "db_only": Flag("--db-only"), "root": Flag("--root", "DIR"),
    "binlogs_only": Flag("--binlogs-only"),
    "full": Flag("--full", help="take a full backup of the files (tar level 0), not an "
                               "incremental"),
    "full_every": Flag("--full-every", "AGE"),
    "db_block": Flag("--db-block", "NAME"), "db_defaults_file": Flag("--db-defaults-file", "FILE"),
    "db_host": Flag("--db-host", "HOST"), "db_port": Flag("--db-port", "PORT"),
    "db_user": Flag("--db-user", "USER"), "db_socket": Flag("--db-socket", "PATH"),
    "container": Flag("--container", "NAME"), "swift_block": Flag("--swift-block", "NAME"),
    "segment_size": Flag("--segment-size", "SIZE"), "swift_retries": Flag("--swift-retries", "N"),
    "swift_timeout": Flag("--swift-timeout", "SECONDS"),
    "swift_retry_budget": Flag("--swift-retry-budget", "SECONDS"),
    "link_lifetime_hours": Flag("--link-lifetime-hours", "HOURS"),
    "prune": Flag("--no-prune", invert=True, help="do not apply the retention policy"),
    "keep_last": Flag("--keep-last", "N"), "keep_daily": Flag("--keep-daily", "D"),
    "keep_weekly": Flag("--keep-weekly", "W"), "staging_dir": Flag("--staging-dir", "DIR"),
    "privileged": Flag("--privileged"), "allow_unreadable": Flag("--allow-unreadable"),
    "allow_partial_database": Flag("--allow-partial-database"),
    "compression_level": Flag("--compression-level", "1-19"),
    "table_checksums": Flag("--no-table-checksums", invert=True,
                            help="record row counts only, not CHECKSUM TABLE (less database "
                                 "CPU; verify then compares counts only)"),
    "task_retries": Flag("--task-retries", "N"),
    "recipients_file": Flag("--recipients-file", "FILE"),
    "signing_key": Flag("--signing-key", "FILE"),
    "no_encryption": Flag("--no-encryption", "REASON"),
}
GROUPS: dict[str, type[_Group]] = {
    "what": WhatToBackUp, "database": DatabaseParams, "swift": SwiftParams,
    "retention": RetentionParams, "advanced": AdvancedParams}


def _cli_type(name: str, annotation: object):
    if name == "segment_size":
        def size(text: str) -> str:
            try:
                segment_size_bytes(text)
            except ValueError as error:
                raise argparse.ArgumentTypeError(str(error)) from None
            return text
        return size
    text = str(annotation)
    return int if "int" in text else float if "float" in text else str


def _not_empty(kind: Callable[[str], object], words: str) -> Callable[[str], object]:
    def parse(text: str) -> object:
        if text == "":
            raise argparse.ArgumentTypeError(
                f"the {words} cannot be empty (leave the flag out for the default)")
        return kind(text)
    return parse


def add_arguments(parser: argparse.ArgumentParser, group: type[_Group], role: str = "") -> None:
    """The group's flags, with its fields' defaults and descriptions (``role`` before them)."""
    section = parser.add_argument_group(str(group.model_config.get("title")))
    for name, field in group.model_fields.items():
        flag = FLAGS[name]
        help_text = role + (flag.help or field.description or "").replace("%", "%%")
        if field.annotation is bool:
            section.add_argument(flag.flag, dest=name, help=help_text,
                                 action="store_false" if flag.invert else "store_true")
        elif "list" in str(field.annotation):
            section.add_argument(flag.flag, dest=name, action="append", default=[],
                                 metavar=flag.metavar, help=help_text + " (repeatable)")
        else:
            kind = _cli_type(name, field.annotation)
            if field.default is None:  # the form's empty field is unset; a flag's is a mistake
                words = " ".join([name.replace("_", " "), (flag.metavar or "").lower()]).strip()
                kind = _not_empty(kind, words)
            choices = range(1, 20) if name == "compression_level" else None
            section.add_argument(flag.flag, dest=name, type=kind, default=field.default,
                                 choices=choices, metavar=flag.metavar, help=help_text)


def from_args(args: argparse.Namespace, group: type[_Group]) -> _Group:
    """The group from parsed flags; a value out of range is one line naming its flag."""
    values = {name: getattr(args, name) for name in group.model_fields}
    try:
        return group(**values)
    except ValidationError as error:
        first = error.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else ""
        flag = FLAGS[name].flag if name in FLAGS else name
        raise ConfigError(detail=f"{flag} {values.get(name)}: {first['msg'].lower()}") from None


# ----------------------------------------------------------- the docs' table of parameters
TABLE_BEGIN = "<!-- parameters: made by python -m flows.params from flows/params.py -->"
TABLE_END = "<!-- end of parameters -->"


def _default_text(field) -> str:
    value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if value == []:
        return "none"
    return f"`{value:g}`" if isinstance(value, float) else f"`{value}`"


def parameters_markdown() -> str:
    """The run form's parameters as docs/backup.md shows them: section, name, CLI flag,
    default and the form's own description (so the two cannot say different things)."""
    rows = ["| section | parameter | flag | default | what it does |", "|---|---|---|---|---|"]
    for key, group in GROUPS.items():
        for name, field in group.model_fields.items():
            flag = FLAGS[name].flag
            description = (field.description or "").replace("|", "\\|")
            rows.append(f"| `{key}` | `{name}` | `{flag}` | {_default_text(field)} "
                        f"| {description} |")
    return "\n".join([TABLE_BEGIN, *rows, TABLE_END])


# --------------------------------------------------------------------- the errors' language
_FLAG_WORD = re.compile(r"(?<![\w-])--[a-z][a-z-]*")


def ui_language(message: str) -> str:
    """An error line for the UI: ``--add-path`` becomes ``add_paths``, as the form says it."""
    names = {flag.flag: name for name, flag in FLAGS.items()}
    return _FLAG_WORD.sub(lambda match: names.get(match.group(0), match.group(0)), message)


def grouped(**flat: object) -> dict[str, _Group]:
    """The flow's grouped parameters from flat names (``root=..., db_user=...``), for Python
    callers: ``undercloud_backup(**grouped(root="/srv/x", prune=False))``."""
    dry_run = flat.pop("dry_run", False)
    groups = {key: group(**{k: flat.pop(k) for k in list(flat) if k in group.model_fields})
              for key, group in GROUPS.items()}
    if flat:
        raise TypeError(f"unknown backup parameter(s): {', '.join(sorted(flat))}")
    return {"dry_run": dry_run, **groups}


# ----------------------------------------------------- the flat flows: restore, verify, prune
# Their deployments take flat parameters (prefect.yaml), so each is declared once in the flow's
# signature, ``name: Annotated[type, Param(...)] = default``: the docstring's Args (and so the
# UI form's descriptions) and the argparse flags are made from it, and parsed flags go back to
# the flow as its keyword arguments.
@dataclass(frozen=True)
class Param:
    """One parameter of a flat flow: what the form and the docstring say of it, its flag
    (None: none, or a group's own flags), the --help section it is listed in (empty: the
    first), and for a group the words said before each of its flags."""

    description: str
    flag: Flag | None = None
    section: str = ""
    role: str = ""


@dataclass(frozen=True)
class Declared:
    name: str
    kind: object  # the annotation without its Param
    param: Param
    default: object


def declared(fn: Callable[..., object]) -> list[Declared]:
    """The flow function's parameters in signature order, each with its :class:`Param`."""
    hints = typing.get_type_hints(fn, include_extras=True)
    found = []
    for name, parameter in inspect.signature(fn).parameters.items():
        hint = hints.get(name)
        params = [m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Param)]
        if not params:
            raise TypeError(f"{fn.__qualname__}: parameter {name} is not declared with a Param")
        found.append(Declared(name, typing.get_args(hint)[0], params[0], parameter.default))
    return found


def described(fn: Callable[..., object]) -> Callable[..., object]:
    """Below ``@flow``: the docstring's Args section from the parameters' descriptions (Prefect
    reads the form's descriptions from there, Google style)."""
    args = [f"    {d.name}: {d.param.description}" for d in declared(fn)]
    fn.__doc__ = inspect.cleandoc(fn.__doc__ or "") + "\n\nArgs:\n" + "\n".join(args) + "\n"
    return fn


def _is_group(kind: object) -> typing.TypeGuard[type[_Group]]:
    return isinstance(kind, type) and issubclass(kind, _Group)


def _scalar(kind: object) -> Callable[[str], object]:
    """argparse's type of ``int``, ``float | None``, ``str | None``..."""
    inner = [k for k in typing.get_args(kind) if k is not type(None)] or [kind]
    return int if inner[0] is int else float if inner[0] is float else str


def add_flow_arguments(parser: argparse.ArgumentParser, parameters: list[Declared]) -> None:
    """The flags of a flow's :func:`declared` parameters (a group's: those of its fields)."""
    sections: dict[str, argparse._ActionsContainer] = {"": parser}
    for d in parameters:
        if _is_group(d.kind):
            add_arguments(parser, d.kind, role=d.param.role)
            continue
        flag = d.param.flag
        if flag is None:
            continue
        if d.param.section not in sections:
            sections[d.param.section] = parser.add_argument_group(d.param.section)
        where = sections[d.param.section]
        help_text = (flag.help or d.param.description).replace("%", "%%")
        if d.kind is bool:
            where.add_argument(flag.flag, dest=d.name, help=help_text,
                               action="store_false" if flag.invert else "store_true")
        elif typing.get_origin(d.kind) is list or "list[" in str(d.kind):
            where.add_argument(flag.flag, dest=d.name, action="append", default=[],
                               metavar=flag.metavar, help=help_text)
        else:
            if d.default is not None and "(default" not in help_text:
                value = f"{d.default:g}" if isinstance(d.default, float) else d.default
                help_text = f"{help_text.rstrip('.')} (default {value})"
            where.add_argument(flag.flag, dest=d.name, type=flag.type or _scalar(d.kind),
                               default=d.default, metavar=flag.metavar, help=help_text)


def flow_arguments(args: argparse.Namespace, parameters: list[Declared]) -> dict[str, object]:
    """The flow's keyword arguments from the flags :func:`add_flow_arguments` made."""
    values: dict[str, object] = {}
    for d in parameters:
        if _is_group(d.kind):
            values[d.name] = from_args(args, d.kind)
        elif d.param.flag is not None:
            values[d.name] = getattr(args, d.name)
    return values


# The parameters the flat flows share, said the same way in each.
def backup_id(verb: str) -> Param:
    return Param(f"The backup to {verb} (default: the latest complete one in the container).",
                 Flag("--backup-id", help=f"backup to {verb} (default: the latest complete one)"))


def container(more: str = "") -> Param:
    return Param("Swift container of the backups (default: the Swift block's, or "
                 f"undercloud-backups){more}.",
                 Flag("--container", help="Swift container (default undercloud-backups)"))


SWIFT_BLOCK = Param("Name of a saved Swift Backup Target block (otherwise the OS_* "
                    "environment).",
                    Flag("--swift-block", help="saved Swift Backup Target block (default: "
                                               "OS_* env)"))


def allowed_signers(verb: str, description: str) -> Param:
    """``description``: what the flow does with the file (the CLI's text is the same for all)."""
    return Param(description, Flag(
        "--allowed-signers", "FILE",
        help=f"ssh-keygen allowed-signers file: {verb} only a manifest signed by a key in it "
             "(exit 53 unsigned, 54 other key, 55 altered); default: "
             f"{signing.INSTALLED_ALLOWED_SIGNERS}, if install configured it"))


def identity(description: str, cli_help: str) -> Param:
    return Param(description, Flag("--identity", "FILE", help="age identity file (a path: the "
                                   f"key is never an argument) {cli_help}"))


CHECK_SIGNATURE = Param(
    "Off: do not check the manifest's signature at all (a backup made before signing was "
    "installed); allowed_signers must then be unset.",
    Flag("--no-signature-check", invert=True,
         help="do not check the manifest's signature (a backup made before signing was "
              "installed); not with --allowed-signers"))


def timeout_hours(description: str) -> Param:
    return Param(description, Flag("--timeout-hours"))


if __name__ == "__main__":  # the table of docs/backup.md, to paste between its markers
    print(parameters_markdown())
