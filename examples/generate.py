"""Generate with an MoE model: the same command as ``samoyeds-generate``.

    python examples/generate.py --max-new-tokens 16                 # tiny random-weight model
    python examples/generate.py --format samoyeds --batch 8
    python examples/generate.py --checkpoint /path/to/hf_model --prompt "Hello"
"""

from __future__ import annotations

import sys

from samoyeds_jax.generate_cli import main

if __name__ == "__main__":
    sys.exit(main())
