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

Each family's names come from ``samoyeds_jax.families`` (the exporter uses the same): ``{moe}``
is ``block_sparse_moe`` (or ``mlp``, as transformers >= 5 saves it) with expert names
``w1/w3/w2`` for Mixtral, ``mlp`` with ``gate_proj/up_proj/down_proj`` for the others. A pre-gate (``pregate != "standard"``) of block
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
- ``tokenizer.json`` copied from the source when it had one;
- ``samoyeds_manifest.json``, written last: ``{"format": "samoyeds_jax.converted",
  "format_version", "checksum": "crc32", "files"}``, where ``files`` gives each other file's
  byte size and, for the weights, every stored array (each field of each sparse expert stack)
  with its shape, dtype, byte size and CRC-32; the small files have a CRC-32 of the whole file.

CRC-32 (``zlib.crc32``: several GB/s on one core, about twice SHA-256's speed) is there to
catch accidental damage: it detects every burst error up to 32 bits, so any flipped byte, and
truncation is caught by the sizes already. A cryptographic hash would buy nothing against a
deliberate edit, since whoever can rewrite a tensor can rewrite the manifest next to it.

The directory is written as a whole, in a sibling, and swapped in (``samoyeds_jax.atomic``):
readers see the previous model or the new one, never weights of one under the metadata of
the other. ``load_converted`` refuses a directory whose manifest is missing or of another
format, whose files differ from it (size, checksum, tensor list, shape or dtype), or whose
arrays differ from the layout the stored config implies (dense shapes, sparse format and
static fields, every field's shape and dtype).

Errors: a missing directory, ``config.json``, shard or listed file raises FileNotFoundError
naming it; an unreadable (e.g. truncated) shard, a missing, unexpected, mis-shaped, corrupt or
non-finite (imports only) tensor raises ValueError naming the tensor, its file and what was
expected vs found.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import warnings
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from pallas_kernels.format_registry import FORMATS, get_format
from samoyeds_jax import atomic, families, pruning
from samoyeds_jax.config import (ExpertFormat, MoEBackend, MoEConfig, PregateMode, SparsityConfig,
                                 _check_literal)
from samoyeds_jax.families import Family
from samoyeds_jax.layers import AttentionConfig
from samoyeds_jax.model import ModelConfig, MoETransformer

__all__ = [
    "CONVERTED_CONFIG",
    "CONVERTED_MANIFEST",
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
CONVERTED_MANIFEST = "samoyeds_manifest.json"
_CONVERTED_FILES = (CONVERTED_MANIFEST, CONVERTED_CONFIG, CONVERTED_WEIGHTS)
_FORMAT = "samoyeds_jax.converted"
_FORMAT_VERSION = 2
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

Path = tuple[str | int, ...]


# ----------------------------------------------------------------------------- shard reading


class ShardReader:
    """Lazy tensor access over the safetensors files of one directory.

    The files are ``files`` when given, else ``model.safetensors.index.json``'s ``weight_map``
    when the index exists, else ``model.safetensors``, else every ``*.safetensors`` in the
    directory. Missing shards raise FileNotFoundError on construction; unreadable ones
    ValueError. With ``finite`` (the default), ``get`` refuses floating-point tensors holding
    NaN or Inf. Use as a context manager.
    """

    def __init__(self, directory: str, files: list[str] | None = None, *, finite: bool = True):
        self.directory = directory
        self.finite = finite
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
        """Tensor ``key`` as a numpy array, after checking it has ``shape`` (and, with
        ``finite``, no NaN or Inf).

        Raises ValueError naming the tensor and its file when it is missing, mis-shaped,
        unreadable or not finite.
        """
        if key not in self._where:
            raise ValueError(f"tensor {key!r} (expected shape {shape}) is missing from the "
                             f"checkpoint in {self.directory}")
        path = os.path.join(self.directory, self._where[key])
        found = self.shape(key)
        if found != tuple(shape):
            raise ValueError(f"tensor {key!r} in {path}: expected shape {tuple(shape)}, found "
                             f"{found}")
        try:
            array = self._handles[self._where[key]].get_tensor(key)
        except SafetensorError as err:
            raise ValueError(f"cannot read tensor {key!r} from {path} ({err})") from None
        if self.finite and jnp.issubdtype(array.dtype, jnp.floating):
            bad = ~np.isfinite(array)
            if bad.any():
                index = tuple(int(i) for i in np.argwhere(bad)[0])
                raise ValueError(f"tensor {key!r} in {path}: expected finite weights, found "
                                 f"{int(bad.sum())} NaN/Inf values (the first, {array[index]}, at "
                                 f"index {index})")
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


def _linear(reader: ShardReader, key: str, shape_in_out: tuple[int, ...]) -> np.ndarray:
    """A torch linear weight [out, in] read as [in, out]."""
    return reader.get(key, tuple(reversed(shape_in_out))).T


def _load_experts(reader: ShardReader, family: Family, i: int, moe: str,
                  e: int, d: int, f: int) -> dict[str, np.ndarray]:
    """Stacked w1/w3 [e, d, f] and w2 [e, f, d] of block i (per-expert or fused layout)."""
    fused_gate_up, fused_down = family.fused_expert_names(i, moe)
    if fused_gate_up in reader:
        gate_up = reader.get(fused_gate_up, (e, 2 * f, d)).transpose(0, 2, 1)  # [e, d, 2f]
        down = reader.get(fused_down, (e, d, f)).transpose(0, 2, 1)  # [e, f, d]
        return {"w1": gate_up[..., :f], "w3": gate_up[..., f:], "w2": down}
    out = {}
    for w, shape in (("w1", (d, f)), ("w3", (d, f)), ("w2", (f, d))):
        path = ("layers", i, "mlp", w)
        out[w] = np.stack([_linear(reader, family.tensor_name(path, expert=j, moe=moe), shape)
                           for j in range(e)])
    return out


def _moe_name(reader: ShardReader, family: Family, i: int) -> str:
    """The name block i's MoE module has in the checkpoint: the first of the family's
    ``moe_names`` whose gate is there (else the written one)."""
    gate = ("layers", i, "mlp", "gate", "kernel")
    return next((name for name in family.moe_names
                 if family.tensor_name(gate, moe=name) in reader), family.moe_names[0])


def _layer_tensors(reader: ShardReader, family: Family, config: ModelConfig, i: int,
                   shapes: Mapping[Path, tuple[int, ...]]) -> dict[Path, np.ndarray]:
    """Every parameter of block i except the pre-gate, under its module path."""
    hf_name = family.tensor_name
    layer = ("layers", i)
    out: dict[Path, np.ndarray] = {}
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
    experts = _load_experts(reader, family, i, moe, m.num_experts, m.d_model, m.d_ff)
    out.update({mlp + (k,): v for k, v in experts.items()})
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
        mis-shaped tensor (named, with expected vs found shape), a tensor with NaN or Inf
        values (named, with its file).
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
        if _is_sparse(array):
            _check_layout(config, path, variables[path].get_value(), array, "the conversion")
            loaded[path] = array
            return
        if tuple(array.shape) != shapes[path]:  # a mapping error here, never a user error
            raise AssertionError(f"{_dotted(path)}: mapped shape {array.shape} != {shapes[path]}")
        loaded[path] = jnp.asarray(array, dtype=param_dtype)

    with ShardReader(directory) as reader:
        v, d = config.vocab_size, config.d_model
        family = families.family(config.architecture)
        hf_name = family.tensor_name
        put(("embed_tokens", "embedding"),
            reader.get(hf_name(("embed_tokens", "embedding")), (v, d)))
        bar = tqdm(range(config.num_layers), unit="layer",
                   desc=f"importing {config.architecture} ({expert_format} experts)",
                   disable=None if progress is None else not progress)  # None: only on a tty
        for i in bar:
            tensors = _layer_tensors(reader, family, config, i, shapes)
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
            key = _pregate_key(reader, family, config, i)
            if key is not None:
                path = ("layers", i, "mlp", "pregate", "kernel")
                if path in shapes:
                    put(path, _linear(reader, key, shapes[path]))
                else:  # standard routing needs no pre-gate: skipped on purpose, not dropped
                    reader.mark_used(key)
        put(("norm", "scale"), reader.get(hf_name(("norm", "scale")), (d,)))
        if config.tie_word_embeddings:  # some exports keep the tied copy; unused here
            reader.mark_used(hf_name(("lm_head", "kernel")))
        else:
            put(("lm_head", "kernel"), _linear(reader, hf_name(("lm_head", "kernel")), (d, v)))
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
    """Whether ``directory`` holds a model written by ``save_converted``, or part of one (any of
    its manifest, metadata or weights files); ``load_converted`` checks that it is complete."""
    return any(os.path.isfile(os.path.join(directory, name)) for name in _CONVERTED_FILES)


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
    ``dense`` itself, or for routed experts in a sparse format the format's ``abstract`` value.
    A TiledSparse takes its tile sizes and slot count, which the config leaves open, from
    ``stored``. ValueError when the config admits no layout for it."""
    name = config.moe.expert_format
    fmt = get_format(name)
    if not fmt.classes or path[:1] != ("layers",) or path[2:] not in (
            ("mlp", "w1"), ("mlp", "w3"), ("mlp", "w2")):
        return dense
    return fmt.abstract(dense.shape, dense.dtype, like=stored,
                        **config.moe.sparsity.format_params(name))


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
            want = f"{type(expected).__name__} (expert_format={config.moe.expert_format!r})"
        else:
            want = _describe(expected)
        raise ValueError(f"parameter {name} in {where}: expected {want} from the config, found "
                         f"{_describe(value)}")
    return expected


def _crc32(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=1) + "\n").encode()


def save_converted(model: MoETransformer, directory: str, *, source: str | None = None,
                   conversion: Mapping[str, Any] | None = None) -> None:
    """Write ``model`` (any expert format) to ``directory`` for ``load_converted``, atomically.

    The files (see the module doc) are written to a fresh sibling directory that then takes the
    place of ``directory`` (``samoyeds_jax.atomic``): readers find the previous version or the
    new one, complete, never a mix. ``directory`` must be absent, empty or a converted model
    (replaced as a whole). ``source``: a checkpoint directory whose ``tokenizer.json`` (if any)
    is copied along and which is recorded in the metadata with ``conversion`` (free-form,
    JSON-serializable).

    Raises ValueError for a parameter whose layout is not the one its config implies (shape,
    dtype, sparse format and fields; e.g. experts in a Hopper layout), or a ``directory`` that
    is a file or a non-empty directory of another kind.
    """
    config = model.config
    specs = {p: v.get_value() for p, v in _variables(_abstract_model(config)).items()
             if isinstance(v, nnx.Param)}
    params = {p: v.get_value() for p, v in _variables(model).items() if isinstance(v, nnx.Param)}
    if params.keys() != specs.keys():
        raise ValueError(f"the model's parameters differ from those of its config: unexpected "
                         f"{sorted(map(_dotted, params.keys() - specs.keys()))}, missing "
                         f"{sorted(map(_dotted, specs.keys() - params.keys()))}")
    tensors: dict[str, np.ndarray] = {}
    sparse: dict[str, Any] = {}
    for path, value in params.items():
        _check_layout(config, path, specs[path], value, "the model")
        name = _dotted(path)
        if _is_sparse(value):
            sparse[name] = {"class": type(value).__name__, "static": _static_fields(value)}
            for field, array in _array_fields(value).items():
                tensors[f"{name}.{field}"] = np.asarray(array)
        else:
            tensors[name] = np.asarray(value)
    meta = {"format_version": _FORMAT_VERSION, "config": config_to_dict(config),
            "sparse": sparse, "conversion": dict(conversion or {}, source=source)}
    try:
        files = {CONVERTED_CONFIG: _json_bytes(meta)}
    except (TypeError, ValueError) as err:
        raise ValueError(f"conversion settings are not JSON-serializable ({err})") from None
    if source is not None and os.path.isfile(os.path.join(source, "tokenizer.json")):
        with open(os.path.join(source, "tokenizer.json"), "rb") as f:
            files["tokenizer.json"] = f.read()
    entries = {key: {"shape": list(a.shape), "dtype": a.dtype.name, "bytes": int(a.nbytes),
                     "crc32": _crc32(a)} for key, a in tensors.items()}
    listed = {name: {"bytes": len(data), "crc32": zlib.crc32(data)} for name, data in files.items()}
    with atomic.replace_directory(directory, markers=_CONVERTED_FILES,
                                  what="converted model") as staged:
        weights = os.path.join(staged, CONVERTED_WEIGHTS)
        save_file(tensors, weights, metadata={"format": _FORMAT})
        atomic.fsync_file(weights)
        for name, data in files.items():
            atomic.write_file(os.path.join(staged, name), data)
        listed[CONVERTED_WEIGHTS] = {"bytes": os.path.getsize(weights), "tensors": entries}
        manifest = {"format": _FORMAT, "format_version": _FORMAT_VERSION, "checksum": "crc32",
                    "files": listed}
        atomic.write_file(os.path.join(staged, CONVERTED_MANIFEST), _json_bytes(manifest))


def _read_converted(directory: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metadata, manifest) of a converted model, after checking the manifest's format, that
    every file it lists is there with its size, and the checksums of all but the weights."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"converted model directory {directory!r} does not exist")
    path = os.path.join(directory, CONVERTED_MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: {directory} is not a complete converted model (save_converted "
            "writes the manifest last; an interrupted save or an older samoyeds-jax leaves none)")
    with open(path, "rb") as f:
        try:
            manifest = json.loads(f.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err})") from None
    found = ((manifest.get("format"), manifest.get("format_version"))
             if isinstance(manifest, dict) else (type(manifest).__name__, None))
    if found != (_FORMAT, _FORMAT_VERSION):
        raise ValueError(f"{path}: expected format {_FORMAT!r} version {_FORMAT_VERSION}, found "
                         f"{found[0]!r} version {found[1]!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files.keys() >= {CONVERTED_CONFIG, CONVERTED_WEIGHTS}:
        raise ValueError(f"{path}: expected 'files' listing {CONVERTED_CONFIG} and "
                         f"{CONVERTED_WEIGHTS}, found {json.dumps(files)[:200]}")
    contents = {}
    for name, entry in files.items():
        key, kind = ("tensors", dict) if name == CONVERTED_WEIGHTS else ("crc32", int)
        if name not in (CONVERTED_CONFIG, CONVERTED_WEIGHTS, "tokenizer.json") or not (
                isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
                and isinstance(entry.get(key), kind)):
            raise ValueError(f"{path}: expected entries with 'bytes' and 'crc32' ('tensors' for "
                             f"{CONVERTED_WEIGHTS}) for {CONVERTED_CONFIG}, {CONVERTED_WEIGHTS} "
                             f"and tokenizer.json, found {name!r}: {json.dumps(entry)[:200]}")
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} not found (listed by {path})")
        if os.path.getsize(file) != entry["bytes"]:
            raise ValueError(f"{file}: expected {entry['bytes']} bytes (listed by {path}), found "
                             f"{os.path.getsize(file)}: the file is truncated or was replaced")
        if name != CONVERTED_WEIGHTS:
            with open(file, "rb") as f:
                contents[name] = f.read()
            if zlib.crc32(contents[name]) != entry["crc32"]:
                raise ValueError(f"{file}: expected crc32 {entry['crc32']:08x} (listed by {path}), "
                                 f"found {zlib.crc32(contents[name]):08x}: the file is corrupt or "
                                 "from another save")
    meta_path = os.path.join(directory, CONVERTED_CONFIG)
    try:
        meta = json.loads(contents[CONVERTED_CONFIG])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{meta_path} is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != _FORMAT_VERSION:
        raise ValueError(f"{meta_path}: expected an object with format_version {_FORMAT_VERSION}, "
                         f"found {json.dumps(meta)[:100]}")
    return meta, manifest


def read_converted_meta(directory: str) -> dict[str, Any]:
    """The metadata of a converted model (``samoyeds_config.json``: format version, config,
    sparse fields, conversion settings), after checking the manifest (format, file sizes,
    checksums of all but the weights); FileNotFoundError / ValueError naming the file."""
    return _read_converted(directory)[0]


def _stored_layouts(meta: Mapping[str, Any], entries: Mapping[str, Any], meta_path: str,
                    manifest_path: str, weights_path: str) -> dict[str, Any]:
    """Every stored parameter as the manifest and metadata describe it: a ShapeDtypeStruct,
    or a sparse-format value of them."""

    def spec(key: str) -> jax.ShapeDtypeStruct:
        entry = entries[key]
        try:
            if not isinstance(entry["bytes"], int) or not isinstance(entry["crc32"], int):
                raise TypeError("'bytes' and 'crc32' must be integers")
            return jax.ShapeDtypeStruct(tuple(entry["shape"]), jnp.dtype(entry["dtype"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{manifest_path}: expected shape, dtype, bytes and crc32 for tensor "
                             f"{key!r}, found {entry!r} ({type(err).__name__}: {err})") from None

    out: dict[str, Any] = {}
    fields: set[str] = set()
    for name, info in meta.get("sparse", {}).items():
        stored_classes = {f.classes[0].__name__: f.classes[0] for f in FORMATS.values()
                          if f.classes}
        cls = stored_classes.get(info.get("class"))
        if cls is None:
            raise ValueError(f"{meta_path}: sparse parameter {name} has class "
                             f"{info.get('class')!r}; expected one of {sorted(stored_classes)}")
        arrays = {}
        for field in (f.name for f in dataclasses.fields(cls) if not f.metadata.get("static")):
            key = f"{name}.{field}"
            if key not in entries:
                raise ValueError(f"tensor {key!r} of sparse parameter {name} ({cls.__name__}) is "
                                 f"not listed by {manifest_path}")
            arrays[field] = spec(key)
            fields.add(key)
        try:
            out[name] = cls(**arrays, **info.get("static", {}))
        except (TypeError, ValueError) as err:
            raise ValueError(f"parameter {name} in {weights_path}: its stored fields "
                             f"{ {k: _describe(v) for k, v in arrays.items()} } with "
                             f"{info.get('static')} (from {meta_path}) do not make a "
                             f"{cls.__name__} ({err})") from None
    for key in entries:
        if key not in fields:
            if key in out:
                raise ValueError(f"{manifest_path}: {key!r} is listed both as a tensor and as a "
                                 "sparse parameter")
            out[key] = spec(key)
    return out


def _read_tensor(reader: ShardReader, key: str, entry: Mapping[str, Any], path: str
                 ) -> jax.Array:
    """Tensor ``key`` after checking its shape, dtype, size and crc32 against the manifest."""
    array = reader.get(key, tuple(entry["shape"]))
    if (array.dtype.name, array.nbytes) != (entry["dtype"], entry["bytes"]):
        raise ValueError(f"tensor {key!r} in {path}: expected {entry['dtype']} ({entry['bytes']} "
                         f"bytes) as listed by {CONVERTED_MANIFEST}, found {array.dtype.name} "
                         f"({array.nbytes} bytes)")
    if _crc32(array) != entry["crc32"]:
        raise ValueError(f"tensor {key!r} in {path}: expected crc32 {entry['crc32']:08x} (listed "
                         f"by {CONVERTED_MANIFEST}), found {_crc32(array):08x}: the file is "
                         "corrupt")
    return jnp.asarray(array)


def load_converted(directory: str, *, backend: MoEBackend | None = None
                   ) -> tuple[MoETransformer, ModelConfig]:
    """Load a model written by ``save_converted``: ``(model, config)``.

    ``backend`` overrides the stored expert backend. Every file is checked against the manifest
    (size; crc32 of each tensor and of the small files), and every stored array, sparse-format
    fields included, against the layout the stored config implies (shape, dtype, format and its
    static fields). Raises FileNotFoundError for a missing directory or file and ValueError for
    anything else that does not match, naming the file and tensor, what was expected and what
    was found.
    """
    meta, manifest = _read_converted(directory)
    meta_path = os.path.join(directory, CONVERTED_CONFIG)
    try:
        config = config_from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{meta_path}: the stored config is not a valid ModelConfig "
                         f"({type(err).__name__}: {err})") from None
    if backend is not None:
        config = config.replace(moe=dict(backend=backend))
    model = _abstract_model(config)
    variables = _variables(model)
    weights = os.path.join(directory, CONVERTED_WEIGHTS)
    entries = manifest["files"][CONVERTED_WEIGHTS]["tensors"]
    stored = _stored_layouts(meta, entries, meta_path, os.path.join(directory, CONVERTED_MANIFEST),
                             weights)
    with ShardReader(directory, files=[CONVERTED_WEIGHTS], finite=False) as reader:
        unlisted = sorted(set(reader.keys()) - set(entries))
        absent = sorted(set(entries) - set(reader.keys()))
        if unlisted or absent:
            raise ValueError(f"{weights} does not hold the tensors {CONVERTED_MANIFEST} lists: "
                             f"not listed {unlisted[:3]}, absent {absent[:3]}")
        for path, var in variables.items():
            if not isinstance(var, nnx.Param):
                continue
            name, dense = _dotted(path), var.get_value()
            if name not in stored:
                raise ValueError(f"parameter {name} ({_describe(dense)} dense) is missing from "
                                 f"{weights}")
            expected = _check_layout(config, path, dense, stored.pop(name),
                                     f"{weights} (as listed by {CONVERTED_MANIFEST})")
            if _is_sparse(expected):
                value = type(expected)(**{f: _read_tensor(reader, f"{name}.{f}",
                                                          entries[f"{name}.{f}"], weights)
                                          for f in _array_fields(expected)},
                                       **_static_fields(expected))
            else:
                value = _read_tensor(reader, name, entries[name], weights)
            var.set_value(value)
        if stored:
            raise ValueError(f"{weights} holds tensors the model has no parameter for: "
                             f"{sorted(stored)[:3]}")
    _fill_non_params(variables)
    return model, config


def load_or_convert(checkpoint: str, converted: str, *, expert_format: ExpertFormat | None = None,
                    prune: pruning.PruneConfig | None = None, dtype: Any = None,
                    backend: MoEBackend | None = None, progress: bool | None = None
                    ) -> tuple[MoETransformer, ModelConfig]:
    """Load ``converted`` if it holds a complete conversion, else import ``checkpoint`` and save
    it there.

    An existing conversion must match the requested ``expert_format``, ``prune`` and ``dtype``
    settings (ValueError otherwise), so conversion runs once per setting and directory. A
    ``converted`` directory that ``load_converted`` refuses (an interrupted save, a corrupt or
    truncated file, another format version) is converted again, with a warning saying why.
    Only an absent or empty ``converted`` or a (partial) converted model is written to: any
    other directory is refused with ValueError before converting.
    """
    if backend is not None:
        _check_literal("backend", backend, MoEBackend)
    settings = {"expert_format": expert_format or (prune.format if prune else "dense"),
                "prune": None if prune is None else dataclasses.asdict(prune),
                "dtype": None if dtype is None else jnp.dtype(_as_dtype(dtype)).name}
    if is_converted(converted):
        try:
            stored = read_converted_meta(converted)["conversion"]
        except (FileNotFoundError, ValueError) as err:
            reason = err
        else:
            differs = {k: (stored.get(k), v) for k, v in settings.items() if stored.get(k) != v}
            if differs:
                raise ValueError(f"{converted} holds a conversion with other settings "
                                 f"(stored, requested): {differs}; pick another directory")
            try:
                return load_converted(converted, backend=backend)
            except (FileNotFoundError, ValueError) as err:
                reason = err
        warnings.warn(f"{converted} holds no usable converted model ({reason}); converting "
                      f"{checkpoint} into it again", stacklevel=2)
    else:
        atomic.check_target(converted, _CONVERTED_FILES, "converted model")
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

