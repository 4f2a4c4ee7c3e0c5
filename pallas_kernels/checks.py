"""Input checks shared by the weight formats, the kernel entry points and the layers.

Two kinds of check:

* Static checks (kind of object, shapes, dtypes, static parameters) raise ``TypeError`` or
  ``ValueError`` at once, traced or not. Pytree classes run them only when their leaves are
  arrays: tree utilities may rebuild a pytree with placeholder leaves (``object()``, None,
  ints for ``vmap`` axes).
* Value checks (ids inside a range, finite weights) need the values. On
  concrete arrays they raise ``ValueError`` eagerly. On traced values they are left out, so
  jitted code carries no extra operation, except under ``checked``, which adds them as
  ``jax.experimental.checkify`` user checks and raises ``ValueError`` when one fails.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

# Part of jit's cache key: a function traced without the checks is traced again with them.
_CHECKING = jax.make_user_context(False)


def checking(enabled: bool = True):
    """Context manager: traced value checks are emitted inside it (as ``checkify.check``).

    For callers that want the ``checkify`` error value themselves::

        with checking():
            err, y = checkify.checkify(f, errors=checkify.user_checks)(x)

    ``checked`` does this and raises.
    """
    return _CHECKING(enabled)


def checking_enabled() -> bool:
    """True inside ``checking()`` / ``checked``."""
    return bool(_CHECKING.value)


def checked(fn: Callable) -> Callable:
    """``fn`` with the traced value checks of its inputs on; a failed check raises ValueError.

    ``fn`` may be jitted (it is traced again with the checks). It must be a pure function of
    its arguments: split Flax NNX modules (``nnx.split``) and merge them inside ``fn``, or use
    modules that do not update state. Without ``checked`` the same code runs unchecked under
    ``jit``, with no extra operation.
    """
    checkified = checkify.checkify(fn, errors=checkify.user_checks)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with checking():
            err, out = checkified(*args, **kwargs)
        message = err.get()
        if message is not None:
            raise ValueError(message.split("\n")[0].removesuffix(" (`check` failed)"))
        return out

    return run


def is_concrete(x: Any) -> bool:
    """True when ``x`` holds values (not a tracer)."""
    return not isinstance(x, jax.core.Tracer)


def are_arrays(*xs: Any) -> bool:
    """True when every ``x`` is array-like (shape, ndim and dtype; float0 cotangents excluded)."""
    for x in xs:
        dtype = getattr(x, "dtype", None)
        if not hasattr(x, "shape") or not hasattr(x, "ndim") or dtype is None or \
                dtype == jax.dtypes.float0:
            return False
    return True


def expect_kind(name: str, obj: Any, kinds: type | tuple[type, ...], expected: str) -> None:
    """TypeError unless ``obj`` is an instance of ``kinds`` (``expected`` names them)."""
    if not isinstance(obj, kinds):
        raise TypeError(f"{name} must be {expected}, got {_describe(obj)}")


def expect_stacks(name: str, stacks: Any, kinds: type | tuple[type, ...],
                  expected: str) -> tuple:
    """One weight stack, or a non-empty tuple or list of stacks of one kind, layout, shape and
    dtype (several products of one input in one launch), as a tuple. TypeError for the wrong
    kind, ValueError for an empty sequence or stacks that are not alike."""
    seq = tuple(stacks) if isinstance(stacks, (tuple, list)) else (stacks,)
    if not seq:
        raise ValueError(f"{name} must be {expected} or a sequence of them, got an empty "
                         f"{type(stacks).__name__}")
    for i, s in enumerate(seq):
        expect_kind(name if len(seq) == 1 else f"{name}[{i}]", s, kinds, expected)
    first, first_leaves = seq[0], jax.tree.leaves(seq[0])
    for i, s in enumerate(seq[1:], 1):
        leaves = jax.tree.leaves(s)
        if (type(s) is not type(first) or jax.tree.structure(s) != jax.tree.structure(first)
                or any((a.shape, a.dtype) != (b.shape, b.dtype)
                       for a, b in zip(leaves, first_leaves))):
            raise ValueError(f"{name}[{i}] must be like {name}[0] (one kind, layout, shape and "
                             f"dtype): {name}[0] is {_describe(first)} {_leaf_shapes(first)}, "
                             f"{name}[{i}] is {_describe(s)} {_leaf_shapes(s)}")
    return seq


def _leaf_shapes(obj: Any) -> str:
    return "[" + ", ".join(f"{jnp.dtype(a.dtype).name}{list(a.shape)}"
                           for a in jax.tree.leaves(obj)) + "]"


def _describe(obj: Any) -> str:
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        return f"{type(obj).__name__} of shape {tuple(obj.shape)} and dtype {obj.dtype}"
    return type(obj).__name__


def expect_shape(owner: str, name: str, x: Any, expected: tuple[int, ...]) -> None:
    """ValueError unless ``x.shape == expected``."""
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{owner}: {name} must have shape {tuple(expected)}, got "
                         f"{tuple(x.shape)}")


def expect_dtype(owner: str, name: str, x: Any, dtypes: Any) -> None:
    """ValueError unless ``x.dtype`` is one of ``dtypes`` (a dtype, or a tuple of them)."""
    allowed = tuple(jnp.dtype(d) for d in (dtypes if isinstance(dtypes, tuple) else (dtypes,)))
    if jnp.dtype(x.dtype) not in allowed:
        names = " or ".join(d.name for d in allowed)
        raise ValueError(f"{owner}: {name} must be {names}, got {jnp.dtype(x.dtype).name}")


def expect_floating(owner: str, name: str, x: Any) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{owner}: {name} must have a floating dtype, got {x.dtype}")


def expect_positive_ints(owner: str, **values: Any) -> None:
    """ValueError unless every value is an int >= 1 (bools excluded)."""
    expect_ints(owner, 1, **values)


def expect_ints(owner: str, minimum: int, **values: Any) -> None:
    """ValueError unless every value is an int >= ``minimum`` (bools excluded)."""
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
            what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
            raise ValueError(f"{owner}: {name} must be {what}, got {v!r}")


def expect_index(name: str, value: Any, size: int) -> None:
    """ValueError unless ``value`` is an int in ``[0, size)`` (bools excluded, no negative
    indexing)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or \
            not 0 <= value < size:
        raise ValueError(f"{name} must be an int in [0, {size}), got {value!r}")


