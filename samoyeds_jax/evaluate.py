"""Language-model evaluation: bits per byte and perplexity on token streams.

A token stream (``ids [n]`` with ``nbytes [n]``, the UTF-8 bytes each token stands for, e.g.
from ``samoyeds_jax.bpe_tokenizer.token_bytes``) is cut into non-overlapping windows of
``seq_len + 1`` tokens; consecutive windows share one boundary token::

    ids       t0 t1 t2 t3 t4 t5 t6 t7 t8      (n = 9, seq_len = 4)
    window 0  t0 t1 t2 t3 t4                  inputs t0..t3, predicts t1..t4
    window 1              t4 t5 t6 t7 t8      inputs t4..t7, predicts t5..t8

Every token but the stream's first (context only) is predicted exactly once, from the tokens
before it in its window (at most ``seq_len``; each window starts with a fresh context). A
short tail window is right-padded and its padding masked: attention is causal and every token
is routed on its own, so padding never changes a real token's logits. Windows never cross
streams (documents). Batches of ``batch_size`` windows run through one jit-compiled forward
(the last batch is filled up with fully masked windows, so all batches share one compile).

Per window the summed negative log-likelihood (nats) of its predicted tokens and their bytes
are kept; the totals give

    bits_per_byte  = sum(nats) / ln 2 / sum(bytes)
    bits_per_token = sum(nats) / ln 2 / sum(tokens)
    perplexity     = exp(sum(nats) / sum(tokens))          (per token)

and the per-window values give paired comparisons of two models on the same windows
(``paired_difference``). Models with different tokenizers compare on bits per byte (the
bytes differ only by those of each stream's first token, which is context only); per-token
numbers depend on the tokenizer.

Cutting streams into windows lives in ``samoyeds_jax.eval_windows``; pre-gate recall on the
same windows in ``samoyeds_jax.pregate_eval``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.checks import expect_kind, expect_positive_ints
from samoyeds_jax.eval_windows import Stream, _make_windows, _Windows

__all__ = [
    "EvalConfig",
    "EvalResult",
    "evaluate_streams",
    "evaluate_texts",
    "evaluate_tokens",
    "paired_difference",
    "text_streams",
]

_LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """How a stream is cut and batched.

    Attributes:
      seq_len: tokens predicted per window (the context grows from 1 to seq_len within it).
        Streams shorter than ``seq_len + 1`` tokens get windows of their own length.
      batch_size: windows per jitted forward ([batch_size, seq_len] tokens).
      max_windows: keep only the first this many windows (in stream order); None: all.
    """

    seq_len: int = 256
    batch_size: int = 8
    max_windows: int | None = None

    def __post_init__(self) -> None:
        expect_positive_ints("EvalConfig", seq_len=self.seq_len, batch_size=self.batch_size)
        w = self.max_windows
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise ValueError(f"EvalConfig: max_windows must be None or a positive int, got {w!r}")


# ----------------------------------------------------------------------------- scoring


def window_nats(logits: jax.Array, targets: jax.Array, valid: jax.Array) -> jax.Array:
    """Summed NLL (nats) of each window's valid predictions: logits [b, L, v] float32,
    targets [b, L] int32, valid [b, L] bool -> [b] float32."""
    logz = jax.nn.logsumexp(logits, axis=-1)  # [b, L]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [b, L]
    return jnp.sum(jnp.where(valid, logz - picked, 0.0), axis=-1)


def _window_nll(graphdef, state, inputs, targets, valid):
    """Summed NLL (nats) of each window: inputs/targets [b, L] int32, valid [b, L] -> [b] f32."""
    logits, _ = nnx.merge(graphdef, state)(inputs)  # [b, L, v] float32
    return window_nats(logits, targets, valid)


# The graph is static and the weights an argument: one executable per model structure and
# batch shape, shared by every evaluation of models with that structure.
_window_nll_jit = jax.jit(_window_nll, static_argnums=0)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class EvalResult:
    """Scores of one model on a set of windows.

    Attributes:
      seq_len: positions per window (``EvalConfig.seq_len``, or less for short streams).
      window_nats: [w] float64 summed negative log-likelihood (nats) of each window's predictions.
      window_tokens: [w] int64 predicted tokens per window.
      window_bytes: [w] int64 bytes of those tokens.
      digest: fingerprint of the windows (tokens, masks, bytes); equal for the same windows.
    """

    seq_len: int
    window_nats: np.ndarray
    window_tokens: np.ndarray
    window_bytes: np.ndarray
    digest: str

    @property
    def window_bits(self) -> np.ndarray:
        """[w] float64 bits of each window."""
        return self.window_nats / _LN2

    @property
    def windows(self) -> int:
        return int(self.window_nats.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.window_tokens.sum())

    @property
    def bytes(self) -> int:
        return int(self.window_bytes.sum())

    @property
    def nats(self) -> float:
        return float(self.window_nats.sum())

    @property
    def bits_per_byte(self) -> float:
        """Total bits / total bytes (inf when the predicted tokens hold no bytes)."""
        bits = self.nats / _LN2
        return bits / self.bytes if self.bytes else math.inf

    @property
    def bits_per_token(self) -> float:
        return self.nats / _LN2 / self.tokens

    @property
    def perplexity(self) -> float:
        """exp(mean NLL per token)."""
        return math.exp(self.nats / self.tokens)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary plus the per-window arrays (for paired comparisons later)."""
        return {
            "bits_per_byte": self.bits_per_byte, "bits_per_token": self.bits_per_token,
            "perplexity": self.perplexity, "tokens": self.tokens, "bytes": self.bytes,
            "windows": self.windows, "seq_len": self.seq_len, "digest": self.digest,
            "window_nats": self.window_nats.tolist(),
            "window_tokens": self.window_tokens.tolist(),
            "window_bytes": self.window_bytes.tolist(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvalResult:
        """Inverse of ``as_dict`` (e.g. to compare two saved runs with ``paired_difference``).
        ValueError naming the missing keys when ``d`` lacks the per-window arrays."""
        expect_kind("EvalResult.from_dict's argument", d, Mapping, "a mapping (as_dict()'s output)")
        missing = [k for k in ("seq_len", "digest", "window_nats", "window_tokens",
                               "window_bytes") if k not in d]
        if missing:
            raise ValueError(f"EvalResult.from_dict: missing keys {missing} (given keys "
                             f"{sorted(d)}); it expects the output of EvalResult.as_dict(), with "
                             "the per-window arrays")
        return cls(seq_len=int(d["seq_len"]), digest=str(d["digest"]),
                   window_nats=np.asarray(d["window_nats"], np.float64),
                   window_tokens=np.asarray(d["window_tokens"], np.int64),
                   window_bytes=np.asarray(d["window_bytes"], np.int64))


def evaluate_streams(model: nnx.Module, streams: Mapping[str, Stream], *,
                     config: EvalConfig = EvalConfig()) -> EvalResult:
    """Score named token streams (documents; windows never cross them) with ``model``.

    Args:
      model: a ``MoETransformer`` (anything with ``model(tokens [b, t]) -> (logits [b, t, v], _)``
        and ``model.config.vocab_size``).
      streams: name -> ``(ids [n] int, nbytes [n] int)``; each needs n >= 2.
      config: window length, batch size, window limit.
    Returns:
      ``EvalResult`` over all windows (in stream order, cut at ``config.max_windows``).
    Raises:
      TypeError: ``streams`` not a mapping of ``(ids, nbytes)`` pairs, ``config`` not an
        ``EvalConfig``.
      ValueError: a stream with fewer than 2 tokens, ids outside [0, vocab_size), mismatched
        shapes, predicted tokens holding 0 bytes, or a non-finite loss (naming the window, its
        stream and token range).
    """
    _expect_model(model)
    windows = checked_windows(streams, config, int(model.config.vocab_size))
    graphdef, state = nnx.split(model)
    # Dispatch every batch before reading any result back, so the device never waits on the
    # host (outputs are [batch_size] floats each).
    pending = [(lo, _window_nll_jit(graphdef, state, jnp.asarray(inputs), jnp.asarray(targets),
                                    jnp.asarray(valid)))
               for lo, inputs, targets, valid in windows.batches(config.batch_size)]
    return scored(windows, pending)


def checked_windows(streams: Mapping[str, Stream], config: EvalConfig, vocab_size: int
                    ) -> _Windows:
    """The windows ``evaluate_streams`` scores (same checks and errors, before any compute)."""
    windows = _make_windows(streams, config, vocab_size)
    stream_bytes: dict[str, int] = {}  # checked before any compute: bits per byte needs bytes
    for name, b in zip(windows.names, windows.nbytes.tolist()):
        stream_bytes[name] = stream_bytes.get(name, 0) + b
    for name, b in stream_bytes.items():
        if not b:
            raise ValueError(f"stream {name!r}: its predicted tokens hold 0 bytes (nbytes after "
                             "the first token sums to 0), so bits per byte is undefined; nbytes "
                             "must give the UTF-8 bytes each token stands for")
    return windows


def scored(windows: _Windows, pending: list[tuple[int, jax.Array]]) -> EvalResult:
    """The ``EvalResult`` of ``windows`` from ``(first window, nats [>= batch windows])`` per
    batch (``window_nats``), in order; ValueError naming the first window with a non-finite
    loss."""
    nats = np.zeros(windows.count, np.float64)
    for (lo, out), hi in zip(pending, [lo for lo, _ in pending[1:]] + [windows.count]):
        out = np.asarray(out, np.float64)
        bad = np.flatnonzero(~np.isfinite(out[:hi - lo]))
        if bad.size:
            w = lo + int(bad[0])
            raise ValueError(f"non-finite loss {out[bad[0]]} in {windows.describe(w)}: the model "
                             "produced NaN/Inf logits (overflow in its dtype or bad weights?)")
        nats[lo:hi] = out[:hi - lo]
    return EvalResult(seq_len=windows.seq_len, window_nats=nats,
                      window_tokens=windows.valid.sum(axis=1).astype(np.int64),
                      window_bytes=windows.nbytes, digest=windows.digest())


def evaluate_tokens(model: nnx.Module, ids: Any, nbytes: Any, *,
                    config: EvalConfig = EvalConfig()) -> EvalResult:
    """``evaluate_streams`` of one stream: ids [n] int, nbytes [n] int (n >= 2)."""
    return evaluate_streams(model, {"tokens": (ids, nbytes)}, config=config)


def _check_tokenizer(tokenizer: Any, vocab_size: int) -> None:
    if not hasattr(tokenizer, "get_vocab_size"):
        hint = (f" ({tokenizer!r} looks like a path)" if isinstance(tokenizer, (str, os.PathLike))
                else "")
        raise TypeError(f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}"
                        f"{hint}; load one with samoyeds_jax.load_tokenizer(model_directory) or "
                        "tokenizers.Tokenizer.from_file(path)")
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise ValueError(f"the tokenizer's vocabulary has {size} tokens but the model's "
                         f"vocab_size is {vocab_size}: they do not belong together")


def text_streams(tokenizer: Any, texts: Mapping[str, str], *, vocab_size: int
                 ) -> dict[str, Stream]:
    """Tokenize ``texts`` (name -> text) into streams with exact byte counts
    (``samoyeds_jax.bpe_tokenizer.token_bytes``), after checking that the tokenizer (a
    ``tokenizers.Tokenizer``) fits a model of ``vocab_size``. Raises ValueError naming both
    sizes when it does not, and naming the text when one has fewer than 2 tokens."""
    expect_kind("texts", texts, Mapping, "a mapping name -> text (e.g. {'doc': text})")
    _check_tokenizer(tokenizer, vocab_size)
    from samoyeds_jax.bpe_tokenizer import token_bytes

    streams = {}
    for name, text in texts.items():
        ids, nbytes = token_bytes(tokenizer, text)
        if len(ids) < 2:
            raise ValueError(f"text {name!r} ({len(text.encode())} bytes) gives {len(ids)} "
                             "token(s); at least 2 are needed (the first is context only)")
        streams[name] = (ids, nbytes)
    return streams


def evaluate_texts(model: nnx.Module, tokenizer: Any, texts: Mapping[str, str], *,
                   config: EvalConfig = EvalConfig()) -> EvalResult:
    """Tokenize ``texts`` (``text_streams``) and score them (``evaluate_streams``)."""
    streams = text_streams(tokenizer, texts, vocab_size=int(model.config.vocab_size))
    return evaluate_streams(model, streams, config=config)


def _expect_model(model: Any) -> None:
    """TypeError unless ``model`` is an ``nnx.Module`` with a model ``config`` (a
    ``MoETransformer`` or a compressed one)."""
    if not (isinstance(model, nnx.Module) and hasattr(model, "config")):
        raise TypeError(f"model must be a MoETransformer, got {type(model).__name__}")


def paired_difference(a: EvalResult, b: EvalResult) -> dict[str, float]:
    """Bits/byte of ``a`` minus bits/byte of ``b`` on the same windows, with a standard error.

    The difference is the ratio estimator ``D = sum_w d_w / sum_w n_w`` with ``d_w = bits_a[w] -
    bits_b[w]`` and ``n_w`` the bytes of window w, i.e. exactly ``a.bits_per_byte -
    b.bits_per_byte``. Its standard error treats windows as the sampling units and linearizes
    the ratio (delta method): with residuals ``r_w = d_w - D * n_w`` over W windows,

        SE(D) = sqrt(W / (W - 1) * sum_w r_w^2) / sum_w n_w

    Windows are assumed independent; neighbouring windows of one document are not quite, so
    read it as a guide. It is 0 when every window's difference is the same multiple of its
    bytes, and nan for a single window.

    Returns:
      dict with ``difference``, ``standard_error``, ``bits_per_byte_a``, ``bits_per_byte_b``,
      ``windows``, ``bytes``.
    Raises:
      ValueError: the results are not on the same windows.
    """
    expect_kind("a", a, EvalResult, "an EvalResult")
    expect_kind("b", b, EvalResult, "an EvalResult")
    if (a.digest != b.digest or a.windows != b.windows
            or not np.array_equal(a.window_bytes, b.window_bytes)
            or not np.array_equal(a.window_tokens, b.window_tokens)):
        raise ValueError(
            f"paired_difference needs both results on the same windows; got {a.windows} windows "
            f"(digest {a.digest}, {a.bytes} bytes) and {b.windows} windows (digest {b.digest}, "
            f"{b.bytes} bytes): evaluate both on the same text with the same seq_len and "
            "max_windows")
    n = a.window_bytes.astype(np.float64)
    total = n.sum()
    if total <= 0:
        raise ValueError("paired_difference: the windows hold no bytes")
    d = a.window_bits - b.window_bits
    diff = float(d.sum() / total)
    w = a.windows
    if w > 1:
        r = d - diff * n
        se = float(math.sqrt(w / (w - 1) * float(np.sum(r * r))) / total)
    else:
        se = math.nan
    return {"difference": diff, "standard_error": se, "bits_per_byte_a": a.bits_per_byte,
            "bits_per_byte_b": b.bits_per_byte, "windows": w, "bytes": int(total)}
