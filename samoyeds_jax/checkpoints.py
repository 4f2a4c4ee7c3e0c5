"""Loading a model for use: ``load_model`` (a converted model or a Hugging Face checkpoint),
``load_or_convert`` (convert a checkpoint once, then load the conversion) and ``load_tokenizer``.

The pieces live in ``samoyeds_jax.hf_import`` (Hugging Face safetensors import, expert
conversion), ``samoyeds_jax.converted_io`` (the converted-model directory with its manifest)
and ``samoyeds_jax.param_layout`` (parameter layouts both check against).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

import jax.numpy as jnp

from samoyeds_jax import atomic, converted_io, hf_import, pruning
from pallas_kernels.expert_op import check_implementation
from samoyeds_jax.config import ExpertFormat, ExpertImplementation
from samoyeds_jax.model import ModelConfig, MoETransformer

__all__ = ["load_model", "load_or_convert", "load_tokenizer"]


def load_or_convert(checkpoint: str, converted: str, *, expert_format: ExpertFormat | None = None,
                    prune: pruning.PruneConfig | None = None, dtype: Any = None,
                    implementation: ExpertImplementation = None,
                    progress: bool | None = None, experts_memory: str = "device"
                    ) -> tuple[MoETransformer, ModelConfig]:
    """Load ``converted`` if it holds a complete conversion, else import ``checkpoint`` and save
    it there.

    An existing conversion must match the requested ``expert_format``, ``prune`` and ``dtype``
    settings (ValueError otherwise), so conversion runs once per setting and directory. A
    ``converted`` directory that ``load_converted`` refuses (an interrupted save, a corrupt or
    truncated file, another format version) is converted again, with a warning saying why.
    Only an absent or empty ``converted`` or a (partial) converted model is written to: any
    other directory is refused with ValueError before converting. ``experts_memory``: as in
    ``load_model``.
    """
    check_implementation(implementation)
    pruning.expect_config("prune", prune, optional=True)
    checkpoint = atomic.check_path(checkpoint, "checkpoint")
    converted = atomic.check_path(converted, "converted")
    settings = {"expert_format": expert_format or (prune.format if prune else "dense"),
                "prune": None if prune is None else dataclasses.asdict(prune),
                "dtype": None if dtype is None else jnp.dtype(hf_import._as_dtype(dtype)).name}
    if converted_io.is_converted(converted):
        try:
            stored = converted_io.read_converted_meta(converted)["conversion"]
        except (FileNotFoundError, ValueError) as err:
            reason = err
        else:
            differs = {k: (stored.get(k), v) for k, v in settings.items() if stored.get(k) != v}
            if differs:
                raise ValueError(f"{converted} holds a conversion with other settings "
                                 f"(stored, requested): {differs}; pick another directory")
            try:
                return converted_io.load_converted(converted, implementation=implementation,
                                                   experts_memory=experts_memory)
            except (FileNotFoundError, ValueError) as err:
                reason = err
        warnings.warn(f"{converted} holds no usable converted model ({reason}); converting "
                      f"{checkpoint} into it again", stacklevel=2)
    else:
        atomic.check_target(converted, converted_io._CONVERTED_FILES, "converted model")
    model, config = hf_import.load_hf_checkpoint(checkpoint, dtype=dtype,
                                                 expert_format=expert_format, prune=prune,
                                                 implementation=implementation,
                                                 progress=progress, experts_memory=experts_memory)
    converted_io.save_converted(model, converted, source=checkpoint, conversion=settings)
    return model, config


def load_model(directory: str, *, expert_format: ExpertFormat | None = None,
               implementation: ExpertImplementation = None, dtype: Any = None,
               prune: pruning.PruneConfig | None = None, progress: bool | None = None,
               experts_memory: str = "device") -> MoETransformer:
    """The model in ``directory``: a converted model (``is_converted``) or a Hugging Face
    checkpoint. For a converted one, ``expert_format``/``dtype`` must match what is stored (or
    be None). ``experts_memory``: "device", or "pinned_host" for ``OffloadGenerator``."""
    directory = atomic.check_path(directory, "directory")
    if converted_io.is_converted(directory):
        model, config = converted_io.load_converted(directory, implementation=implementation,
                                                    experts_memory=experts_memory)
        fmt = config.moe.expert_format
        if expert_format is not None and expert_format != fmt:
            raise ValueError(f"{directory} stores {fmt!r} experts; requested {expert_format!r} "
                             "(convert the original checkpoint again for another format)")
        requested = None if dtype is None else jnp.dtype(hf_import._as_dtype(dtype))
        if requested is not None and requested != jnp.dtype(config.param_dtype):
            raise ValueError(f"{directory} stores {jnp.dtype(config.param_dtype).name} weights; "
                             f"requested {requested.name}")
        return model
    model, _ = hf_import.load_hf_checkpoint(directory, dtype=dtype, expert_format=expert_format,
                                            prune=prune, implementation=implementation,
                                            progress=progress, experts_memory=experts_memory)
    return model


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer(directory: str):
    """``tokenizers.Tokenizer`` from ``directory/tokenizer.json`` (or from ``directory`` itself
    when it is a tokenizer file), or None.

    None when the directory has no tokenizer.json, or (with a warning) when the ``tokenizers``
    package is not installed: callers then work with token ids. A missing ``directory`` raises
    FileNotFoundError; a tokenizer file that does not parse raises ValueError naming it.
    """
    if os.path.isfile(directory):
        path = directory
    elif not os.path.isdir(directory):
        raise FileNotFoundError(f"tokenizer directory {directory!r} does not exist (expected a "
                                "model directory holding tokenizer.json, or the file itself)")
    else:
        path = os.path.join(directory, "tokenizer.json")
        if os.path.isdir(path):
            raise IsADirectoryError(f"{path} is a directory; expected the tokenizer.json file")
        if not os.path.isfile(path):
            return None
    try:
        from tokenizers import Tokenizer  # optional dependency, imported only when needed
    except ImportError:
        warnings.warn(f"{path} found but the 'tokenizers' package is not installed "
                      "(pip install tokenizers); using token ids", stacklevel=2)
        return None
    try:
        return Tokenizer.from_file(path)
    except Exception as err:  # tokenizers raises a bare Exception for any parse error
        raise ValueError(f"{path} is not a valid tokenizer.json (tokenizers could not parse it: "
                         f"{err})") from None
