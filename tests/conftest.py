"""Test settings: strict JAX numerics, several fake CPU devices, a ``gpu`` marker, one
compilation cache per test run.

Pallas kernels run in interpret mode whenever the default backend is CPU
(``pallas_kernels.backend.interpret_mode``), so every kernel body is exercised here.
"""

import os
import shutil
import sys
import tempfile

# The offload engines for benchmarks (examples/offload_engines: OffloadDecoder, InJitDecoder,
# SimpleMoEBlock) are not part of the library; their tests import them as ``offload_engines``.
sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "examples"))

# Fake host devices for the expert-parallel tests; must be set before JAX starts.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

# One JAX compilation cache per test run, shared by the pytest-xdist workers (they inherit
# this environment): the tests build many identical small programs in new closures, and each
# is compiled once (on a GPU compilation is most of the suite's time). Removed at the end.
_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="samoyeds-jax-tests-")
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_unconfigure(config):
    if _CACHE is not None:  # the process that made it (the controller under xdist)
        shutil.rmtree(_CACHE, ignore_errors=True)


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
