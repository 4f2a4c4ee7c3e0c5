"""samoyeds-jax: memory-lean, fast Mixture-of-Experts inference in JAX (Flax NNX modules).

The drop-in layer is ``MoE`` (config ``MoEConfig``); the model is ``MoETransformer``
(config ``ModelConfig``, from a Hugging Face ``config.json``); generation is ``Generator``.
"""

from samoyeds_jax.checkpoints import load_model, load_or_convert, load_tokenizer
from samoyeds_jax.compress import calibrate_and_prune, recover, to_compressed
from samoyeds_jax.config import MoEConfig, SparsityConfig
from samoyeds_jax.converted_io import load_converted, save_converted
from samoyeds_jax.evaluate import (EvalConfig, EvalResult, evaluate_streams, evaluate_texts,
                                   evaluate_tokens, paired_difference)
from samoyeds_jax.expert_cache import ExpertCache
from samoyeds_jax.expert_store import ExpertStore
from samoyeds_jax.generate import GenerationResult, Generator, SamplingConfig, sample
from samoyeds_jax.hf_export import config_to_hf, save_hf_checkpoint
from samoyeds_jax.hf_import import load_hf_checkpoint
from samoyeds_jax.generate_offload import OffloadGenerationResult, OffloadGenerator
from samoyeds_jax.layers import Attention, AttentionConfig, RMSNorm, apply_rope
from samoyeds_jax.model import KVCache, ModelConfig, MoETransformer, RouterLogits
from samoyeds_jax.moe import MoE, PreGatedRouter, Router, SharedExperts, moe_linen
from samoyeds_jax.offload import BlockScheduler, OffloadConfig
from samoyeds_jax.parallel import ExpertParallel, make_expert_mesh, use_expert_parallel
from samoyeds_jax.pregate import PregateTrainConfig, train_pregates
from samoyeds_jax.pregate_eval import PregateRecall, pregate_recall
from samoyeds_jax.prune_report import PruneReport
from samoyeds_jax.prune_weights import (magnitude_score, prune_nm, prune_samoyeds,
                                        prune_unstructured, wanda_score)
from samoyeds_jax.pruning import PruneConfig, prune_experts
from samoyeds_jax.routing import Routing, route_logits, topk_recall
from samoyeds_jax.train import TrainConfig
from samoyeds_jax.trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "MoEConfig", "SparsityConfig", "MoE", "Router", "PreGatedRouter", "SharedExperts", "moe_linen",
    "Routing", "route_logits", "topk_recall",
    "PregateTrainConfig", "train_pregates",
    "PruneConfig", "PruneReport", "prune_experts", "prune_nm", "prune_samoyeds",
    "prune_unstructured", "magnitude_score", "wanda_score",
    "Attention", "AttentionConfig", "RMSNorm", "apply_rope",
    "ModelConfig", "MoETransformer", "KVCache", "RouterLogits",
    "TrainConfig", "Trainer",
    "EvalConfig", "EvalResult", "PregateRecall", "evaluate_streams", "evaluate_texts",
    "evaluate_tokens", "paired_difference", "pregate_recall",
    "calibrate_and_prune", "recover", "to_compressed",
    "Generator", "GenerationResult", "SamplingConfig", "sample",
    "OffloadGenerator", "OffloadGenerationResult",
    "ExpertStore", "ExpertCache", "OffloadConfig", "BlockScheduler",
    "ExpertParallel", "make_expert_mesh", "use_expert_parallel",
    "load_hf_checkpoint", "load_converted", "save_converted", "load_or_convert", "load_model",
    "load_tokenizer", "save_hf_checkpoint", "config_to_hf",
]
