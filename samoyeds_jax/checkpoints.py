"""Hugging Face checkpoint import, expert-format conversion, and a converted-model file format.

Import (``load_hf_checkpoint``) reads a Hugging Face model directory:

- ``config.json`` -> ``ModelConfig.from_hf`` (Mixtral, Qwen2-MoE / Qwen1.5-MoE, Qwen3-MoE, OLMoE);
- ``model.safetensors``, or the shards listed by ``model.safetensors.index.json``, or every
  ``*.safetensors`` file of the directory; tensors are read lazily (memory-mapped), one layer at
  a time, so host memory holds at most one layer's dense experts besides the result.

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

``{moe}`` is ``block_sparse_moe`` with expert names ``w1/w3/w2`` for Mixtral, ``mlp`` with
``gate_proj/up_proj/down_proj`` for the others. A pre-gate (``pregate != "standard"``) of block
i is read from ``...{moe}.pregate.weight`` when the checkpoint has that tensor (written by
``samoyeds_jax.hf_export``; transformers skips it), else starts as a copy of block i+1's gate.
A model built without pre-gates (``pregate="standard"``) skips those tensors.

The routed experts are then pruned and stored in ``expert_format`` (``samoyeds_jax.pruning``),
layer by layer under a progress bar.

Converted models (``save_converted`` / ``load_converted``, or ``load_or_convert`` for both)
are a directory with:

- ``samoyeds_model.safetensors``: every parameter under its module path joined by ``.``; a
  sparse expert stack stores each array field, e.g. ``layers.0.mlp.w1.values`` and
  ``layers.0.mlp.w1.meta``;
- ``samoyeds_config.json``: ``{"format_version", "config" (the ModelConfig), "sparse"
  (path -> format class and static fields), "conversion" (source and pruning settings)}``;
- ``tokenizer.json`` copied from the source when it had one.

Errors: a missing directory, ``config.json`` or shard raises FileNotFoundError naming it; an
unreadable (e.g. truncated) shard, a missing, unexpected or mis-shaped tensor raises ValueError
naming the tensor, its file and the expected vs found shape.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from pallas_kernels import formats, tiled_format
from samoyeds_jax import pruning
from samoyeds_jax.config import ExpertFormat, MoEBackend, MoEConfig, PregateMode, SparsityConfig
from samoyeds_jax.layers import AttentionConfig
from samoyeds_jax.model import ModelConfig, MoETransformer

__all__ = [
    "CONVERTED_CONFIG",
    "CONVERTED_WEIGHTS",
    "ShardReader",
    "config_from_dict",
    "config_to_dict",
    "is_converted",
    "load_converted",
    "load_hf_checkpoint",
    "load_model",
    "load_or_convert",
    "load_tokenizer",
    "read_converted_meta",
    "read_hf_config",
    "save_converted",
]

CONVERTED_CONFIG = "samoyeds_config.json"
CONVERTED_WEIGHTS = "samoyeds_model.safetensors"
_FORMAT_VERSION = 1
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_SPARSE_CLASSES = {cls.__name__: cls for cls in
                   (formats.NMSparse, formats.SamoyedsSparse, tiled_format.TiledSparse)}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

Path = tuple[str | int, ...]


# ----------------------------------------------------------------------------- shard reading


class ShardReader:
    """Lazy tensor access over the safetensors files of one directory.

    The files are ``files`` when given, else ``model.safetensors.index.json``'s ``weight_map``
    when the index exists, else ``model.safetensors``, else every ``*.safetensors`` in the
    directory. Missing shards raise FileNotFoundError on construction; unreadable ones
    ValueError. Use as a context manager.
    """

    def __init__(self, directory: str, files: list[str] | None = None):
        self.directory = directory
        index = os.path.join(directory, _INDEX)
        self._where: dict[str, str] = {}
        if files is not None:
            for name in files:
                if not os.path.isfile(os.path.join(directory, name)):
                    raise FileNotFoundError(f"{os.path.join(directory, name)} not found")
            weight_map = None
        elif os.path.isfile(index):
            with open(index) as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as err:
                    raise ValueError(f"{index}: expected JSON with a 'weight_map' object ({err})"
                                     ) from None
            files = sorted(set(weight_map.values()))
            for name in files:
                if not os.path.isfile(os.path.join(directory, name)):
                    raise FileNotFoundError(
                        f"shard {name!r} listed in {index} is missing from {directory}")
        else:
            files = ([_SINGLE] if os.path.isfile(os.path.join(directory, _SINGLE)) else
                     sorted(os.path.basename(p)
                            for p in glob.glob(os.path.join(directory, "*.safetensors"))))
            if not files:
                raise FileNotFoundError(
                    f"no weights in {directory}: expected {_SINGLE}, {_INDEX} with its shards, "
                    "or *.safetensors files")
            weight_map = None
        self._handles: dict[str, Any] = {}
        for name in files:
            handle = self._open(name)
            for key in handle.keys():
                if weight_map is None or weight_map.get(key) == name:
                    if key in self._where and weight_map is None:
                        raise ValueError(f"tensor {key!r} is in both {self._where[key]} and {name} "
                                         f"of {directory}")
                    self._where[key] = name
        if weight_map is not None:
            absent = sorted(k for k, name in weight_map.items() if self._where.get(k) != name)
            if absent:
                raise ValueError(f"{index} lists {len(absent)} tensors that their shards do not "
                                 f"hold, e.g. {absent[0]!r} in {weight_map[absent[0]]}")
        self._used: set[str] = set()

    def _open(self, name: str):
        path = os.path.join(self.directory, name)
        try:
            handle = safe_open(path, framework="numpy")
            handle.__enter__()
        except SafetensorError as err:
            raise ValueError(f"cannot read safetensors shard {path} ({err}); the file may be "
                             "truncated or not a safetensors file") from None
        self._handles[name] = handle
        return handle

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def keys(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def mark_used(self, key: str) -> None:
        """Count ``key`` as consumed without reading it (deliberately ignored tensors)."""
        self._used.add(key)

    def unused(self) -> list[str]:
        """Tensors never read by ``get``."""
        return sorted(set(self._where) - self._used)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

    def get(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        """Tensor ``key`` as a numpy array, after checking it has ``shape``.

        Raises ValueError naming the tensor (and its file) when it is missing or mis-shaped.
        """
        if key not in self._where:
            raise ValueError(f"tensor {key!r} (expected shape {shape}) is missing from the "
                             f"checkpoint in {self.directory}")
        name = self._where[key]
        found = self.shape(key)
        if found != tuple(shape):
            raise ValueError(f"tensor {key!r} in {name}: expected shape {tuple(shape)} from "
                             f"config.json, found {found}")
        try:
            array = self._handles[name].get_tensor(key)
        except SafetensorError as err:
            raise ValueError(f"cannot read tensor {key!r} from {os.path.join(self.directory, name)}"
                             f" ({err})") from None
        self._used.add(key)
        return array


# ----------------------------------------------------------------------------- config I/O


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """A JSON-ready dict of ``config`` (dtypes by name)."""
    d = dataclasses.asdict(config)
    d["dtype"] = jnp.dtype(config.dtype).name
    d["param_dtype"] = jnp.dtype(config.param_dtype).name
    return d


def config_from_dict(d: Mapping[str, Any]) -> ModelConfig:
    """Inverse of ``config_to_dict`` (validates every nested config again)."""
    d = dict(d)
    moe = dict(d.pop("moe"))
    sparsity = SparsityConfig(**moe.pop("sparsity"))
    return ModelConfig(
        **{k: v for k, v in d.items() if k not in ("attention", "dtype", "param_dtype")},
        attention=AttentionConfig(**d["attention"]),
        moe=MoEConfig(**moe, sparsity=sparsity),
        dtype=jnp.dtype(d["dtype"]), param_dtype=jnp.dtype(d["param_dtype"]))


def read_hf_config(directory: str) -> dict[str, Any]:
    """``directory/config.json`` as a dict (FileNotFoundError / ValueError naming the file)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: a Hugging Face checkpoint directory needs "
                                "config.json next to its *.safetensors")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err})") from None


