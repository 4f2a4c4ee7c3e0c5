"""The one list of weight formats: ``FORMATS``, name -> ``WeightFormat``.

A weight format is how a dense weight W [..., K, N] (``y = x @ W``) is stored. Its entry knows:

* ``name`` and ``classes``: the pytree classes that hold it (the first is what ``from_dense``
  returns; none for dense);
* ``params``: its parameters with their defaults (e.g. nm: n, m), checked by ``check_params``;
  ``params_of(obj)`` reads them off any object with those attributes (``SparsityConfig``,
  ``PruneConfig``);
* ``check_shape(k, n, **params)``: ValueError unless a [K, N] matrix can be stored;
* ``from_dense(w, **params)`` (W already pruned to the pattern), ``to_dense(w)``,
  ``astype(w, dtype)``, ``abstract(shape, dtype, like=None, **params)`` (the layout without data;
  ``like``: a stored weight giving the fields the parameters leave open);
* ``random(key, shape, dtype, **params)``: a random weight drawn directly in the format (the
  initialization of a sparse layer; see ``WeightFormat.random``);
* its pruning pattern: ``pattern(k, n, **params)``, a hashable ``(name, *args)`` tuple, and
  ``keep_masks(scores, *args)``, the boolean keep-masks of that pattern from float32 scores
  (several scores: one choice shared by all, where the format has such a choice).

``format_names()`` lists the names, ``get_format(name)`` looks one up, ``format_of(w)`` finds
the entry of a stored weight.

Adding a format: one module with its pytree class (``from_dense``, ``abstract``, ``to_dense``
and a ``values`` array field) and a ``WeightFormat`` subclass, plus one line in ``FORMATS``::

    class HalvedFormat(WeightFormat):
        name = "halved"
        classes = (Halved,)

        def from_dense(self, w, **params):
            self.check_params(**params)
            return Halved.from_dense(w)

    FORMATS = {..., "halved": HalvedFormat()}

Configs, pruning, checkpoints and the command lines then accept ``"halved"``; pruning to it keeps
every entry unless ``pattern`` and ``keep_masks`` say otherwise. A layer is created in it once
the entry draws random weights (``_draw``); without one, build the layer dense and convert it
(``MoE.to_format``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from pallas_kernels import formats, prune_masks, tiled_format


class WeightFormat:
    """A weight format; this base is the dense one (plain arrays)."""

    name: ClassVar[str] = "dense"
    classes: ClassVar[tuple[type, ...]] = ()
    params: ClassVar[dict[str, Any]] = {}
    pattern_shares_choice: ClassVar[bool] = False
    """Whether ``keep_masks`` of several scores makes one choice for all (not one each)."""

    def __repr__(self) -> str:
        return f"<weight format {self.name!r}>"

    # -- parameters

    def check_params(self, **params: Any) -> dict[str, Any]:
        """All parameters (defaults filled in), after checking them; ValueError otherwise."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise ValueError(f"format {self.name!r} takes parameters {sorted(self.params)}; "
                             f"given unknown {unknown}")
        return {**self.params, **params}

    def params_of(self, source: Any) -> dict[str, Any]:
        """This format's parameters as attributes of ``source`` (defaults where it has none)."""
        return {p: getattr(source, p, default) for p, default in self.params.items()}

    def check_shape(self, k: int, n: int, /, **params: Any) -> None:
        """ValueError unless a dense [k, n] matrix can be stored in this format."""
        self.check_params(**params)

    # -- conversion

    def from_dense(self, w: Any, **params: Any) -> Any:
        """The stored form of W [..., K, N] (already pruned to the pattern)."""
        self.check_params(**params)
        return jnp.asarray(w)

    def to_dense(self, w: Any) -> jax.Array:
        """W [..., K, N] as a dense array (traceable)."""
        return w.to_dense() if self.classes else jnp.asarray(w)

    def astype(self, w: Any, dtype: Any) -> Any:
        """``w`` with its values in ``dtype`` (indices and metadata unchanged)."""
        if not self.classes:
            return jnp.asarray(w).astype(dtype)
        if w.values.dtype == dtype:
            return w
        return dataclasses.replace(w, values=w.values.astype(dtype))

    def abstract(self, shape: Sequence[int], dtype: Any, *, like: Any = None,
                 **params: Any) -> Any:
        """What ``from_dense`` gives a W of ``shape`` and ``dtype``, arrays as
        ``jax.ShapeDtypeStruct``: the layout a stored weight must have."""
        self.check_params(**params)
        return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))

    # -- random initialization

    def random(self, key: jax.Array, shape: Sequence[int], dtype: Any, **params: Any) -> Any:
        """A random W of dense ``shape`` [..., K, N] and ``dtype``, stored in this format.

        Dense: the fan-in truncated normal (``jax.nn.initializers.variance_scaling(1.0,
        "fan_in", "truncated_normal")``, variance 1/K per entry). Sparse formats draw the stored
        arrays directly (jnp, under one ``jit``; no pruning): the kept entries uniformly at random
        among the format's patterns, the kept values from the same truncated normal with
        variance 1/(K * density), so that ``x @ W`` has the dense init's expected output variance
        (a magnitude-pruned dense draw keeps less of it). Kept values are never exactly 0 (a 0
        would read as a dropped entry): ``from_dense(to_dense(w))`` gives back ``w``.
        """
        shape = tuple(shape)
        if len(shape) < 2:
            raise ValueError(f"shape must be [..., K, N], got {shape}")
        self.check_shape(*shape[-2:], **params)
        return _jit_draw(self, key, shape, jnp.dtype(dtype),
                         tuple(self.check_params(**params).items()))

    def _draw(self, key: jax.Array, shape: tuple[int, ...], dtype: Any, **params: Any) -> Any:
        """``random`` after its checks (traced: ``params`` are static)."""
        if self.classes:
            raise NotImplementedError(
                f"format {self.name!r} has no random init; build the weights dense and "
                "convert them (e.g. MoE.to_format)")
        init = jax.nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
            batch_axis=tuple(range(len(shape) - 2)))
        return init(key, shape, dtype)

    # -- pruning

    def pattern(self, k: int, n: int, /, **params: Any) -> tuple:
        """The hashable pruning pattern ``(name, *args)`` of one [k, n] matrix (what the mask
        needs of the shape is checked; storage needs are ``check_shape``'s)."""
        self.check_params(**params)
        return (self.name,)

    def keep_masks(self, scores: Sequence[jax.Array], *args: Any) -> list[jax.Array]:
        """Boolean keep-masks of the pattern ``(name, *args)``, one per float32 score."""
        return [jnp.ones(s.shape, jnp.bool_) for s in scores]