def expect_number(owner: str, name: str, value: Any, *, above: float | None = None) -> None:
    """ValueError unless ``value`` is a finite real number (an int or a float, bools and
    strings excluded), greater than ``above`` when given."""
    ok = (not isinstance(value, bool)
          and isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value)
          and (above is None or value > above))
    if not ok:
        bound = "" if above is None else f" > {above}"
        raise ValueError(f"{owner}: {name} must be a finite number{bound}, got {value!r}")


def expect_float_dtype(owner: str, **values: Any) -> None:
    """ValueError unless every value is a floating dtype (a dtype, a scalar type or its name)."""
    for name, v in values.items():
        try:
            given = jnp.dtype(v)
            ok, given = jnp.issubdtype(given, jnp.floating), given.name
        except TypeError:  # not a dtype at all ("float33", 123)
            ok, given = False, repr(v)
        if not ok:
            raise ValueError(f"{owner}: {name} must be a floating dtype (float32, bfloat16 or "
                             f"float16), got {given}")


def matrix_shape(owner: str, shape: Any) -> tuple[tuple[int, ...], int, int]:
    """``(lead, K, N)`` of a dense weight ``shape`` [..., K, N]; ValueError for fewer dims."""
    if not isinstance(shape, (tuple, list)) or not all(isinstance(d, (int, np.integer))
                                                        for d in shape):
        raise TypeError(f"{owner}: shape must be a tuple of ints [..., K, N], got {shape!r}")
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"{owner}: shape must be [..., K, N] (at least 2 dims), got {shape}")
    return shape[:-2], shape[-2], shape[-1]


def dim(x: Any, axis: int) -> int | None:
    """``x.shape[axis]`` when ``x`` is an array with that axis, else None."""
    shape = getattr(x, "shape", ())
    return int(shape[axis]) if -len(shape) <= axis < len(shape) else None


def check_layout(owner: str, **fields: tuple[Any, tuple[int | None, ...], Any]) -> None:
    """Static consistency of a pytree's array fields; nothing is checked unless all are arrays.

    ``fields[name] = (array, trailing, dtype)``: every array is ``lead + trailing`` with one
    ``lead`` shared by all (the leading dims of the first field: a stack of experts, say);
    None in ``trailing`` matches any size. ``dtype``: a dtype, a tuple of them,
    ``"floating"``, or None (any).
    """
    if not are_arrays(*(x for x, _, _ in fields.values())):
        return
    lead = None
    for name, (x, trailing, dtype) in fields.items():
        n = len(trailing)
        if x.ndim < n:
            raise ValueError(f"{owner}: {name} must have at least {n} dims, got shape "
                             f"{tuple(x.shape)}")
        if lead is None:
            lead = tuple(x.shape[:x.ndim - n])
        tail = x.shape[x.ndim - n:]
        expect_shape(owner, name, x, lead + tuple(s if t is None else t
                                                  for t, s in zip(trailing, tail)))
        if dtype == "floating":
            expect_floating(owner, name, x)
        elif dtype is not None:
            expect_dtype(owner, name, x, dtype)


