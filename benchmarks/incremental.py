"""Nightly incrementals: a full, a nightly after 0 % and after 1 % of the files
changed, four more 1 % nights (a full plus 6 incrementals), a full of the same final state,
and the restores of the chain and of that equivalent full (files only: the database is a
full dump in every backup, so it restores the same either way).

Each change touches 1 % of the files of the bulk directories (``home/stack``, ``srv/node``):
about half appended to (modified), a quarter added, a quarter deleted. Every change is
journalled under the workdir and undone at the end of the sequence (appends truncated, added
files removed, deleted files renamed back), so the other variants always read the same tree;
a journal left by an interrupted run is undone before the next one.

The sequence needs the incremental CLI contract: ``python -m flows.backup --full``, an
incremental by default when the container holds a recent full of this host, ``--json`` with
``kind`` and ``parent``, and ``flows.restore`` of an incremental's id applying its chain.
Without ``--full`` in ``flows.backup --help`` it is not run ("not available", one line).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
from pathlib import Path

from context import Context
from measure import RunResult
from runner import Results, run_variant
from sampledata import ensure_bench_db
from shell import REPO, log
from variants import Variant, ours_argv, parse_ours, reset_restore_target, restore_check

BULK = ("home/stack", "srv/node")  # what a night changes: logs, Swift objects
MAX_CHANGED_BYTES = 8 * 1024**2  # never a glance image: a nightly changes small files
NIGHTS = 6  # incrementals in the chain restored against one equivalent full
CHAIN = "incr_chain"  # the container of the full and its incrementals
EQUIVALENT = "incr_equivalent_full"
TIP = "chain_tip"  # ctx.last_backup key of the chain's last incremental

LABELS = {
    "incr_full": "incremental chain: the full (--full)",
    "incr_nightly_0pct": "nightly incremental, 0 % of files changed",
    "incr_nightly_1pct": "nightly incremental, 1 % of files changed",
    "incr_nightly_more": "nightly incrementals 3-6 of the chain (1 % each)",
    "incr_equivalent_full": "a full of the chain's final state (--full)",
    "restore_chain": "restore (files): the full + 6 incrementals",
    "restore_equivalent_full": "restore (files): one equivalent full",
}


def available(ctx: Context) -> str | None:
    """None when the backup CLI has the incremental contract, else why not (one line)."""
    done = subprocess.run([str(ctx.python), "-m", "flows.backup", "--help"], cwd=REPO,
                          capture_output=True, env=ctx.env, check=False)
    if done.returncode != 0:
        return "python -m flows.backup --help failed"
    if "--full" not in done.stdout.decode():
        return "python -m flows.backup has no --full (this tree has no incremental backups)"
    return None


# ------------------------------------------------------------------------------- changes
class Changes:
    """The nights' changes to the tree, journalled so that they can be undone."""

    def __init__(self, workdir: Path, root: Path) -> None:
        self.root = root
        self.dir = workdir / "incr-journal"
        self.file = self.dir / "journal.json"
        self.appended: dict[str, int] = {}  # path -> original size
        self.added: list[str] = []
        self.deleted: dict[str, str] = {}  # path -> where it was moved
        self.rng = random.Random(13)

    def _save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file.write_text(json.dumps({"appended": self.appended, "added": self.added,
                                         "deleted": self.deleted}))

    def _candidates(self) -> list[Path]:
        found = []
        for rel in BULK:
            for directory, _dirs, files in os.walk(self.root / rel):
                for name in files:
                    path = Path(directory, name)
                    st = path.lstat()
                    if path.is_file() and not path.is_symlink() and st.st_nlink == 1 \
                            and st.st_size <= MAX_CHANGED_BYTES \
                            and str(path) not in self.added:
                        found.append(path)
        return sorted(found)

    def night(self, percent: float = 1.0) -> dict[str, int]:
        """Change ``percent`` of the bulk files: append to some, add some, delete some."""
        files = self._candidates()
        n = max(3, round(len(files) * percent / 100))
        added = deleted = max(1, n // 4)
        picked = self.rng.sample(files, min(n - added, len(files)))
        modify, delete = picked[deleted:], picked[:deleted]
        for path in modify:
            self.appended.setdefault(str(path), path.stat().st_size)
            with open(path, "ab") as f:
                f.write(f"nightly change {self.rng.getrandbits(64):016x}\n".encode() * 32)
        for path in delete:
            if str(path) in self.appended:  # appended earlier: truncate first, then move
                os.truncate(path, self.appended.pop(str(path)))
            moved = self.dir / f"deleted-{len(self.deleted)}"
            self.dir.mkdir(parents=True, exist_ok=True)
            os.rename(path, moved)
            self.deleted[str(path)] = str(moved)
        for _ in range(added):
            where = self.rng.choice(files).parent
            path = where / f"nightly-{len(self.added)}-{self.rng.getrandbits(32):08x}.log"
            path.write_bytes(os.urandom(2048).hex().encode())
            self.added.append(str(path))
        self._save()
        return {"modified": len(modify), "added": added, "deleted": len(delete)}

    def undo(self) -> None:
        for path, size in self.appended.items():
            with contextlib.suppress(FileNotFoundError):
                os.truncate(path, size)
        for path in self.added:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for path, moved in self.deleted.items():
            with contextlib.suppress(FileNotFoundError):
                os.rename(moved, path)
        self.appended, self.added, self.deleted = {}, [], {}
        self.file.unlink(missing_ok=True)

    @classmethod
    def recover(cls, workdir: Path, root: Path) -> None:
        """Undo what an interrupted run left changed."""
        changes = cls(workdir, root)
        if changes.file.exists():
            state = json.loads(changes.file.read_text())
            changes.appended, changes.added = state["appended"], state["added"]
            changes.deleted = state["deleted"]
            log("undoing the nightly changes an interrupted run left in the tree")
            changes.undo()


# ------------------------------------------------------------------------------ variants
def _backup_variant(name: str, container: str, *extra: str, clean: bool = False) -> Variant:
    def build(ctx: Context, _round: int):
        return ours_argv(ctx, ctx.container(container), *extra), ctx.running_env()

    def prepare(ctx: Context) -> None:
        if clean:
            ctx.clean_container(ctx.container(container))
        ensure_bench_db(ctx.args.scale)

    def after(ctx: Context, result: RunResult) -> None:
        parse_ours(ctx, name, result)
        out = ctx.last_backup.get(name) if result.ok else None
        if result.ok and out is not None:
            result.kind, result.parent = str(out.get("kind")), str(out.get("parent"))
            want = "full" if "--full" in extra else "incremental"
            if out.get("kind") != want:
                result.ok = False
                result.add_note(f"expected a {want}, --json says kind={out.get('kind')!r}, "
                                f"parent={out.get('parent')!r}")

    return Variant(name, LABELS[name], "incremental", build, prepare, after,
                   Context.server_sessions)


def _restore_variant(name: str, source: str) -> Variant:
    """``flows.restore`` of the files of ``source``'s latest backup (the database is left
    out: it is a full dump in every backup, the same work both ways)."""
    def build(ctx: Context, _round: int):
        backup = ctx.last_backup.get(source)
        if backup is None:
            return None
        return [str(ctx.python), "-m", "flows.restore", "--container", backup["container"],
                "--backup-id", backup["backup_id"], "--target", str(ctx.restore_target(name)),
                "--staging-dir", str(ctx.staging), "--json"], ctx.running_env()

    def after(ctx: Context, result: RunResult) -> None:
        if result.ok:
            restore_check(ctx, name, result, database=False)

    return Variant(name, LABELS[name], "incremental", build,
                   lambda ctx: reset_restore_target(ctx, name, database=False), after,
                   Context.server_sessions)


FULL = _backup_variant("incr_full", CHAIN, "--full", clean=True)
NIGHTLY = {key: _backup_variant(key, CHAIN)
           for key in ("incr_nightly_0pct", "incr_nightly_1pct", "incr_nightly_more")}
EQUIVALENT_FULL = _backup_variant(EQUIVALENT, EQUIVALENT, "--full", clean=True)
RESTORE_CHAIN = _restore_variant("restore_chain", TIP)
RESTORE_FULL = _restore_variant("restore_equivalent_full", EQUIVALENT)
VARIANTS = [FULL, *NIGHTLY.values(), EQUIVALENT_FULL, RESTORE_CHAIN, RESTORE_FULL]


def _step(ctx: Context, variant: Variant, round_: int, results: Results) -> bool:
    run_variant(ctx, variant, round_, results)
    runs = results.get(variant.name) or []
    return bool(runs) and runs[-1].ok


def incremental_round(ctx: Context, round_: int, results: Results) -> None:
    """One chain: the full, 6 nights, an equivalent full, both restores; the tree undone."""
    changes = Changes(ctx.workdir, ctx.root)
    try:
        if not _step(ctx, FULL, round_, results):
            log("  incremental: the full failed; no chain this round")
            return
        steps: list[tuple[Variant, float]] = [(NIGHTLY["incr_nightly_0pct"], 0.0),
                                              (NIGHTLY["incr_nightly_1pct"], 1.0)]
        steps += [(NIGHTLY["incr_nightly_more"], 1.0)] * (NIGHTS - 2)
        # The chain's last backup is the one its restore reads.
        for variant, percent in steps:
            if percent:
                changed = changes.night(percent)
                log(f"  nightly change: {changed}")
            if not _step(ctx, variant, round_, results):
                log(f"  incremental: {variant.name} failed; the chain stops this round")
                return
        ctx.last_backup[TIP] = ctx.last_backup[steps[-1][0].name]
        if _step(ctx, EQUIVALENT_FULL, round_, results):
            _step(ctx, RESTORE_CHAIN, round_, results)
            _step(ctx, RESTORE_FULL, round_, results)
    finally:
        changes.undo()
        for name in (CHAIN, EQUIVALENT):
            ctx.clean_container(ctx.container(name))
