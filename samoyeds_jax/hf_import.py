"""Hugging Face checkpoint import: ``load_hf_checkpoint`` maps a checkpoint's tensors onto
``MoETransformer`` and converts its experts (the files are read by ``samoyeds_jax.hf_files``).

Import (``load_hf_checkpoint``) reads a Hugging Face model directory:

- ``config.json`` -> ``ModelConfig.from_hf`` (Mixtral, Qwen2-MoE / Qwen1.5-MoE, Qwen3-MoE, OLMoE);
- ``model.safetensors``, or the shards listed by ``model.safetensors.index.json``, or every
  ``*.safetensors`` file of the directory; tensors are read one layer at a time (a layer's
  experts on several threads; layer i+1 while layer i, uploaded, is converted on the
  device), so host memory holds about one layer's dense weights besides the result.

Tensor mapping (``model.`` prefix as in the checkpoints; see ``samoyeds_jax.model`` for the
module names). Torch linear weights ``[out, in]`` are transposed to ``[in, out]`` (``y = x @ W``):

===================================================================  ==================================
Hugging Face                                                         here
===================================================================  ==================================
``model.embed_tokens.weight`` [v, d]                                 ``embed_tokens.embedding`` [v, d]
``model.layers.{i}.{input,post_attention}_layernorm.weight`` [d]     ``layers.{i}.*_layernorm.scale``
``...self_attn.{q,k,v,o}_proj.weight`` (+ ``.bias``)                 ``...self_attn.*_proj.kernel`` (+ bias)
``...self_attn.{q,k}_norm.weight``                                   ``...self_attn.{q,k}_norm.scale``
``...{moe}.gate.weight`` [e, d]                                      ``layers.{i}.mlp.gate.kernel`` [d, e]
``...{moe}.experts.{j}.{gate}.weight`` [f, d], j = 0..e-1            ``layers.{i}.mlp.w1`` [e, d, f]
``...{moe}.experts.{j}.{up}.weight`` [f, d]                          ``layers.{i}.mlp.w3`` [e, d, f]
``...{moe}.experts.{j}.{down}.weight`` [d, f]                        ``layers.{i}.mlp.w2`` [e, f, d]
``...mlp.experts.gate_up_proj`` [e, 2f, d] (fused layout)            ``w1`` = first f rows, ``w3`` = rest
``...mlp.experts.down_proj`` [e, d, f] (fused layout)                ``layers.{i}.mlp.w2`` [e, f, d]
``...mlp.shared_expert.{gate,up,down}_proj.weight`` (Qwen2-MoE)      ``layers.{i}.mlp.shared.{w1,w3,w2}``
``...mlp.shared_expert_gate.weight`` [1, d] (Qwen2-MoE)              ``layers.{i}.mlp.shared.gate_kernel``
``...{moe}.pregate.weight`` [e, d], i < l-1 (transformers skips it)  ``layers.{i}.mlp.pregate.kernel`` [d, e]
``model.norm.weight``                                                ``norm.scale``
``lm_head.weight`` [v, d] (absent or ignored when tied)              ``lm_head.kernel`` [d, v]
===================================================================  ==================================

Each family's names come from ``samoyeds_jax.families`` (the exporter uses the same): ``{moe}``
is ``block_sparse_moe`` (or ``mlp``, as transformers >= 5 saves it) with expert names
``w1/w3/w2`` for Mixtral, ``mlp`` with ``gate_proj/up_proj/down_proj`` for the others. A pre-gate (``pregate != "standard"``) of block
i is read from ``...{moe}.pregate.weight`` when the checkpoint has that tensor (written by
``samoyeds_jax.hf_export``; transformers skips it), else starts as a copy of block i+1's gate.
A model built without pre-gates (``pregate="standard"``) skips those tensors.

The routed experts are then pruned and stored in ``expert_format`` (``samoyeds_jax.pruning``),
layer by layer under a progress bar. ``compress.prune_checkpoint`` prunes each layer with
calibration instead (Wanda, SparseGPT), on the hidden states of token windows after the layers
before it, already pruned, still one layer at a time: a model that does not fit the device in
dense form is pruned with calibration, and evaluated, on one GPU.

Errors: a missing directory, ``config.json``, shard or listed file raises FileNotFoundError
naming it; an unreadable (e.g. truncated) shard, a missing, unexpected, mis-shaped or
non-finite tensor raises ValueError naming the tensor, its file and what was expected vs found.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from pallas_kernels.checks import expect_float_dtype
from pallas_kernels.format_registry import get_format
from samoyeds_jax import families, pruning
from samoyeds_jax.config import (FLOAT_DTYPES, ExpertFormat, ExpertImplementation, PregateMode,
                                 SparsityConfig)
from samoyeds_jax.expert_store import check_experts_memory, place_experts
from samoyeds_jax.families import Family
from samoyeds_jax.hf_files import ShardReader, read_hf_config
from samoyeds_jax.model import ModelConfig, MoETransformer
from samoyeds_jax.param_layout import (Path, _abstract_model, _check_layout, _dotted,
                                       _fill_non_params, _is_sparse, _variables)

__all__ = ["ShardReader", "load_hf_checkpoint", "read_hf_config"]


# ----------------------------------------------------------------------------- dtype


def _as_dtype(dtype: Any) -> Any:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(FLOAT_DTYPES)}, got {dtype!r}")
        return FLOAT_DTYPES[dtype]
    expect_float_dtype("load_hf_checkpoint", dtype=dtype)
    return dtype


def _config_dtype(hf: Mapping[str, Any], directory: str) -> Any:
    """config.json's ``torch_dtype`` (transformers < 5) or ``dtype``; float32 when absent."""
    key = "torch_dtype" if "torch_dtype" in hf else "dtype"
    name = str(hf.get(key) or "float32")
    if name not in FLOAT_DTYPES:
        raise ValueError(f"{os.path.join(directory, 'config.json')}: {key} must be one of "
                         f"{sorted(FLOAT_DTYPES)}, found {name!r}; pass dtype= to load it anyway")
    return FLOAT_DTYPES[name]


