"""The method registry: resolving a name never changes the listing, config building runs a config's
__post_init__ once, and the adapters package's modules import each other without a cycle."""
import ast
import dataclasses
import graphlib
import importlib
from pathlib import Path
from typing import ClassVar

from vtab_lily.adapters import METHODS, get_method, make_config
from vtab_lily.adapters.method import Method

ADAPTERS = Path(__file__).resolve().parent.parent / "vtab_lily" / "adapters"


def test_resolving_plugins_peft_tuners_and_compositions_leaves_the_listing_unchanged():
    importlib.import_module("examples.tied_lora")  # a user's module registers its method when imported
    before = dict(METHODS)
    tied = get_method("examples.tied_lora:tied_lora")
    assert tied is METHODS["tied_lora"] and tied.module == "examples.tied_lora"
    peft = get_method("peft:lora")
    assert peft.module == "peft" and get_method("peft:lora") is peft  # one config class per tuner
    assert get_method("lora+examples.tied_lora:tied_lora").parts == ("lora", "examples.tied_lora:tied_lora")
    make_config("peft:lora+bitfit", {"peft:lora.r": 4}, "vit-tiny")
    assert METHODS == before


@dataclasses.dataclass
class CountingConfig:
    r: int | None = None
    targets: tuple[str, ...] | None = None
    FAMILY_DEFAULTS: ClassVar[dict] = {"vit": {"r": 3, "targets": ("q",)}}
    calls: ClassVar[list] = []

    def __post_init__(self):
        CountingConfig.calls.append((self.r, self.targets))


def test_make_config_runs_post_init_once_and_then_fills_family_defaults(monkeypatch):
    monkeypatch.setitem(METHODS, "counting", Method(CountingConfig, lambda model, cfg: None))
    monkeypatch.setattr(CountingConfig, "calls", [])
    cfg = make_config("counting", {"r": 5}, "vit-tiny")
    assert CountingConfig.calls == [(5, None)] and (cfg.r, cfg.targets) == (5, ("q",))
    lily = make_config("lily", {"preset": "lily-s"}, "vim-s")  # the preset beats the family's defaults
    assert (lily.r, lily.ne_2, lily.dt_r, lily.router) == (4, 3, 7, "model")


def _imports(path: Path) -> tuple[set[str], list[str]]:
    """The adapters modules `path` imports at its top level, and the relative imports inside functions."""
    tree = ast.parse(path.read_text())
    top, inner = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [a.name for a in node.names]
            (top.update if node in tree.body else inner.extend)(names)
    return top, inner


def test_the_adapters_modules_import_each_other_without_a_cycle_or_a_lazy_import():
    graph = {}
    for path in sorted(ADAPTERS.glob("*.py")):
        top, inner = _imports(path)
        assert not inner, f"{path.name} imports {inner} inside a function"
        if path.stem != "__init__":
            graph[path.stem] = top
    order = list(graphlib.TopologicalSorter(graph).static_order())  # CycleError on a cycle
    assert order.index("wrappers") < order.index("registry") < order.index("config") < order.index("base")
