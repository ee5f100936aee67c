"""The rows of the paper tables, declared once: each row's backbone, method, fixed options (method options and
recipe settings), searched grid, table label and record filters. `sweep --preset P` trains the rows of P
(`PRESETS`, the sweep's (backbone, method, fixed, grid) tuples) and `tables --table T` reports the records of
T's rows (`TABLES`, tables.Row). Adding a row is one `PaperRow` in `ROWS` (docs/tables.md)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .recipes import (
    BITFIT,
    CONVPASS,
    DTL,
    FACT_RANK,
    FACT_SCALE,
    GPS,
    HYDRA,
    IMAGENET_NORM,
    NOAH_ADAPTER,
    RECIPE_FIELDS,
    REPADAPTER_SCALE,
    SCT,
    SSF_RECIPE,
    VPETL_ADAPTFORMER,
    VPETL_LORA,
    VPT_LENGTHS,
)


@dataclass(frozen=True)
class Row:
    """A table's row: the records it takes."""
    backbone: str
    label: str  # the paper's row label (column `method` of paper_tables.csv)
    method: str
    filters: dict = field(default_factory=dict)  # method-config values a record must have
    origin: str | None = None  # the records' origin label (records.load_records), when it must match
    recipe: str | None = None  # the records' recipe (JSON, `runs` rows); None: the table's preset's


@dataclass(frozen=True)
class PaperRow:
    """A row of a paper table and of the preset that trains it."""
    backbone: str
    method: str
    fixed: dict = field(default_factory=dict)  # method options and recipe settings (PerTask values per task)
    grid: dict = field(default_factory=dict)  # searched values, chosen per task by the table's protocol
    label: str | None = None  # the table's label; None: preset_label's (with -r<rank> where two would share one)
    filters: dict | None = None  # method-config values a record must have; None: the method options of `fixed`

    def sweep_row(self) -> tuple:
        return self.backbone, self.method, self.fixed, self.grid


def preset_label(method: str, fixed: dict) -> str:
    """A MambaPEFT-style row's label (the `method` column of vtab_lily/paper/mambapeft.csv)."""
    if method == "partial":
        return f"partial-{'+'.join(fixed['parts'])}"
    if method in ("prompt", "affix"):
        return method + ("" if fixed.get("project", True) else "-noproj")
    if method == "lora" and "targets" in fixed:
        return f"lora-{fixed['targets'][0]}"
    if method == "lorap":
        return f"lorap-{'+'.join(fixed['targets'])}" + ("-dora" if fixed.get("dora") else "")
    return fixed.get("preset") or method


def table_rows(rows: list[PaperRow]) -> list[Row]:
    """The table rows of paper rows: their own label or preset_label's (with -r<rank> where two rows of one
    backbone would share one), their own filters or the method options they fix."""
    labels = [(r.backbone, preset_label(r.method, r.fixed)) for r in rows]
    return [Row(r.backbone, r.label or (f"{label[1]}-r{r.fixed['r']}" if sum(
                    not o.label and other == label for o, other in zip(rows, labels)) > 1 else label[1]),
                r.method, r.filters if r.filters is not None else
                {k: v for k, v in r.fixed.items() if k not in RECIPE_FIELDS})
            for r, label in zip(rows, labels)]


def mambapeft_rows(backbone: str, recipe: dict) -> list[PaperRow]:
    """MambaPEFT's methods at their configs' sizes on `backbone`, each with `recipe`'s settings."""
    # '+'-joined names as tuples, as the configs hold them (and records, so that table rows match)
    lorap = [((t,), {}) for t in ("x", "z", "dt", "B", "C")] + [(("x",), {"dora": True})]  # 2_small_lorap_*_64[_dora]
    return [PaperRow(backbone, method, fixed) for method, fixed in [
        ("fft", {**recipe}),  # 1_small_ft
        ("linear", {**recipe}),  # 1_small_lp
        *[("partial", {"parts": (part,), **({"wd_mult": wd} if wd != 1 else {}), **recipe})
          for part, wd in (("cls_token", 1), ("pos_embed", 1), ("dt_bias", 100), ("D", 10), ("A", 10), ("conv1d", 10))],
        *[("prompt", {"n": 8, "type": "prefix_suffix", "project": proj, **recipe})  # 4_small_prompt_*
          for proj in (False, True)],
        *[("affix", {"n": 3, "project": proj, **recipe}) for proj in (False, True)],  # 4_small_affixtune
        ("addscan", {"n": 6, "pos": "prefix", "copy_A": True, **recipe}),  # 4_small_addiscan_prefix_6
        ("adaptformer", {"width": 32, "s": 0.1, **recipe}),  # 4_small_adaptf_32
        ("lora", {"targets": ("patch_embed",), "r": 32, "s": 1.0, **recipe}),
        # x_proj_dim64, dt_dim64: merged into the weights (W + s up @ down, vim_peft_all.py L115-123, L161-171), so
        # no dropout
        ("lora", {"targets": ("x_proj", "x_proj_b"), "r": 64, "s": 0.1, "dropout": 0.0, **recipe}),
        ("lora", {"targets": ("dt_proj", "dt_proj_b"), "r": 64, "s": 0.1, "dropout": 0.0, **recipe}),
        ("lora", {"targets": ("out_proj",), "r": 96, "s": 0.1, **recipe}),  # out_proj_96
        ("lora", {"targets": ("in_proj",), "r": 32, "s": 0.1, **recipe}),  # in_proj_32
        *[("lorap", {"targets": t, "r": 64, "s": 0.1, **extra, **recipe}) for t, extra in lorap],
    ]]