# ----------------------------------------------------------------------------- import


def _linear(reader: ShardReader, key: str, shape_in_out: tuple[int, ...]) -> np.ndarray:
    """A torch linear weight [out, in] read as [in, out]."""
    return reader.get(key, tuple(reversed(shape_in_out))).T


# A stack of tensors read on the host: their checkpoint names and the [len(keys), ...] array.
_HostStack = tuple[list[str], np.ndarray]


def _upload(reader: ShardReader, stack: _HostStack, dtype: Any) -> jax.Array:
    """A host stack on the default device in ``dtype`` (one key: that tensor), checked for
    NaN/Inf there, one reduction instead of a numpy pass over a layer's weights on the host;
    on a failure the host pass runs for the error, which names the tensor and its file (or the
    tensor whose values, finite as stored, overflow ``dtype``, e.g. float32 in float16)."""
    keys, array = stack
    x = jnp.asarray(array, dtype)
    if reader.finite and not bool(jnp.isfinite(x).all()):
        for key in keys:
            reader.get(key, array.shape[1:])  # raises ValueError naming the first non-finite one
        j = next(j for j in range(len(keys)) if not bool(jnp.isfinite(x[j]).all()))
        raise ValueError(f"tensor {keys[j]!r}: finite as stored, but with values beyond the range "
                         f"of {x.dtype}, the dtype it loads in")
    return x if len(keys) > 1 else x[0]


def _read_experts(reader: ShardReader, family: Family, i: int, moe: str,
                  e: int, d: int, f: int) -> dict[str, _HostStack]:
    """Block i's routed experts as stored (torch [out, in]), read on the host on several
    threads: w1, w3 and w2 stacks, or the fused layout's gate_up [e, 2f, d] and w2 [e, d, f]."""
    fused_gate_up, fused_down = family.fused_expert_names(i, moe)
    if fused_gate_up in reader:
        return {"gate_up": ([fused_gate_up], reader.stack([fused_gate_up], (e, 2 * f, d),
                                                          finite=False)),
                "w2": ([fused_down], reader.stack([fused_down], (e, d, f), finite=False))}
    out = {}
    for w, shape in (("w1", (f, d)), ("w3", (f, d)), ("w2", (d, f))):
        keys = [family.tensor_name(("layers", i, "mlp", w), expert=j, moe=moe) for j in range(e)]
        out[w] = (keys, reader.stack(keys, shape, finite=False))
    return out