def _as_dtype(dtype: Any) -> Any:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        return _DTYPES[dtype]
    return dtype


# ----------------------------------------------------------------------------- model assembly


def _abstract_model(config: ModelConfig) -> MoETransformer:
    """The model with ShapeDtypeStruct leaves (nothing allocated); experts are dense shapes."""
    return nnx.eval_shape(lambda: MoETransformer(config, rngs=nnx.Rngs(0)))


def _variables(model: nnx.Module) -> dict[Path, nnx.Variable]:
    return {path: node for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Variable)}


def _dotted(path: Path) -> str:
    return ".".join(str(p) for p in path)


def _fill_non_params(variables: Mapping[Path, nnx.Variable]) -> None:
    """Non-parameter state (counters) starts at zero."""
    for var in variables.values():
        if not isinstance(var, nnx.Param):
            var.set_value(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), var.get_value()))


def _moe_names(arch: str) -> tuple[str, tuple[str, str, str]]:
    """(MoE module name, (gate, up, down) expert projection names) of an architecture."""
    if arch == "mixtral":
        return "block_sparse_moe", ("w1", "w3", "w2")
    return "mlp", ("gate_proj", "up_proj", "down_proj")


def _linear(reader: ShardReader, key: str, shape_in_out: tuple[int, ...]) -> np.ndarray:
    """A torch linear weight [out, in] read as [in, out]."""
    return reader.get(key, tuple(reversed(shape_in_out))).T


