"""Language-model evaluation: bits per byte, perplexity, and pre-gate recall on token streams.

A token stream (``ids [n]`` with ``nbytes [n]``, the UTF-8 bytes each token stands for, e.g.
from ``samoyeds_jax.corpus.token_bytes``) is cut into non-overlapping windows of ``seq_len + 1``
tokens; consecutive windows share one boundary token::

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

``pregate_recall`` runs the same windows with ``return_router_logits=True`` and compares the
top-k experts that block i's pre-gate predicts with those block i+1's own gate picks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from samoyeds_jax.moe import MoE
from samoyeds_jax.routing import topk_mask

__all__ = [
    "EvalConfig",
    "EvalResult",
    "PairRecall",
    "PregateRecall",
    "evaluate_streams",
    "evaluate_texts",
    "evaluate_tokens",
    "has_pregates",
    "paired_difference",
    "pregate_recall",
    "text_streams",
]

_LN2 = math.log(2.0)
_PAD_ID = 0  # any valid id works: padded positions are masked and never seen by real ones

Stream = tuple[Any, Any]
"""``(ids [n] int, nbytes [n] int)``: token ids and the bytes of text each token stands for."""


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
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {self.seq_len!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self.max_windows is not None and (not isinstance(self.max_windows, int)
                                             or self.max_windows < 1):
            raise ValueError(
                f"max_windows must be None or a positive int, got {self.max_windows!r}")


# ----------------------------------------------------------------------------- windows


@dataclasses.dataclass(frozen=True, eq=False)
class _Windows:
    """w windows of L positions, host arrays.

    inputs, targets: [w, L] int32 (target = next token; padding holds ``_PAD_ID``);
    valid: [w, L] bool (a real prediction); nbytes: [w] int64 bytes of the predicted tokens;
    names: [w] stream name of each window; starts: [w] stream offset of each window's first input.
    """

    inputs: np.ndarray
    targets: np.ndarray
    valid: np.ndarray
    nbytes: np.ndarray
    names: tuple[str, ...]
    starts: np.ndarray

    @property
    def count(self) -> int:
        return self.inputs.shape[0]

    @property
    def seq_len(self) -> int:
        return self.inputs.shape[1]

    def describe(self, w: int) -> str:
        """Where window ``w`` lies: its stream and predicted token range."""
        start, stop = int(self.starts[w]), int(self.starts[w]) + int(self.valid[w].sum())
        return f"window {w} (stream {self.names[w]!r}, predicting tokens {start + 1}..{stop})"

    def digest(self) -> str:
        """A fingerprint of the windows' tokens, masks and bytes (equal iff the same windows)."""
        h = hashlib.sha256()
        for a in (self.inputs, self.targets, self.valid, self.nbytes):
            h.update(np.ascontiguousarray(a).tobytes())
            h.update(str(a.shape).encode())
        return h.hexdigest()[:16]

    def batches(self, batch_size: int
                ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """``(first window, inputs, targets, valid)`` of each batch, the last one filled up with
        masked windows so every batch has the shape [batch_size, L]."""
        for lo in range(0, self.count, batch_size):
            hi = min(lo + batch_size, self.count)
            fill = batch_size - (hi - lo)
            pad = ((0, fill), (0, 0))
            yield (lo, np.pad(self.inputs[lo:hi], pad, constant_values=_PAD_ID),
                   np.pad(self.targets[lo:hi], pad, constant_values=_PAD_ID),
                   np.pad(self.valid[lo:hi], pad, constant_values=False))


def _check_stream(name: str, ids: Any, nbytes: Any, vocab_size: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    ids, nbytes = np.asarray(ids), np.asarray(nbytes)
    if ids.ndim != 1 or nbytes.shape != ids.shape:
        raise ValueError(f"stream {name!r}: ids and nbytes must both be [n], got shapes "
                         f"{ids.shape} and {nbytes.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"stream {name!r}: token ids must be integers, got dtype {ids.dtype}")
    if ids.size < 2:
        raise ValueError(f"stream {name!r}: need at least 2 tokens (the first is context only), "
                         f"got {ids.size} token{'' if ids.size == 1 else 's'}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"stream {name!r}: token ids must be in [0, {vocab_size}) for the "
                         f"model's vocab_size={vocab_size}, got ids in [{lo}, {hi}] (a tokenizer "
                         f"with a vocabulary of at least {hi + 1} tokens?)")
    if nbytes.size and (not np.issubdtype(nbytes.dtype, np.integer) or int(nbytes.min()) < 0):
        raise ValueError(f"stream {name!r}: nbytes must be non-negative integers, got dtype "
                         f"{nbytes.dtype} with minimum {nbytes.min()}")
    return ids.astype(np.int32), nbytes.astype(np.int64)


def _make_windows(streams: Mapping[str, Stream], config: EvalConfig, vocab_size: int) -> _Windows:
    """Cut every stream into windows (see the module doc); ValueError for bad streams."""
    if not streams:
        raise ValueError("no token streams to evaluate (got an empty mapping)")
    checked = {name: _check_stream(name, ids, nb, vocab_size)
               for name, (ids, nb) in streams.items()}
    # Short streams only: one window of the longest stream's length instead of seq_len.
    length = min(config.seq_len, max(ids.size - 1 for ids, _ in checked.values()))
    inputs, targets, valid, nbytes, names, starts = [], [], [], [], [], []
    limit = config.max_windows
    for name, (ids, nb) in checked.items():
        n = ids.size
        for start in range(0, n - 1, length):
            if limit is not None and len(names) == limit:
                break
            stop = min(start + length, n - 1)  # inputs ids[start:stop], targets one later
            m = stop - start
            row_in = np.full(length, _PAD_ID, np.int32)
            row_tg = np.full(length, _PAD_ID, np.int32)
            row_in[:m], row_tg[:m] = ids[start:stop], ids[start + 1:stop + 1]
            inputs.append(row_in)
            targets.append(row_tg)
            valid.append(np.arange(length) < m)
            nbytes.append(int(nb[start + 1:stop + 1].sum()))
            names.append(name)
            starts.append(start)
    return _Windows(inputs=np.stack(inputs), targets=np.stack(targets), valid=np.stack(valid),
                    nbytes=np.asarray(nbytes, np.int64), names=tuple(names),
                    starts=np.asarray(starts, np.int64))


# ----------------------------------------------------------------------------- scoring


def _window_nll(graphdef, state, inputs, targets, valid):
    """Summed NLL (nats) of each window: inputs/targets [b, L] int32, valid [b, L] -> [b] f32."""
    model = nnx.merge(graphdef, state)
    logits, _ = model(inputs)  # [b, L, v] float32
    logz = jax.nn.logsumexp(logits, axis=-1)  # [b, L]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [b, L]
    return jnp.sum(jnp.where(valid, logz - picked, 0.0), axis=-1)


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
        """Inverse of ``as_dict`` (e.g. to compare two saved runs with ``paired_difference``)."""
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
      ValueError: a stream with fewer than 2 tokens, ids outside [0, vocab_size), mismatched
        shapes, or a non-finite loss (naming the window, its stream and token range).
    """
    vocab = int(model.config.vocab_size)
    windows = _make_windows(streams, config, vocab)
    graphdef, state = nnx.split(model)
    # Dispatch every batch before reading any result back, so the device never waits on the
    # host (outputs are [batch_size] floats each).
    pending = [(lo, _window_nll_jit(graphdef, state, jnp.asarray(inputs), jnp.asarray(targets),
                                    jnp.asarray(valid)))
               for lo, inputs, targets, valid in windows.batches(config.batch_size)]
    nats = np.zeros(windows.count, np.float64)
    for lo, out in pending:
        out = np.asarray(out, np.float64)
        real = min(config.batch_size, windows.count - lo)
        bad = np.flatnonzero(~np.isfinite(out[:real]))
        if bad.size:
            w = lo + int(bad[0])
            raise ValueError(f"non-finite loss {out[bad[0]]} in {windows.describe(w)}: the model "
                             "produced NaN/Inf logits (overflow in its dtype or bad weights?)")
        nats[lo:lo + real] = out[:real]
    return EvalResult(seq_len=windows.seq_len, window_nats=nats,
                      window_tokens=windows.valid.sum(axis=1).astype(np.int64),
                      window_bytes=windows.nbytes, digest=windows.digest())


def evaluate_tokens(model: nnx.Module, ids: Any, nbytes: Any, *,
                    config: EvalConfig = EvalConfig()) -> EvalResult:
    """``evaluate_streams`` of one stream: ids [n] int, nbytes [n] int (n >= 2)."""
    return evaluate_streams(model, {"tokens": (ids, nbytes)}, config=config)


def _check_tokenizer(tokenizer: Any, vocab_size: int) -> None:
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise ValueError(f"the tokenizer's vocabulary has {size} tokens but the model's "
                         f"vocab_size is {vocab_size}: they do not belong together")


def text_streams(tokenizer: Any, texts: Mapping[str, str], *, vocab_size: int
                 ) -> dict[str, Stream]:
    """Tokenize ``texts`` (name -> text) into streams with exact byte counts
    (``samoyeds_jax.corpus.token_bytes``), after checking that the tokenizer (a
    ``tokenizers.Tokenizer``) fits a model of ``vocab_size``. Raises ValueError naming both
    sizes when it does not, and naming the text when one has fewer than 2 tokens."""
    _check_tokenizer(tokenizer, vocab_size)
    from samoyeds_jax.corpus import token_bytes

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


# ----------------------------------------------------------------------------- pre-gate recall


def has_pregates(model: nnx.Module) -> bool:
    """Whether any MoE block of ``model`` has a pre-gate (``MoEConfig.pregate != "standard"``)."""
    return any(isinstance(m, MoE) and m.pregate is not None for _, m in nnx.iter_modules(model))


def _window_router_counts(graphdef, state, inputs, valid, *, top_k: int, num_experts: int):
    """Per block with a pre-gate: (exact matches [], hits [e], actual [e]) int32 counts over the
    valid positions of inputs [b, L]; None for blocks without one."""
    model = nnx.merge(graphdef, state)
    _, _, router = model(inputs, return_router_logits=True)
    real = valid.reshape(-1)  # [b*L]
    out = []
    for i, pre in enumerate(router.pregate):
        if pre is None or i + 1 >= len(router.gate):
            out.append(None)
            continue
        pred = topk_mask(jax.lax.top_k(pre, top_k)[1], num_experts)  # [b*L, e]
        act = topk_mask(jax.lax.top_k(router.gate[i + 1], top_k)[1], num_experts)  # [b*L, e]
        act = act & real[:, None]
        exact = jnp.all(pred == act, axis=-1) & real
        out.append((jnp.sum(exact, dtype=jnp.int32),
                    jnp.sum(pred & act, axis=0, dtype=jnp.int32),
                    jnp.sum(act, axis=0, dtype=jnp.int32)))
    return tuple(out)


_window_router_counts_jit = jax.jit(_window_router_counts, static_argnums=0,
                                    static_argnames=("top_k", "num_experts"))


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class PairRecall:
    """How well block ``block``'s pre-gate predicted block ``block + 1``'s top-k experts.

    Attributes:
      block: i, the predicting block.
      tokens: positions compared.
      top_k: k of both sets.
      exact: tokens whose predicted top-k set equals the actual one.
      expert_hits: [e] int64, tokens that selected expert j and had it predicted.
      expert_actual: [e] int64, tokens that selected expert j (block i+1's own gate).
    """

    block: int
    tokens: int
    top_k: int
    exact: int
    expert_hits: np.ndarray
    expert_actual: np.ndarray

    @property
    def exact_match(self) -> float:
        """Share of tokens whose whole top-k set was predicted."""
        return self.exact / self.tokens if self.tokens else math.nan

    @property
    def pair_recall(self) -> float:
        """Hit (token, expert) pairs / actual pairs (= precision: both sets have k experts)."""
        actual = int(self.expert_actual.sum())
        return int(self.expert_hits.sum()) / actual if actual else math.nan

    @property
    def expert_recall(self) -> np.ndarray:
        """[e] float64 hits / times selected per expert of block i+1 (nan: never selected)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.expert_actual > 0,
                            self.expert_hits / np.maximum(self.expert_actual, 1), np.nan)

    def as_dict(self) -> dict[str, Any]:
        return {"block": self.block, "next_block": self.block + 1, "tokens": self.tokens,
                "top_k": self.top_k, "exact_match": self.exact_match,
                "pair_recall": self.pair_recall,
                "expert_recall": [None if math.isnan(x) else float(x) for x in self.expert_recall],
                "expert_hits": self.expert_hits.tolist(),
                "expert_actual": self.expert_actual.tolist()}


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class PregateRecall:
    """Pre-gate recall of every block pair (i -> i+1) that has a pre-gate, and overall."""

    pairs: tuple[PairRecall, ...]

    @property
    def tokens(self) -> int:
        """Compared (token, block pair) cases."""
        return sum(p.tokens for p in self.pairs)

    @property
    def exact_match(self) -> float:
        """Exact top-k set matches over all pairs / compared cases."""
        return sum(p.exact for p in self.pairs) / self.tokens if self.tokens else math.nan

    @property
    def pair_recall(self) -> float:
        """Hit (token, expert) pairs / actual pairs, over all block pairs."""
        actual = sum(int(p.expert_actual.sum()) for p in self.pairs)
        hits = sum(int(p.expert_hits.sum()) for p in self.pairs)
        return hits / actual if actual else math.nan

    def as_dict(self) -> dict[str, Any]:
        return {"exact_match": self.exact_match, "pair_recall": self.pair_recall,
                "tokens": self.tokens, "pairs": [p.as_dict() for p in self.pairs]}


def pregate_recall(model: nnx.Module, tokens: Any, *, config: EvalConfig = EvalConfig()
                   ) -> PregateRecall:
    """Compare each pre-gate's top-k prediction with the next block's own gate, token by token.

    The model runs the windows of ``tokens`` (as ``evaluate_streams`` cuts them: every
    position that is an input of a window counts once; padding never does) with
    ``return_router_logits=True``. For block i with a pre-gate, the predicted set is the top-k
    of its pre-gate logits and the actual set the top-k of block i+1's own gate logits on
    block i+1's input. In ``"pregated"`` mode block i+1 computes with the predicted set,
    which changes the hidden states after it; the comparison is always with what block i+1's
    own gate would pick on its input.

    Args:
      model: a ``MoETransformer`` with pre-gates (``pregate`` "pregated" or "speculative").
      tokens: ids [n] int, or a mapping name -> ids [n] (several documents).
      config: windows and batching, as for scoring.
    Returns:
      ``PregateRecall`` with one ``PairRecall`` per block pair.
    Raises:
      ValueError: the model has no pre-gates, or bad token input (as ``evaluate_streams``).
    """
    if not has_pregates(model):
        raise ValueError("pregate_recall needs a model with pre-gates (MoEConfig.pregate "
                         f"'pregated' or 'speculative'); this one has pregate="
                         f"{model.config.moe.pregate!r} and no pre-gate modules")
    if isinstance(tokens, Mapping):
        streams = {name: (ids, np.zeros(np.shape(ids), np.int64)) for name, ids in tokens.items()}
    else:
        streams = {"tokens": (tokens, np.zeros(np.shape(tokens), np.int64))}
    windows = _make_windows(streams, config, int(model.config.vocab_size))
    moe = model.config.moe
    graphdef, state = nnx.split(model)
    pending = [_window_router_counts_jit(graphdef, state, jnp.asarray(inputs), jnp.asarray(valid),
                                         top_k=moe.top_k, num_experts=moe.num_experts)
               for _, inputs, _, valid in windows.batches(config.batch_size)]
    totals: list[list[np.ndarray] | None] | None = None
    for out in jax.device_get(pending):
        if totals is None:
            totals = [None if c is None else [np.zeros(np.shape(x), np.int64) for x in c]
                      for c in out]
        for acc, c in zip(totals, out):
            if c is not None:
                for x, y in zip(acc, c):
                    x += np.asarray(y, np.int64)
    compared = int(windows.valid.sum())
    pairs = tuple(PairRecall(block=i, tokens=compared, top_k=moe.top_k, exact=int(c[0]),
                             expert_hits=c[1], expert_actual=c[2])
                  for i, c in enumerate(totals) if c is not None)
    if not pairs:
        raise ValueError("pregate_recall: the forward returned no pre-gate logits for any block "
                         "pair (is the only pre-gate on the last block?)")
    return PregateRecall(pairs=pairs)
