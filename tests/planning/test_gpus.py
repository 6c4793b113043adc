"""The GPU preset table: every preset resolves to a shipped recipe, a budget under the card and a
marker policy; a broken table is refused naming the field."""

from __future__ import annotations

import pytest
import yaml

from lance_deploy.core.schema import SchemaError
from lance_deploy.core.units import GiB
from lance_deploy.planning.gpus import (
    PRESET_NAMES,
    PRESETS_FILE,
    parse_presets,
    preset,
    presets,
)


def test_every_preset_resolves_to_a_shipped_recipe():
    from lance_deploy.quant.recipe import load_recipe

    table = presets()
    assert tuple(table) == PRESET_NAMES
    for name, p in table.items():
        assert load_recipe(p.recipe).name == p.recipe
        assert 8 * GiB <= p.budget <= 80 * GiB, name
    assert preset("rtx4090").budget == 22 * GiB  # a 24 GB card keeps ~2 GiB of headroom
    assert preset("rtx3090").recipe == "int8-ampere"  # Ampere: no fp8 tensor cores


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d["presets"]["l40s"].update(colour="red"), "presets.l40s.colour: unknown field"),
    (lambda d: d["presets"]["h100"].update(recipe="fp9"), "presets.h100.recipe: 'fp9' not allowed"),
    (lambda d: d["presets"]["rtx4080"].update(budget="lots"), "presets.rtx4080.budget"),
    (lambda d: d["presets"]["rtx4080"].update(markers="all"), "presets.rtx4080.markers"),
    (lambda d: d["presets"].pop("rtx3090"), "presets: expected exactly"),
    (lambda d: d.update(schema_version=2), "schema_version: 2 not allowed"),
])
def test_broken_table_names_the_field(edit, needle):
    doc = yaml.safe_load(PRESETS_FILE.read_text())
    edit(doc)
    with pytest.raises(SchemaError, match=needle.replace("(", r"\(")):
        parse_presets(doc, "gpus.yaml")
