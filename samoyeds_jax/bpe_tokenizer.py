"""Byte-level BPE tokenizers for small MoE models, and exact per-token byte counts.

Tokenizers (``train_tokenizer``) are byte-level BPE with no added prefix space, so every
string encodes and decodes back exactly; special tokens ``<unk>`` = 0, ``<s>`` = 1,
``</s>`` = 2 (Mixtral's ids). ``token_bytes`` gives the UTF-8 bytes each token accounts
for, the denominator of bits-per-byte evaluation. ``samoyeds_jax.corpus`` trains them on the
train split of the reference corpus.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from pallas_kernels.checks import expect_ints, expect_kind

if TYPE_CHECKING:
    import tokenizers

__all__ = [
    "SPECIAL_TOKENS",
    "encode_documents",
    "token_bytes",
    "train_tokenizer",
]

# Ids 0, 1, 2 in this order, as in Mixtral's tokenizer.
SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>")


def _tokenizers():
    try:
        import tokenizers  # optional dependency, imported only when needed
    except ImportError as err:
        raise ImportError("samoyeds_jax.bpe_tokenizer needs the 'tokenizers' package "
                          "(pip install tokenizers)") from err
    return tokenizers


def train_tokenizer(texts: Iterable[str], *, vocab_size: int,
                    min_frequency: int = 2) -> tokenizers.Tokenizer:
    """Trains a byte-level BPE tokenizer on ``texts``.

    Every string encodes (the 256 byte symbols are always in the vocabulary) and
    ``decode(encode(s).ids) == s`` exactly; no prefix space is added and no BOS/EOS is inserted
    by ``encode``. Special tokens ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2; as in Mixtral's
    tokenizer, their spellings inside a text encode to these ids (``decode(...,
    skip_special_tokens=False)`` restores them). The same input gives the same tokenizer.

    Args:
      texts: training documents (each one string).
      vocab_size: vocabulary size including the 3 special tokens and 256 byte symbols; the
        result has fewer tokens when no pair reaches ``min_frequency``.
      min_frequency: minimum count of a pair to be merged.

    Raises:
      TypeError: ``texts`` is a single str.
      ValueError: ``vocab_size < 259``, ``min_frequency < 0``, or no non-empty text.
    """
    tk = _tokenizers()
    smallest = 256 + len(SPECIAL_TOKENS)
    expect_ints("train_tokenizer", 0, vocab_size=vocab_size, min_frequency=min_frequency)
    if vocab_size < smallest:
        raise ValueError(f"{vocab_size=} is too small for byte-level BPE: the 256 byte symbols "
                         f"and {len(SPECIAL_TOKENS)} special tokens need at least {smallest}")
    if min_frequency < 0:
        raise ValueError(f"{min_frequency=} must be >= 0")
    docs = _documents(texts)
    for i, doc in enumerate(docs):
        if not isinstance(doc, str):
            raise ValueError(f"texts[{i}] should be a str, got {type(doc).__name__}")
    if not any(docs):
        raise ValueError(f"tokenizer training needs some text; got {len(docs)} documents, "
                         "all empty")
    tokenizer = tk.Tokenizer(tk.models.BPE(unk_token=SPECIAL_TOKENS[0]))
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(docs, trainer=trainer, length=len(docs))
    ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError(f"special tokens {SPECIAL_TOKENS} got ids {ids}, expected 0, 1, 2")
    return tokenizer


def _documents(texts: Iterable[str]) -> list[str]:
    """``texts`` as a list; a single str is refused (it would be read as one-character docs)."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"texts must be a sequence of str (one per document), got "
                        f"{type(texts).__name__}; wrap a single document as [text]")
    return list(texts)


def _expect_tokenizer(tokenizer: object) -> None:
    """TypeError unless ``tokenizer`` looks like a ``tokenizers.Tokenizer`` (duck-typed)."""
    if not (hasattr(tokenizer, "encode") and hasattr(tokenizer, "get_vocab_size")):
        raise TypeError("tokenizer must be a tokenizers.Tokenizer (e.g. from train_tokenizer or "
                        f"load_tokenizer), got {type(tokenizer).__name__}")


