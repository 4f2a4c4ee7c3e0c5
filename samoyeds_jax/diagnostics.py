"""``samoyeds-gpu-check``: what this machine offers, and whether each Pallas backend runs."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import backend as backend_lib
from pallas_kernels import smoke


def _memory_kinds(device) -> list[str]:
    try:
        return sorted(m.kind for m in device.addressable_memories())
    except Exception as e:  # older runtimes have no memories API
        return [f"unavailable ({type(e).__name__})"]


def gpu_check(*, t: int = 64, d: int = 128, f: int = 64, seed: int = 0) -> dict:
    """Print device facts and run the smoke kernel through every available backend.

    Returns a dict of what was found: ``gpu`` whether jax sees a GPU; ``ok`` True only when
    it does and every backend matched its reference. Without a GPU nothing is compiled for
    one: the Triton kernel runs in Pallas interpret mode on the CPU (a check of the kernel
    code, not of a GPU) and Mosaic GPU is skipped.
    """
    dev = jax.devices()[0]
    gpu = backend_lib.platform() == "gpu"
    report = {
        "jax": jax.__version__,
        "platform": backend_lib.platform(),
        "devices": [str(d_) for d_ in jax.devices()],
        "device_kind": dev.device_kind,
        "memory_kinds": _memory_kinds(dev),
        "interpret_mode": backend_lib.interpret_mode(),
        "backends": {},
    }
    for k, v in report.items():
        if k != "backends":
            print(f"{k:>15}: {v}")

    key = jax.random.key(seed)
    kx, kw, kb = jax.random.split(key, 3)
    x = jax.random.normal(kx, (t, d), jnp.bfloat16)
    w = jax.random.normal(kw, (d, f), jnp.bfloat16)
    b = jax.random.normal(kb, (f,), jnp.bfloat16)
    ref = np.asarray(smoke.smoke_reference(x, w, b), np.float32)

    runs = {"triton": smoke.smoke_triton}
    if gpu:
        runs["mosaic_gpu"] = smoke.smoke_mosaic_gpu
    ok = True
    for name, fn in runs.items():
        t0 = time.perf_counter()
        try:
            out = np.asarray(jax.jit(fn)(x, w, b), np.float32)
            rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
            passed = bool(np.isfinite(out).all() and rel < 2e-2)
            result = {"ok": passed, "rel_err": rel, "seconds": time.perf_counter() - t0}
        except Exception as e:  # report every backend, even when one fails
            passed = False
            result = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:500]}"}
        ok &= passed
        report["backends"][name] = result
        label = f"pallas {name}" + ("" if gpu else " (interpret mode, on the CPU)")
        print(f"{label:>15}: {result}")
    report["gpu"] = gpu
    report["ok"] = ok and gpu
    if gpu:
        print(f"{'ok':>15}: {ok}")
    else:
        print(f"{'pallas mosaic_gpu':>15}: skipped (needs a GPU)")
        print(f"{'ok':>15}: False: no GPU visible to jax (platform {report['platform']!r}); no "
              "kernel was compiled for a GPU (install jax[cuda13]==0.11.2 on a machine with an "
              "NVIDIA GPU)")
    return report
