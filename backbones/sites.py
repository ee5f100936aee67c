"""Adapter sites: the places of a backbone that a PEFT method may adapt.

A backbone lists, per layer, its adaptable Linear outputs (optionally a slice of the output, such as
the K third of ViT's fused qkv), its parallel sites (read the input of one module, add to the
output of another), its serial sites (the whole output of a module, which serial methods such as SSF
or a sequential adapter read and change), its tensors (parameters that partial tuning trains, such as
Vim's A_log of both scan directions), its hooks (an optional module called at one point of the forward,
such as Vim's scan input) and, on state-space models, its state sites (A, B, C of each scan
direction, which a method may widen with extra state dimensions). Model-level sites (the patch embedding,
the final norm, the token sequence through the blocks, single tensors such as the class token) come from
`model_sites`. Methods attach by asking for sites by name, never by module paths.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import UnknownName


@dataclass(frozen=True)
class LinearSite:
    """The output columns `out` of the Linear `parent.<attr>`."""

    parent: nn.Module
    attr: str
    d_in: int
    out: slice

    @property
    def d_out(self) -> int:
        return self.out.stop - self.out.start


@dataclass(frozen=True)
class ParallelSite:
    """A parallel branch: reads the input of `read` = parent.<read_attr>, adds to the output of
    `write` = parent.<write_attr> (the same module when both names are equal)."""

    parent: nn.Module
    read_attr: str
    write_attr: str
    d_in: int
    d_out: int


@dataclass(frozen=True)
class OutputSite:
    """The whole output of `parent.<attr>` (any module; features in the last dim, d_out of them)."""

    parent: nn.Module
    attr: str
    d_out: int


@dataclass(frozen=True)
class StreamSite:
    """The residual stream after one branch of a block: s = x + a, x the input of `parent.<read_attr>` (the stream
    entering the branch), a the output of `parent.<write_attr>` (the branch after its drop_path). A method
    changes the stream to s + f(s), which the rest of the block then reads (SCT's channel tuning after the
    attention); d: its width."""

    parent: nn.Module
    read_attr: str
    write_attr: str
    d: int


@dataclass(frozen=True)
class TokenSite:
    """The token sequence through the stack of blocks `parent.<attr>` (an nn.Sequential): `prefix` tokens
    (the class token) then the patches, width d; `patch_size` is the patches' side in pixels."""

    parent: nn.Module
    attr: str
    d: int
    prefix: int
    patch_size: int


@dataclass(frozen=True)
class StateSite:
    """The state of one scan direction of a state-space mixer. `parent.<attr>` is None until a method sets it
    to a module called as (u, A, B, C) -> (A, B, C) just before the selective scan: u (b, d_inner, l) the
    scan's input, A (d_inner, n), B and C (b, n, l); it may return more state dimensions (columns of A, rows
    of B and C). `A_log`: the direction's own A_log parameter, (d_inner, n)."""

    parent: nn.Module
    attr: str
    A_log: torch.Tensor = field(compare=False)


@dataclass(frozen=True)
class ConvSite:
    """The output channels of the Conv2d `parent.<attr>` (channel-first: (b, d_out, h, w)); a branch reads
    the conv's input and needs its kernel, stride and padding to give the same grid."""

    parent: nn.Module
    attr: str
    d_in: int
    d_out: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass(frozen=True)
class TensorSite:
    """The tensor `parent.<attr>` (an nn.Parameter of the backbone)."""

    parent: nn.Module
    attr: str


@dataclass(frozen=True)
class HookSite:
    """A point of the backbone's forward that calls the optional module `parent.<attr>` (None until a method
    sets one: one method per hook); the backbone's docstring says what it receives and returns; d: its width."""

    parent: nn.Module
    attr: str
    d: int


@dataclass
class LayerSites:
    index: int
    linear: dict[str, LinearSite] = field(default_factory=dict)
    parallel: dict[str, ParallelSite] = field(default_factory=dict)
    serial: dict[str, OutputSite] = field(default_factory=dict)
    state: dict[str, StateSite] = field(default_factory=dict)
    tensors: dict[str, tuple[TensorSite, ...]] = field(default_factory=dict)  # a name -> its tensors (all directions)
    hooks: dict[str, HookSite] = field(default_factory=dict)
    stream: dict[str, StreamSite] = field(default_factory=dict)

    def get(self, name: str) -> LinearSite | ParallelSite | OutputSite | HookSite | StreamSite:
        """A branch site or hook by name (state sites are read from `state` by the methods that widen a state)."""
        site = (self.linear.get(name) or self.parallel.get(name) or self.serial.get(name) or self.hooks.get(name)
                or self.stream.get(name))
        if site is None:
            known = sorted([*self.linear, *self.parallel, *self.serial, *self.hooks, *self.stream])
            raise UnknownName(f"unknown adapter site {name!r}; this backbone has {known}")
        return site
