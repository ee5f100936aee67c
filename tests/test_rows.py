"""The single list of table rows (vtab_lily/rows.py) gives every preset's runs and every table's rows exactly
as the two lists it replaced did (recipes.PRESETS and tables.TABLES, frozen in tests/data/rows.json)."""
import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from vtab_lily import tables
from vtab_lily.rows import PRESET_ORDER, PRESET_TASKS, PRESETS, ROWS, PaperRow, paper_tables, sweep_presets
from vtab_lily.sweep import expand
from vtab_lily.tasks import TASK_SETS

FROZEN = Path(__file__).parent / "data" / "rows.json"
PROVENANCE = {"weights": "w", "data": "d", "precision": "fp32"}  # one for every run: ids differ by row only
PRESET_NAMES = ["table4", "table5", "extended", "table15", "mini", "mambapeft", "vim", "vpetl"]
TABLE_NAMES = ["4", "5", "15", "extended", "mini", "mambapeft", "vim", "vpetl"]


def _json(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def preset_points(name: str) -> list:
    """The preset's points on its default tasks, seed 42, in order: [label, run id or failure line]."""
    return [[p.label, dataclasses.replace(p.spec, provenance=PROVENANCE).run_id if p.spec is not None
             else p.error.splitlines()[0]]
            for p in expand(PRESETS[name], list(TASK_SETS[PRESET_TASKS.get(name, "all")]), [42], {}, {})]


def table_rows(name: str) -> list:
    """The table's rows in order: [backbone, label, method, filters, origin, recipe, hash of the row's recipe
    per task (tables.row_recipe)]."""
    return [_json([r.backbone, r.label, r.method, r.filters, r.origin, r.recipe,
                   _hash([tables.row_recipe(name, r, task) for task in tables.table_tasks(name)])])
            for r in tables.TABLES[name]]


def snapshot() -> dict:
    points = {name: preset_points(name) for name in PRESETS}
    return {"presets": {name: {"points": len(p), "sha256": _hash(p)} for name, p in points.items()},
            "tables": {name: table_rows(name) for name in tables.TABLES}, "table_preset": tables.TABLE_PRESET}


FROZEN_DATA = json.loads(FROZEN.read_text())


def test_the_presets_and_tables_are_the_frozen_ones():
    assert sorted(PRESETS) == sorted(FROZEN_DATA["presets"]) == sorted(PRESET_NAMES)
    assert sorted(tables.TABLES) == sorted(FROZEN_DATA["tables"]) == sorted(TABLE_NAMES)
    assert tables.TABLE_PRESET == FROZEN_DATA["table_preset"]
    assert sum(p["points"] for p in FROZEN_DATA["presets"].values()) == 3782


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_runs_are_todays(name):
    points = preset_points(name)
    assert {"points": len(points), "sha256": _hash(points)} == FROZEN_DATA["presets"][name]


@pytest.mark.parametrize("name", TABLE_NAMES)
def test_table_rows_are_todays(name):
    assert table_rows(name) == FROZEN_DATA["tables"][name]


def test_preset_orders_are_permutations_of_their_tables():
    assert {t: sorted(order) for t, order in PRESET_ORDER.items()} == {t: [*range(len(ROWS[t]))] for t in PRESET_ORDER}


def test_a_new_row_is_one_entry():
    """One PaperRow appended to the mini table is a row of the `mini` preset and of the `mini` table: its label
    and filters derived from its fixed options (the recipe setting lr is no filter)."""
    fixed, grid = {"r": 2, "targets": ("q",), "lr": 0.01}, {"s": [1.0, 2.0]}
    rows = {**ROWS, "mini": [*ROWS["mini"], PaperRow("vit-mini", "lora", fixed, grid)]}
    assert sweep_presets(rows)["mini"] == [*PRESETS["mini"], ("vit-mini", "lora", fixed, grid)]
    assert paper_tables(rows)["mini"] == [*tables.TABLES["mini"],
                                          tables.Row("vit-mini", "lora-q", "lora", {"r": 2, "targets": ("q",)})]


if __name__ == "__main__":  # python tests/test_rows.py: rewrite the fixture (only when rows change on purpose)
    FROZEN.write_text(json.dumps(snapshot(), indent=1, sort_keys=True) + "\n")
