"""The variants the benchmark runs: how each is started, prepared and checked (untimed)."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import references as ref
from context import Context
from measure import RESTORE_PHASES, RunResult, error_line, timeline
from sampledata import EVENTS, ensure_bench_db, events_rows, scaled, tree_bytes
from servers import reset_scratch

Built = tuple[list[str], dict[str, str]] | None  # argv and environment; None: cannot run
Sessions = Callable[[Context], dict[int, str]]


def _no_sessions(_ctx: Context) -> dict[int, str]:
    return {}


@dataclass
class Variant:
    name: str
    label: str
    kind: str  # backup | restore | overhead
    build: Callable[[Context, int], Built]
    prepare: Callable[[Context], None] = lambda ctx: None
    after: Callable[[Context, RunResult], None] = lambda ctx, result: None
    sessions: Sessions = _no_sessions  # other sessions whose CPU counts as a server's


# The backups the restores read; the other variants' containers are emptied right after a run.
RESTORE_SOURCES = ("reference_sequential", "ours_running_server")


def _backup(name: str, label: str, kind: str, build: Callable[[Context, int], Built],
            measured: Callable[[Context, RunResult], None], tidy: Callable[[Context], None],
            sessions: Sessions) -> Variant:
    """A backup into the variant's own container, emptied before each run."""
    def prepare(ctx: Context) -> None:
        ctx.clean_container(ctx.container(name))
        tidy(ctx)
        if ctx.source_bytes:  # not before the data exists (the Prefect overhead runs)
            ensure_bench_db(ctx.args.scale)

    def after(ctx: Context, result: RunResult) -> None:
        measured(ctx, result)
        if name not in RESTORE_SOURCES:  # disk: Swift shares it with the data
            ctx.clean_container(ctx.container(name))

    return Variant(name, label, kind, build, prepare, after, sessions)


def _staged(ctx: Context) -> list[Path]:
    return list(ctx.staging.glob("*.zst"))


def shell_variant(name: str, label: str, script: Callable[[Context, str], str],
                  kind: str = "backup") -> Variant:
    """A reference pipeline: ``bash -o pipefail -c SCRIPT`` into the variant's container."""
    def build(ctx: Context, _round: int) -> Built:
        return ["bash", "-o", "pipefail", "-c", script(ctx, ctx.container(name))], ctx.env

    def tidy(ctx: Context) -> None:
        for leftover in _staged(ctx):
            leftover.unlink()

    def measured(ctx: Context, result: RunResult) -> None:
        if result.ok:
            result.stored_bytes += sum(f.stat().st_size for f in _staged(ctx))
        tidy(ctx)

    return _backup(name, label, kind, build, measured, tidy, _no_sessions)


def ours_argv(ctx: Context, c: str, *extra: str) -> list[str]:
    # Our own segment size (64 MiB at these sizes), unless --segment-mib was given.
    size = ["--segment-size", f"{ctx.args.segment_mib}MiB"] if ctx.args.segment_mib else []
    # Plain text on purpose, even where install configured recipients: the encrypted
    # variant is the one that says --recipients-file, so the two measure the difference.
    plain = (["--no-encryption", "benchmark: the plain-text variant"]
             if ctx.no_encryption_flag and "--recipients-file" not in extra else [])
    return [str(ctx.python), "-m", "flows.backup", "--root", str(ctx.root), "--container", c,
            "--db-defaults-file", str(ctx.cnf), *size, "--staging-dir", str(ctx.staging),
            "--json", *plain, *extra]


def parse_ours(ctx: Context, name: str, result: RunResult) -> None:
    """Our flow's run: its phases and its --json (stored bytes); on failure, its one line."""
    if not result.ok:
        result.add_note(error_line(result))
        return
    result.timeline = timeline(result)
    with contextlib.suppress(ValueError, IndexError, KeyError):
        ctx.last_backup[name] = out = json.loads(result.stdout.splitlines()[-1])
        result.stored_bytes = sum(o["size"] for o in out["objects"])
        result.stored_files_bytes = sum(o["size"] for o in out["objects"]
                                        if ".tar." in o["name"])


def ours_variant(name: str, label: str, ephemeral: bool, *extra: str,
                 kind: str = "backup") -> Variant:
    """``python -m flows.backup`` with a running Prefect server, or its ephemeral one."""
    def build(ctx: Context, _round: int) -> Built:
        env = ctx.ephemeral_env() if ephemeral else ctx.running_env()
        return ours_argv(ctx, ctx.container(name), *extra), env

    def measured(ctx: Context, result: RunResult) -> None:
        parse_ours(ctx, name, result)

    return _backup(name, label, kind, build, measured, lambda ctx: None,
                   Context.server_sessions)


def encrypted_variant(name: str, label: str) -> Variant:
    """Ours with its defaults and ``--recipients-file`` (age): every object
    ``zstd | age -R``. Not run without ``age-keygen`` or without the option in --help."""
    def build(ctx: Context, _round: int) -> Built:
        if ctx.recipients_file is None:
            return None
        return (ours_argv(ctx, ctx.container(name), "--recipients-file",
                          str(ctx.recipients_file)), ctx.running_env())

    def measured(ctx: Context, result: RunResult) -> None:
        parse_ours(ctx, name, result)
        names = [o["name"] for o in ctx.last_backup.get(name, {}).get("objects", [])]
        if result.ok and not all(n.endswith(".age") for n in names):
            result.ok = False
            result.add_note(f"objects not encrypted: {', '.join(names)}")

    return _backup(name, label, "backup", build, measured, lambda ctx: None,
                   Context.server_sessions)


