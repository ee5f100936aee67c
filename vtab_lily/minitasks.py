"""The mini VTAB: offline tasks in the three VTAB groups, drawn by project code (nothing downloaded).

Each source split is a list of examples {"image": (32, 32, 3) uint8, "label": int}, a pure function of
(task, split): `prepare` writes them in the VTAB-1K layout like any task. "train" holds 1,000 examples
(train800 = the first 800, val200 = the next 200), "test" 1,000 (mini_svhn: the 797 held-out digits).
None of them is the pretraining task (backbones/shapes.py: which shape, colour and texture):

- Natural: `digits` (scikit-learn's handwritten digits), `mini_svhn` (those digits, coloured, on crops of
  scikit-learn's two bundled photographs: SVHN-style).
- Specialized: `mini_sensor` (EuroSAT-style land-cover tiles: water, forest, field, urban, bare soil,
  highway), `mini_cells` (Camelyon-style stained tissue: are there tumour-like nuclei?).
- Structured: `mini_count` (CLEVR-count-style: 1-8 objects), `mini_loc` (dSprites-location-style: x position
  of one sprite in 8 bins), `mini_ori` (dSprites-orientation-style: angle of an elongated sprite in 8 bins).
"""
from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

from backbones.shapes import (
    SHAPES,
    SIZE,
    SUPER,
    background,
    canvas,
    hsv_to_rgb,
    local,
    paint,
    shape_mask,
    to_uint8,
    value_noise,
)

SPLIT_SIZE = 1000
S = SIZE * SUPER  # drawing resolution
SOLID = ("circle", "triangle", "square", "hexagon")  # filled shapes (no holes to miscount at 32 px)


def _rng(task: str, split: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"{task}/{split}".encode()))


def _examples(images: np.ndarray, labels) -> list[dict]:
    return [{"image": im, "label": int(y)} for im, y in zip(images, labels)]


def _digits():
    from sklearn.datasets import load_digits
    return load_digits()


def digits(split: str) -> list[dict]:
    """scikit-learn's 1,797 bundled 8x8 digits (0-16), scaled to 0-255 and tiled to RGB; one split."""
    d = _digits()
    images = np.round(d.images * (255 / 16)).astype(np.uint8)[..., None].repeat(3, -1)
    return _examples(images, d.target)


def _colours(rng, n, value=(0.7, 1.0)) -> np.ndarray:
    return hsv_to_rgb(rng.random(n), rng.uniform(0.6, 1, n), rng.uniform(*value, n))


