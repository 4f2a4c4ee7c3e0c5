"""The one ``pallas_call`` the kernels here go through.

It runs in interpret mode on CPU, and can start the output from a given array (aliased
in) so that tests can poison it with NaN: any element the kernel leaves unwritten shows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.experimental import pallas as pl

from pallas_kernels import backend as backend_lib


def _skip_init_ref(kernel: Callable, num_inputs: int) -> Callable:
    """Wrap ``kernel(*in_refs, o_ref)`` so the aliased initial-output ref (the last input) is
    never seen by it."""
    def wrapped(*refs):
        return kernel(*refs[:num_inputs - 1], *refs[num_inputs:])
    return wrapped


def launch(kernel: Callable, args: Sequence[jax.Array], *, out_shape: jax.ShapeDtypeStruct,
           grid: tuple[int, ...], compiler_params: Any, name: str,
           init: jax.Array | None = None) -> jax.Array:
    """``pl.pallas_call(kernel, ...)(*args)`` with one output of ``out_shape``.

    ``init``: when given, the output starts as this array (same shape and dtype as
    ``out_shape``; aliased, the kernel never reads it); otherwise the output starts
    uninitialized.
    """
    args = list(args)
    aliases = {}
    if init is not None:
        if init.shape != out_shape.shape or init.dtype != out_shape.dtype:
            raise ValueError(f"{name}: the initial output must be {out_shape.shape} "
                             f"{out_shape.dtype}, got {init.shape} {init.dtype}")
        aliases = {len(args): 0}
        args.append(init)
        kernel = _skip_init_ref(kernel, len(args))
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        input_output_aliases=aliases,
        compiler_params=compiler_params,
        interpret=backend_lib.interpret_mode(),
        name=name,
    )(*args)
