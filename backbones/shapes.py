"""Procedural images drawn with numpy: glyphs, shapes, colours and smooth noise.

`source_task` is the pretraining task of the mini backbones (vit-mini, vim-mini): which of 64 random
glyphs (4 strokes each, fixed by a seed) is drawn, under a random affine jitter, stroke width, ink colour
and background. The mini VTAB tasks (vtab_lily/minitasks.py) draw shapes with the same primitives and ask
other questions (count, position, orientation, ...).
Everything is a function of a numpy Generator: a seed gives the same images (with the same numpy and CPU
type; float32 rounding of sin / hypot may differ elsewhere).
Drawing happens at 2x the output size and is averaged down (anti-aliasing); coordinates are in [-1, 1].
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import zoom

SIZE = 32
SUPER = 2  # supersampling factor
SHAPES = ("circle", "triangle", "square", "hexagon", "ring", "cross", "star", "crescent")
GLYPHS = SOURCE_CLASSES = 64


def canvas(n: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) in [-1, 1] at the supersampled resolution, shaped (1, S, S)."""
    s = size * SUPER
    c = ((np.arange(s) + 0.5) / s * 2 - 1).astype(np.float32)
    return c[None, :, None].repeat(s, 2), c[None, None, :].repeat(s, 1)


def local(y, x, cx, cy, radius, angle):
    """Coordinates in the frame of a shape centred at (cx, cy), rotated by `angle`, scaled by `radius`.
    Parameters are arrays of shape (n,) (or scalars); the result is (n, S, S)."""
    cx, cy, radius, angle = (np.asarray(a, dtype=np.float32).reshape(-1, 1, 1) for a in (cx, cy, radius, angle))
    dx, dy = (x - cx) / radius, (y - cy) / radius
    cos, sin = np.cos(angle), np.sin(angle)
    return cos * dx + sin * dy, -sin * dx + cos * dy


def _polygon(u, v, sides: int, apothem: float) -> np.ndarray:
    angles = 2 * np.pi * np.arange(sides) / sides
    return np.max([u * np.cos(a) + v * np.sin(a) for a in angles], axis=0) <= apothem


