"""A registry of an op's implementations: names -> op instances, and the choice among them.

One ``OpRegistry`` per op (the expert op, the linear op). An op instance has a ``name``, says
where it runs (``supported_on(platform)``; optionally ``requires``, in words), what it runs as stored (``supports(*weights)``),
what ``prepare`` can bring into its layout (``prepares(*weights)``) and, in words, what it
takes (``accepts()``). The registry holds them by name and picks one for given weights:

- an explicit name, or a sequence of names (the first that applies);
- None: the fastest that applies on this device, ``default_order`` on a GPU, ``("xla",)``
  elsewhere (weights already in some op's layout also run on that op).

A name asked for explicitly also runs off its platform where the kernels have an interpret
mode (no GPU). The built-in implementations live in modules imported on first use
(``builtin_modules``), each registering its ops.

Gradients: an op whose ``compute`` jax cannot differentiate (a Pallas kernel has no autodiff
rule) says so (``differentiable = False``) and runs through ``Op.with_gradient``:
its own forward, the gradient of the op's reference (the XLA implementation, the same function).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, ClassVar, Sequence

import jax
import jax.numpy as jnp

from pallas_kernels import backend as backend_lib
from pallas_kernels.format_registry import format_name

Implementation = str | Sequence[str] | None


@dataclasses.dataclass(frozen=True)
class Op:
    """What every implementation says about itself, for the weights of its op (one matrix for
    the linear op, the three expert stacks for the expert op). This base: runs everywhere and
    every format (expanding sparse ones to dense)."""

    name: ClassVar[str] = "xla"
    # Platforms it runs on (``jax.default_backend()`` names); None: every platform.
    platforms: ClassVar[tuple[str, ...] | None] = None
    # Stored formats it runs as they are, without expanding to dense; None: it expands any.
    formats: ClassVar[tuple[str, ...] | None] = None
    # What runs instead of the compiled kernels in interpret mode (no GPU), for ``describe``.
    off_gpu: ClassVar[str] = ""
    # Whether jax differentiates ``compute``; False: the gradient is the reference's.
    differentiable: ClassVar[bool] = True

    def with_gradient(self, compute: Callable, reference: Callable) -> Callable:
        """``compute``, or, when jax cannot differentiate it (``differentiable`` False),
        ``compute`` with ``reference``'s gradient (``with_reference_gradient``)."""
        return compute if self.differentiable else with_reference_gradient(compute, reference)

    def supported_on(self, platform: str) -> bool:
        """Whether this implementation runs (compiled) on ``platform``."""
        return self.platforms is None or platform in self.platforms

    def supports(self, *weights: Any) -> bool:
        """Whether it runs these stored weights as they are."""
        if self.formats is None:
            return all(format_name(w) is not None for w in weights)
        return all(format_name(w) in self.formats for w in weights)

    def prepares(self, *weights: Any) -> bool:
        """Whether ``prepare`` can bring these weights into a layout it runs."""
        return self.supports(*weights)

    def accepts(self) -> str:
        """What weights it runs, in words (for refusals)."""
        return f"runs {', '.join(self.formats or ('every format',))}"

    def expands(self, *weights: Any) -> bool:
        """Whether it computes sparse weights as dense (reported by ``describe``)."""
        return self.formats is None and any(format_name(w) not in (None, "dense")
                                            for w in weights)


def with_reference_gradient(compute: Callable, reference: Callable) -> Callable:
    """``compute`` in the forward pass and ``reference``'s vector-Jacobian product at the same
    inputs in the backward pass: for kernels without an autodiff rule whose reference computes
    the same function. Integer inputs (ids, metadata) get zero (float0) cotangents."""

    @jax.custom_vjp
    def op(*args):
        return compute(*args)

    def forward(*args):
        return compute(*args), args

    def backward(args, cotangent):
        return jax.vjp(reference, *args)[1](cotangent)

    op.defvjp(forward, backward)
    return op


