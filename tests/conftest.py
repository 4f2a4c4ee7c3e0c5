"""Test settings: strict JAX numerics, several fake CPU devices, a ``gpu`` marker.

Pallas kernels run in interpret mode whenever the default backend is CPU
(``pallas_kernels.backend.interpret_mode``), so every kernel body is exercised here.
"""

import os
import sys

# The offload engines for benchmarks (examples/offload_engines: OffloadDecoder, InJitDecoder,
# SimpleMoEBlock) are not part of the library; their tests import them as ``offload_engines``.
sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "examples"))

# Fake host devices for the expert-parallel tests; must be set before JAX starts.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(
        reason=f"needs a real NVIDIA GPU (default backend is {jax.default_backend()!r})")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request):
    """A fresh numpy Generator per test, seeded from the test's name and a random draw.

    The seed is printed on failure (pytest shows captured stdout), so a failing draw
    can be replayed with SAMOYEDS_TEST_SEED.
    """
    import numpy as np
    seed = int(os.environ.get("SAMOYEDS_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
    print(f"SAMOYEDS_TEST_SEED={seed} ({request.node.nodeid})")
    return np.random.default_rng(seed)