def first_run_variant(home: Path) -> Variant:
    """A tiny --db-only backup with the ephemeral server in a fresh ``home`` (migrations)."""
    def build(ctx: Context, _round: int) -> Built:
        return (ours_argv(ctx, ctx.container("overhead_ephemeral_server"), "--db-only"),
                ctx.ephemeral_env(home))

    return Variant("overhead_ephemeral_first_run",
                   "tiny --db-only: ours, ephemeral, fresh PREFECT_HOME (migrations)",
                   "overhead", build)


def reset_restore_target(ctx: Context, name: str, database: bool = True) -> None:
    """An empty target directory (and the emptied scratch server when ``database``)."""
    target = ctx.restore_target(name)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    if database:
        assert ctx.scratch_sock is not None
        reset_scratch(ctx.scratch_sock)


def restore_check(ctx: Context, name: str, result: RunResult, database: bool = True) -> None:
    """Untimed: the files (and the bench database) came back; the target is removed."""
    got, got_entries = tree_bytes(ctx.restore_target(name))
    want, want_entries = tree_bytes(ctx.root)
    if database:
        count = events_rows(f"--socket={ctx.scratch_sock}") or "missing"
        if got != want or count != str(scaled(EVENTS, ctx.args.scale)):
            result.ok = False
            result.add_note(f"restore check failed: {got}/{want} bytes, events rows {count}")
    elif (got, got_entries) != (want, want_entries):  # deletions must be applied too
        result.ok = False
        result.add_note(f"restore check failed: {got}/{want} bytes, "
                        f"{got_entries}/{want_entries} entries")
    shutil.rmtree(ctx.restore_target(name), ignore_errors=True)


def restore_variant(name: str, label: str, build: Callable[[Context, int], Built],
                    phases: tuple[tuple[str, str], ...] | None = None,
                    sessions: Sessions = _no_sessions) -> Variant:
    """A restore into an empty target directory and the emptied scratch server, checked
    afterwards (untimed): the files and the bench database came back."""
    def after(ctx: Context, result: RunResult) -> None:
        if not result.ok:
            result.add_note(error_line(result))
            return
        if phases:
            result.timeline = timeline(result, phases)
        restore_check(ctx, name, result)

    return Variant(name, label, "restore", build, lambda ctx: reset_restore_target(ctx, name),
                   after, sessions)


def restore_reference(ctx: Context, _round: int) -> Built:
    script = ref.ref_restore(ctx, ctx.container("reference_sequential"),
                             ctx.restore_target("restore_reference"))
    return ["bash", "-o", "pipefail", "-c", script], ctx.env


def restore_ours(ctx: Context, _round: int) -> Built:
    """``python -m flows.restore`` of our latest bench backup into the scratch target/server.

    Only when the restore CLI can aim the database at another server than the real one
    (``--db-socket`` in its --help): a benchmark never loads into the shared server.
    """
    backup = ctx.last_backup.get("ours_running_server")
    if not ctx.restore_available or backup is None or "--db-socket" not in ctx.restore_help:
        return None
    return [str(ctx.python), "-m", "flows.restore", "--container", backup["container"],
            "--backup-id", backup["backup_id"],
            "--target", str(ctx.restore_target("restore_ours")),
            "--db-socket", str(ctx.scratch_sock),
            "--db-user", "root",  # scratch server: root through its socket, no password
            "--all-databases",  # users and grants too, as the reference's full load
            "--staging-dir", str(ctx.staging), "--json"], ctx.running_env()


BACKUPS = [
    shell_variant("reference_sequential", "reference sequential (file, then swift upload)",
                  ref.ref_sequential),
    shell_variant("reference_streamed", "reference streamed (| swift upload -), one by one",
                  ref.ref_streamed),
    shell_variant("reference_streamed_parallel", "reference streamed, both at once",
                  ref.ref_streamed_parallel),
    ours_variant("ours_running_server", "ours, running Prefect server", ephemeral=False),
    ours_variant("ours_fast", "ours, running server, --compression-level 1 "
                 "--no-table-checksums", False, "--compression-level", "1",
                 "--no-table-checksums"),
    ours_variant("ours_ephemeral_server", "ours, ephemeral Prefect server", ephemeral=True),
    encrypted_variant("ours_encrypted", "ours, running server, --recipients-file (age)"),
]
RESTORES = [
    restore_variant("restore_reference",
                    "restore: swift download | zstd -d | tar -x; mariadb <", restore_reference),
    restore_variant("restore_ours", "restore: ours (python -m flows.restore)", restore_ours,
                    RESTORE_PHASES, Context.server_sessions),
]
OVERHEAD = [  # the first three store into their own containers
    shell_variant("overhead_tools_db_only", "tiny --db-only: dump | zstd | swift upload -",
                  ref.ref_db_only, kind="overhead"),
    ours_variant("overhead_running_server", "tiny --db-only: ours, running server", False,
                 "--db-only", kind="overhead"),
    ours_variant("overhead_ephemeral_server", "tiny --db-only: ours, ephemeral server", True,
                 "--db-only", kind="overhead"),
    Variant("overhead_import_only", "tiny: python -c 'import flows.backup' (no run)", "overhead",
            lambda ctx, _r: ([str(ctx.python), "-c", "import flows.backup"], ctx.running_env())),
]