def mini_svhn(split: str) -> list[dict]:
    from sklearn.datasets import load_sample_images
    d = _digits()
    rng = _rng("mini_svhn", split)
    idx = np.arange(SPLIT_SIZE) if split == "train" else np.arange(SPLIT_SIZE, len(d.target))
    photos = load_sample_images().images
    out = np.empty((len(idx), S, S, 3), np.float32)
    for j, i in enumerate(idx):
        photo = photos[rng.integers(len(photos))]
        c = int(rng.integers(48, 160))
        top, left = rng.integers(photo.shape[0] - c), rng.integers(photo.shape[1] - c)
        crop = Image.fromarray(photo[top:top + c, left:left + c]).resize((S, S), Image.BILINEAR)
        bg = np.asarray(crop, np.float32) / 255
        h = int(rng.integers(36, 54))
        glyph = Image.fromarray((d.images[i] / 16).astype(np.float32), mode="F").resize((h * 3 // 4, h),
                                                                                        Image.BILINEAR)
        mask = np.zeros((S, S), np.float32)
        oy, ox = (S - h) // 2 + rng.integers(-5, 6), (S - h * 3 // 4) // 2 + rng.integers(-5, 6)
        mask[oy:oy + h, ox:ox + h * 3 // 4] = np.clip(np.asarray(glyph), 0, 1)
        dark = bg.mean() > 0.5
        colour = hsv_to_rgb(rng.random(1), rng.uniform(0, 0.8, 1), rng.uniform(0, 0.25, 1) if dark
                            else rng.uniform(0.8, 1, 1))
        out[j] = paint(bg[None], mask[None], colour)[0]
    return _examples(to_uint8(out), d.target[idx])


def _stripes(n, rng, freq):
    y, x = canvas(n)
    u, _ = local(y, x, 0, 0, 1, rng.uniform(0, np.pi, n))
    return (np.sin(np.pi * np.asarray(freq).reshape(-1, 1, 1) * u + rng.uniform(0, 6.3, (n, 1, 1))) > 0)


def _tint(rng, n, hue, sat, val) -> np.ndarray:
    return hsv_to_rgb(hue + rng.normal(0, 0.03, n), np.clip(sat + rng.normal(0, 0.1, n), 0, 1),
                      np.clip(val + rng.normal(0, 0.1, n), 0, 1))


def _land_cover(rng, kind: int, n: int) -> np.ndarray:
    """n tiles of one land-cover class, (n, S, S, 3) floats."""
    shade = value_noise(rng, n, 6)[..., None]
    grain = rng.normal(0, 0.03, (n, S, S, 1))
    if kind == 0:  # water: dark blue, soft ripples
        tile = _tint(rng, n, 0.6, 0.7, 0.45)[:, None, None] * (0.85 + 0.15 * _stripes(n, rng, 9)[..., None])
    elif kind == 1:  # forest: dark green canopy
        tile = _tint(rng, n, 0.3, 0.6, 0.35)[:, None, None] * (0.6 + 0.6 * value_noise(rng, n, 10)[..., None])
    elif kind == 2:  # field: parallel crop rows
        rows = _stripes(n, rng, rng.uniform(3, 6, n))[..., None]
        crop, soil = _tint(rng, n, 0.22, 0.6, 0.6), _tint(rng, n, 0.12, 0.5, 0.65)
        tile = np.where(rows, crop[:, None, None], soil[:, None, None])
    elif kind == 3:  # urban: a grid of grey blocks
        cells = rng.uniform(0.3, 0.9, (n, 8, 8))
        blocks = np.kron(cells, np.ones((S // 8, S // 8)))
        streets = ((np.arange(S) % (S // 8)) < 2)
        blocks = np.where(streets[None, :, None] | streets[None, None, :], 0.25, blocks)
        tile = blocks[..., None] * _tint(rng, n, 0.1, 0.1, 1.0)[:, None, None]
    elif kind == 4:  # bare soil: smooth beige
        tile = _tint(rng, n, 0.09, 0.4, 0.7)[:, None, None] * (0.8 + 0.4 * shade)
    else:  # highway: a grey band across vegetation
        y, x = canvas(n)
        u, _ = local(y, x, rng.uniform(-0.4, 0.4, n), 0, 1, rng.uniform(0, np.pi, n))
        road = (np.abs(u) < rng.uniform(0.08, 0.15, (n, 1, 1)))[..., None]
        ground = _tint(rng, n, 0.25, 0.5, 0.5)[:, None, None] * (0.7 + 0.6 * shade)
        tile = np.where(road, _tint(rng, n, 0.1, 0.05, 0.55)[:, None, None], ground)
    return np.clip(tile * (0.9 + 0.2 * shade) + grain, 0, 1)


def mini_sensor(split: str) -> list[dict]:
    rng = _rng("mini_sensor", split)
    labels = rng.integers(6, size=SPLIT_SIZE)
    images = np.empty((SPLIT_SIZE, S, S, 3), np.float32)
    for kind in range(6):
        idx = np.flatnonzero(labels == kind)
        images[idx] = _land_cover(rng, kind, len(idx))
    return _examples(to_uint8(images), labels)


def mini_cells(split: str) -> list[dict]:
    """Pink tissue with 10-18 small round nuclei; label 1: 2-5 of them are large, dark and irregular."""
    rng = _rng("mini_cells", split)
    labels = rng.integers(2, size=SPLIT_SIZE)
    y, x = canvas(1)
    images = np.empty((SPLIT_SIZE, S, S, 3), np.float32)
    for i, label in enumerate(labels):
        stain = rng.normal(0, 0.04)
        tissue = hsv_to_rgb([0.92 + stain], [rng.uniform(0.15, 0.35)], [rng.uniform(0.8, 0.95)])
        image = tissue[:, None, None] * (0.85 + 0.3 * value_noise(rng, 1, 5)[..., None])
        normal, tumour = int(rng.integers(10, 19)), int(rng.integers(2, 6)) * int(label)
        for k in range(normal + tumour):
            big = k >= normal
            r = rng.uniform(0.13, 0.2) if big else rng.uniform(0.06, 0.1)
            u, v = local(y, x, rng.uniform(-0.9, 0.9), rng.uniform(-0.9, 0.9), r, rng.uniform(0, 2 * np.pi))
            rho, phi = np.hypot(u, v / rng.uniform(0.6, 1.0)), np.arctan2(v, u)
            mask = rho <= (1 + 0.25 * np.cos(3 * phi + rng.uniform(0, 6.3)) if big else 1)
            nucleus = hsv_to_rgb([0.75 + stain], [0.5], [rng.uniform(0.25, 0.4) if big else rng.uniform(0.4, 0.6)])
            image = paint(image, mask, nucleus)
        images[i] = image[0]
    return _examples(to_uint8(np.clip(images + rng.normal(0, 0.03, images.shape), 0, 1)), labels)


def _sprites(rng, n: int, kinds: list[str], cx, cy, radius, angle) -> np.ndarray:
    """One sprite per image: kinds[i] at (cx[i], cy[i]), a random colour on a random background."""
    y, x = canvas(n)
    u, v = local(y, x, cx, cy, radius, angle)
    mask = np.stack([shape_mask(k, u[i:i + 1], v[i:i + 1])[0] for i, k in enumerate(kinds)])
    return paint(background(rng, n), mask, _colours(rng, n))


def mini_count(split: str) -> list[dict]:
    """1-8 solid shapes (label = count - 1), one per cell of a 4 x 4 grid whose cells are the backbones'
    8 px patches (so no shape is cut by a patch border), each 5-7 px wide and in a contrasting shade: large
    and well separated enough to count at 32 px (CLEVR-count-style)."""
    rng = _rng("mini_count", split)
    counts = rng.integers(1, 9, size=SPLIT_SIZE)
    images, value = background(rng, SPLIT_SIZE, with_value=True)
    centres = (np.arange(4) - 1.5) * 0.5
    y, x = canvas(1)
    for i, count in enumerate(counts):
        cells = rng.choice(16, size=count, replace=False)
        cx = centres[cells % 4] + rng.uniform(-0.03, 0.03, count)
        cy = centres[cells // 4] + rng.uniform(-0.03, 0.03, count)
        u, v = local(y, x, cx, cy, rng.uniform(0.17, 0.21, count), rng.uniform(0, 2 * np.pi, count))
        shade = rng.uniform(0.0, 0.15, count) if value[i] > 0.5 else rng.uniform(0.85, 1.0, count)
        colours = hsv_to_rgb(rng.random(count), rng.uniform(0.3, 0.9, count), shade)
        for k, kind in enumerate(rng.integers(len(SOLID), size=count)):
            images[i:i + 1] = paint(images[i:i + 1], shape_mask(SOLID[kind], u[k:k + 1], v[k:k + 1]), colours[k:k + 1])
    return _examples(to_uint8(images), counts - 1)


def mini_loc(split: str) -> list[dict]:
    """One shape; label = its x position in 8 equal bins over [-0.8, 0.8)."""
    rng = _rng("mini_loc", split)
    cx = rng.uniform(-0.8, 0.8, SPLIT_SIZE)
    kinds = [SHAPES[k] for k in rng.integers(len(SHAPES), size=SPLIT_SIZE)]
    images = _sprites(rng, SPLIT_SIZE, kinds, cx, rng.uniform(-0.7, 0.7, SPLIT_SIZE),
                      rng.uniform(0.15, 0.25, SPLIT_SIZE), rng.uniform(0, 2 * np.pi, SPLIT_SIZE))
    return _examples(to_uint8(images), np.floor((cx + 0.8) / 0.2).astype(int))


def mini_ori(split: str) -> list[dict]:
    """One ellipse; label = its orientation in 8 equal bins over [0, 180) degrees."""
    rng = _rng("mini_ori", split)
    angle = rng.uniform(0, np.pi, SPLIT_SIZE)
    images = _sprites(rng, SPLIT_SIZE, ["ellipse"] * SPLIT_SIZE, rng.uniform(-0.35, 0.35, SPLIT_SIZE),
                      rng.uniform(-0.35, 0.35, SPLIT_SIZE), rng.uniform(0.45, 0.7, SPLIT_SIZE), angle)
    return _examples(to_uint8(images), np.floor(angle / (np.pi / 8)).astype(int))


SOURCES: dict[str, Callable[[str], list[dict]]] = {f.__name__: f for f in (
    digits, mini_svhn, mini_sensor, mini_cells, mini_count, mini_loc, mini_ori)}
