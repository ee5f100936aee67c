"""Options you can see: every option declares its help and its range or choices (options.option), one
function checks them (options.check_fields, nothing inferred from names), and `run --list-options` shows them."""
from __future__ import annotations

import dataclasses
import re
from typing import Literal

import pytest

from vtab_lily import run as run_cli
from vtab_lily.adapters.config import option_table
from vtab_lily.adapters.lily import LilyConfig
from vtab_lily.adapters.registry import METHODS
from vtab_lily.options import OptionError, check_fields, describe, option
from vtab_lily.recipes import RECIPES, Recipe

# str options whose values are site names, checked against the backbone's sites when the method attaches
SITE_OPTIONS = {("adaptformer", "site")}


def _suite_configs():
    configs = {name: m.config for name, m in METHODS.items() if m.module.startswith("vtab_lily.")}
    return {**configs, "recipe": Recipe}


@pytest.mark.parametrize("owner", sorted(_suite_configs()))
def test_every_option_of_every_method_and_the_recipe_has_help_and_a_range_or_choices(owner):
    for row in describe(_suite_configs()[owner]):
        assert len(row["help"]) >= 10, (owner, row["name"])
        if row["type"].split(" | ")[0] in ("int", "float"):
            assert row["range"] is not None or row["choices"], (owner, row["name"])
        if row["type"].split(" | ")[0] == "str" and (owner, row["name"]) not in SITE_OPTIONS:
            assert row["choices"], (owner, row["name"])  # a free string would go unchecked


def test_ranges_and_choices_come_from_the_declaration_not_from_the_name():
    @dataclasses.dataclass
    class Plain:  # a plugin's plain fields: no rule from their names any more
        dropout: float = 0.5
        seed: int = 1

    cfg = Plain(dropout=3.0, seed=5)
    check_fields(cfg)
    assert cfg.dropout == 3.0  # formerly refused as a "*dropout*" field outside [0, 1]
    with pytest.raises(OptionError, match=r"^seed must be >= 1, got 0$"):  # an int without a range: >= 1
        check_fields(Plain(seed=0))

    @dataclasses.dataclass
    class Declared:
        rate: float = option(0.1, "a rate", (0.0, 0.5))
        seed_like: int = option(0, "from 0", (0, None))
        kind: Literal["a", "b"] | None = option(None, "a or b")

    check_fields(Declared(rate=0.5, seed_like=0, kind="b"))
    with pytest.raises(OptionError, match=r"^x rate must be in \[0.0, 0.5\], got 0.6$"):
        check_fields(Declared(rate=0.6), "x ")
    with pytest.raises(OptionError, match=r"^x kind must be one of \('a', 'b'\), got 'c'$"):
        check_fields(Declared(kind="c"), "x ")


def _listing(capsys, *argv) -> tuple[int, str]:
    code = run_cli.main(["--list-options", *argv])
    return code, capsys.readouterr().out


def _entries(text: str) -> dict[str, tuple[str, str]]:
    """name -> (its line after the name, its help line) for each option of the first section."""
    lines = text.split("\n\n")[0].splitlines()[1:]
    out, i = {}, 0
    while i < len(lines):
        name, rest = re.match(r"  (\S+) (.*)$", lines[i]).groups()
        helps = lines[i + 1].strip() if i + 1 < len(lines) and lines[i + 1].startswith("      ") else ""
        out[name] = (rest, helps)
        i += 2 if helps else 1
    return out


def test_list_options_of_lily_shows_each_option_its_default_per_family_its_range_and_help(capsys):
    code, out = _listing(capsys, "--method", "lily")
    assert code == 0 and out.startswith("lily options (--set NAME=VALUE):\n")
    entries = _entries(out)
    assert list(entries) == [f.name for f in dataclasses.fields(LilyConfig)]
    assert entries["r"][0] == "(int | None) default vit: 16, vim: 8; >= 1"
    assert entries["ne_1"][0] == "(int | None) default vit: 4, vim: None; >= 1"
    assert entries["targets"][0] == "(names | None) default vit: k+v+mlp, vim: in_proj"
    assert entries["router"][0] == "(str | None) default vit: layer, vim: model; one of layer, lp, model, none"
    assert entries["lp_dropout"][0] == "(float | None) default vit: 0.0, vim: 0.1; in [0.0, 1.0]"
    assert entries["dt_r"][0] == "(int | None) default vit: 0, vim: 4; >= 0"
    assert entries["s"][0] == "(float) default 1.0; any"
    assert entries["preset"][0] == "(str | None) default None; one of lily-s, lily-l"
    assert all(len(h) >= 10 for _, h in entries.values())
    recipe = _entries(out.split("\n\n")[1])
    assert recipe["lr"][0] == f"(float) default vit: {RECIPES['vit'].lr}, vim: {RECIPES['vim'].lr}; >= 1e-12"
    assert recipe["batch_size"][0] == "(int) default 64; >= 1"
    assert recipe["label_smoothing"][0].endswith("in [0.0, 1.0]")

    code, out = _listing(capsys, "--method", "lily", "--backbone", "vim-s")
    entries = _entries(out)
    assert code == 0 and out.startswith("lily options on vim-s")
    assert entries["r"][0] == "(int | None) default vim: 8; >= 1"
    assert entries["mlp_r"][0].startswith("(int | None) default None")
    assert _entries(out.split("\n\n")[1])["lr"][0] == f"(float) default {RECIPES['vim'].lr}; >= 1e-12"


def test_list_options_of_a_composition_prefixes_each_option_by_its_method(capsys):
    code, out = _listing(capsys, "--method", "lora+ssf", "--backbone", "vit-b")
    entries = _entries(out)
    assert code == 0
    assert list(entries) == ["lora.targets", "lora.r", "lora.s", "lora.dropout", "ssf.targets", "ssf.init"]
    assert entries["lora.targets"][0] == "(names | None) default vit: q+v"
    assert entries["ssf.init"][0] == "(str) default official; one of official, identity"
    assert [r["name"] for r in option_table("lora+ssf")][:2] == ["lora.targets", "lora.r"]


def test_list_options_of_a_plugin_and_of_an_unknown_method(capsys):
    code, out = _listing(capsys, "--method", "examples.tied_lora:tied_lora")
    assert code == 0 and _entries(out)["r"] == ("(int) default 8; >= 1", "rank of the shared pair A, B")
    assert run_cli.main(["--list-options", "--method", "nosuch"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown method 'nosuch'")