def shape_mask(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of a unit-size shape in local coordinates (u, v)."""
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    if kind == "circle":
        return rho <= 0.9
    if kind == "triangle":
        return _polygon(u, v, 3, 0.5)
    if kind == "square":
        return _polygon(u, v, 4, 0.7)
    if kind == "hexagon":
        return _polygon(u, v, 6, 0.8)
    if kind == "ring":
        return (rho <= 1.0) & (rho >= 0.55)
    if kind == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
    if kind == "star":
        return rho <= 0.6 + 0.4 * np.cos(5 * phi)
    if kind == "crescent":
        return (rho <= 1.0) & (np.hypot(u - 0.45, v) >= 0.75)
    if kind == "ellipse":  # elongated along u: the orientation sprite of the mini tasks
        return np.hypot(u, v / 0.3) <= 1.0
    raise KeyError(f"unknown shape {kind!r}")


def hsv_to_rgb(h, s, v) -> np.ndarray:
    """(n,) hue, saturation, value in [0, 1] -> (n, 3) RGB."""
    h, s, v = (np.asarray(a, dtype=np.float64) for a in (h, s, v))
    k = (np.array([5.0, 3.0, 1.0]) + h[:, None] * 6) % 6
    return v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def value_noise(rng: np.random.Generator, n: int, cells: int, size: int = SIZE) -> np.ndarray:
    """Smooth noise in [0, 1], (n, S, S): random values on a cells x cells grid, cubic-interpolated."""
    grid = rng.random((n, cells + 1, cells + 1))
    s = size * SUPER
    basis = zoom(np.eye(cells + 1), (s / (cells + 1), 1), order=3, mode="nearest")  # (S, cells + 1)
    return np.clip(np.einsum("sa,nab,tb->nst", basis, grid, basis), 0, 1)


def background(rng: np.random.Generator, n: int, size: int = SIZE, with_value: bool = False):
    """Low-saturation colour with smooth shading and pixel noise, (n, S, S, 3) in [0, 1] (and the base
    brightness per image, (n,), when `with_value`)."""
    value = rng.uniform(0.15, 0.85, n)
    base = hsv_to_rgb(rng.random(n), rng.uniform(0, 0.3, n), value)
    shade = (0.25 * (value_noise(rng, n, 2, size) - 0.5)).astype(np.float32)
    noise = 0.04 * rng.standard_normal((n, size * SUPER, size * SUPER, 1), dtype=np.float32)
    image = np.clip(base.astype(np.float32)[:, None, None, :] + shade[..., None] + noise, 0, 1)
    return (image, value) if with_value else image


def paint(image: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Paint `colour` ((n, 3) or (n, S, S, 3)) where mask ((n, S, S) in [0, 1]) is set."""
    colour = colour if colour.ndim == 4 else colour[:, None, None, :]
    m = mask[..., None].astype(np.float32)
    return image * (1 - m) + colour * m


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Average SUPER x SUPER blocks and quantise: (n, S, S, 3) float -> (n, S/SUPER, S/SUPER, 3) uint8."""
    n, s = image.shape[0], image.shape[1] // SUPER
    small = image.reshape(n, s, SUPER, s, SUPER, 3).mean(axis=(2, 4))
    return np.round(np.clip(small, 0, 1) * 255).astype(np.uint8)


def glyph_strokes(classes: int = GLYPHS, strokes: int = 4, seed: int = 2024) -> np.ndarray:
    """The source task's glyphs: per class a polyline of `strokes - 1` segments and one free segment with
    random end points in [-0.8, 0.8]^2, (classes, strokes, 2 ends, 2 coords (x, y)); fixed by `seed`."""
    rng = np.random.default_rng(seed)
    points = rng.uniform(-0.8, 0.8, (classes, strokes, 2))
    polyline = np.stack([points[:, :-1], points[:, 1:]], axis=2)  # (classes, strokes - 1, 2, 2)
    free = rng.uniform(-0.8, 0.8, (classes, 1, 2, 2))
    return np.concatenate([polyline, free], axis=1).astype(np.float32)


def stroke_mask(y, x, segments: np.ndarray, width) -> np.ndarray:
    """Pixels within `width` ((n,)) of any segment of segments (n, k, 2, 2): (n, S, S) bool."""
    p0, d = segments[:, :, 0, None, None, :], (segments[:, :, 1] - segments[:, :, 0])[:, :, None, None, :]
    px, py = x[:, None] - p0[..., 0], y[:, None] - p0[..., 1]  # (n, k, S, S)
    t = np.clip((px * d[..., 0] + py * d[..., 1]) / np.maximum((d ** 2).sum(-1), 1e-6), 0, 1)
    dist = np.hypot(px - t * d[..., 0], py - t * d[..., 1]).min(axis=1)
    return dist <= np.asarray(width, dtype=np.float32).reshape(-1, 1, 1)


GLYPH_STROKES = glyph_strokes()


def source_task(rng: np.random.Generator, n: int, jitter: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """n images (n, 32, 32, 3) uint8 of random glyphs and their labels in [0, 64): each glyph drawn with a
    random affine jitter (rotation up to 0.5 rad, scale 0.7-1.1, shear, shift; all times `jitter`, which
    pretraining ramps up from 0: ViTs do not leave the initial plateau on the fully jittered task), stroke
    width and colour on a random background."""
    labels = rng.integers(GLYPHS, size=n)
    angle, shear = jitter * rng.uniform(-0.5, 0.5, n), jitter * rng.uniform(-0.3, 0.3, n)
    sx, sy = 1 - jitter * rng.uniform(-0.1, 0.3, n), 1 - jitter * rng.uniform(-0.1, 0.3, n)
    cos, sin = np.cos(angle), np.sin(angle)
    affine = np.stack([np.stack([sx * cos, sy * (shear * cos - sin)], -1),
                       np.stack([sx * sin, sy * (shear * sin + cos)], -1)], 1).astype(np.float32)  # (n, 2, 2)
    shift = jitter * rng.uniform(-0.15, 0.15, (n, 1, 1, 2)).astype(np.float32)
    segments = np.einsum("nij,nkej->nkei", affine, GLYPH_STROKES[labels]) + shift
    y, x = canvas(n)
    mask = stroke_mask(y, x, segments, rng.uniform(0.07, 0.14, n))
    image, value = background(rng, n, with_value=True)
    ink = hsv_to_rgb(rng.random(n), rng.uniform(0, 1, n), np.where(value < 0.5, rng.uniform(0.8, 1, n),
                                                                     rng.uniform(0, 0.2, n)))
    return to_uint8(paint(image, mask, ink.astype(np.float32))), labels