def _device_experts(reader: ShardReader, stacks: Mapping[str, _HostStack], dtype: Any
                    ) -> dict[str, jax.Array]:
    """Stacked w1/w3 [e, d, f] and w2 [e, f, d] on the default device in ``dtype``, from the
    host stacks of ``_read_experts`` (uploaded, then transposed and split there)."""
    out = {name: _upload(reader, stack, dtype).mT for name, stack in stacks.items()}
    if "gate_up" in out:
        gate_up = out.pop("gate_up")
        f = gate_up.shape[-1] // 2
        out.update(w1=gate_up[..., :f], w3=gate_up[..., f:])
    return out


def _moe_name(reader: ShardReader, family: Family, i: int) -> str:
    """The name block i's MoE module has in the checkpoint: the first of the family's
    ``moe_names`` whose gate is there (else the written one)."""
    gate = ("layers", i, "mlp", "gate", "kernel")
    return next((name for name in family.moe_names
                 if family.tensor_name(gate, moe=name) in reader), family.moe_names[0])


# Where _read_layer puts block i's host stacks of routed experts.
_EXPERTS = "routed experts"


def _read_layer(reader: ShardReader, family: Family, config: ModelConfig, i: int,
                shapes: Mapping[Path, tuple[int, ...]]) -> dict[Path, Any]:
    """Every parameter of block i except the pre-gate, read on the host (numpy) under its
    module path; the routed experts under ``("layers", i, "mlp", _EXPERTS)`` as host stacks
    (``_read_experts``)."""
    hf_name = family.tensor_name
    layer = ("layers", i)
    out: dict[Path, Any] = {}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        path = layer + (norm, "scale")
        out[path] = reader.get(hf_name(path), (config.d_model,))
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        path = layer + ("self_attn", proj)
        out[path + ("kernel",)] = _linear(reader, hf_name(path + ("kernel",)),
                                          shapes[path + ("kernel",)])
        if path + ("bias",) in shapes:
            out[path + ("bias",)] = reader.get(hf_name(path + ("bias",)), shapes[path + ("bias",)])
    for norm in ("q_norm", "k_norm"):
        path = layer + ("self_attn", norm, "scale")
        if path in shapes:
            out[path] = reader.get(hf_name(path), shapes[path])

    moe = _moe_name(reader, family, i)
    mlp = layer + ("mlp",)
    m = config.moe
    out[mlp + ("gate", "kernel")] = _linear(reader, hf_name(mlp + ("gate", "kernel"), moe=moe),
                                            (m.d_model, m.num_experts))
    out[mlp + (_EXPERTS,)] = _read_experts(reader, family, i, moe, m.num_experts, m.d_model,
                                           m.d_ff)
    if mlp + ("shared", "w1") in shapes:
        s = m.shared_width
        for w, shape in (("w1", (m.d_model, s)), ("w3", (m.d_model, s)), ("w2", (s, m.d_model))):
            out[mlp + ("shared", w)] = _linear(reader, hf_name(mlp + ("shared", w), moe=moe), shape)
        if mlp + ("shared", "gate_kernel") in shapes:
            path = mlp + ("shared", "gate_kernel")
            out[path] = _linear(reader, hf_name(path, moe=moe), (m.d_model, 1))
    return out


def _pregate_key(reader: ShardReader, family: Family, config: ModelConfig, i: int
                 ) -> str | None:
    """Name of block i's pre-gate tensor [e, d] when the checkpoint holds one, else None.

    Only blocks before the last have a pre-gate; a pre-gate tensor of the last block is left
    unread, so the importer refuses it as an unknown weight. Any of the family's MoE module
    names is accepted, as for its gate.
    """
    if i >= config.num_layers - 1:
        return None
    for moe in family.moe_names:
        key = family.tensor_name(("layers", i, "mlp", "pregate", "kernel"), moe=moe)
        if key in reader:
            return key
    return None


def _prune_config(config: ModelConfig, expert_format: ExpertFormat,
                  prune: pruning.PruneConfig | None) -> pruning.PruneConfig | None:
    """The pruning settings of a conversion (None for dense)."""
    if prune is not None:
        if prune.format != expert_format:
            raise ValueError(f"prune.format={prune.format!r} disagrees with "
                             f"expert_format={expert_format!r}")
        if prune.output != "compressed":
            raise ValueError("prune.output must be 'compressed' to store the experts in their "
                             f"format, got {prune.output!r}")
        return prune
    if not get_format(expert_format, "expert_format").classes:
        return None
    return pruning.PruneConfig(format=expert_format,
                               **config.moe.sparsity.format_params(expert_format))


