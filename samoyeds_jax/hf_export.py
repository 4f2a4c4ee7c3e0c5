"""Hugging Face checkpoint export: the inverse of ``checkpoints.load_hf_checkpoint``.

``save_hf_checkpoint(model, directory)`` writes a directory that transformers'
``AutoModelForCausalLM.from_pretrained`` and ``load_hf_checkpoint`` both read:

- ``config.json`` from ``config_to_hf`` (Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE);
- ``model.safetensors``: every parameter under its Hugging Face name, torch layout (linear
  weights ``[out, in]``), all in one dtype, header metadata ``{"format": "pt"}``;
- ``generation_config.json``: ``bos_token_id``/``eos_token_id`` of the config, then the given
  ``generation_config`` entries (``pad_token_id`` from there also goes into ``config.json``);
- the tokenizer files, when a tokenizer is given, and any ``extra_files``.

Tensor mapping: the table in ``samoyeds_jax.checkpoints`` read from right to left. Routed
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

Architectures: a config of architecture ``"tiny"`` (``ModelConfig.tiny``) has Mixtral's
layout (no q/k norm, no attention bias, top-k-then-softmax routing, no shared experts) and is
written as ``"mixtral"``; ``ModelConfig.from_hf`` then gives it back with
``architecture="mixtral"``. A config that no family's ``config.json`` can express (e.g. q/k
norms on a Mixtral, a shared expert on a Qwen3-MoE) raises ValueError naming every mismatch.
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

from samoyeds_jax import atomic
from samoyeds_jax.checkpoints import _abstract_model, _dotted, _moe_names
from samoyeds_jax.model import SUPPORTED_ARCHITECTURES, ModelConfig, MoETransformer

__all__ = ["HF_WEIGHTS", "config_to_hf", "save_hf_checkpoint"]

HF_WEIGHTS = "model.safetensors"
_CONFIG = "config.json"
_GENERATION_CONFIG = "generation_config.json"
_RESERVED = (_CONFIG, HF_WEIGHTS, _GENERATION_CONFIG, "model.safetensors.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
# dtype name -> safetensors header code.
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_CAUSAL_LM = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
              "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}
# The q/k norm each family's attention has (``ModelConfig.from_hf`` sets it by family).
_QK_NORM = {"mixtral": "none", "qwen2_moe": "none", "qwen3_moe": "per_head", "olmoe": "full"}


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


def _inexpressible(config: ModelConfig, arch: str) -> list[str]:
    """Every way ``config`` differs from what a ``config.json`` of family ``arch`` can say."""
    a, m = config.attention, config.moe
    problems = []
    if a.norm_eps != config.norm_eps:
        problems.append(f"attention.norm_eps={a.norm_eps} != norm_eps={config.norm_eps} "
                        "(one rms_norm_eps serves both)")
    if a.qk_norm != _QK_NORM[arch]:
        problems.append(f"attention.qk_norm={a.qk_norm!r} (the family has {_QK_NORM[arch]!r})")
    if a.qkv_bias and arch != "qwen2_moe":
        # Mixtral has no attention bias; Qwen3-MoE's and OLMoE's attention_bias adds an
        # o_proj bias as well, which this model does not have.
        problems.append("attention.qkv_bias=True (only qwen2_moe has q/k/v biases alone)")
    if arch in ("qwen2_moe", "olmoe") and a.num_heads * a.head_dim != a.d_model:
        problems.append(f"head_dim={a.head_dim} != d_model / num_heads = "
                        f"{a.d_model}/{a.num_heads} (the family derives head_dim)")
    if arch == "olmoe" and a.sliding_window is not None:
        problems.append(f"attention.sliding_window={a.sliding_window} (OLMoE has none)")
    if arch == "mixtral" and m.router_norm != "topk_softmax":
        problems.append(f"moe.router_norm={m.router_norm!r} (Mixtral routes 'topk_softmax')")
    if arch == "qwen2_moe":
        if m.num_shared_experts > 1 or (m.num_shared_experts and m.shared_gate != "sigmoid"):
            problems.append(f"moe.num_shared_experts={m.num_shared_experts}, "
                            f"shared_gate={m.shared_gate!r} (Qwen2-MoE has at most one shared "
                            "expert, with a sigmoid gate)")
    elif m.num_shared_experts:
        problems.append(f"moe.num_shared_experts={m.num_shared_experts} (the family has none)")
    return problems


def config_to_hf(config: ModelConfig, *, dtype: str | None = None) -> dict[str, Any]:
    """The Hugging Face ``config.json`` dict of ``config``.

    ``ModelConfig.from_hf(config_to_hf(c), expert_format=..., backend=..., pregate=...)``
    equals ``c`` up to what a ``config.json`` does not hold: the expert storage and compute
    settings (``moe.expert_format``, ``moe.sparsity``, ``moe.backend``, ``moe.pregate``; the
    arguments of ``from_hf``), ``dtype`` and ``param_dtype`` (both become the written dtype),
    and ``architecture="tiny"``, which comes back as ``"mixtral"``.

    Args:
      config: the model config; architecture "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", or
        "tiny" (written as "mixtral").
      dtype: the weights' dtype ("float32", "bfloat16", "float16"), written as both
        ``torch_dtype`` (transformers < 5) and ``dtype`` (transformers >= 5); None: the
        config's ``param_dtype``.
    Returns:
      A JSON-ready dict with transformers' field names for the family (``MixtralConfig``,
      ``Qwen2MoeConfig``, ``Qwen3MoeConfig``, ``OlmoeConfig``).
    Raises:
      ValueError: an unknown architecture, a config no family can express (every mismatch is
        named), or an unsupported dtype.
    """
    arch = "mixtral" if config.architecture == "tiny" else config.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"architecture {config.architecture!r} has no Hugging Face layout here; "
                         f"expected one of {SUPPORTED_ARCHITECTURES} or 'tiny'")
    problems = _inexpressible(config, arch)
    if problems:
        raise ValueError(f"a {arch} config.json cannot express this config (architecture "
                         f"{config.architecture!r}): " + "; ".join(problems))
    dtype_name = _dtype_name(config.param_dtype if dtype is None else dtype)
    a, m = config.attention, config.moe
    theta = float(a.rope_theta)
    hf: dict[str, Any] = {
        "architectures": [_CAUSAL_LM[arch]],
        "model_type": arch,
        "vocab_size": config.vocab_size,
        "hidden_size": a.d_model,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": a.num_heads,
        "num_key_value_heads": a.num_kv_heads,
        "head_dim": a.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.norm_eps,
        # transformers < 5 reads rope_theta, later versions rope_parameters.
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "num_experts_per_tok": m.top_k,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "output_router_logits": False,
        "use_cache": True,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }
    window = a.sliding_window
    if arch == "mixtral":
        hf.update(intermediate_size=m.d_ff, num_local_experts=m.num_experts,
                  sliding_window=window, router_jitter_noise=0.0)
        return hf
    hf.update(num_experts=m.num_experts, norm_topk_prob=m.router_norm == "topk_softmax")
    if arch == "olmoe":
        hf.update(intermediate_size=m.d_ff, attention_bias=False, clip_qkv=None)
        return hf
    # Qwen2-MoE / Qwen3-MoE: every layer is a MoE layer; the window (if any) applies to the
    # layers from max_window_layers on, so 0 puts it on all of them.
    hf.update(moe_intermediate_size=m.d_ff, intermediate_size=m.d_ff, decoder_sparse_step=1,
              mlp_only_layers=[], use_sliding_window=window is not None, sliding_window=window,
              max_window_layers=0 if window is not None else config.num_layers)
    if arch == "qwen2_moe":
        hf.update(qkv_bias=a.qkv_bias, shared_expert_intermediate_size=m.shared_width)
    else:
        hf.update(attention_bias=False)
    return hf


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


def _plan(model: MoETransformer, arch: str) -> list[_Tensor]:
    """Every parameter of ``model`` as Hugging Face tensors, in module order.

    Raises ValueError for parameters with no Hugging Face name (e.g. a custom MoE module) or
    whose shapes differ from what ``model.config`` describes.
    """
    moe, (gate, up, down) = _moe_names(arch)
    experts = {"w1": gate, "w3": up, "w2": down}
    shared = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
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
        layer = f"model.layers.{path[1]}" if path[0] == "layers" else ""
        match path:
            case ("embed_tokens", "embedding"):
                plan.append(_Tensor(name="model.embed_tokens.weight", source=value))
            case ("norm", "scale"):
                plan.append(_Tensor(name="model.norm.weight", source=value))
            case ("lm_head", "kernel"):
                plan.append(_Tensor(name="lm_head.weight", source=value, transpose=True))
            case ("layers", int(), "input_layernorm" | "post_attention_layernorm" as norm, "scale"):
                plan.append(_Tensor(name=f"{layer}.{norm}.weight", source=value))
            case ("layers", int(), "self_attn", "q_proj" | "k_proj" | "v_proj" | "o_proj" as proj,
                  "kernel"):
                plan.append(_Tensor(name=f"{layer}.self_attn.{proj}.weight", source=value,
                                    transpose=True))
            case ("layers", int(), "self_attn", "q_proj" | "k_proj" | "v_proj" as proj, "bias"):
                plan.append(_Tensor(name=f"{layer}.self_attn.{proj}.bias", source=value))
            case ("layers", int(), "self_attn", "q_norm" | "k_norm" as norm, "scale"):
                plan.append(_Tensor(name=f"{layer}.self_attn.{norm}.weight", source=value))
            case ("layers", int(), "mlp", "gate" | "pregate" as router, "kernel"):
                plan.append(_Tensor(name=f"{layer}.{moe}.{router}.weight", source=value,
                                    transpose=True))
            case ("layers", int(), "mlp", "w1" | "w3" | "w2" as w):
                plan.extend(_Tensor(name=f"{layer}.{moe}.experts.{j}.{experts[w]}.weight",
                                    source=value, expert=j, transpose=True)
                            for j in range(value.shape[0]))
            case ("layers", int(), "mlp", "shared", "w1" | "w3" | "w2" as w):
                plan.append(_Tensor(name=f"{layer}.mlp.shared_expert.{shared[w]}.weight",
                                    source=value, transpose=True))
            case ("layers", int(), "mlp", "shared", "gate_kernel"):
                plan.append(_Tensor(name=f"{layer}.mlp.shared_expert_gate.weight", source=value,
                                    transpose=True))
            case _:
                unmapped.append(_dotted(path))
    missing = [_dotted(p) for p in expected]
    if unmapped or misshaped or missing:
        raise ValueError(
            f"the model's parameters do not match the {arch} layout of its config: "
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
        ``tokenizer.json``) or a directory whose tokenizer files are copied.
      generation_config: entries written into ``generation_config.json`` over the config's
        ``bos_token_id``/``eos_token_id`` (JSON-serializable; a ``pad_token_id`` there also
        goes into ``config.json``).
      extra_files: more files, plain name -> bytes or str (UTF-8), e.g. a README.md.
    Raises:
      ValueError: a config no family expresses, an unsupported dtype, a model whose parameters
        do not match its config, a bad file name or content, or a ``directory`` that is a file
        or a non-empty directory without ``config.json``.
      FileNotFoundError: ``tokenizer`` missing.
    """
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise ValueError(f"model must be a MoETransformer (with a ModelConfig), got "
                         f"{type(model).__name__}")
    dtype_name = _dtype_name(config.param_dtype if dtype is None else dtype)
    hf = config_to_hf(config, dtype=dtype_name)
    tensors = _plan(model, hf["model_type"])
    files = _small_files(config, hf, tokenizer, generation_config, extra_files)
    with atomic.replace_directory(directory, markers=(_CONFIG,), what="checkpoint") as staged:
        _write_safetensors(os.path.join(staged, HF_WEIGHTS), tensors, dtype_name,
                           metadata={"format": "pt"})
        for name, data in files.items():
            atomic.write_file(os.path.join(staged, name), data)
