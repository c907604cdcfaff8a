"""A chain restored into ``/`` cannot reach through a link an earlier level made by giving it
another name: a later level's own relative symlink to it (an alias), an alias of an alias, or
a link to its parent directory; nor by a directory rename record (GNU tar's dumpdir ``R``/``T``,
which ``tar --list`` does not show). Verify reports such a chain; a genuine chain whose
directory was renamed between two levels still restores into a scratch target and verifies
clean.

Forged levels are written straight into Swift (helpers of ``test_restore_confinement``). The
members restored into ``/`` lie under a fresh directory of /var/tmp, which no level holds an
entry for, so even a regression could only write there and at the victim beside it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_restore_confinement import (
    assert_untouched,
    cli,
    gnu_level,
    last_line,
    plain_archive,
    plant_level,
    restore_cli,
)

from undercloud_backup.files import tarlist
from undercloud_backup.files.tarlist import Entry
from undercloud_backup.restore import verify

LINK, FILE, DIR, HARD, RENAME = "l", "-", "d", "h", "R"
LEVEL0 = [Entry("etc/", DIR), Entry("etc/link", LINK, "/var/lib/victim")]


def out(*later: list[Entry]) -> list[str]:
    return tarlist.leading_out([LEVEL0, *later])


# ---------------------------------------------------------------------------- pure (unit)
@pytest.mark.unit
def test_a_later_levels_own_link_to_an_earlier_link_is_followed():
    """tar makes a relative symlink without ``..`` at once, so the level's next member goes
    through it, and on through the earlier level's link."""
    assert out([Entry("etc/alias", LINK, "link"), Entry("etc/alias/pwned", FILE)]) == [
        "level 1 writes etc/alias/pwned through the symlink etc/link level 0 made"]
    # an alias of an alias, made in either order
    assert out([Entry("etc/b", LINK, "a"), Entry("etc/a", LINK, "link"),
                Entry("etc/b/x", FILE)]) == [
        "level 1 writes etc/b/x through the symlink etc/link level 0 made"]
    # a link to the earlier link's parent directory, then a member through both
    assert out([Entry("etc/a", LINK, "."), Entry("etc/a/link/x", FILE)]) == [
        "level 1 writes etc/a/link/x through the symlink etc/link level 0 made"]
    assert out([Entry("etc/up", LINK, "sub/.."), Entry("etc/up/link/", DIR)]) == [
        "level 1 writes etc/up/link through the symlink etc/link level 0 made"]
    # an absolute link of the level to the earlier link (for / it leads there)
    assert out([Entry("etc/s", LINK, "/etc/link"), Entry("etc/s/p", FILE)]) == [
        "level 1 writes etc/s/p through the symlink etc/link level 0 made"]
    # an alias made two levels on still leads through level 0's link
    assert out([Entry("etc/a", LINK, "link")], [Entry("etc/a/x", FILE)]) == [
        "level 2 writes etc/a/x through the symlink etc/a level 1 made"]
    # a hard link to the earlier symlink is a second name of it
    assert out([Entry("etc/h", HARD, "etc/link"), Entry("etc/h/y", FILE)]) == [
        "level 1 hard-links etc/h to etc/link through the symlink etc/link level 0 made",
        "level 1 writes etc/h/y through the symlink etc/h level 0 made"]


