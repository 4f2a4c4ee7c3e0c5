"""Parameter layouts shared by the checkpoint importer, the converted-model format and the
exporter: the abstract (nothing allocated) model of a config, its variables by module path,
and the layout a config implies for each parameter (dense shape and dtype, or a sparse format
with its static fields and array fields), with checks naming the parameter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.format_registry import get_format
from samoyeds_jax.model import ModelConfig, MoETransformer

Path = tuple[str | int, ...]


def _abstract_model(config: ModelConfig) -> MoETransformer:
    """The model with ShapeDtypeStruct leaves (nothing allocated); experts are dense shapes."""
    return nnx.eval_shape(lambda: MoETransformer(config, rngs=nnx.Rngs(0)))


def abstract_model(config: ModelConfig) -> MoETransformer:
    """The model of ``config`` with ``jax.ShapeDtypeStruct`` leaves (nothing allocated), each
    parameter in the layout the config implies (sparse formats' ``abstract`` values): what
    ``jax.jit(...).lower`` needs to compile for a model without building it. An unstructured
    weight gets one slot per tile (its slot count depends on the weights)."""
    model = _abstract_model(config)
    for path, var in _variables(model).items():
        if isinstance(var, nnx.Param):
            var.set_value(_expected(config, path, var.get_value(), None))
    return model


def check_unfused(model: Any, what: str) -> None:
    """ValueError when ``prepare`` joined a block's q/k/v projections (``Attention.fuse_qkv``):
    a layout for inference, which ``what`` (a save, an export, pruning) does not take."""
    if any(block.self_attn.fused for block in model.layers):
        raise ValueError(f"{what}: the model's q/k/v projections are joined for inference "
                         "(MoETransformer.prepare fused them); pass the model before prepare(), "
                         "as loaded or converted")


def _variables(model: nnx.Module) -> dict[Path, nnx.Variable]:
    return {path: node for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Variable)}


def _dotted(path: Path) -> str:
    return ".".join(str(p) for p in path)


def _fill_non_params(variables: Mapping[Path, nnx.Variable]) -> None:
    """Non-parameter state (counters) starts at zero."""
    for var in variables.values():
        if not isinstance(var, nnx.Param):
            var.set_value(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), var.get_value()))



def _static_fields(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
            if f.metadata.get("static")}


def _array_fields(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
            if not f.metadata.get("static")}


def _is_sparse(value: Any) -> bool:
    return hasattr(value, "to_dense")


def _describe(value: Any) -> str:
    """A parameter value's layout: ``float32[4, 64, 64]``, or the sparse format's class, static
    fields and every array field, e.g. ``NMSparse(n=2, m=4, k=64; values float32[4, 32, 64],
    meta int32[4, 2, 64])``."""
    if not _is_sparse(value):
        return f"{jnp.dtype(value.dtype).name}{list(value.shape)}"
    if not dataclasses.is_dataclass(value):
        return type(value).__name__
    static = ", ".join(f"{k}={v}" for k, v in _static_fields(value).items())
    arrays = ", ".join(f"{k} {_describe(v)}" for k, v in _array_fields(value).items())
    return f"{type(value).__name__}({static}; {arrays})"


def _expected(config: ModelConfig, path: Path, dense: Any, stored: Any) -> Any:
    """The layout ``config`` implies for parameter ``path`` of abstract dense value ``dense``:
    ``dense`` itself, or for routed experts (``config.moe.expert_format``) and the attention
    projections and shared experts (``config.linear.format``) in a sparse format the format's
    ``abstract`` value.
    A TiledSparse takes its tile sizes and slot count, which the config leaves open, from
    ``stored``. ValueError when the config admits no layout for it."""
    if path[:1] != ("layers",):
        return dense
    if path[2:] in _EXPERTS:
        name, sparsity = config.moe.expert_format, config.moe.sparsity
    elif path[2:] in _LINEARS:
        name, sparsity = config.linear.format, config.linear.sparsity
    else:
        return dense
    return get_format(name).abstract(dense.shape, dense.dtype, like=stored,
                                     **sparsity.format_params(name))


_EXPERTS = (("mlp", "w1"), ("mlp", "w3"), ("mlp", "w2"))
_LINEARS = tuple(("self_attn", p, "kernel") for p in ("q_proj", "k_proj", "v_proj", "o_proj")) + \
    tuple(("mlp", "shared", w) for w in ("w1", "w3", "w2"))


def _check_layout(config: ModelConfig, path: Path, dense: Any, value: Any, where: str) -> Any:
    """The layout ``config`` implies for parameter ``path`` (see ``_expected``), after checking
    that ``value`` has it: format, static fields, every array's shape and dtype (ValueError
    naming the parameter and ``where`` it comes from otherwise)."""
    name = _dotted(path)
    try:
        expected = _expected(config, path, dense, value)
    except ValueError as err:
        raise ValueError(f"parameter {name} in {where}: {_describe(value)} fits no layout of the "
                         f"config ({err})") from None
    if _describe(value) != _describe(expected):
        if type(value) is not type(expected) and _is_sparse(expected):
            which = (f"expert_format={config.moe.expert_format!r}" if path[2:] in _EXPERTS
                     else f"linear format={config.linear.format!r}")
            want = f"{type(expected).__name__} ({which})"
        else:
            want = _describe(expected)
        raise ValueError(f"parameter {name} in {where}: expected {want} from the config, found "
                         f"{_describe(value)}")
    return expected
