"""Print device, jax version and memory kinds; run a tiny kernel through each Pallas GPU backend.

    python examples/gpu_check.py        (or: samoyeds-gpu-check)
"""

import sys

from samoyeds_jax.cli import gpu_check_main

if __name__ == "__main__":
    sys.exit(gpu_check_main())