@pytest.mark.unit
def test_links_that_loop_or_climb_out_of_the_root_and_what_stays_fine():
    assert out([Entry("etc/x", LINK, "x"), Entry("etc/x/y", FILE)]) == [
        "level 1 writes etc/x/y through symlinks (or ..) that loop or climb out of the target"]
    assert out([Entry("etc/u", LINK, "../.."), Entry("etc/u/y", FILE)]) == [
        "level 1 writes etc/u/y through symlinks (or ..) that loop or climb out of the target"]
    # the level's own links that stay clear of level 0's, and members beside it: fine
    assert out([Entry("etc/ok", FILE), Entry("etc/d/", DIR), Entry("etc/r", LINK, "ok"),
                Entry("etc/dl", LINK, "d"), Entry("etc/dl/f", FILE),
                Entry("etc/linkless", FILE)]) == []
    # the level's alias replaces the earlier link with a file: nothing goes through it
    assert out([Entry("etc/a", LINK, "."), Entry("etc/a/link", FILE),
                Entry("etc/other", FILE)]) == []
    # within one archive tar's own protection holds: the alias is not reported there
    assert tarlist.leading_out([LEVEL0 + [Entry("etc/alias", LINK, "link"),
                                          Entry("etc/alias/pwned", FILE)]]) == []


@pytest.mark.unit
def test_rename_records_are_checked_and_move_the_links_under_them():
    assert out([Entry("etc/link/sub", RENAME, "etc/moved")]) == [
        "level 1 renames etc/link/sub to etc/moved: etc/link/sub through the symlink etc/link "
        "level 0 made"]
    assert out([Entry("etc/a", RENAME, "etc/link/a")]) == [
        "level 1 renames etc/a to etc/link/a: etc/link/a through the symlink etc/link level 0 "
        "made"]
    # a genuine rename: fine, and a link under the renamed directory is found at its new name
    level0 = [Entry("etc/a/", DIR), Entry("etc/a/lnk", LINK, "/x")]
    assert tarlist.leading_out([level0, [Entry("etc/a", RENAME, "etc/b")]]) == []
    assert tarlist.leading_out([level0, [Entry("etc/a", RENAME, "etc/b")],
                                [Entry("etc/b/lnk/p", FILE)]]) == [
        "level 2 writes etc/b/lnk/p through the symlink etc/b/lnk level 0 made"]
    paths = tarlist.ChainPaths()
    for index, level in enumerate([level0, [Entry("etc/a", RENAME, "etc/b")]]):
        paths.start_level(index)
        for entry in level:
            paths.add(entry)
    assert paths.renaming == [1] and paths.problems == []


@pytest.mark.unit
def test_rename_records_are_read_from_tars_dumpdir_listing(tmp_path):
    """``tar --list --incremental -vv`` shows each directory's dumpdir; a genuine level
    whose directory was renamed holds an R/T pair naming it from the archive's root."""
    source = tmp_path / "src"
    (source / "etc/a").mkdir(parents=True)
    (source / "etc/a/f").write_text("one\n")
    gnu_level(source, tmp_path / "s.snar", "etc")
    (source / "etc/a").rename(source / "etc/b")
    second = gnu_level(source, tmp_path / "s.snar", "etc")
    listed = subprocess.run(list(tarlist.tar_renames_command().argv), input=second,
                            capture_output=True, check=True).stdout
    assert tarlist.read_renames(io.BytesIO(listed)) == [Entry("etc/a", RENAME, "etc/b")]
    # an X record's temporary directory stands for an empty name; a lone R still counts
    assert tarlist.read_renames(io.BytesIO(
        b'drwxr-xr-x 0/0 0 2026-12-01 10:00 "etc/"\nX etc/t\nR etc/c\nT \nR \nT etc/d\n'
        b'R etc/e\n\n')) == [Entry("etc/c", RENAME, "etc/t/tar.XXXXXX"),
                             Entry("etc/t/tar.XXXXXX", RENAME, "etc/d"),
                             Entry("etc/e", RENAME, "etc/t/tar.XXXXXX")]


# ------------------------------------------------------------------------- by the tool
@pytest.fixture
def place() -> Iterator[Path]:
    """A fresh directory of /var/tmp: the victim, and where the members restored into ``/``
    would land."""
    top = Path(tempfile.mkdtemp(prefix="ucb-chain-alias-", dir="/var/tmp"))
    victim = top / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "sub/canary2").write_text("keep me\n")
    (victim / "secret").write_text("only root\n")
    try:
        yield top
    finally:
        shutil.rmtree(top)