def _lily15(targets) -> PaperRow:
    return PaperRow("vit-b", "lily", {"targets": targets, "ne_1": 12}, {"s": [0.01, 0.1, 1.0, 10.0, 100.0],
                                                                       "ne_2": [2, 3, 4]},
                    label=f"lily-{''.join(targets)}")


# The rows of each table, in the table's order (the sweep's order: PRESET_ORDER).
# Lily on ViT: rank 16, lily_s in {0.01, 0.1, 1, 10, 100}, ne_1 = ne_2 = ne in {2, 3, 4}, chosen per task
# (the official per-task choices are unpublished, so the row is a sweep).
ROWS = {
    "4": [
        PaperRow("vit-b", "fft"),
        PaperRow("vit-b", "linear"),
        PaperRow("vit-b", "adaptformer", {"width": 32}),
        PaperRow("vit-b", "bilora", {"r": 32}),
        PaperRow("vit-b", "lora", {"r": 32}),
        PaperRow("vit-b", "fourierft", {"n": 3000, "scale": 300.0}, filters={}),
        PaperRow("vit-b", "mora", {"r": 29, "type": 6}, filters={}),  # 24 x 210^2 = 1,058,400: Table 4's 1.058M
        PaperRow("vit-b", "lily", {"r": 16}, {"s": [0.01, 0.1, 1.0, 10.0, 100.0], "ne": [2, 3, 4]},
                 filters={"targets": ["k", "v", "mlp"], "r": 16}),
    ],
    "5": [
        PaperRow("vim-s", "fft"),
        PaperRow("vit-b-in1k", "fft"),
        PaperRow("vim-s", "linear"),
        PaperRow("vit-b-in1k", "linear"),
        PaperRow("vit-b-in1k", "adaptformer", {"width": 8}),
        PaperRow("vit-b-in1k", "lora", {"r": 8}),
        PaperRow("vim-s", "lora", {"r": 1, "targets": ("in_proj",)}, label="lora"),
        PaperRow("vim-s", "lily", {"preset": "lily-s"}),
        PaperRow("vim-s", "lily", {"preset": "lily-l"}),
    ],
    # Appendix D: Lily on different modules without LP sharing (one LP per layer); the paper tunes the
    # settings to similar parameter counts without publishing them, so the row is a sweep over s and ne_2.
    "15": [_lily15(targets) for targets in (("q", "v"), ("mlp",), ("q", "v", "mlp"), ("k", "v", "mlp"))],
    # The classic VTAB-1K baselines beside their own papers' numbers (vtab_lily/paper/extended.csv), each with its
    # official code's settings, inputs ImageNet-normalised as theirs: VPT's backbone runs without dropout (its ViT
    # has no stochastic depth) and searches the prompt length; Adapter as NOAH (width 8, dropout 0.1, trunc_normal
    # init, no decay on 1-d tensors); BitFit with the encoder in eval mode (drop_path 0); SSF and FacT with their
    # per-task settings. SSF's published numbers come from the AugReg ImageNet-21K ViT-B/16 (timm
    # `vit_base_patch16_224_in21k` of its era), normalised with mean = std = 0.5; its row here runs on `vit-b`
    # unnormalised, like the other rows.
    "extended": [
        PaperRow("vit-b", "vpt", {"deep": False, "drop_path": 0.0, **IMAGENET_NORM}, {"length": VPT_LENGTHS},
                 label="vpt-shallow"),
        PaperRow("vit-b", "vpt", {"deep": True, "drop_path": 0.0, **IMAGENET_NORM}, {"length": VPT_LENGTHS},
                 label="vpt-deep"),
        PaperRow("vit-b", "bitfit", BITFIT),
        PaperRow("vit-b", "adapter", NOAH_ADAPTER, filters={"width": 8, "placement": "mlp", "init": "trunc_normal"}),
        PaperRow("vit-b", "ssf", SSF_RECIPE, filters={"init": "official"}),
        *[PaperRow("vit-b", "fact", {"type": kind, "r": FACT_RANK[kind], "s": FACT_SCALE[kind], **IMAGENET_NORM},
                   label=f"fact-{kind}", filters={"type": kind}) for kind in ("tt", "tk")],
    ],
    # The offline mini-benchmark: Table 4's methods on vit-mini and Table 5's on vim-mini (width 64 / 48, so
    # ranks and widths are scaled down from ViT-B's 768; FourierFT keeps ViT-B's dW magnitude, scale
    # sqrt(n) / (d_in d_out)), over the mini VTAB, Lily's grid reduced to ne in {2, 4}; MINI_VIM follows.
    "mini": [
        PaperRow("vit-mini", "fft"),
        PaperRow("vit-mini", "linear"),
        PaperRow("vit-mini", "adaptformer", {"width": 8}),
        PaperRow("vit-mini", "bilora", {"r": 8}),
        PaperRow("vit-mini", "lora", {"r": 8}),
        PaperRow("vit-mini", "fourierft", {"n": 256, "scale": 8.0}, filters={"n": 256}),
        PaperRow("vit-mini", "mora", {"r": 8}),
        PaperRow("vit-mini", "lily", {"r": 8}, {"ne": [2, 4]}),
        PaperRow("vit-mini", "repadapter"),
        PaperRow("vit-mini", "lntune"),
        PaperRow("vit-mini", "convpass"),
        PaperRow("vit-mini", "adapterplus"),
        # V-PETL Bench's methods at their official sizes (SCT's 96 of 768 channels scaled to 8 of 64)
        PaperRow("vit-mini", "hydra", {"r": 2}),
        PaperRow("vit-mini", "sct", {"k": 8}),
        PaperRow("vit-mini", "dtl", {"r": 2}),
        PaperRow("vit-mini", "gps", {"k": 1}),
        PaperRow("vim-mini", "fft"),
        PaperRow("vim-mini", "linear"),
        PaperRow("vim-mini", "lora", {"r": 1, "targets": ("in_proj",)}, label="lora"),
        PaperRow("vim-mini", "lily", {"preset": "lily-s"}),
        PaperRow("vim-mini", "lily", {"preset": "lily-l"}),
    ],
}
# MambaPEFT's Vim-S rows (sony/MambaPEFT vision/configs/mmpretrain/vim/vtab1k/1_small/<config>.py, named per
# row) with their recipe, beside their published group means and 19-task Avg (vtab_lily/paper/mambapeft.csv).
# LoRA(embed) has no config: its sizes are vim_peft_all.py's defaults (L735 dim_patch_embed=32,
# s_patch_embed=1). Their Hybrid rows come from an Optuna search whose chosen settings are not published
# (5_small_peft_search_step{1,2}.py give search spaces and a starting point), so they are no rows.
MAMBAPEFT = {"recipe": "mambapeft"}
ROWS["mambapeft"] = mambapeft_rows("vim-s", MAMBAPEFT)
# Every Vim method of the suite on vim-s (Table 5's, BitFit, MambaPEFT's) under the recipe the sweep names
# with `--set recipe=...` (default: the hustvl recipe), so both papers' methods meet under one protocol; labelled
# MambaPEFT's way throughout.
ROWS["vim"] = [dataclasses.replace(r, label=None) for r in ROWS["5"] if r.backbone == "vim-s"] + [
    PaperRow("vim-s", "bitfit")] + [r for r in mambapeft_rows("vim-s", {}) if r.method not in ("fft", "linear")]