class NMFormat(WeightFormat):
    """N:M along K: ``formats.NMSparse``."""

    name = "nm"
    classes = (formats.NMSparse,)
    params = {"n": 2, "m": 4}

    def check_params(self, **params):
        p = super().check_params(**params)
        prune_masks.check_ints(n=p["n"], m=p["m"])
        formats._check_nm(p["n"], p["m"])
        return p

    def check_shape(self, k, n, /, **params):
        p = self.check_params(**params)
        step = formats.nm_k_multiple(p["n"], p["m"])
        if k % step:
            raise ValueError(
                f"{p['n']}:{p['m']} sparsity needs the reduction dim to be a multiple of {step} "
                f"(m={p['m']}, {formats.values_per_word(p['m'])} metadata entries per int32 "
                f"word), got {k}")

    def from_dense(self, w, **params):
        p = self.check_params(**params)
        return formats.NMSparse.from_dense(w, n=p["n"], m=p["m"])

    def abstract(self, shape, dtype, *, like=None, **params):
        p = self.check_params(**params)
        return formats.NMSparse.abstract(tuple(shape), dtype, n=p["n"], m=p["m"])

    def _draw(self, key, shape, dtype, n, m):
        *lead, k, cols = shape
        kv, km = jax.random.split(key)
        values = _kept_values(kv, (*lead, k * n // m, cols), dtype, k * n / m)
        return formats.NMSparse(values=values, meta=_random_nm_meta(km, shape, n, m), n=n, m=m,
                                k=k)

    def pattern(self, k, n, /, **params):
        p = self.check_params(**params)
        prune_masks.check_nm(p["n"], p["m"], k)
        return (self.name, p["n"], p["m"])

    def keep_masks(self, scores, n, m):
        return [prune_masks.nm_keep(s, n=n, m=m) for s in scores]


class SamoyedsFormat(WeightFormat):
    """Vector-wise n_sel:m_sel:v column selection plus 2:4 along K: ``formats.SamoyedsSparse``.
    Several scores (an expert's w1 and w3) share one column choice per slab."""

    name = "samoyeds"
    classes = (formats.SamoyedsSparse,)
    params = {"n_sel": 1, "m_sel": 2, "v": 128}
    pattern_shares_choice = True

    def check_params(self, **params):
        p = super().check_params(**params)
        prune_masks.check_ints(n_sel=p["n_sel"], m_sel=p["m_sel"], v=p["v"])
        formats._check_samoyeds(p["n_sel"], p["m_sel"], p["v"])
        return p

    def check_shape(self, k, n, /, **params):
        p = self.check_params(**params)
        if k % p["v"]:
            raise ValueError(f"samoyeds format needs the reduction dim to be a multiple of "
                             f"v={p['v']}, got {k}")
        if n % p["m_sel"]:
            raise ValueError(f"samoyeds format needs the output dim to be a multiple of "
                             f"m_sel={p['m_sel']}, got {n}")

    def from_dense(self, w, **params):
        return formats.SamoyedsSparse.from_dense(w, **self.check_params(**params))

    def abstract(self, shape, dtype, *, like=None, **params):
        return formats.SamoyedsSparse.abstract(tuple(shape), dtype, **self.check_params(**params))

    def _draw(self, key, shape, dtype, n_sel, m_sel, v):
        """Per slab and column group n_sel of the m_sel columns, then 2:4 along K in each kept
        column (independently for each matrix: no choice shared between w1 and w3)."""
        *lead, k, cols = shape
        nc = cols // m_sel * n_sel
        kv, km, ks = jax.random.split(key, 3)
        sel = _random_subsets(ks, (*lead, k // v, cols // m_sel), n_sel, m_sel)
        return formats.SamoyedsSparse(
            values=_kept_values(kv, (*lead, k // 2, nc), dtype, k * n_sel / m_sel / 2),
            meta=_random_nm_meta(km, (*lead, k, nc), 2, 4),
            sel=sel.reshape(*lead, k // v, nc).astype(jnp.int8),
            n_sel=n_sel, m_sel=m_sel, v=v, k=k, n_out=cols)

    def pattern(self, k, n, /, **params):
        p = {**self.params, **params}  # the mask alone takes any v % 4 (dense output)
        super().check_params(**params)
        prune_masks.check_samoyeds(p["n_sel"], p["m_sel"], p["v"], k, n)
        return (self.name, p["n_sel"], p["m_sel"], p["v"])

    def keep_masks(self, scores, n_sel, m_sel, v):
        if len(scores) == 2:
            return list(prune_masks.samoyeds_keep_shared(*scores, n_sel=n_sel, m_sel=m_sel, v=v))
        return [prune_masks.samoyeds_keep(s, n_sel=n_sel, m_sel=m_sel, v=v) for s in scores]


class UnstructuredFormat(WeightFormat):
    """The top (1 - sparsity) entries of each matrix: ``tiled_format.TiledSparse`` (column-ELL
    tiles; None tile sizes: its defaults), or the ``TiledBitmap`` layout of the same weights."""

    name = "unstructured"
    classes = (tiled_format.TiledSparse, tiled_format.TiledBitmap)
    params = {"sparsity": 0.5, "tile_k": None, "tile_n": None}

    def check_params(self, **params):
        p = super().check_params(**params)
        prune_masks.check_sparsity(p["sparsity"])
        prune_masks.check_ints(**{t: p[t] for t in ("tile_k", "tile_n") if p[t] is not None})
        return p

    def check_shape(self, k, n, /, **params):
        p = self.check_params(**params)
        for dim, size, tile in (("K", k, "tile_k"), ("N", n, "tile_n")):
            if p[tile] is not None and size % p[tile]:
                raise ValueError(f"{dim}={size} must be a multiple of {tile}={p[tile]}")

    def from_dense(self, w, **params):
        p = self.check_params(**params)
        return tiled_format.TiledSparse.from_dense(w, tile_k=p["tile_k"], tile_n=p["tile_n"])

    def abstract(self, shape, dtype, *, like=None, **params):
        """The slot count depends on the data: taken from ``like`` (with its tiles) when it is a
        ``TiledSparse``, else 1."""
        p = self.check_params(**params)
        cls = tiled_format.TiledSparse
        if not isinstance(like, cls):
            return cls.abstract(tuple(shape), dtype, num_slots=1, tile_k=p["tile_k"],
                                tile_n=p["tile_n"])
        return cls.abstract(tuple(shape), dtype, num_slots=like.num_slots, tile_k=like.tile_k,
                            tile_n=like.tile_n, slot_align=like.slot_align)

    def _draw(self, key, shape, dtype, sparsity, tile_k, tile_n):
        """Every column of every tile keeps the same number of rows, round(tile_k * (1 -
        sparsity)) (at least 1), chosen uniformly: a ``TiledSparse`` without padding slots."""
        *lead, k, n = shape
        tile_k, tile_n = tiled_format._tiles(k, n, tile_k, tile_n, 1)
        kt, nt = k // tile_k, n // tile_n
        per_col = max(1, round(tile_k * (1 - sparsity)))
        kv, kr = jax.random.split(key)
        rows = _random_subsets(kr, (*lead, kt, nt, tile_n), per_col, tile_k)  # [.., KT, NT, tn, c]
        rows = jnp.swapaxes(jnp.swapaxes(rows, -4, -3), -1, -2)  # [..., NT, KT, c, tn]
        rows = rows.reshape(*lead, nt * kt * per_col, tile_n)
        offsets = per_col * (kt * jnp.arange(nt)[:, None] + jnp.arange(kt + 1)[None, :])
        return tiled_format.TiledSparse(
            values=_kept_values(kv, rows.shape, dtype, k * per_col / tile_k),
            rows=rows.astype(tiled_format._rows_dtype(tile_k)),
            offsets=jnp.broadcast_to(offsets.astype(jnp.int32), (*lead, nt, kt + 1)),
            k=k, n=n, tile_k=tile_k, tile_n=tile_n)

    def pattern(self, k, n, /, **params):
        p = self.check_params(**params)
        return (self.name, prune_masks.count_kept(p["sparsity"], k * n))

    def keep_masks(self, scores, n_keep):
        return [prune_masks.unstructured_keep(
            s, n_keep=n_keep, select=prune_masks.select_for(s.shape[-2] * s.shape[-1]))
            for s in scores]


# -- random draws


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4))
def _jit_draw(fmt: WeightFormat, key: jax.Array, shape: tuple[int, ...], dtype: Any,
              params: tuple[tuple[str, Any], ...]) -> Any:
    return fmt._draw(key, shape, dtype, **dict(params))


# Standard deviation of a standard normal truncated to [-2, 2] (as in jax's variance_scaling).
_TRUNCATED_STD = 0.87962566103423978
# n-of-m choices with at most this many subsets index a table of them; larger ones take a top_k.
_MAX_SUBSET_TABLE = 256


def _kept_values(key: jax.Array, shape: tuple[int, ...], dtype: Any, fan_in: float) -> jax.Array:
    """Truncated normal in [-2, 2] standard deviations, variance 1/fan_in, drawn in float32;
    an exact 0 (a rare draw, or an underflow in ``dtype``) becomes the smallest normal."""
    std = (1.0 / fan_in) ** 0.5 / _TRUNCATED_STD
    values = (jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) * std).astype(dtype)
    return jnp.where(values == 0, jnp.finfo(dtype).smallest_normal, values)


def _random_subsets(key: jax.Array, shape: tuple[int, ...], n: int, m: int) -> jax.Array:
    """[*shape, n] int32: n distinct positions of range(m) in ascending order, each of the
    C(m, n) choices equally likely, independently for every index of ``shape``."""
    if math.comb(m, n) <= _MAX_SUBSET_TABLE:
        table = jnp.asarray(list(itertools.combinations(range(m), n)), jnp.int32)
        return table[jax.random.randint(key, shape, 0, table.shape[0])]
    top = jax.lax.top_k(jax.random.uniform(key, (*shape, m)), n)[1]
    return jnp.sort(top, axis=-1).astype(jnp.int32)


def _random_nm_meta(key: jax.Array, shape: tuple[int, ...], n: int, m: int) -> jax.Array:
    """Packed meta (``formats.NMSparse.meta``) of a random n:m pattern along K of [..., K, N]."""
    *lead, k, cols = shape
    pos = _random_subsets(key, (*lead, k // m, cols), n, m)  # [..., K/m, N, n]
    return formats.pack_meta(jnp.swapaxes(pos, -1, -2).reshape(*lead, k * n // m, cols), n, m)


FORMATS: dict[str, WeightFormat] = {
    "dense": WeightFormat(),
    "nm": NMFormat(),
    "samoyeds": SamoyedsFormat(),
    "unstructured": UnstructuredFormat(),
}


def as_dense(w: Any, dtype: Any) -> jax.Array:
    """A dense [..., K, N] array of ``dtype`` from an array or a sparse-format pytree."""
    if hasattr(w, "to_dense"):
        w = w.to_dense()
    return jnp.asarray(w).astype(dtype)


def format_names() -> tuple[str, ...]:
    """The registered format names, in registration order."""
    return tuple(FORMATS)


def get_format(name: Any, what: str = "format") -> WeightFormat:
    """The entry of format ``name``; ValueError naming ``what`` and the known names otherwise."""
    fmt = FORMATS.get(name) if isinstance(name, str) else None
    if fmt is None:
        raise ValueError(f"{what} must be one of {format_names()}, got {name!r}")
    return fmt


def format_of(w: Any) -> WeightFormat:
    """The entry of a stored weight: the format whose classes hold it, or dense for an array.

    Raises TypeError for anything else (kernel layouts such as ``TransposedSparse`` included).
    """
    for fmt in FORMATS.values():
        if fmt.classes and isinstance(w, fmt.classes):
            return fmt
    if hasattr(w, "shape") and hasattr(w, "dtype") and not hasattr(w, "to_dense"):
        return FORMATS["dense"]
    known = [c.__name__ for f in FORMATS.values() for c in f.classes]
    raise TypeError(f"expected an array or a weight of a registered format ({', '.join(known)}), "
                    f"got {type(w).__name__}")


def format_name(w: Any) -> str | None:
    """The name of ``w``'s registered format (``"dense"`` for an array), or None for anything
    else (kernel layouts such as ``TransposedSparse`` included)."""
    try:
        return format_of(w).name
    except TypeError:
        return None
