"""Hugging Face checkpoint export: the inverse of ``hf_import.load_hf_checkpoint``.

``save_hf_checkpoint(model, directory)`` writes a directory that transformers'
``AutoModelForCausalLM.from_pretrained`` and ``load_hf_checkpoint`` both read:

- ``config.json`` from ``config_to_hf`` (Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE);
- ``model.safetensors``: every parameter under its Hugging Face name, torch layout (linear
  weights ``[out, in]``), all in one dtype, header metadata ``{"format": "pt"}``;
- ``generation_config.json``: ``bos_token_id``/``eos_token_id`` of the config, then the given
  ``generation_config`` entries (``pad_token_id`` from there also goes into ``config.json``);
- the tokenizer files, when a tokenizer is given, and any ``extra_files``.

Tensor mapping: the table in ``samoyeds_jax.hf_import`` read from right to left. Routed
experts are written one tensor per expert (``...experts.{j}.w1.weight`` [f, d]; the layout on
the Hub, which every transformers version loads), never the fused ``gate_up_proj`` layout;
``lm_head.weight`` is left out when the embeddings are tied. Experts stored in a sparse format
(any value with ``to_dense()``: ``NMSparse``, ``SamoyedsSparse``, ``TiledSparse``, the Hopper
layouts) are written densified, pruned entries as zeros, so the file holds exactly the weights
the model computes with.

Pre-gates (``pregate != "standard"``): block i's ``mlp.pregate.kernel`` [d, e] is written as
``model.layers.{i}.block_sparse_moe.pregate.weight`` [e, d] (Mixtral; ``...mlp.pregate.weight``
for the other families). The tensor is not part of transformers' layout: ``from_pretrained``
skips it with an "unused weights" warning and routes every block with its own gate (standard
routing). ``load_hf_checkpoint`` loads it into the pre-gate when the model is built with
pre-gates and skips it otherwise.

Precision: ``dtype`` (default: the model's ``param_dtype``) is one of float32, bfloat16 and
float16; every tensor is cast to it (round to nearest even). The safetensors file is written
here, tensor by tensor, so host memory holds at most one densified expert stack besides the
model (``safetensors.numpy.save_file`` would need a host copy of every tensor at once).

Replacement is atomic (``samoyeds_jax.atomic``): the files go to a fresh sibling directory
``.{name}.tmp-*``, each file and the directory are fsync'd, then the sibling takes the place of
``directory`` (on Linux in one atomic exchange), so ``directory`` holds the old checkpoint or
the new one, complete; the old copy is deleted last.

Architectures: the config's family (``samoyeds_jax.families``) gives the ``config.json``
fields and every tensor name, the same names the importer reads. A config of architecture
``"tiny"`` (``ModelConfig.tiny``) has Mixtral's layout (no q/k norm, no attention bias,
top-k-then-softmax routing, no shared experts) and is written as ``"mixtral"``;
``ModelConfig.from_hf`` then gives it back with ``architecture="mixtral"``. A config that its
family's ``config.json`` cannot express (e.g. q/k norms on a Mixtral, a shared expert on a
Qwen3-MoE) raises ValueError naming every mismatch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from samoyeds_jax import atomic, families
from samoyeds_jax.param_layout import _abstract_model, _dotted, check_unfused
from samoyeds_jax.families import Family
from samoyeds_jax.model import ModelConfig, MoETransformer

__all__ = ["HF_WEIGHTS", "config_to_hf", "save_hf_checkpoint"]

HF_WEIGHTS = "model.safetensors"
_CONFIG = "config.json"
_GENERATION_CONFIG = "generation_config.json"
_RESERVED = (_CONFIG, HF_WEIGHTS, _GENERATION_CONFIG, "model.safetensors.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
# dtype name -> safetensors header code.
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


# ----------------------------------------------------------------------------- config.json


def _dtype_name(dtype: Any) -> str:
    """"float32" / "bfloat16" / "float16" of a dtype or its name; ValueError otherwise."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in _SAFETENSORS_DTYPES:
        raise ValueError(f"dtype must be one of {tuple(_SAFETENSORS_DTYPES)}, got {dtype!r}")
    return name


def config_to_hf(config: ModelConfig, *, dtype: str | None = None) -> dict[str, Any]:
    """The Hugging Face ``config.json`` dict of ``config``.

    ``ModelConfig.from_hf(config_to_hf(c), expert_format=..., implementation=..., pregate=...)``
    equals ``c`` up to what a ``config.json`` does not hold: the expert storage and compute
    settings (``moe.expert_format``, ``moe.sparsity``, ``moe.implementation``, ``moe.pregate``; the
    arguments of ``from_hf``), ``dtype`` and ``param_dtype`` (both become the written dtype),
    and ``architecture="tiny"``, which comes back as ``"mixtral"``.

    Args:
      config: the model config; architecture a ``model_type`` of ``families.FAMILIES``
        ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe") or an alias of one ("tiny", written as
        "mixtral").
      dtype: the weights' dtype ("float32", "bfloat16", "float16"), written as both
        ``torch_dtype`` (transformers < 5) and ``dtype`` (transformers >= 5); None: the
        config's ``param_dtype``.
    Returns:
      A JSON-ready dict with transformers' field names for the family (``MixtralConfig``,
      ``Qwen2MoeConfig``, ``Qwen3MoeConfig``, ``OlmoeConfig``).
    Raises:
      ValueError: an unknown architecture, a config no family can express (every mismatch is
        named), or an unsupported dtype.
      TypeError: ``config`` not a ``ModelConfig``.
    """
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    family = families.family_of(config.architecture)
    problems = family.inexpressible(config)
    if problems:
        raise ValueError(f"a {family.model_type} config.json cannot express this config "
                         f"(architecture {config.architecture!r}): " + "; ".join(problems))
    dtype_name = _dtype_name(config.param_dtype if dtype is None else dtype)
    return family.config_to_hf(config) | {"torch_dtype": dtype_name, "dtype": dtype_name}