# The mini benchmark's vim section: one row per MambaPEFT method family on vim-mini (width 48: ranks and widths
# scaled down; the conv1d partial row and LoRAp(X) at their configs' other settings) and one composition, as their
# Hybrid rows (its settings are ours: their searched ones are unpublished). The full list is the `mambapeft` preset.
MINI_SIZES = {"r": 4, "width": 8}
MINI_VIM = [PaperRow("vim-mini", r.method, {**r.fixed, **{k: v for k, v in MINI_SIZES.items() if k in r.fixed}})
            for r in mambapeft_rows("vim-mini", {})
            if (r.method, r.fixed.get("parts"), r.fixed.get("targets"), r.fixed.get("project"), r.fixed.get("dora"))
            in {("partial", ("conv1d",), None, None, None), ("prompt", None, None, True, None),
                ("affix", None, None, True, None), ("addscan", None, None, None, None),
                ("adaptformer", None, None, None, None), ("lora", None, ("out_proj",), None, None),
                ("lorap", None, ("x",), None, None)}]
MINI_VIM.append(PaperRow("vim-mini", "lorap+partial", {"lorap.targets": ("x",), "lorap.r": 4,
                                                       "partial.parts": ("conv1d",), "partial.wd_mult": 10}))
ROWS["mini"] += MINI_VIM
# V-PETL Bench's VTAB-1K table (vtab_lily/paper/vpetl.csv): the methods the suite has, at the sizes its Params
# column prints. LoRA (r 8 on q, v: its scripts' topN 8; 0.29M) and AdaptFormer (width 8; 0.16M) at V-PETL Bench's
# settings; the others' rows are the published numbers of their own papers (equal to the `extended` table's), so
# they run at their official settings as in `extended` (FacT: TK, 0.07M). Not reproduced: its per-task train_aug
# (e.g. configs/model_lora/vtab/dtd.yaml L3).
_EXTENDED = {row.label: r for row, r in zip(table_rows(ROWS["extended"]), ROWS["extended"])}
ROWS["vpetl"] = [*ROWS["4"][:2], _EXTENDED["adapter"], _EXTENDED["vpt-shallow"], _EXTENDED["vpt-deep"],
                 _EXTENDED["bitfit"], PaperRow("vit-b", "lora", {"r": 8, **VPETL_LORA}),
                 PaperRow("vit-b", "adaptformer", {"width": 8, **VPETL_ADAPTFORMER}), _EXTENDED["ssf"],
                 dataclasses.replace(_EXTENDED["fact-tk"], label="fact"),
                 # the authors' own settings (recipes.py names each source: V-PETL Bench's model files for Hydra,
                 # DTL and GPS are copies of its VPT model), filtered on the sizes they fix
                 PaperRow("vit-b", "sct", SCT, filters={"k": 96}),
                 PaperRow("vit-b", "repadapter", {"s": REPADAPTER_SCALE, **IMAGENET_NORM}, filters={}),
                 PaperRow("vit-b", "hydra", HYDRA, filters={"r": 2}),
                 PaperRow("vit-b", "dtl", DTL, filters={"r": 2, "beta": 100.0}),
                 PaperRow("vit-b", "gps", GPS, filters={}),
                 PaperRow("vit-b", "convpass", CONVPASS, filters={})]

