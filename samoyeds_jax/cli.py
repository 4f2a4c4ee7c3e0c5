"""Console entry points."""

from __future__ import annotations

import sys


def gpu_check_main(argv: list[str] | None = None) -> int:
    from samoyeds_jax.diagnostics import gpu_check

    return 0 if gpu_check()["ok"] else 1


def generate_main(argv: list[str] | None = None) -> int:
    """``samoyeds-generate``; bad options or inputs print one error line and exit with 2."""
    from samoyeds_jax.generate_cli import main

    try:
        return main(sys.argv[1:] if argv is None else argv)
    except (ValueError, FileNotFoundError) as err:
        print(f"samoyeds-generate: error: {err}", file=sys.stderr)
        return 2
