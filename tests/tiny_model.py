"""A tiny randomly initialised BERT wrapped as a SentenceTransformer: loads offline, trains in milliseconds. It lives
on conftest's ``DEVICE`` (CUDA where there is one), and :func:`on_device` moves tokenized features next to it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from conftest import DEVICE

WORDS = (
    "the a an is was of to in on for with and or not it this that he she they we you sun rain car road house "
    "work office store weather outside today nice sunny drove took walked went city river tree book read write "
    "good bad fast slow big small red blue green cat dog bird fish apple bread water coffee tea music film game"
).split()


def make_tiny_sentence_transformer(path: Path, seed: int = 0, dropout: float = 0.1, hidden: int = 32):
    """Save a 2-layer BERT (hidden ``hidden``) with a WordPiece vocab of ~70 words to ``path`` and load it on
    ``DEVICE``."""
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=64, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    BertModel(config).save_pretrained(path)
    return SentenceTransformer(str(path), device=str(DEVICE))


def on_device(feature: dict[str, Any], device: torch.device | str = DEVICE) -> dict[str, Any]:
    """Tokenized ``feature`` (``model.preprocess``'s CPU tensors) with its tensors moved to ``device``."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in feature.items()}


def sentences(n: int, seed: int, length: int = 6) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (n, length), generator=gen)
    return [" ".join(WORDS[i] for i in row) for row in idx.tolist()]
