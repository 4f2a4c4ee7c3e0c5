"""Where SparseGPT's time goes on a GPU: the first (compiling) and second call of
``pruning.prune_experts`` with SparseGPT (refit included) on expert stacks of three sizes, 2:4
and Samoyeds, then the calibrated pruning walk of the shipped reference model, twice.

    PYTHONPATH=. python examples/profile_sparsegpt.py

Prints one line per call (seconds, ``block_until_ready`` included).
"""
import time
import numpy as np, jax, jax.numpy as jnp
from samoyeds_jax import pruning, compress
from samoyeds_jax.hf_import import load_hf_checkpoint
rng = np.random.default_rng(0)
for k, n, e, t in [(256, 256, 8, 1024), (512, 512, 8, 4096), (4096, 14336, 1, 4096)]:
    w = jnp.asarray(rng.standard_normal((e, k, n)) / np.sqrt(k), jnp.float32)
    x = jnp.asarray(rng.standard_normal((e, t, k)), jnp.float32)
    for fmt in ("nm", "samoyeds"):
        cfg = pruning.PruneConfig(format=fmt, method="sparsegpt", output="dense")
        for rep in range(2):
            t0 = time.perf_counter()
            out, _ = pruning.prune_experts({"l": {"w2": w}}, cfg, {"l/w2": x}, progress=False)
            jax.block_until_ready(out)
            print(f"K{k} N{n} e{e} t{t} {fmt} call {rep}: {time.perf_counter() - t0:.2f} s", flush=True)
dense, config = load_hf_checkpoint("samoyeds_jax/assets/shakespeare-moe", dtype="float32")
calib = rng.integers(0, config.vocab_size, (64, 257))
for method in ("magnitude", "sparsegpt"):
    cfg = pruning.PruneConfig(method=method, output="dense", format="nm")
    for rep in range(2):
        model = compress.copy_model(dense)
        t0 = time.perf_counter()
        compress.calibrate_and_prune(model, calib, cfg, progress=False)
        print(f"reference model {method} call {rep}: {time.perf_counter() - t0:.1f} s", flush=True)