class OpRegistry:
    """The implementations of one op.

    Args:
      what: the op's name in messages, e.g. ``"expert implementation"``.
      default_order: the automatic choice on a GPU, fastest first.
      builtin_modules: modules (``pallas_kernels.<name>``) that register the built-in ops.
      describe_weights: the weights in words, e.g. ``"nm experts"`` (for refusals).
    """

    def __init__(self, what: str, default_order: tuple[str, ...],
                 builtin_modules: tuple[str, ...],
                 describe_weights: Callable[..., str]):
        self.what = what
        self.default_order = default_order
        self.builtin_modules = builtin_modules
        self.describe_weights = describe_weights
        self.ops: dict[str, Any] = {}
        self._loaded = False

    def register(self, op: Any) -> Any:
        """Add an implementation (its name in ``default_order`` makes it an automatic choice)."""
        if op.name in self.ops:
            raise ValueError(f"{self.what} {op.name!r} is already registered")
        self.ops[op.name] = op
        return op

    def get_op(self, name: Any) -> Any:
        """The op registered under ``name``; ValueError lists the names."""
        self.load_builtin()
        if not isinstance(name, str) or name not in self.ops:
            raise ValueError(f"{self.what} must be one of {sorted(self.ops)}, got {name!r}")
        return self.ops[name]

    def check_implementation(self, implementation: Any) -> tuple[str, ...] | None:
        """The names of ``implementation`` (a name, a non-empty sequence of names, or None),
        each checked; ValueError names the bad one."""
        if implementation is None:
            return None
        names = (implementation,) if isinstance(implementation, str) else implementation
        if not isinstance(names, (tuple, list)) or not names:
            raise ValueError(f"implementation must be a name, a non-empty sequence of names or "
                             f"None, got {implementation!r}")
        for name in names:
            self.get_op(name)
        return tuple(names)

    def candidates(self, implementation: Implementation, platform: str | None = None
                   ) -> list[Any]:
        """The ops ``implementation`` allows on ``platform`` (default: this process's), in
        order."""
        self.load_builtin()
        names = self.check_implementation(implementation)
        platform = platform or backend_lib.platform()
        if names is None:
            names = self.default_order if platform == "gpu" else ("xla",)
        ops = [self.get_op(n) for n in names]
        return [op for op in ops if op.supported_on(platform) or
                (implementation is not None and backend_lib.interpret_mode())]

    def resolve(self, implementation: Implementation, *weights: Any,
                platform: str | None = None, prepared: bool = True) -> Any:
        """The op that computes these weights: the first of ``candidates`` that ``supports``
        them as stored (``prepared=False``: that ``prepares`` them).

        Raises ValueError when none applies, naming what was asked, what the weights are and
        why each asked-for implementation refused.
        """
        platform = platform or backend_lib.platform()
        ops = self.candidates(implementation, platform)
        if implementation is None and prepared:  # weights some op prepared run on that op
            ops += [op for op in self.ops.values()
                    if op not in ops and op.supported_on(platform)]
        for op in ops:
            if (op.supports if prepared else op.prepares)(*weights):
                return op
        asked = list(self.check_implementation(implementation) or self.default_order)
        why = [f"{name}: " + (self.get_op(name).accepts() if self.get_op(name) in ops
                              else _not_here(self.get_op(name), platform)) for name in asked]
        dtypes = "/".join(sorted({jnp.dtype(w.dtype).name for w in weights
                                  if hasattr(w, "dtype")}))
        raise ValueError(f"no {self.what} of {asked} runs {self.describe_weights(*weights)} "
                         f"in {dtypes} on platform {platform!r} ({'; '.join(why)})")

    def describe(self, op: Any, *weights: Any) -> str:
        """``op.name``, and what it does with these weights when it expands them or runs
        without a GPU."""
        notes = []
        if op.expands(*weights):
            notes.append(f"{self.describe_weights(*weights)} expanded to dense")
        if op.off_gpu and backend_lib.interpret_mode():
            notes.append(op.off_gpu)
        return f"{op.name} ({'; '.join(notes)})" if notes else op.name

    def implementation_names(self) -> tuple[str, ...]:
        """The registered implementation names."""
        self.load_builtin()
        return tuple(self.ops)

    def load_builtin(self) -> None:
        """Register the built-in implementations (their modules import on first use)."""
        if self._loaded:
            return
        self._loaded = True
        for module in self.builtin_modules:  # each registers its ops
            importlib.import_module(f"pallas_kernels.{module}")


def _not_here(op: Any, platform: str) -> str:
    needs = getattr(op, "requires", "")
    return f"does not run on {platform!r}" + (f" (needs {needs})" if needs else "")