# ----------------------------------------------------------------------------- tensor plan


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Tensor:
    """One tensor of the file: ``source`` (a parameter value, dense array or sparse-format
    pytree), row ``expert`` of its leading e (None: all of it), transposed when ``transpose``
    (a kernel [in, out] written as torch's weight [out, in])."""

    name: str
    source: Any
    expert: int | None = None
    transpose: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(self.source.shape)
        if self.expert is not None:
            shape = shape[1:]
        return shape[::-1] if self.transpose else shape


def _plan(model: MoETransformer, family: Family) -> list[_Tensor]:
    """Every parameter of ``model`` as Hugging Face tensors, in module order.

    Raises ValueError for parameters with no Hugging Face name (e.g. a custom MoE module) or
    whose shapes differ from what ``model.config`` describes.
    """
    expected = {path: tuple(var.get_value().shape)
                for path, var in nnx.iter_graph(_abstract_model(model.config))
                if isinstance(var, nnx.Param)}
    plan: list[_Tensor] = []
    unmapped, misshaped = [], []
    for path, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Param):
            continue
        value = var.get_value()
        want = expected.pop(path, None)
        if want != tuple(value.shape):
            misshaped.append(f"{_dotted(path)} {tuple(value.shape)} (config: {want})")
        # Routed experts: one tensor per expert, the layout every transformers version loads.
        experts = range(value.shape[0]) if families.routed(path) else [None]
        names = [family.tensor_name(path, expert=j) for j in experts]
        if None in names:
            unmapped.append(_dotted(path))
            continue
        plan.extend(_Tensor(name=name, source=value, expert=j, transpose=families.transposed(path))
                    for name, j in zip(names, experts))
    missing = [_dotted(p) for p in expected]
    if unmapped or misshaped or missing:
        raise ValueError(
            f"the model's parameters do not match the {family.model_type} layout of its config: "
            f"no Hugging Face name for {unmapped}, shapes other than the config's (None: not "
            f"in the config's model) {misshaped}, absent {missing}")
    return plan


def _dense(source: Any, dtype: np.dtype) -> np.ndarray:
    """A parameter value as a host array in ``dtype`` (sparse formats expanded, zeros kept)."""
    if hasattr(source, "to_dense"):
        source = source.to_dense()
    return np.asarray(source).astype(dtype, copy=False)


# ----------------------------------------------------------------------------- file writing


def _write_safetensors(path: str, tensors: list[_Tensor], dtype: str,
                       metadata: Mapping[str, str]) -> None:
    """Write ``tensors`` in ``dtype`` as one safetensors file, one tensor in memory at a time.

    The format: an 8-byte little-endian header length, the JSON header (``__metadata__`` and,
    per tensor, dtype code, shape and ``data_offsets`` into the data that follows), padded with
    spaces so the data starts 8-byte aligned, then every tensor's bytes, C order, little endian.
    """
    np_dtype = jnp.dtype(dtype)
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for t in tensors:
        if t.name in header:
            raise AssertionError(f"tensor {t.name!r} planned twice")  # a mapping error
        nbytes = math.prod(t.shape) * np_dtype.itemsize
        header[t.name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    # Bytes go out through an unsigned-int view, whose byte order numpy can fix (bfloat16's
    # cannot be swapped directly); on little-endian hosts this copies nothing.
    word, little = f"u{np_dtype.itemsize}", f"<u{np_dtype.itemsize}"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        cached_source, cached = None, None
        for t in tensors:
            if t.source is not cached_source:  # an expert stack is densified once for its e rows
                cached_source, cached = t.source, _dense(t.source, np_dtype)
            array = cached if t.expert is None else cached[t.expert]
            array = np.ascontiguousarray(array.T if t.transpose else array)
            if array.shape != t.shape:
                raise AssertionError(f"{t.name}: array {array.shape} != planned {t.shape}")
            f.write(array.view(word).astype(little, copy=False).data)
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- small files


def _json_bytes(value: Mapping[str, Any], what: str) -> bytes:
    try:
        return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} is not JSON-serializable ({err})") from None


def _check_name(name: Any, what: str) -> None:
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name
            or name in _RESERVED):
        raise ValueError(f"{what}: expected a plain file name other than {_RESERVED}, "
                         f"got {name!r}")


