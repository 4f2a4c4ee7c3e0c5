"""Host-side (numpy) selection of the kept entries of N:M groups, for ``formats.from_dense``.

Weights arrive as unsigned-integer bit views (``formats`` masks out the sign bit for the
nonzero test), so the selection never runs float ufuncs on bfloat16 data.
"""

from __future__ import annotations

import numpy as np


def select_positions(nz: list[np.ndarray], count: np.ndarray, n: int) -> list[np.ndarray]:
    """Ascending positions of n entries per group: every nonzero, then the lowest unused ones.

    Args:
      nz: m bool arrays (one per position in the group), each of the group grid's shape.
      count: nonzeros per group (<= n), the grid's shape.

    Returns:
      n uint8 arrays of the grid's shape: the s-th chosen position of each group.
    """
    need = (n - count).astype(np.uint8)  # zero entries to take per group
    zeros_seen = np.zeros(count.shape, np.uint8)
    taken = np.zeros(count.shape, np.uint8)
    pos = [np.zeros(count.shape, np.uint8) for _ in range(n)]
    for j, z in enumerate(nz):
        take = z | (zeros_seen < need)
        for s in range(n):
            np.copyto(pos[s], np.uint8(j), where=take & (taken == s))
        taken += take
        zeros_seen += ~z
    return pos


def gather_slots(groups: np.ndarray, pos: list[np.ndarray], axis: int) -> np.ndarray:
    """out[..., s, ...] = groups[..., pos[s], ...] along ``axis``; pos[s] broadcasts to a slice."""
    axis %= groups.ndim
    m, n = groups.shape[axis], len(pos)
    out = np.zeros(groups.shape[:axis] + (n,) + groups.shape[axis + 1:], groups.dtype)
    lead = (slice(None),) * axis
    for s, p in enumerate(pos):
        dst = out[lead + (s,)]  # a view
        for j in range(s, m - n + s + 1):  # ascending distinct positions: slot s in s..m-n+s
            np.copyto(dst, groups[lead + (j,)], where=np.broadcast_to(p == j, dst.shape))
    return out


def nm_compress(bits: np.ndarray, abs_mask: int, n: int,
                m: int) -> tuple[np.ndarray, np.ndarray, tuple | None]:
    """One matrix's bit view [K, N] -> (values bits [K*n/m, N], positions [K*n/m, N], first_bad).

    first_bad is None, or (group, column, nonzeros found, number of offending groups).
    """
    k, cols = bits.shape
    g = k // m
    wg = bits.reshape(g, m, cols)
    nz = [(wg[:, j, :] & bits.dtype.type(abs_mask)) != 0 for j in range(m)]  # m x [g, N]
    count = np.zeros((g, cols), np.uint8)
    for z in nz:
        count += z
    bad = count > n
    if bad.any():
        gi, ci = (int(i) for i in np.argwhere(bad)[0])
        return bits, bits, (gi, ci, int(count[gi, ci]), int(bad.sum()))
    pos = select_positions(nz, count, n)  # n x [g, N]
    values = gather_slots(wg, pos, axis=1)  # [g, n, N]
    return values.reshape(g * n, cols), np.stack(pos, axis=1).reshape(g * n, cols), None