def test_into_slash_a_later_levels_alias_of_an_earlier_link_is_refused_and_reported(
        container, os_env, place):
    victim, base = place / "victim", str(place / "slash").lstrip("/")
    plant_level(container, "forged-0", plain_archive(
        (f"{base}/etc/link", tarfile.SYMTYPE, str(victim), 0o777, "")), [],
        included=(f"/{base}",))
    plant_level(container, "forged-1", plain_archive(
        (f"{base}/etc/alias", tarfile.SYMTYPE, "link", 0o777, ""),
        (f"{base}/etc/alias/pwned", tarfile.REGTYPE, "", 0o4755, "x")), ["forged-0"],
        included=(f"/{base}",), minute=1)
    result = restore_cli(container, "forged-1", "--target", "/", "--allow-root-target",
                         "--overwrite")
    assert result.returncode == tarlist.ChainLeadsOut.exit_code == 64, result.stderr
    assert f"level 1 writes {base}/etc/alias/pwned through the symlink {base}/etc/link " \
        "level 0 made" in last_line(result)
    assert "Nothing was written" in last_line(result)
    assert not (place / "slash").exists()
    assert_untouched(victim)

    checked = cli("verify", "--container", container, "--backup-id", "forged-1",
                  "--skip-database", "--no-signature-check", "--json")
    assert checked.returncode == verify.VerificationFailed.exit_code == 41, checked.stderr
    assert any(f"a restore would lead out of its target: level 1 writes {base}/etc/alias/pwned "
               f"through the symlink {base}/etc/link level 0 made" in p
               for p in json.loads(checked.stdout)["problems"])


def test_a_directory_renamed_between_levels_restores_into_scratch_not_into_slash(
        container, os_env, tmp_path, place):
    """A genuine chain: level 1 renames etc/a (which holds an absolute symlink) to etc/b."""
    base = str(place / "slash").lstrip("/")
    source = tmp_path / "src"
    top = source / base
    (top / "etc/a").mkdir(parents=True)
    (top / "etc/a/f").write_text("one\n")
    (top / "etc/a/lnk").symlink_to("/nowhere")
    first = gnu_level(source, tmp_path / "s.snar", base)
    (top / "etc/a").rename(top / "etc/b")
    (top / "etc/b/g").write_text("two\n")
    second = gnu_level(source, tmp_path / "s.snar", base)
    plant_level(container, "genuine-0", first, [], included=(f"/{base}",))
    plant_level(container, "genuine-1", second, ["genuine-0"], included=(f"/{base}",),
                minute=1)

    target = tmp_path / "target"
    result = restore_cli(container, "genuine-1", "--target", str(target))
    assert result.returncode == 0, result.stderr
    restored = target / base / "etc"
    assert sorted(os.listdir(restored)) == ["b"]
    assert sorted(os.listdir(restored / "b")) == ["f", "g", "lnk"]
    assert os.readlink(restored / "b/lnk") == "/nowhere"

    checked = cli("verify", "--container", container, "--backup-id", "genuine-1",
                  "--skip-database", "--no-signature-check", "--json")
    assert checked.returncode == 0, checked.stderr
    report = json.loads(checked.stdout)
    assert report["problems"] == []
    assert any("rename directories: a restore into / refuses them" in w
               for w in report["warnings"])

    refused = restore_cli(container, "genuine-1", "--target", "/", "--allow-root-target",
                          "--overwrite", "--path", f"/{base}")
    assert refused.returncode == tarlist.RenamesIntoRoot.exit_code == 84, refused.stderr
    assert last_line(refused).startswith(
        "undercloud-restore: error: Refusing to restore genuine-1 into /: level(s) 1 of its "
        "chain rename directories")
    assert "Restore into a scratch target" in last_line(refused)
    assert not (place / "slash").exists()
    assert_untouched(place / "victim")
