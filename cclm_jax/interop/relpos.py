"""Resizing a Swin relative-position-bias table to another window (BEiT's geometric-progression method).

A table has one row per relative offset (dy, dx) in [-(W-1), W-1]^2, row-major ((2W-1)^2 rows, one column
per head). Going from window 7 (13x13 offsets) to 12 (23x23) the reference (`load_pretrained` in the
official code, taken from BEiT) does not scale offsets linearly: it keeps small offsets almost where they
were and stretches large ones. With S = 2W-1 source and D = 2W'-1 destination sides, n = S // 2, m = D // 2:

1. ratio q: bisection on [1.01, 1.5] (stop when the bracket is under 1e-6; q = the last midpoint) for
   1 + q + ... + q^(n-1) = m, i.e. the n-th source offset lands on the outermost destination offset;
2. source offset k (|k| <= n) is placed at sign(k) * (1 + q + ... + q^(|k|-1)) (0 at 0);
3. per head, an interpolating bicubic spline through the S x S table at those coordinates is sampled at
   the integer offsets -m..m in both axes. Offsets past the outermost coordinate (it falls within ~1e-5 of
   m) take the edge value, because FITPACK's evaluator clamps to the data range.

How this compares with the reference: it used `scipy.interpolate.interp2d(x, y, z, kind='cubic')`, removed
in SciPy 1.14. On a rectangular grid interp2d fitted FITPACK `regrid` with s=0 to `z.T` and evaluated with
`bispev`, transposing the result; `RectBivariateSpline(x, y, z.T, kx=3, ky=3, s=0)` calls the same two
routines, so `resize_relative_position_table` is the reference computation (same ratio, coordinates,
spline and clamping), evaluated in float64 and cast back to the table's dtype. It could not be run against
interp2d itself here (SciPy 1.17). Shrinking (D < S) keeps q at its lower bound 1.01 and samples the
centre of the stretched table (close to a crop). Equal sizes return the input values unchanged.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.interpolate import RectBivariateSpline

RATIO_BOUNDS = (1.01, 1.5)
RATIO_TOLERANCE = 1e-6


def _side(rows: int, what: str) -> int:
    side = math.isqrt(rows)
    if side * side != rows or side % 2 == 0:
        raise ValueError(f"{what}: {rows} rows is not (2*window-1)^2 for any window")
    return side


def progression_ratio(n: int, target: float) -> float:
    """q with 1 + q + ... + q^(n-1) ~= target, by the reference's bisection on [1.01, 1.5]."""
    left, right = RATIO_BOUNDS
    q = left
    while right - left > RATIO_TOLERANCE:
        q = (left + right) / 2.0
        total = (1.0 - q ** n) / (1.0 - q)
        if total > target:
            right = q
        else:
            left = q
    return q


def source_coordinates(src_side: int, dst_side: int) -> np.ndarray:
    """(src_side,) float64 positions on the destination offset axis given to the source offsets."""
    n = src_side // 2
    q = progression_ratio(n, dst_side // 2)
    distances = np.cumsum(q ** np.arange(n, dtype=np.float64))  # 1, 1+q, 1+q+q^2, ...
    return np.concatenate([-distances[::-1], [0.0], distances])


def resize_relative_position_table(table: np.ndarray, dst_rows: int) -> np.ndarray:
    """(S^2, heads) table -> (dst_rows, heads), same dtype; dst_rows = D^2 with D = 2 * window - 1 odd."""
    table = np.asarray(table)
    if table.ndim != 2:
        raise ValueError(f"relative position table must be 2-D (rows, heads), got shape {table.shape}")
    src_side = _side(table.shape[0], "source relative position table")
    dst_side = _side(dst_rows, "destination relative position table")
    if src_side == dst_side:
        return np.array(table)
    if src_side < 5:
        raise ValueError(f"a bicubic spline needs at least 4 offsets per side; the source window has "
                         f"{src_side} (table of {table.shape[0]} rows)")
    coords = source_coordinates(src_side, dst_side)
    half = dst_side // 2
    grid = np.arange(-half, half + 1, dtype=np.float64)
    heads = []
    for h in range(table.shape[1]):
        z = table[:, h].astype(np.float64).reshape(src_side, src_side)
        spline = RectBivariateSpline(coords, coords, z.T, kx=3, ky=3, s=0)
        heads.append(spline(grid, grid).T.reshape(-1))
    return np.stack(heads, axis=1).astype(table.dtype)
