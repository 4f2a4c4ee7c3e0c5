"""Hugging Face model families: one module per family, one registry.

``FAMILIES`` maps a ``config.json`` ``model_type`` to its ``Family`` (``base.py``), which
holds everything family-specific: the ``config.json`` mapping both ways
(``ModelConfig.from_hf`` and ``hf_export.config_to_hf`` call it), what a config of the
family cannot express, and the tensor names that both the importer
(``hf_import.load_hf_checkpoint``) and the exporter (``hf_export.save_hf_checkpoint``) use.
Nothing else branches on the family.

Adding a family is one new file here, a ``Family`` subclass overriding what differs from
the defaults of ``base.py``, plus one line in ``FAMILIES`` below.
"""

from __future__ import annotations

from samoyeds_jax.families.base import Family, need, routed, transposed
from samoyeds_jax.families.mixtral import Mixtral
from samoyeds_jax.families.olmoe import Olmoe
from samoyeds_jax.families.qwen2_moe import Qwen2Moe
from samoyeds_jax.families.qwen3_moe import Qwen3Moe

__all__ = ["FAMILIES", "SUPPORTED_ARCHITECTURES", "Family", "family", "family_of", "need",
           "routed", "transposed"]

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Mixtral(),
    Qwen2Moe(),
    Qwen3Moe(),
    Olmoe(),
)}

# The model_types ModelConfig.from_hf reads (the registry's keys when this module loads).
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)


def family(model_type: str) -> Family:
    """The family of a ``config.json`` ``model_type``; ValueError naming the supported ones."""
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise ValueError(f"unsupported architecture model_type={model_type!r}; "
                         f"expected one of {tuple(FAMILIES)}")
    return FAMILIES[model_type]


def family_of(architecture: str) -> Family:
    """The family a ``ModelConfig.architecture`` is exported as: its own, or the one listing
    it among its ``aliases`` (``"tiny"``: Mixtral); ValueError otherwise."""
    names = {name: f for f in FAMILIES.values() for name in (f.model_type, *f.aliases)}
    found = names.get(architecture)
    if found is None:
        raise ValueError(f"architecture {architecture!r} has no Hugging Face layout here; "
                         f"expected one of {tuple(FAMILIES)} or "
                         + ", ".join(repr(n) for n in names if n not in FAMILIES))
    return found


def check_model_fields(architecture: object, tie_word_embeddings: object) -> None:
    """``ModelConfig`` checks of fields the families read: ``architecture`` a string (any:
    a config may name a family not registered here; exporting it is refused), and
    ``tie_word_embeddings`` a bool."""
    if not isinstance(architecture, str) or not architecture:
        raise ValueError(f"ModelConfig: architecture must be a non-empty str (a model_type), "
                         f"got {architecture!r}")
    if not isinstance(tie_word_embeddings, bool):
        raise ValueError(f"ModelConfig: tie_word_embeddings must be a bool, got "
                         f"{tie_word_embeddings!r}")
