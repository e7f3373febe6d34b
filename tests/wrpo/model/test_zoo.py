"""The committed support matrix (``wrpo/assets/verified_layouts.json``, ``docs/models.md``) holds.

Every architecture of transformers' causal-LM registry is re-checked in every layout (about 30 s on
one core): a status that changes (exact, off, differs, error) fails. Re-run ``make zoo`` and review
the diff of the table when the code or transformers changes.
"""

from __future__ import annotations

import json

import pytest
import transformers
from zoo.architectures import registry_names
from zoo.conformance import check_one
from zoo.render import DOC, render

from wrpo.model.layout import LAYOUTS, VERIFIED_LAYOUTS

TABLE = json.loads(VERIFIED_LAYOUTS.read_text())


def _short(status: str) -> str:
    return status.split(":", 1)[0]


def test_the_table_is_for_the_installed_transformers():
    assert TABLE["transformers"] == transformers.__version__, "re-run `make zoo` for this transformers"


def test_every_registry_architecture_is_listed():
    assert set(registry_names()) == set(TABLE["models"]) | set(TABLE["skipped"])
    assert all(why for why in TABLE["skipped"].values())


def test_docs_models_md_is_rendered_from_the_table():
    assert DOC.read_text() == render(TABLE), "docs/models.md is stale: `make zoo` (or python -m zoo --render)"


@pytest.mark.parametrize("name", registry_names())
def test_architecture_matches_the_matrix(name):
    _, result = check_one(name)
    if name in TABLE["skipped"]:
        assert isinstance(result, str)
        return
    assert isinstance(result, dict), result
    got = {lay: _short(result[lay]) for lay in LAYOUTS}
    want = {lay: _short(TABLE["models"][name][lay]) for lay in LAYOUTS}
    assert got == want, {lay: result[lay] for lay in LAYOUTS if got[lay] != want[lay]}
