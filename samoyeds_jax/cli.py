"""Console entry points, and what their parsers share."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, except for required options, flags and None
    defaults (whose help text says what they mean)."""

    def _get_help_string(self, action):
        if action.required or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def given_options(parser: argparse.ArgumentParser, args: argparse.Namespace,
                  argv: Sequence[str]) -> set[str]:
    """The destinations of ``args`` that ``argv`` sets itself (not left at their defaults):
    ``argv`` parsed again into a namespace that already holds a marker for each (argparse
    fills in defaults only where a destination is absent)."""
    unset = object()
    probe = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(vars(args),
                                                                                 unset)))
    return {k for k, v in vars(probe).items() if v is not unset}


def refuse_unless(condition: bool, given: set[str], options: dict[str, str], why: str) -> None:
    """ValueError when ``condition`` is false and one of ``options`` (destination -> flag) was
    given: such an option would have no effect; ``why`` says what it needs."""
    if condition:
        return
    named = [flag for dest, flag in options.items() if dest in given]
    if named:
        raise ValueError(f"{', '.join(named)} {'has' if len(named) == 1 else 'have'} no effect "
                         f"here: {why}")


def describe_experts(model) -> str:
    """``format=..., implementation=..., pregate=...`` of a ``MoETransformer``: the expert
    implementation that runs (``MoE.implementation``), saying when it expands a sparse format
    or runs without a GPU; and ``linears=...`` with theirs when they are sparse."""
    moe = model.config.moe
    out = (f"format={moe.expert_format}, implementation={model.layers[0].mlp.implementation()}, "
           f"pregate={moe.pregate}")
    if model.config.linear.is_sparse:
        out += (f", linears={model.config.linear.format} "
                f"({model.layers[0].self_attn.o_proj.implementation()})")
    return out


def gpu_check_main(argv: list[str] | None = None) -> int:
    """``samoyeds-gpu-check``: 0 when a GPU is visible and every Pallas GPU backend matches its
    reference, 1 when one fails, 2 when jax sees no GPU."""
    argparse.ArgumentParser(
        prog="samoyeds-gpu-check",
        description="Print the device, jax version and memory kinds, and run a tiny kernel "
                    "through each Pallas GPU backend (Triton, Mosaic GPU) against its reference. "
                    "Exit status: 0 all passed on a GPU, 1 a backend failed, 2 no GPU visible "
                    "to jax.").parse_args(sys.argv[1:] if argv is None else argv)
    from samoyeds_jax.diagnostics import gpu_check

    report = gpu_check()
    if not report["gpu"]:
        return 2
    return 0 if report["ok"] else 1


def _run(name: str, main, argv: list[str] | None) -> int:
    """Run a console entry; bad options or inputs print one error line and exit with 2."""
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as err:
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


if __name__ == "__main__":
    print("samoyeds_jax.cli holds the console entries: samoyeds-generate, samoyeds-eval, "
          "samoyeds-train, samoyeds-compress, samoyeds-corpus, samoyeds-gpu-check (in .venv/bin), "
          "or python -m samoyeds_jax.generate_cli / eval_cli / train_cli / compress_cli / corpus",
          file=sys.stderr)
    sys.exit(2)