def _load_experts(reader: ShardReader, prefix: str, names: tuple[str, str, str],
                  e: int, d: int, f: int) -> dict[str, np.ndarray]:
    """Stacked w1/w3 [e, d, f] and w2 [e, f, d] of one MoE block (per-expert or fused layout)."""
    fused_gate_up, fused_down = f"{prefix}.experts.gate_up_proj", f"{prefix}.experts.down_proj"
    if fused_gate_up in reader:
        gate_up = reader.get(fused_gate_up, (e, 2 * f, d)).transpose(0, 2, 1)  # [e, d, 2f]
        down = reader.get(fused_down, (e, d, f)).transpose(0, 2, 1)  # [e, f, d]
        return {"w1": gate_up[..., :f], "w3": gate_up[..., f:], "w2": down}
    gate, up, down = names
    out = {}
    for ours, theirs, shape in (("w1", gate, (d, f)), ("w3", up, (d, f)), ("w2", down, (f, d))):
        out[ours] = np.stack([_linear(reader, f"{prefix}.experts.{j}.{theirs}.weight", shape)
                              for j in range(e)])
    return out


def _layer_tensors(reader: ShardReader, config: ModelConfig, i: int,
                   shapes: Mapping[Path, tuple[int, ...]]) -> dict[Path, np.ndarray]:
    """Every parameter of block i except the pre-gate, under its module path."""
    arch = config.architecture
    hf = f"model.layers.{i}"
    out: dict[Path, np.ndarray] = {}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[("layers", i, norm, "scale")] = reader.get(f"{hf}.{norm}.weight", (config.d_model,))
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        path = ("layers", i, "self_attn", proj)
        out[path + ("kernel",)] = _linear(reader, f"{hf}.self_attn.{proj}.weight",
                                          shapes[path + ("kernel",)])
        if path + ("bias",) in shapes:
            out[path + ("bias",)] = reader.get(f"{hf}.self_attn.{proj}.bias",
                                               shapes[path + ("bias",)])
    for norm in ("q_norm", "k_norm"):
        path = ("layers", i, "self_attn", norm, "scale")
        if path in shapes:
            out[path] = reader.get(f"{hf}.self_attn.{norm}.weight", shapes[path])

    moe_name, names = _moe_names(arch)
    if f"{hf}.{moe_name}.gate.weight" not in reader and f"{hf}.mlp.gate.weight" in reader:
        moe_name = "mlp"  # Mixtral as transformers >= 5 names it in memory
    prefix = f"{hf}.{moe_name}"
    mlp = ("layers", i, "mlp")
    m = config.moe
    out[mlp + ("gate", "kernel")] = _linear(reader, f"{prefix}.gate.weight",
                                            (m.d_model, m.num_experts))
    experts = _load_experts(reader, prefix, names, m.num_experts, m.d_model, m.d_ff)
    out.update({mlp + (k,): v for k, v in experts.items()})
    if mlp + ("shared", "w1") in shapes:
        s = m.shared_width
        for ours, theirs, shape in (("w1", "gate_proj", (m.d_model, s)),
                                    ("w3", "up_proj", (m.d_model, s)),
                                    ("w2", "down_proj", (s, m.d_model))):
            out[mlp + ("shared", ours)] = _linear(
                reader, f"{prefix}.shared_expert.{theirs}.weight", shape)
        if mlp + ("shared", "gate_kernel") in shapes:
            out[mlp + ("shared", "gate_kernel")] = _linear(
                reader, f"{prefix}.shared_expert_gate.weight", (m.d_model, 1))
    return out


