"""The shared pallas_call launcher: aliased initial output, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import triton as plt

from pallas_kernels.launch import launch


def _write_first_half(x_ref, o_ref):
    # x_ref, o_ref: [16, 16]; only rows 0..7 are written.
    o_ref[:8, :] = x_ref[:8, :] * 2


def test_init_shows_through_where_the_kernel_does_not_write(rng):
    x = jnp.asarray(rng.standard_normal((16, 16)), jnp.float32)
    out = launch(_write_first_half, [x], out_shape=jax.ShapeDtypeStruct((16, 16), jnp.float32),
                 grid=(1,), compiler_params=plt.CompilerParams(num_warps=4), name="half",
                 init=jnp.full((16, 16), jnp.nan, jnp.float32))
    np.testing.assert_array_equal(np.asarray(out[:8]), np.asarray(x[:8] * 2))
    assert np.isnan(np.asarray(out[8:])).all()


def test_init_of_the_wrong_shape_or_dtype_is_rejected():
    x = jnp.ones((16, 16), jnp.float32)
    kw = dict(out_shape=jax.ShapeDtypeStruct((16, 16), jnp.float32), grid=(1,),
              compiler_params=plt.CompilerParams(num_warps=4), name="half")
    with pytest.raises(ValueError, match=r"half: the initial output must be \(16, 16\) float32, "
                                         r"got \(8, 16\) float32"):
        launch(_write_first_half, [x], init=jnp.zeros((8, 16), jnp.float32), **kw)
    with pytest.raises(ValueError, match="got \\(16, 16\\) bfloat16"):
        launch(_write_first_half, [x], init=jnp.zeros((16, 16), jnp.bfloat16), **kw)
