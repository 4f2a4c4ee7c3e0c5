"""``samoyeds-generate``: placeholder until the model lands; runs the kernel smoke check."""

from __future__ import annotations


def main(argv: list[str]) -> int:
    from samoyeds_jax.diagnostics import gpu_check

    print("samoyeds-generate: the MoE model is not built yet; running the kernel smoke check.")
    return 0 if gpu_check()["ok"] else 1