def _pregate_key(reader: ShardReader, config: ModelConfig, i: int) -> str | None:
    """Name of block i's pre-gate tensor [e, d] when the checkpoint holds one, else None.

    Only blocks before the last have a pre-gate; a pre-gate tensor of the last block is left
    unread, so the importer refuses it as an unknown weight.
    """
    if i >= config.num_layers - 1:
        return None
    moe_name, _ = _moe_names(config.architecture)
    for name in dict.fromkeys((moe_name, "mlp")):  # Mixtral: either name, as for its gate
        key = f"model.layers.{i}.{name}.pregate.weight"
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
    if expert_format == "dense":
        return None
    sp = config.moe.sparsity
    return pruning.PruneConfig(format=expert_format, n=sp.n, m=sp.m, n_sel=sp.n_sel,
                               m_sel=sp.m_sel, v=sp.v, sparsity=1.0 - sp.density)


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
    backend: MoEBackend = "xla",
    pregate: PregateMode = "standard",
    progress: bool | None = None,
) -> tuple[MoETransformer, ModelConfig]:
    """Import a Hugging Face MoE checkpoint directory and convert its experts.

    Args:
      directory: holds ``config.json`` and the ``*.safetensors`` weights (see the module doc).
      dtype: compute and parameter dtype ("float32", "bfloat16", "float16" or a jnp dtype);
        None: the config's ``torch_dtype``/``dtype`` (float32 if absent).
      expert_format: storage of the routed experts; None: ``prune.format``, else "dense".
      prune: the ``pruning.PruneConfig`` (method, pattern) used for a sparse format; None:
        magnitude pruning with the pattern of ``MoEConfig.sparsity``'s defaults.
      backend: expert compute of the model ("xla" or "pallas").
      pregate: pre-gating mode; pre-gates are read from the checkpoint's ``...pregate.weight``
        tensors when present, else start as copies of the next block's gate.
      progress: tqdm bar over the layers; None shows it on a terminal.
    Returns:
      ``(model, config)``.
    Raises:
      FileNotFoundError: missing directory, config.json or shard.
      ValueError: unsupported architecture/option, unreadable shard, missing, unexpected or
        mis-shaped tensor (named, with expected vs found shape), non-finite expert weights.
    """
    hf = read_hf_config(directory)
    if expert_format is None:
        expert_format = prune.format if prune is not None else "dense"
    dtype = _as_dtype(dtype)
    if dtype is None:
        dtype = _DTYPES.get(str(hf.get("torch_dtype", hf.get("dtype", "float32"))), jnp.float32)
    config = ModelConfig.from_hf(hf, expert_format="dense", backend=backend, pregate=pregate,
                                 dtype=dtype, param_dtype=dtype)
    prune = _prune_config(config, expert_format, prune)
    if prune is not None:
        sparsity = SparsityConfig(n=prune.n, m=prune.m, n_sel=prune.n_sel, m_sel=prune.m_sel,
                                  v=prune.v, density=1.0 - prune.sparsity)
        config = config.replace(moe=dict(expert_format=expert_format, sparsity=sparsity))

    model = _abstract_model(config)
    variables = _variables(model)
    shapes = {p: tuple(v.get_value().shape) for p, v in variables.items()
              if isinstance(v, nnx.Param)}
    param_dtype = config.param_dtype
    loaded: dict[Path, Any] = {}

    def put(path: Path, array: Any) -> None:
        if not isinstance(array, np.ndarray | jax.Array):  # a sparse format pytree
            loaded[path] = array
            return
        if tuple(array.shape) != shapes[path]:  # a mapping error here, never a user error
            raise AssertionError(f"{_dotted(path)}: mapped shape {array.shape} != {shapes[path]}")
        loaded[path] = jnp.asarray(array, dtype=param_dtype)

    with ShardReader(directory) as reader:
        v, d = config.vocab_size, config.d_model
        put(("embed_tokens", "embedding"), reader.get("model.embed_tokens.weight", (v, d)))
        bar = tqdm(range(config.num_layers), unit="layer",
                   desc=f"importing {config.architecture} ({expert_format} experts)",
                   disable=None if progress is None else not progress)  # None: only on a tty
        for i in bar:
            tensors = _layer_tensors(reader, config, i, shapes)
            expert_paths = {("layers", i, "mlp", k): k for k in ("w1", "w3", "w2")}
            experts = {}
            for path, array in tensors.items():
                if path in expert_paths:
                    experts[expert_paths[path]] = jnp.asarray(array, dtype=param_dtype)
                else:
                    put(path, array)
            del tensors
            for name, w in _convert_experts(experts, i, prune).items():
                put(("layers", i, "mlp", name), w)
            key = _pregate_key(reader, config, i)
            if key is not None:
                path = ("layers", i, "mlp", "pregate", "kernel")
                if path in shapes:
                    put(path, _linear(reader, key, shapes[path]))
                else:  # standard routing needs no pre-gate: skipped on purpose, not dropped
                    reader.mark_used(key)
        put(("norm", "scale"), reader.get("model.norm.weight", (d,)))
        if config.tie_word_embeddings:
            reader.mark_used("lm_head.weight")  # some exports keep the tied copy; unused here
        else:
            put(("lm_head", "kernel"), _linear(reader, "lm_head.weight", (d, v)))
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