TABLE_PRESET = {"4": "table4", "5": "table5", "15": "table15", "extended": "extended", "mini": "mini",
                "mambapeft": "mambapeft", "vim": "vim", "vpetl": "vpetl"}  # the preset that trains a table's rows
# The order a preset sweeps its table's rows in (row indices of ROWS), where it is not the table's: Table 5's
# backbones one after the other, V-PETL Bench's rows in the order its preset was first swept.
PRESET_ORDER = {"5": [0, 2, 6, 7, 8, 1, 3, 4, 5], "vpetl": [0, 1, 3, 4, 5, 2, 8, 9, 6, 7, *range(10, 16)]}


def sweep_presets(rows: dict[str, list[PaperRow]]) -> dict[str, list[tuple]]:
    """Per preset: the sweep rows (backbone, method, fixed, grid) of its table's paper rows, in PRESET_ORDER."""
    return {TABLE_PRESET[t]: [table[i].sweep_row() for i in PRESET_ORDER.get(t, range(len(table)))]
            for t, table in rows.items()}


def paper_tables(rows: dict[str, list[PaperRow]]) -> dict[str, list[Row]]:
    """Per table: its rows (tables.Row), in the table's order."""
    return {t: table_rows(table) for t, table in rows.items()}


PRESETS = sweep_presets(ROWS)
TABLES = paper_tables(ROWS)
PRESET_TASKS = {"mini": "mini"}  # a preset's default task set (tasks.TASK_SETS; others: "all", the 19)
