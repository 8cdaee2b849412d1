"""Byte-level tokenizer for the CLIP text tower.

Why bytes rather than CLIP's BPE: kiln runs where nothing can be downloaded, so a
vocabulary file is not an option, and a tokenizer learnt from the training data would make
token ids depend on the dataset (a checkpoint could not be evaluated on another set). UTF-8
bytes need no vocabulary, cover every language and emoji with no unknown token, and are a
pure function of the text, so the same string gives the same ids on every machine, worker
and rank. The price is longer sequences (one token per byte), which is fine for alt-text
captions at the small context lengths kiln trains with.

Ids: ``PAD_ID = 0`` (after the end of a text), ``BOS_ID = 1``, ``EOS_ID = 2``, then byte
``b`` is ``b + BYTE_OFFSET``. A row is ``BOS, bytes..., EOS, PAD...``; text too long for
the context is cut, and the last slot is always ``EOS`` so the text tower can read its
features at the end-of-text position. Cutting may split a multi-byte UTF-8 character; the
model sees the bytes that fit, which is harmless (``decode`` replaces the broken tail).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["BOS_ID", "BYTE_OFFSET", "EOS_ID", "PAD_ID", "VOCAB_SIZE", "decode", "tokenize"]

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
BYTE_OFFSET = 3
#: 3 special ids + 256 byte values.
VOCAB_SIZE = BYTE_OFFSET + 256


def tokenize(texts: Sequence[str] | str, context_length: int) -> torch.Tensor:
    """Token ids of `texts` as a ``LongTensor [len(texts), context_length]``.

    A single string is treated as one text (a batch of one). Every row starts with BOS and
    holds EOS at its last non-pad position, even when the text had to be truncated.
    """
    if context_length < 2:
        raise ValueError(
            f"context_length={context_length} leaves no room for BOS and EOS: use at least 2"
        )
    if isinstance(texts, str):
        texts = [texts]
    out = np.zeros((len(texts), context_length), dtype=np.int64)  # PAD_ID == 0
    out[:, 0] = BOS_ID
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(
                f"tokenize: texts[{row}] is {type(text).__name__}, not str: "
                "replace missing captions with '' before tokenizing"
            )
        body = np.frombuffer(text.encode("utf-8")[: context_length - 2], dtype=np.uint8)
        out[row, 1 : 1 + len(body)] = body
        out[row, 1 : 1 + len(body)] += BYTE_OFFSET
        out[row, 1 + len(body)] = EOS_ID
    return torch.from_numpy(out)


def decode(tokens: torch.Tensor | Sequence[int]) -> str:
    """The text of one row of token ids (special ids dropped); for logs and debugging."""
    ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
    data = bytes(i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < VOCAB_SIZE)
    return data.decode("utf-8", errors="replace")
