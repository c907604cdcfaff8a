"""The backup's run form: optional fields look like fields, and the documentation's table of
parameters is the form's own (before: 16 optional fields showed a ``str | None`` switch with
"Property is type None", and docs/backup.md listed fields the form had changed, or not at all:
recipients_file, signing_key, no_encryption; two database connections in one, three in the
other)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools.validation import validate

from flows import params
from flows.backup import undercloud_backup

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.unit


def _schema() -> dict:
    """What ``prefect deploy`` stores as the deployment's parameter schema (the form)."""
    return parameter_schema(undercloud_backup).model_dump()


def test_no_field_of_the_form_is_a_choice_between_a_type_and_none():
    switches = [f"{group}.{name}"
                for group, definition in _schema()["definitions"].items()
                for name, prop in definition["properties"].items()
                if any(c.get("type") == "null" for c in prop.get("anyOf", []))]
    assert switches == []
    swift = _schema()["definitions"]["SwiftParams"]["properties"]
    assert swift["swift_retries"]["type"] == "integer" and "default" not in swift["swift_retries"]
    retention = _schema()["definitions"]["RetentionParams"]["properties"]
    assert retention["keep_last"]["default"] == 3  # a number's default is shown


def test_the_server_takes_an_optional_field_left_empty_and_refuses_a_wrong_type():
    """The server checks a run's parameters against the schema (``enforce_parameter_schema``):
    a plain optional field must still take null (what clients send for unset), and the flow
    takes an empty one as unset."""
    schema = _schema()
    assert validate({"database": {"db_block": None, "db_port": None},
                     "swift": {"swift_retries": None}}, schema, preprocess=True,
                    ignore_required=True) == []
    assert validate({"swift": {"swift_retries": "many"}}, schema, preprocess=True,
                    ignore_required=True) != []
    assert params.DatabaseParams(db_block="", db_port=None).db_block is None
    assert params.WhatToBackUp(root="/").root == "/"


def test_the_docs_table_of_parameters_is_the_forms():
    text = (REPO / "docs/backup.md").read_text()
    start, end = text.index(params.TABLE_BEGIN), text.index(params.TABLE_END)
    in_docs = text[start:end + len(params.TABLE_END)]
    assert in_docs == params.parameters_markdown(), \
        "docs/backup.md's table differs from flows/params.py: paste `python -m flows.params`"
    for name in ("recipients_file", "signing_key", "no_encryption"):
        assert f"| `{name}` |" in in_docs
    assert "needs three" in params.AdvancedParams.model_fields["table_checksums"].description
