"""CoCa: contrastive captioners (Yu et al. 2022), in OpenCLIP's layout.

- image tower: a ViT giving tokens; an attentional pooler turns them into
  ``1 + pooler_queries`` tokens: the first, projected, is the contrastive image embedding,
  the rest are what the decoder cross-attends to;
- unimodal text tower: the causal text transformer; its end-of-text features, projected,
  are the contrastive text embedding;
- multimodal decoder: per layer a causal self-attention block over the text tower's
  per-position features and a cross-attention block over the pooled image tokens, then a
  LayerNorm and a linear head over the vocabulary (next-token logits).

``forward(images, tokens)`` returns the CLIP outputs plus ``"caption_logits"`` and
``"caption_targets"``: next-token logits and the id each one predicts (``PAD_ID``: nothing
to predict, the loss skips it), for the positions up to each caption's end-of-text only.
Nothing after a caption's end-of-text changes an earlier position (causal self-attention;
cross-attention and MLPs are per position), so those positions are not computed: the batch
is cut at its longest caption, and captions of mixed length are packed
(`kiln.models.text.cut_captions`), so the towers, the decoder and the vocabulary head
run on each caption's own tokens: ``[R, V]`` and ``[R]`` then (the ``T`` tokens, then
rows up to `kiln.models.layers.Packing`'s rounded count whose targets are ``PAD_ID``),
else ``[B, n, V]`` and ``[B, n]``.
`generate` captions images greedily or with beam search (eval; no KV cache, so it costs
one decoder pass per generated token, fine for captions of tens of tokens).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kiln.models.config import MAX_LOGIT_SCALE, ModelConfig
from kiln.models.layers import (
    AttentionalPooler,
    CrossAttentionBlock,
    Linear,
    Packing,
    TransformerBlock,
    run_block,
)
from kiln.models.text import TextTransformer, cut_captions
from kiln.models.tokenizer import BOS_ID, EOS_ID, PAD_ID
from kiln.models.vit import VisionTransformer

__all__ = ["CoCa"]


class CoCa(nn.Module):
    """Contrastive + captioning model; see the module docstring."""

    #: Top-level modules per tower, for parameter counts (the rest: the logit scale).
    TOWERS: ClassVar[dict[str, tuple[str, ...]]] = {
        "vision": ("visual", "pooler", "ln_pool", "image_proj"),
        "text": ("text",),
        "decoder": ("text_to_decoder", "self_blocks", "cross_blocks", "ln_decoder", "lm_head"),
    }
    #: Activation checkpointing of the decoder's blocks (`set_activation_checkpointing`).
    recompute_blocks = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.text is None or cfg.decoder is None:
            raise ValueError(f"flavor {cfg.flavor!r}: CoCa needs model.text and model.decoder")
        t, d = cfg.text, cfg.decoder
        self.config = cfg.model_copy()
        self.context_length = t.context_length
        self.visual = VisionTransformer(cfg.vision, None)
        self.pooler = AttentionalPooler(
            d.width, cfg.vision.width, 1 + d.pooler_queries, d.pooler_heads
        )
        self.ln_pool = nn.LayerNorm(d.width)
        self.image_proj = Linear(d.width, cfg.embed_dim, std=d.width**-0.5, bias=False)
        self.text = TextTransformer(t, cfg.embed_dim)
        self.text_to_decoder = (
            Linear(t.width, d.width, std=t.width**-0.5) if t.width != d.width else None
        )
        self.self_blocks = nn.ModuleList(
            TransformerBlock(d.width, d.heads, d.layers, d.mlp_width) for _ in range(d.layers)
        )
        self.cross_blocks = nn.ModuleList(
            CrossAttentionBlock(d.width, d.heads, d.layers, d.width, d.mlp_width)
            for _ in range(d.layers)
        )
        self.ln_decoder = nn.LayerNorm(d.width)
        self.lm_head = Linear(d.width, t.vocab_size, std=d.width**-0.5, bias=False)
        self.logit_scale = nn.Parameter(torch.full((1,), float(cfg.init_logit_scale)))

    # -- towers ----------------------------------------------------------------------------
    def _image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(unit-norm image embedding [B, D], image tokens for the decoder [B, q, width])."""
        pooled = self.pooler(self.visual(images, tokens=True))
        emb = F.normalize(self.image_proj(self.ln_pool(pooled[:, 0])), dim=-1)
        return emb, pooled[:, 1:]

    def _decode(
        self,
        text_features: torch.Tensor,
        image_tokens: torch.Tensor,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        """Next-token logits ``[B, n, V]`` (``[R, V]`` for packed text features)."""
        x = text_features
        if self.text_to_decoder is not None:
            x = self.text_to_decoder(x)
        r = self.recompute_blocks
        packed = {"packing": packing} if packing is not None else {}
        for self_block, cross_block in zip(self.self_blocks, self.cross_blocks, strict=True):
            x = run_block(self_block, x, causal=True, recompute=r, **packed)
            x = run_block(cross_block, x, image_tokens, recompute=r, **packed)
        logits: torch.Tensor = self.lm_head(self.ln_decoder(x))
        return logits

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``images [B, 3, S, S]`` -> unit-norm ``[B, embed_dim]`` (contrastive embedding)."""
        return self._image(images)[0]

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [B, L]`` -> unit-norm ``[B, embed_dim]`` (unimodal text tower)."""
        return F.normalize(self.text(tokens, pooled_only=True)[0], dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        image_embeds, image_tokens = self._image(images)
        tokens, packing = cut_captions(tokens)
        pooled, features = self.text(tokens, packing=packing)
        targets = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], PAD_ID)], dim=1)
        if packing is not None:
            targets = packing.pack(targets)
            targets[packing.tokens :] = PAD_ID  # the rows past the tokens: nothing to predict
        return {
            "image_embeds": image_embeds,
            "text_embeds": F.normalize(pooled, dim=-1),
            "logit_scale": self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE).reshape(()),
            "caption_logits": self._decode(features, image_tokens, packing),
            "caption_targets": targets,
        }

    # -- captioning ------------------------------------------------------------------------
    def _next_logprobs(self, prefix: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        features = self.text(prefix)[1]
        logits = self._decode(features, image_tokens)[:, -1].float()
        logits[:, PAD_ID] = -torch.inf  # never emit padding; BOS only ever starts a row
        logits[:, BOS_ID] = -torch.inf
        return F.log_softmax(logits, dim=-1)

    @torch.no_grad()
    def generate(
        self, images: torch.Tensor, *, max_length: int | None = None, num_beams: int = 1
    ) -> list[list[int]]:
        """Caption token ids per image (``BOS ... EOS``; EOS missing if cut at the length).

        ``num_beams=1`` is greedy decoding; more keeps that many hypotheses per image and
        returns the one with the best mean token log-probability. `max_length` counts the
        ids of a caption, BOS included: the context length by default, and at most.
        """
        if max_length is not None and not 2 <= max_length <= self.context_length:
            raise ValueError(
                f"max_length={max_length} must be between 2 (BOS and one token) and the "
                f"model's context length {self.context_length}"
            )
        length = self.context_length if max_length is None else max_length
        if num_beams < 1:
            raise ValueError(f"num_beams={num_beams} must be at least 1")
        _, image_tokens = self._image(images)
        if num_beams == 1:
            return self._greedy(image_tokens, length)
        return [self._beam(image_tokens[i : i + 1], length, num_beams) for i in range(len(images))]

    def _greedy(self, image_tokens: torch.Tensor, length: int) -> list[list[int]]:
        b = image_tokens.shape[0]
        seq = torch.full((b, 1), BOS_ID, dtype=torch.long, device=image_tokens.device)
        done = torch.zeros(b, dtype=torch.bool, device=image_tokens.device)
        while seq.shape[1] < length and not bool(done.all()):
            nxt = self._next_logprobs(seq, image_tokens).argmax(dim=-1)
            nxt = torch.where(done, torch.full_like(nxt, PAD_ID), nxt)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            done |= nxt == EOS_ID
        return [[int(t) for t in row if t != PAD_ID] for row in seq]

    def _beam(self, image_tokens: torch.Tensor, length: int, beams: int) -> list[int]:
        live: list[tuple[float, list[int]]] = [(0.0, [BOS_ID])]
        finished: list[tuple[float, list[int]]] = []
        while live and len(live[0][1]) < length:
            prefix = torch.tensor([seq for _, seq in live], device=image_tokens.device)
            logp = self._next_logprobs(prefix, image_tokens.expand(len(live), -1, -1))
            top = logp.topk(beams, dim=-1)
            candidates = [
                (score + float(v), [*seq, int(t)])
                for (score, seq), vals, ids in zip(live, top.values, top.indices, strict=True)
                for v, t in zip(vals, ids, strict=True)
            ]
            candidates.sort(key=lambda c: c[0], reverse=True)
            live = []
            for score, seq in candidates[:beams]:
                (finished if seq[-1] == EOS_ID else live).append((score, seq))
        finished.extend(live)
        return max(finished, key=lambda c: c[0] / (len(c[1]) - 1))[1]
