"""Declaring options and checking their values, before any work starts.

Used for every method config and for the training recipe, so `--set r=abc`, `--set r=0`, `--set s=nan`,
`--set router=nosuch` or `--epochs 0` end in one clear error instead of a traceback (or a silently useless run).

An option is a dataclass field declared with `option(default, help, range=...)`:
- its type is the field's annotation: int, float, bool, str, tuple[str, ...], or `Literal[...]` (the values
  it may take: its choices), each optionally `| None` (None: a default filled in later, e.g. per family);
- `range=(low, high)` bounds a number (inclusive; None = open). Without one, an int is a size, count or rank
  (>= 1: INT_RANGE) and a float may be any finite number; every float must be finite;
- `help` says what it does (shown by `python -m vtab_lily.run --method NAME --list-options`).
A plain field (a plugin's, `x: int = 3`) is checked by the same rules with no help text.

Also the checks of a run's other options, before any work: the seed, the image size against the
backbone's patches, the device, a folder that must be writable.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import types
import typing
from pathlib import Path

from .errors import UserError

INT_RANGE = (1, None)  # an int option without a declared range: a size, count or rank
NUMBER_RANGE = (None, None)  # a float option without a declared range: any finite number


class OptionError(UserError, ValueError):
    """An option value of the wrong type or outside its range; the message names the option."""


def option(default=dataclasses.MISSING, help: str = "", range: tuple | None = None, *, default_factory=None):
    """A dataclass field for an option: its default, its help text and, for a number, its range."""
    metadata = {"help": help, **({"range": range} if range is not None else {})}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _kinds(hint) -> tuple[set, bool, tuple]:
    """The base types an annotation admits, whether None is allowed, and its Literal choices (or ())."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    optional = type(None) in args
    choices = tuple(c for a in args if typing.get_origin(a) is typing.Literal for c in typing.get_args(a))
    kinds = {typing.get_origin(a) or a for a in args
             if a is not type(None) and typing.get_origin(a) is not typing.Literal}
    return kinds | {type(c) for c in choices}, optional, choices


def describe(cls) -> list[dict]:
    """Each option of config class `cls`: name, type (as written), default, range (numbers), choices, help."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kinds, optional, choices = _kinds(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        numeric = not choices and bool(kinds & {int, float}) and bool not in kinds
        out.append({"name": f.name, "type": _type_name(hints[f.name]),
                    "default": None if default is dataclasses.MISSING else default,
                    "range": field_range(f, kinds) if numeric else None, "choices": choices or None,
                    "help": f.metadata.get("help", "")})
    return out


def _type_name(hint) -> str:
    """int, float, bool, str, 'names' (tuple[str, ...]: names joined by '+'), each with '| None' if optional;
    a Literal by its values' type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(dict.fromkeys(_type_name(a) for a in typing.get_args(hint)))
    if origin is typing.Literal:
        return type(typing.get_args(hint)[0]).__name__
    if origin is tuple:
        return "names"
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


def range_text(low, high) -> str:
    """A range as messages and listings write it: '>= 1', '<= 2', 'in [0.0, 1.0]', 'any'."""
    if low is None and high is None:
        return "any"
    return f">= {low}" if high is None else f"<= {high}" if low is None else f"in [{low}, {round(high, 6)}]"


def field_range(f: dataclasses.Field, kinds: set) -> tuple:
    """A numeric field's (low, high): its declared range, else INT_RANGE for an int, NUMBER_RANGE for a float."""
    return f.metadata.get("range", INT_RANGE if int in kinds else NUMBER_RANGE)


def _coerce(name: str, value, kinds: set):
    if bool in kinds:
        if isinstance(value, bool):
            return value
        raise OptionError(f"{name} must be True or False, got {value!r}")
    if int in kinds:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise OptionError(f"{name} must be an integer, got {value!r}")
    if float in kinds:
        if isinstance(value, str):
            try:
                value = float(value)  # 'nan', 'inf' reach here as strings
            except ValueError:
                raise OptionError(f"{name} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OptionError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise OptionError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    if tuple in kinds:
        if isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
            return value
        raise OptionError(f"{name} must be names joined by '+' (e.g. q+v), got {value!r}")
    if str in kinds and not isinstance(value, str):
        raise OptionError(f"{name} must be a string, got {value!r}")
    return value


def check_fields(obj, prefix: str = "", first=()) -> None:
    """Coerce and check every field of dataclass instance `obj` in place; raise OptionError on the first
    bad one, checking the fields named in `first` (those the user gave) before the others (which a config's
    __post_init__ may have derived from them, as Lily's ne_1 from ne). `prefix` names the owner in messages
    (e.g. 'lily ')."""
    hints = typing.get_type_hints(type(obj))
    for f in sorted(dataclasses.fields(obj), key=lambda f: f.name not in first):
        value = getattr(obj, f.name)
        kinds, optional, choices = _kinds(hints[f.name])
        if value is None:
            if optional:
                continue
            raise OptionError(f"{prefix}{f.name} may not be None")
        label = f"{prefix}{f.name}"
        if choices:
            if isinstance(value, bool) or value not in choices:
                raise OptionError(f"{label} must be one of {choices}, got {value!r}")
            continue
        value = _coerce(label, value, kinds)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (int in kinds or float in kinds):
            low, high = field_range(f, kinds)
            if (low is not None and value < low) or (high is not None and value > high):
                raise OptionError(f"{label} must be {range_text(low, high)}, got {value!r}")
        object.__setattr__(obj, f.name, value)  # frozen dataclasses too


# data.Batches shuffles epoch e of seed s with torch.Generator().manual_seed(s * 100_003 + e), and torch takes
# seeds in [-2**63, 2**64 - 1]: the largest seed for which every epoch below 100_003 has a valid generator seed.
MAX_SEED = (2**64 - 1) // 100_003 - 1


def check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise OptionError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}")


def check_image_size(backbone: str, image_size: int) -> None:
    """The image must hold whole patches of the backbone: a positive multiple of its patch size."""
    from backbones import patch_size  # here, not at the top: records and tables import this module without torch
    patch = patch_size(backbone)
    if patch and (image_size < patch or image_size % patch):
        raise OptionError(f"image_size {image_size} does not fit {backbone}'s {patch} px patches: use a multiple "
                          f"of {patch} (e.g. {max(patch, image_size - image_size % patch)})")


def check_device(device: str) -> None:
    """`cpu`, `mps` (where present) or `cuda[:N]` with a GPU N that this process sees."""
    import torch  # here, not at the top: records and tables import this module without torch
    try:
        kind = torch.device(device)
    except (RuntimeError, TypeError):
        kind = None
    if kind is None or kind.type not in ("cpu", "cuda", "mps"):
        raise OptionError(f"--device {device!r}: choose cpu or cuda[:N]")
    if kind.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError(f"--device {device}: this machine has no MPS device; use cpu")
    if kind.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise OptionError(f"--device {device}: no CUDA GPU is visible here (torch {torch.__version__}, "
                              f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use cpu")
        if kind.index is not None and kind.index >= count:
            raise OptionError(f"--device {device}: this process sees {count} GPU(s), numbered 0..{count - 1}")


def check_writable_folder(path: str | os.PathLike, what: str, flag: str) -> None:
    """Fail early, in one line, when `what` cannot be written under `path`, without creating anything: a
    file is created and removed in the folder, or in the nearest existing folder above it."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(folder))
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe.")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OptionError(f"cannot write {what} under {path} ({e.strerror or e}); pass a writable folder with "
                          f"{flag}") from None