def _tokenizer_files(tokenizer: str | None) -> dict[str, bytes]:
    """The tokenizer files to copy: a file under its own name, or the known tokenizer files
    (``_TOKENIZER_FILES``) of a directory."""
    if tokenizer is None:
        return {}
    if os.path.isfile(tokenizer):
        paths = {os.path.basename(tokenizer): tokenizer}
    elif os.path.isdir(tokenizer):
        paths = {name: os.path.join(tokenizer, name) for name in _TOKENIZER_FILES
                 if os.path.isfile(os.path.join(tokenizer, name))}
        if not paths:
            raise FileNotFoundError(f"no tokenizer files in {tokenizer}: expected one of "
                                    f"{_TOKENIZER_FILES}")
    else:
        raise FileNotFoundError(f"tokenizer {tokenizer!r} not found: expected a tokenizer file "
                                "(e.g. tokenizer.json) or a directory holding one")
    out = {}
    for name, path in paths.items():
        _check_name(name, f"tokenizer file {path}")
        with open(path, "rb") as f:
            out[name] = f.read()
        if not out[name]:
            raise ValueError(f"tokenizer file {path} is empty")
        if name == "tokenizer.json" or name not in _TOKENIZER_FILES:
            from samoyeds_jax.checkpoints import load_tokenizer  # ValueError naming the file
            load_tokenizer(path)
    return out


def _small_files(config: ModelConfig, hf: dict[str, Any], tokenizer: str | None,
                 generation_config: Mapping[str, Any] | None,
                 extra_files: Mapping[str, bytes | str] | None) -> dict[str, bytes]:
    """Every file but the weights, as bytes (read and checked before anything is written).

    A ``pad_token_id`` of the generation config is also set in ``hf`` (the config.json dict).
    """
    generation = {k: v for k, v in (("bos_token_id", config.bos_token_id),
                                    ("eos_token_id", config.eos_token_id)) if v is not None}
    generation.update(generation_config or {})
    if generation.get("pad_token_id") is not None:
        hf["pad_token_id"] = generation["pad_token_id"]
    files = {_CONFIG: _json_bytes(hf, _CONFIG),
             _GENERATION_CONFIG: _json_bytes(generation, "generation_config")}
    files.update(_tokenizer_files(tokenizer))
    for name, data in (extra_files or {}).items():
        _check_name(name, "extra_files")
        if name in files:
            raise ValueError(f"extra_files: {name!r} is also a tokenizer file")
        if isinstance(data, str):
            data = data.encode()
        if not isinstance(data, bytes):
            raise ValueError(f"extra_files[{name!r}]: expected bytes or str, got "
                             f"{type(data).__name__}")
        files[name] = data
    return files


# ----------------------------------------------------------------------------- export


def save_hf_checkpoint(
    model: MoETransformer,
    directory: str,
    *,
    dtype: Any = None,
    tokenizer: str | None = None,
    generation_config: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, bytes | str] | None = None,
) -> None:
    """Write ``model`` as a Hugging Face checkpoint directory (see the module doc), atomically.

    Args:
      model: a ``MoETransformer`` of a family ``config_to_hf`` can express; experts dense or
        in any sparse format (written densified); pre-gates written as ``...pregate.weight``.
      directory: created, or replaced when it holds a checkpoint (a ``config.json``) or is
        empty; its parent is created if missing.
      dtype: "float32", "bfloat16", "float16" (or the jnp dtype); None: the model's
        ``param_dtype``.
      tokenizer: a tokenizer file (copied under its own name; ``load_tokenizer`` reads
        ``tokenizer.json``) or a directory whose tokenizer files are copied. Empty files, and
        a ``tokenizer.json`` or a file of another name that ``load_tokenizer`` cannot parse,
        raise ValueError before anything is written.
      generation_config: entries written into ``generation_config.json`` over the config's
        ``bos_token_id``/``eos_token_id`` (JSON-serializable; a ``pad_token_id`` there also
        goes into ``config.json``).
      extra_files: more files, plain name -> bytes or str (UTF-8), e.g. a README.md.
    Raises:
      ValueError: a config no family expresses, an unsupported dtype, a model whose parameters
        do not match its config or whose q/k/v ``prepare`` joined, a bad file name or
        content, or a ``directory`` that is a file or a non-empty directory without
        ``config.json``.
      FileNotFoundError: ``tokenizer`` missing.
    """
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise ValueError(f"model must be a MoETransformer (with a ModelConfig), got "
                         f"{type(model).__name__}")
    check_unfused(model, "save_hf_checkpoint")
    dtype_name = _dtype_name(config.param_dtype if dtype is None else dtype)
    hf = config_to_hf(config, dtype=dtype_name)
    tensors = _plan(model, families.family(hf["model_type"]))
    files = _small_files(config, hf, tokenizer, generation_config, extra_files)
    with atomic.replace_directory(directory, markers=(_CONFIG,), what="checkpoint") as staged:
        _write_safetensors(os.path.join(staged, HF_WEIGHTS), tensors, dtype_name,
                           metadata={"format": "pt"})
        for name, data in files.items():
            atomic.write_file(os.path.join(staged, name), data)
