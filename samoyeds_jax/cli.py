"""Console entry points."""

from __future__ import annotations

import sys


def gpu_check_main(argv: list[str] | None = None) -> int:
    from samoyeds_jax.diagnostics import gpu_check

    return 0 if gpu_check()["ok"] else 1


def _run(name: str, main, argv: list[str] | None) -> int:
    """Run a console entry; bad options or inputs print one error line and exit with 2."""
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except (ValueError, FileNotFoundError) as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2


def generate_main(argv: list[str] | None = None) -> int:
    """``samoyeds-generate``."""
    from samoyeds_jax.generate_cli import main

    return _run("samoyeds-generate", main, argv)


def eval_main(argv: list[str] | None = None) -> int:
    """``samoyeds-eval``: bits per byte, perplexity and pre-gate recall of a checkpoint."""
    from samoyeds_jax.eval_cli import main

    return _run("samoyeds-eval", main, argv)


def train_main(argv: list[str] | None = None) -> int:
    """``samoyeds-train``: train a Mixtral-architecture MoE on the reference corpus."""
    from samoyeds_jax.train_cli import main

    return _run("samoyeds-train", main, argv)


def compress_main(argv: list[str] | None = None) -> int:
    """``samoyeds-compress``: calibrate, prune, recover, evaluate, save converted."""
    from samoyeds_jax.compress_cli import main

    return _run("samoyeds-compress", main, argv)


def corpus_main(argv: list[str] | None = None) -> int:
    """``samoyeds-corpus``: fetch the reference corpus, train its tokenizer."""
    from samoyeds_jax.corpus import main

    return _run("samoyeds-corpus", main, argv)