# ----------------------------------------------------------------------------- converted models


def is_converted(directory: str) -> bool:
    """Whether ``directory`` holds a model written by ``save_converted``."""
    return os.path.isfile(os.path.join(directory, CONVERTED_CONFIG))


def _static_fields(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
            if f.metadata.get("static")}


def _array_fields(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
            if not f.metadata.get("static")}


def save_converted(model: MoETransformer, directory: str, *, source: str | None = None,
                   conversion: Mapping[str, Any] | None = None) -> None:
    """Write ``model`` (any expert format) to ``directory`` for ``load_converted``.

    ``source``: a checkpoint directory whose ``tokenizer.json`` (if any) is copied along and
    which is recorded in the metadata with ``conversion`` (free-form, JSON-serializable).
    """
    os.makedirs(directory, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    sparse: dict[str, Any] = {}
    for path, var in _variables(model).items():
        if not isinstance(var, nnx.Param):
            continue
        value, name = var.get_value(), _dotted(path)
        if isinstance(value, tuple(_SPARSE_CLASSES.values())):
            sparse[name] = {"class": type(value).__name__, "static": _static_fields(value)}
            for field, array in _array_fields(value).items():
                tensors[f"{name}.{field}"] = np.asarray(array)
        else:
            tensors[name] = np.asarray(value)
    meta = {"format_version": _FORMAT_VERSION, "config": config_to_dict(model.config),
            "sparse": sparse, "conversion": dict(conversion or {}, source=source)}
    save_file(tensors, os.path.join(directory, CONVERTED_WEIGHTS),
              metadata={"format": "samoyeds_jax"})
    with open(os.path.join(directory, CONVERTED_CONFIG), "w") as f:
        json.dump(meta, f, indent=1)
    if source is not None and os.path.isfile(os.path.join(source, "tokenizer.json")):
        shutil.copyfile(os.path.join(source, "tokenizer.json"),
                        os.path.join(directory, "tokenizer.json"))


def read_converted_meta(directory: str) -> dict[str, Any]:
    """The metadata of a converted model (``samoyeds_config.json``: format version, config,
    sparse fields, conversion settings); FileNotFoundError / ValueError naming the file."""
    path = os.path.join(directory, CONVERTED_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: not a directory written by save_converted")
    with open(path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err})") from None
    if meta.get("format_version") != _FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')!r} is not the "
                         f"supported {_FORMAT_VERSION}")
    return meta


