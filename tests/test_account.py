"""The database account of docs/backup.md, as an operator creates it from there: a whole backup
with exactly its grants is complete, and the same account short of one grant fails the run
before anything is written (exit 25, one line naming the fix)."""

from __future__ import annotations

import json
import re
import secrets
import subprocess

import pytest
from conftest import REPO, mariadb
from test_faults import (  # noqa: F401 - fixtures used by name
    _objects,
    _store,
    assert_failed_cleanly,
    earlier,
    run_backup,
    staging,
)

from undercloud_backup.core.manifest import DB_OBJECT, Manifest

USER = "ucb_readme"


def readme_account_sql() -> str:
    """The SQL block of docs/backup.md's "The database account" section, as written there."""
    text = (REPO / "docs/backup.md").read_text()
    section = text.split("## The database account", 1)[1]
    return re.search(r"```sql\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def readme_account(services, tmp_path):
    """The README's account over TCP (its own name and password); dropped afterwards."""
    password = secrets.token_hex(12)
    sql = (readme_account_sql().replace("'backup'@'localhost'", f"'{USER}'@'127.0.0.1'")
           .replace("'a password of its own'", f"'{password}'"))
    assert f"'{USER}'@'127.0.0.1'" in sql and "GRANT " in sql
    mariadb(f"DROP USER IF EXISTS '{USER}'@'127.0.0.1';" + sql)
    cnf = tmp_path / "readme-account.cnf"
    cnf.write_text(f"[client]\nhost=127.0.0.1\nport=3306\nuser={USER}\npassword={password}\n")
    cnf.chmod(0o600)
    yield str(cnf)
    mariadb(f"DROP USER IF EXISTS '{USER}'@'127.0.0.1';")


def test_readme_grants_back_up_everything(readme_account, sample_databases,
                                          earlier, staging):  # noqa: F811
    result = run_backup(earlier, staging, "--db-defaults-file", readme_account, "--db-only",
                        "--json", "--no-prune")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    store = _store()
    try:
        manifest = Manifest.from_json(store.get_bytes(earlier.container, summary["manifest"]))
        section = manifest.mariadb
        # every sample database, with its trigger, view, routine and event, and the grants
        # the dump ran with: the README's own
        assert set(sample_databases) <= set(section.databases)
        names = ",".join(f"'{d}'" for d in sample_databases)
        triggers = int(mariadb("SELECT COUNT(*) FROM information_schema.triggers "
                               f"WHERE trigger_schema IN ({names})"))
        assert triggers >= 1
        assert sum(section.schema_objects[d]["triggers"] for d in sample_databases) == triggers
        dump = subprocess.run(["zstd", "-dc"], check=True, capture_output=True, input=b"".join(
            store.get_bytes(earlier.container, o.name) for o in manifest.objects
            if o.leaf == DB_OBJECT)).stdout
        assert len(re.findall(rb"CREATE\b[^\n]*\bTRIGGER\b", dump)) == triggers
        assert any("TRIGGER" in g and "SHOW DATABASES" in g and "ON *.*" in g
                   for g in section.privileges), section.privileges
    finally:
        store.delete(earlier.container, summary["manifest"])  # the earlier one stays latest


def test_readme_grants_short_of_trigger_fail_before_writing(readme_account, sample_databases,
                                                            earlier, staging):  # noqa: F811
    mariadb(f"REVOKE TRIGGER ON *.* FROM '{USER}'@'127.0.0.1';")
    before = _objects(earlier.container)
    result = run_backup(earlier, staging, "--db-defaults-file", readme_account, "--db-only")
    assert_failed_cleanly(result, earlier, staging, before, exit_code=25, says="TRIGGER")
    last = result.stderr.strip().splitlines()[-1]
    assert f"GRANT TRIGGER ON *.* TO '{USER}'@'127.0.0.1';" in last, last
    assert "Traceback" not in result.stderr