def encode_documents(tokenizer: tokenizers.Tokenizer, texts: Iterable[str], *,
                     eos_id: int = 2) -> np.ndarray:
    """Encodes each document and appends ``eos_id`` after it.

    Returns:
      int32 ``[n]``: ``ids(doc0) + [eos_id] + ids(doc1) + [eos_id] + ...`` (``encode`` with the
      tokenizer's defaults, so a tokenizer that adds a BOS adds it to every document).

    Raises:
      TypeError: ``texts`` is a single str.
      ValueError: ``eos_id`` outside the vocabulary.
    """
    _expect_tokenizer(tokenizer)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if not 0 <= eos_id < vocab:
        raise ValueError(f"{eos_id=} is outside the tokenizer's vocabulary of {vocab}")
    docs = _documents(texts)
    if not docs:
        return np.zeros((0,), np.int32)
    encodings = tokenizer.encode_batch(docs)
    out = np.empty((sum(len(e.ids) + 1 for e in encodings),), np.int32)
    start = 0
    for encoding in encodings:
        n = len(encoding.ids)
        out[start:start + n] = encoding.ids
        out[start + n] = eos_id
        start += n + 1
    return out


def token_bytes(tokenizer: tokenizers.Tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of ``text`` and the UTF-8 bytes of ``text`` each token accounts for.

    Every byte of ``text`` is assigned to exactly one token, so
    ``nbytes.sum() == len(text.encode())``. Tokens a post-processor inserts (a BOS, say)
    count 0 bytes.

    - Byte-level tokenizers without a text-changing normalizer (those of ``train_tokenizer``,
      GPT-2 style ones): each token's string spells its bytes, so the count is exact even
      when a multi-byte character is split over two tokens.
    - Any other tokenizer: from the encoding's offsets. A character spanned by several
      tokens goes to the first; text no token spans (whitespace a pre-tokenizer drops) goes to
      the next token, or the last one at the end.

    Returns:
      ``(ids int32 [n], nbytes int32 [n])``, ``ids`` as ``tokenizer.encode(text).ids``.

    Raises:
      ValueError: ``text`` is not empty but yields no token that spans text.
    """
    _expect_tokenizer(tokenizer)
    expect_kind("text", text, str, "a str")
    encoding = tokenizer.encode(text)
    ids = np.asarray(encoding.ids, np.int32).reshape(-1)
    raw = text.encode("utf-8")
    special = np.asarray(encoding.special_tokens_mask, bool).reshape(-1)
    nbytes = _byte_level_counts(encoding.tokens, special, raw)
    if nbytes is None:
        nbytes = _offset_counts(encoding.offsets, special, text, len(raw))
    return ids, nbytes


def _byte_level_alphabet() -> dict[int, int]:
    """Byte-level BPE's byte -> symbol map (as code points): bytes that are printable,
    non-space Latin-1 characters stand for themselves, the other 68 take code points 256 on,
    in byte order, so every symbol is a visible character."""
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    symbols = {b: b for b in printable}
    for i, b in enumerate(b for b in range(256) if b not in symbols):
        symbols[b] = 256 + i
    return symbols


# str.translate table: byte-level symbol -> the Latin-1 character of its byte. Latin-1
# characters that are not symbols map to U+FFFF, which no Latin-1 encode accepts, so a token
# string that is not pure byte-level symbols fails the check in _byte_level_counts.
_SYMBOL_TO_LATIN1 = {**{c: 0xFFFF for c in range(256)},
                     **{symbol: byte for byte, symbol in _byte_level_alphabet().items()}}


def _byte_level_counts(tokens: list[str], special: np.ndarray,
                       raw: bytes) -> np.ndarray | None:
    """Per-token byte counts from byte-level token strings, or None when the non-special
    tokens' strings do not spell exactly ``raw``."""
    pieces = [token for token, s in zip(tokens, special) if not s]
    try:
        spelled = "".join(pieces).translate(_SYMBOL_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:
        return None
    if spelled != raw:
        return None
    counts = np.zeros((len(tokens),), np.int32)
    counts[~special] = [len(piece) for piece in pieces]
    return counts


def _offset_counts(offsets: list[tuple[int, int]], special: np.ndarray, text: str,
                   total: int) -> np.ndarray:
    """Per-token byte counts from character offsets; each byte assigned once (see
    ``token_bytes``)."""
    counts = np.zeros((len(offsets),), np.int32)
    spans = ~special
    if not spans.any():
        if total:
            raise ValueError(f"text of {total} bytes gave no token that spans it "
                             f"({len(offsets)} special tokens only)")
        return counts
    code_points = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    char_bytes = (1 + (code_points >= 0x80) + (code_points >= 0x800)
                  + (code_points >= 0x10000)).astype(np.int64)
    byte_at_char = np.concatenate([[0], np.cumsum(char_bytes)])  # [chars + 1]
    ends = byte_at_char[np.asarray([end for _, end in offsets], np.int64)[spans]]
    # Byte position each token has reached; a token owns the bytes from the previous
    # token's reach to its own, gaps before it included.
    reach = np.maximum.accumulate(ends)
    owned = np.diff(reach, prepend=0)
    owned[-1] += total - reach[-1]  # trailing text no token spans
    counts[spans] = owned
    return counts
