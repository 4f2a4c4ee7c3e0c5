"""The smoke kernel behind ``samoyeds-gpu-check`` matches its reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import smoke
from samoyeds_jax.diagnostics import gpu_check


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_smoke_triton_matches_reference(rng, dtype):
    x = jnp.asarray(rng.standard_normal((16, 32)), dtype)
    w = jnp.asarray(rng.standard_normal((32, 64)), dtype)
    b = jnp.asarray(rng.standard_normal((64,)), dtype)
    out = smoke.smoke_triton(x, w, b)
    ref = smoke.smoke_reference(x, w, b)
    chex.assert_trees_all_close(out.astype(jnp.float32), ref.astype(jnp.float32),
                                rtol=2e-2, atol=2e-2)


def test_smoke_rejects_bad_shapes():
    x = jnp.ones((3, 32), jnp.float32)
    with pytest.raises(ValueError, match="powers of two"):
        smoke.smoke_triton(x, jnp.ones((32, 64)), jnp.ones((64,)))


def test_gpu_check_reports_every_backend(capsys):
    report = gpu_check()
    assert report["jax"] == jax.__version__
    assert "triton" in report["backends"] and report["backends"]["triton"]["ok"]
    out = capsys.readouterr().out
    if jax.default_backend() == "gpu":
        assert report["gpu"] and report["ok"] and "mosaic_gpu" in report["backends"]
    else:
        # Without a GPU the check cannot pass: it says so, and the kernel ran interpreted.
        assert not report["gpu"] and not report["ok"]
        assert "pinned_host" in report["memory_kinds"]
        assert np.isclose(report["backends"]["triton"]["rel_err"], 0.0, atol=2e-2)
        assert "interpret mode" in out and "no GPU visible to jax" in out
        assert "ok: True" not in out


def test_gpu_check_command_exit_status(capsys):
    from samoyeds_jax.cli import gpu_check_main

    assert gpu_check_main([]) == (0 if jax.default_backend() == "gpu" else 2)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        gpu_check_main(["--help"])
    assert exc.value.code == 0
    assert "2 no GPU visible to jax" in " ".join(capsys.readouterr().out.split())


@pytest.mark.gpu
def test_mosaic_gpu_smoke_on_gpu(rng):
    x = jnp.asarray(rng.standard_normal((64, 128)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((128, 64)), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((64,)), jnp.bfloat16)
    out = smoke.smoke_mosaic_gpu(x, w, b).astype(jnp.float32)
    ref = smoke.smoke_reference(x, w, b).astype(jnp.float32)
    chex.assert_trees_all_close(out, ref, rtol=2e-2, atol=5e-2)
