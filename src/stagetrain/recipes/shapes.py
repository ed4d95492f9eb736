"""BasicShapes and GeomShapes (Bengio, Louradour, Collobert & Weston 2009), generated here.

32 x 32 grey images of three classes: 0 rectangle, 1 ellipse, 2 triangle. The paper does
not give its exact ranges; ours, documented and tested:

* size: circumscribed radius ``r`` uniform in [5, 14] pixels; the centre uniform in
  ``[r, 31 - r]`` on both axes, so the whole shape lies inside the image;
* orientation: uniform in [0, 2 pi);
* grey levels: background uniform in [0, 1]; foreground uniform in [0, 1] subject to
  ``|foreground - background| >= 0.3`` (minimum contrast);
* GeomShapes: rectangles with side ratio uniform in [0.3, 1], ellipses with axis ratio
  uniform in [0.3, 1], triangles with three vertices on the circumscribed circle at
  random angles, each pair at least 40 degrees apart (a minimum area);
* BasicShapes: the special cases ratio = 1 (squares, circles) and vertices 120 degrees
  apart (equilateral triangles) — drawn by the same code with those parameters fixed.

Splits (each seeded separately): train 10,000 per set; GeomShapes also valid 5,000 and
test 5,000. Classes are balanced (equal thirds, shuffled).
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from stagetrain.data import TensorPairDataset
from stagetrain.errors import DataError

SIZE = 32
RADIUS = (5.0, 14.0)
MIN_CONTRAST = 0.3
RATIO = (0.3, 1.0)
MIN_VERTEX_GAP = np.deg2rad(40.0)
SPLIT_SIZES = {"train": 10_000, "valid": 5_000, "test": 5_000}

_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5


def _grey_levels(rng: np.random.Generator) -> tuple[float, float]:
    background = rng.uniform(0.0, 1.0)
    while True:
        foreground = rng.uniform(0.0, 1.0)
        if abs(foreground - background) >= MIN_CONTRAST:
            return background, foreground


def shape_mask(
    kind: int, cx: float, cy: float, r: float, angle: float, ratio: float, vertex_angles: np.ndarray
) -> np.ndarray:
    """Boolean 32 x 32 mask of one shape (pixel centres inside it)."""
    dx, dy = _XX - cx, _YY - cy
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # coordinates in the shape's frame
    if kind == 0:  # rectangle with half-diagonal r and side ratio b/a = ratio
        a = r / np.sqrt(1.0 + ratio**2)
        return (np.abs(u) <= a) & (np.abs(v) <= a * ratio)
    if kind == 1:  # ellipse with semi-axes r and r * ratio
        return (u / r) ** 2 + (v / (r * ratio)) ** 2 <= 1.0
    px, py = cx + r * np.cos(vertex_angles + angle), cy + r * np.sin(vertex_angles + angle)
    signs = []
    for i in range(3):
        j = (i + 1) % 3
        signs.append((px[j] - px[i]) * (_YY - py[i]) - (py[j] - py[i]) * (_XX - px[i]))
    s = np.stack(signs)
    return np.all(s >= 0, axis=0) | np.all(s <= 0, axis=0)


def _vertex_angles(rng: np.random.Generator, basic: bool) -> np.ndarray:
    if basic:
        return np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3])
    while True:
        angles = np.sort(rng.uniform(0.0, 2 * np.pi, 3))
        gaps = np.diff(np.concatenate([angles, angles[:1] + 2 * np.pi]))
        if gaps.min() >= MIN_VERTEX_GAP:
            return angles


def generate_shapes(
    n: int, *, basic: bool, seed: int
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """``n`` images (float32, [n, 32, 32]), labels, and the parameters used for each."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 3)
    images = np.empty((n, SIZE, SIZE), dtype=np.float32)
    params = {k: np.empty(n) for k in ("r", "cx", "cy", "ratio", "background", "foreground")}
    for i, kind in enumerate(labels):
        r = rng.uniform(*RADIUS)
        cx, cy = rng.uniform(r, SIZE - r, 2)
        angle = rng.uniform(0.0, 2 * np.pi)
        ratio = 1.0 if basic else rng.uniform(*RATIO)
        background, foreground = _grey_levels(rng)
        mask = shape_mask(int(kind), cx, cy, r, angle, ratio, _vertex_angles(rng, basic))
        images[i] = np.where(mask, foreground, background)
        for key, value in zip(params, (r, cx, cy, ratio, background, foreground), strict=True):
            params[key][i] = value
    return images, labels.astype(np.int64), params


def shapes_dataset(
    *, kind: str = "geom", split: str = "train", seed: int = 0, size: int | None = None
) -> TensorPairDataset:
    """BasicShapes (``kind="basic"``) or GeomShapes (``"geom"``): one split, flattened to 1,024."""
    if kind not in ("basic", "geom"):
        raise DataError(f"kind must be 'basic' or 'geom', got {kind!r}")
    if split not in SPLIT_SIZES or (kind == "basic" and split != "train"):
        raise DataError(
            f"split must be one of {sorted(SPLIT_SIZES)} (basic: train only), got {split!r}"
        )
    n = size if size is not None else SPLIT_SIZES[split]
    stream = zlib.crc32(f"{kind}/{split}".encode())
    images, labels, _ = generate_shapes(n, basic=kind == "basic", seed=seed * 1_000_003 + stream)
    return TensorPairDataset(torch.from_numpy(images.reshape(n, -1)), torch.from_numpy(labels))