def expect_multiple(owner: str, name: str, value: Any, step: int) -> int:
    """``value``, after checking it is a positive int and a multiple of ``step``."""
    expect_positive_ints(owner, **{name: value})
    if value % step:
        raise ValueError(f"{owner}: {name}={value} must be a multiple of {step}")
    return int(value)


def expect_token_tiles(x: Any, tile_expert: Any, k: int, block_t: int, max_block_t: int
                       ) -> None:
    """ValueError (expected vs given) unless ``block_t`` is a multiple of 8 in [8,
    ``max_block_t``], x is [n*block_t, k] and ``tile_expert`` [n] (one expert per token tile):
    the inputs of an expert-grouped kernel."""
    if block_t % 8 or not 8 <= block_t <= max_block_t:
        raise ValueError(f"block_t must be a multiple of 8 in [8, {max_block_t}], got {block_t}")
    if x.ndim != 2 or x.shape[1] != k or x.shape[0] % block_t:
        raise ValueError(f"x must be [n*{block_t}, K={k}], got {x.shape}")
    n = x.shape[0] // block_t
    if tile_expert.shape != (n,):
        raise ValueError(f"tile_expert must be [{n}] (one per tile), got {tile_expert.shape}")


def _first(bad: np.ndarray) -> tuple[int, ...]:
    """Index of the first True entry of ``bad`` (``()`` for a scalar)."""
    return tuple(int(i) for i in np.argwhere(bad)[0]) if bad.ndim else ()


def _at(where: tuple[int, ...], axes: tuple[str, ...] | None) -> str:
    """" at token 3, slot 1" (with ``axes``) or " at index (3, 1)"; "" for a scalar."""
    if not where:
        return ""
    if axes is None:
        return f" at index {where}"
    return " at " + ", ".join(f"{axis} {i}" for axis, i in zip(axes, where))


def check_ids(ids: Any, size: int, name: str, axes: tuple[str, ...] | None = None) -> None:
    """Integer ``ids`` in ``[0, size)``: the dtype always; the values eagerly when concrete,
    under ``checked`` when traced (ValueError naming ``name``, the range and the first
    offender, its position named by ``axes``, e.g. ``("token", "slot")``)."""
    if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
        raise ValueError(f"{name} must be integer ids in [0, {size}), got dtype "
                         f"{jnp.result_type(ids)}")
    if is_concrete(ids):
        arr = np.asarray(ids)
        bad = (arr < 0) | (arr >= size)
        if bad.any():
            where = _first(bad)
            raise ValueError(f"{name} must lie in [0, {size}); got {arr[where]}"
                             f"{_at(where, axes)} ({int(bad.sum())} out-of-range entries)")
    elif checking_enabled() and np.size(ids):
        ids = jnp.asarray(ids)
        checkify.check(jnp.all((ids >= 0) & (ids < size)),
                       _escape(f"{name} must lie in [0, {size}); got values in ") + "[{lo}, {hi}]",
                       lo=jnp.min(ids), hi=jnp.max(ids))


def check_finite(x: Any, name: str, axes: tuple[str, ...] | None = None) -> None:
    """Finite floating ``x``: eagerly when concrete, under ``checked`` when traced."""
    if is_concrete(x):
        arr = np.asarray(x, np.float32)
        bad = ~np.isfinite(arr)
        if bad.any():
            where = _first(bad)
            raise ValueError(f"{name} must be finite; got {arr[where]}{_at(where, axes)} "
                             f"({int(bad.sum())} non-finite entries)")
    elif checking_enabled() and np.size(x):
        checkify.check(jnp.all(jnp.isfinite(x)),
                       _escape(f"{name} must be finite; got ") + "{count} non-finite entries",
                       count=jnp.sum(~jnp.isfinite(x)))


def _escape(text: str) -> str:
    """``text`` as a literal inside a ``str.format`` template."""
    return text.replace("{", "{{").replace("}", "}}")
