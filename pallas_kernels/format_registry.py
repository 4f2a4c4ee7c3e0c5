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
every entry unless ``pattern`` and ``keep_masks`` say otherwise.
"""

from __future__ import annotations

import dataclasses
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

    def pattern(self, k, n, /, **params):
        p = self.check_params(**params)
        return (self.name, prune_masks.count_kept(p["sparsity"], k * n))

    def keep_masks(self, scores, n_keep):
        return [prune_masks.unstructured_keep(
            s, n_keep=n_keep, select=prune_masks.select_for(s.shape[-2] * s.shape[-1]))
            for s in scores]


FORMATS: dict[str, WeightFormat] = {
    "dense": WeightFormat(),
    "nm": NMFormat(),
    "samoyeds": SamoyedsFormat(),
    "unstructured": UnstructuredFormat(),
}


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