def load_converted(directory: str, *, backend: MoEBackend | None = None
                   ) -> tuple[MoETransformer, ModelConfig]:
    """Load a model written by ``save_converted``: ``(model, config)``.

    ``backend`` overrides the stored expert backend. Raises FileNotFoundError for missing
    files and ValueError for missing, unexpected or mis-shaped tensors.
    """
    meta = read_converted_meta(directory)
    config = config_from_dict(meta["config"])
    if backend is not None:
        config = config.replace(moe=dict(backend=backend))
    model = _abstract_model(config)
    variables = _variables(model)
    weights = os.path.join(directory, CONVERTED_WEIGHTS)
    with ShardReader(directory, files=[CONVERTED_WEIGHTS]) as reader:
        for path, var in variables.items():
            if not isinstance(var, nnx.Param):
                continue
            name, abstract = _dotted(path), var.get_value()
            if name in meta["sparse"]:
                info = meta["sparse"][name]
                cls = _SPARSE_CLASSES[info["class"]]
                arrays = {}
                for field in (f.name for f in dataclasses.fields(cls)
                              if not f.metadata.get("static")):
                    key = f"{name}.{field}"
                    if key not in reader:
                        raise ValueError(f"tensor {key!r} of sparse parameter {name} "
                                         f"({info['class']}) is missing from {weights}")
                    arrays[field] = jnp.asarray(reader.get(key, reader.shape(key)))
                value = cls(**arrays, **info["static"])
                if tuple(value.shape) != tuple(abstract.shape):
                    raise ValueError(f"sparse parameter {name} in {weights}: expected dense shape "
                                     f"{tuple(abstract.shape)}, found {tuple(value.shape)}")
            else:
                value = jnp.asarray(reader.get(name, tuple(abstract.shape)), dtype=abstract.dtype)
            var.set_value(value)
        if reader.unused():
            raise ValueError(f"{weights} holds tensors the model has no parameter for: "
                             f"{reader.unused()[:3]}")
    _fill_non_params(variables)
    return model, config


def load_or_convert(checkpoint: str, converted: str, *, expert_format: ExpertFormat | None = None,
                    prune: pruning.PruneConfig | None = None, dtype: Any = None,
                    backend: MoEBackend | None = None, progress: bool | None = None
                    ) -> tuple[MoETransformer, ModelConfig]:
    """Load ``converted`` if it exists, else import ``checkpoint`` and save it there.

    An existing conversion must match the requested ``expert_format`` and ``prune`` settings
    (ValueError otherwise), so conversion runs once per setting and directory.
    """
    settings = {"expert_format": expert_format or (prune.format if prune else "dense"),
                "prune": None if prune is None else dataclasses.asdict(prune),
                "dtype": None if dtype is None else jnp.dtype(_as_dtype(dtype)).name}
    if is_converted(converted):
        stored = read_converted_meta(converted)["conversion"]
        differs = {k: (stored.get(k), v) for k, v in settings.items() if stored.get(k) != v}
        if differs:
            raise ValueError(f"{converted} holds a conversion with other settings "
                             f"(stored, requested): {differs}; pick another directory")
        return load_converted(converted, backend=backend)
    model, config = load_hf_checkpoint(checkpoint, dtype=dtype, expert_format=expert_format,
                                       prune=prune, backend=backend or "xla", progress=progress)
    save_converted(model, converted, source=checkpoint, conversion=settings)
    return model, config


def load_model(directory: str, *, expert_format: ExpertFormat | None = None,
               backend: MoEBackend | None = None, dtype: Any = None,
               prune: pruning.PruneConfig | None = None, progress: bool | None = None
               ) -> MoETransformer:
    """The model in ``directory``: a converted model (``is_converted``) or a Hugging Face
    checkpoint. For a converted one, ``expert_format``/``dtype`` must match what is stored (or
    be None)."""
    if is_converted(directory):
        model, config = load_converted(directory, backend=backend)
        fmt = config.moe.expert_format
        if expert_format is not None and expert_format != fmt:
            raise ValueError(f"{directory} stores {fmt!r} experts; requested {expert_format!r} "
                             "(convert the original checkpoint again for another format)")
        if dtype is not None and jnp.dtype(_as_dtype(dtype)) != jnp.dtype(config.param_dtype):
            raise ValueError(f"{directory} stores {jnp.dtype(config.param_dtype).name} weights; "
                             f"requested {jnp.dtype(_as_dtype(dtype)).name}")
        return model
    model, _ = load_hf_checkpoint(directory, dtype=dtype, expert_format=expert_format,
                                  prune=prune, backend=backend or "xla", progress=progress)
    return model


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer(directory: str):
    """``tokenizers.Tokenizer`` from ``directory/tokenizer.json``, or None.

    None when there is no tokenizer.json, or (with a warning) when the ``tokenizers`` package
    is not installed: callers then work with token ids.
    """
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    try:
        from tokenizers import Tokenizer  # optional dependency, imported only when needed
    except ImportError:
        warnings.warn(f"{path} found but the 'tokenizers' package is not installed "
                      "(pip install tokenizers); using token ids", stacklevel=2)
        return None
    return Tokenizer.from_file(path)