def _convert_experts(experts: dict[str, jax.Array], i: int,
                     prune: pruning.PruneConfig | None) -> dict[str, Any]:
    if prune is None:
        return experts
    converted, _ = pruning.prune_experts({"layers": {str(i): experts}}, prune, progress=False)
    return converted["layers"][str(i)]


def load_hf_checkpoint(
    directory: str,
    *,
    dtype: Any = None,
    expert_format: ExpertFormat | None = None,
    prune: pruning.PruneConfig | None = None,
    implementation: ExpertImplementation = None,
    pregate: PregateMode = "standard",
    progress: bool | None = None,
    experts_memory: str = "device",
    pruner: Any = None,
) -> tuple[MoETransformer, ModelConfig]:
    """Import a Hugging Face MoE checkpoint directory and convert its experts.

    Args:
      directory: holds ``config.json`` and the ``*.safetensors`` weights (see the module doc).
      dtype: compute and parameter dtype ("float32", "bfloat16", "float16" or a jnp floating
        dtype); None: the config's ``torch_dtype``/``dtype`` (float32 if absent; another value
        raises ValueError). When given, the config's dtype is ignored.
      expert_format: storage of the routed experts; None: ``prune.format``, else "dense".
      prune: the ``pruning.PruneConfig`` (method, pattern) used for a sparse format; None:
        magnitude pruning with the pattern of ``MoEConfig.sparsity``'s defaults.
      implementation: the expert implementation (``MoEConfig.implementation``).
      pregate: pre-gating mode; pre-gates are read from the checkpoint's ``...pregate.weight``
        tensors when present, else start as copies of the next block's gate.
      progress: tqdm bar over the layers; None shows it on a terminal.
      experts_memory: where the routed experts end up: "device", or "pinned_host" (each
        block's experts leave the device before the next block is read: for
        ``OffloadGenerator`` when the experts do not fit the device).
      pruner: prunes each block's experts with calibration as the blocks stream in
        (``compress.prune_checkpoint`` passes its ``CheckpointPruning``, which Wanda and
        SparseGPT need); None: each weight alone, by ``prune``.
    Returns:
      ``(model, config)``.
    Raises:
      FileNotFoundError: missing directory, config.json or shard.
      ValueError: unsupported architecture/option, config.json not an object or with a
        non-boolean flag, unreadable shard, missing, unexpected or mis-shaped tensor (named,
        with expected vs found shape), or one with NaN/Inf or a non-floating dtype.
    """
    check_experts_memory(experts_memory)  # before any work
    pruning.expect_config("prune", prune, optional=True)
    hf = read_hf_config(directory)
    if expert_format is None:
        expert_format = prune.format if prune is not None else "dense"
    dtype = _as_dtype(dtype)
    if dtype is None:  # the config's dtype matters only then: with dtype= it is ignored
        dtype = _config_dtype(hf, directory)
    config = ModelConfig.from_hf(hf, expert_format="dense", implementation=implementation,
                                 pregate=pregate, dtype=dtype, param_dtype=dtype)
    prune = _prune_config(config, expert_format, prune)
    if prune is None and pruner is not None:
        raise ValueError(f"a calibrated pruner was given, but expert_format={expert_format!r} "
                         "prunes nothing; pass a sparse expert_format or prune=PruneConfig(...)")
    if prune is not None and prune.method != "magnitude" and pruner is None:
        raise ValueError(f"prune.method={prune.method!r} needs calibration: use "
                         "compress.prune_checkpoint(directory, windows, prune)")
    if prune is not None:
        sparsity = SparsityConfig(n=prune.n, m=prune.m, n_sel=prune.n_sel, m_sel=prune.m_sel,
                                  v=prune.v, density=1.0 - prune.sparsity)
        config = config.replace(moe=dict(expert_format=expert_format, sparsity=sparsity))

    if pruner is not None:
        config = pruner.configure(config)
    model = _abstract_model(config)
    variables = _variables(model)
    shapes = {p: tuple(v.get_value().shape) for p, v in variables.items()
              if isinstance(v, nnx.Param)}
    param_dtype = config.param_dtype
    loaded: dict[Path, Any] = {}

    def put(path: Path, array: Any) -> None:
        if _is_sparse(array):
            _check_layout(config, path, variables[path].get_value(), array, "the conversion")
            loaded[path] = array
            return
        if tuple(array.shape) != shapes[path]:  # a mapping error here, never a user error
            raise AssertionError(f"{_dotted(path)}: mapped shape {array.shape} != {shapes[path]}")
        value = jnp.asarray(array, dtype=param_dtype)
        if isinstance(array, np.ndarray) and not bool(jnp.isfinite(value).all()):
            raise ValueError(f"{_dotted(path)}: finite in the checkpoint ({array.dtype}), but with "
                             f"values beyond the range of {value.dtype}, the model's dtype")
        loaded[path] = value

    with ShardReader(directory, floating=True) as reader:
        v, d = config.vocab_size, config.d_model
        family = families.family(config.architecture)
        hf_name = family.tensor_name
        put(("embed_tokens", "embedding"),
            reader.get(hf_name(("embed_tokens", "embedding")), (v, d)))
        if pruner is not None:
            pruner.start(config, loaded[("embed_tokens", "embedding")])
        bar = tqdm(range(config.num_layers), unit="layer",
                   desc=f"importing {config.architecture} ({expert_format} experts)",
                   disable=None if progress is None else not progress)  # None: only on a tty

        def upload_block(i: int, tensors: dict[Path, Any]) -> dict[str, jax.Array]:
            """Block i's host arrays (``_read_layer``) on the device; returns its dense
            experts. The host arrays are let go when this returns."""
            experts = _device_experts(reader, tensors.pop(("layers", i, "mlp", _EXPERTS)),
                                      param_dtype)
            for path, array in tensors.items():
                put(path, array)
            return experts

        def convert_block(i: int, experts: dict[str, jax.Array]) -> None:
            """Block i's experts (and with the pruner's linears, those) pruned and stored in
            their formats; its pre-gate."""
            if pruner is not None:
                pruned = pruner(i, loaded, experts)
            else:
                pruned = {("layers", i, "mlp", name): w
                          for name, w in _convert_experts(experts, i, prune).items()}
            for path, w in pruned.items():
                put(path, w)
                if families.routed(path):
                    loaded[path] = place_experts(loaded[path], experts_memory)
            key = _pregate_key(reader, family, config, i)
            if key is not None:
                path = ("layers", i, "mlp", "pregate", "kernel")
                if path in shapes:
                    put(path, _linear(reader, key, shapes[path]))
                else:  # standard routing needs no pre-gate: skipped on purpose, not dropped
                    reader.mark_used(key)

        # Block i+1 is read on the host (on its own thread) while block i, uploaded, is
        # converted on the device: the host holds about one block's dense weights at a time.
        prefetch = ThreadPoolExecutor(1)
        read = functools.partial(_read_layer, reader, family, config, shapes=shapes)
        ahead = prefetch.submit(read, 0) if config.num_layers else None
        try:
            for i in bar:
                experts = upload_block(i, ahead.result())
                ahead = prefetch.submit(read, i + 1) if i + 1 < config.num_layers else None
                convert_block(i, experts)
                del experts
        finally:
            if ahead is not None:
                ahead.cancel()
            prefetch.shutdown(wait=True)
        put(("norm", "scale"), reader.get(hf_name(("norm", "scale")), (d,)))
        if config.tie_word_embeddings:  # some exports keep the tied copy; unused here
            reader.mark_used(hf_name(("lm_head", "kernel")))
        else:
            put(("lm_head", "kernel"), _linear(reader, hf_name(("lm_head", "kernel")), (d, v)))
        if pruner is not None:
            pruner.finish(loaded)
        unused = [k for k in reader.unused() if not k.endswith("rotary_emb.inv_freq")]
        if unused:
            raise ValueError(
                f"{len(unused)} tensors of {directory} are not part of the {config.architecture} "
                f"layout this importer maps (e.g. {unused[:3]}); refusing to drop weights")

    for i in range(config.num_layers - 1):  # pre-gates not in the file: the next block's gate
        path = ("layers", i, "mlp", "pregate", "kernel")
        if path in shapes and path not in loaded:
            loaded[path] = loaded[("layers", i + 1, "mlp", "gate", "kernel")]
    missing = sorted(_dotted(p) for p in shapes if p not in loaded)
    if missing:  # a mapping gap: fail loudly instead of leaving abstract leaves behind
        raise AssertionError(f"parameters not filled from the checkpoint: {missing}")
    for path, value in loaded.items():
        variables[path].set_value(value)
    _fill_non_params(variables)
    return model, config
