"""Typed model configuration: one nested config per tower, resolved from a named flavor.

A recipe's ``model:`` section names a flavor (`kiln.models.flavors`) and may override any
field of it, at any depth::

    model: {flavor: clip-vit-b-16, vision: {image_size: 160}}

The flavor's fields are the base and the recipe's values are laid over them, so the
validated config is always complete and `model_dump()` re-validates to itself (the
resolved config is what a run records). The flat fields kiln used before flavors
(``image_size``, ``vision_width``, ``text_layers``, ...) are still read: they are mapped
onto the nested form (see `LEGACY_FIELDS`) over the ``clip-tiny`` flavor, which has the
same defaults the flat config had.

This module imports no torch: recipes are read by code that never trains.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from kiln.contracts import StrictModel

__all__ = [
    "ARCHS",
    "BYTE_VOCAB_SIZE",
    "DEFAULT_FLAVOR",
    "LEGACY_FIELDS",
    "MAX_LOGIT_SCALE",
    "ModelConfig",
    "PixelDecoderConfig",
    "TextConfig",
    "TextDecoderConfig",
    "ViTConfig",
]

#: Model families kiln builds; each has its objective of the same name.
ARCHS = ("clip", "siglip", "coca", "mae")
DEFAULT_FLAVOR = "clip-tiny"
#: Ids of kiln's byte tokenizer (3 specials + 256 bytes; `kiln.models.tokenizer.VOCAB_SIZE`).
BYTE_VOCAB_SIZE = 259
#: The temperature ``exp(logit_scale)`` is clamped to at most this, as in CLIP.
MAX_LOGIT_SCALE = 100.0

#: Flat field of the pre-flavor ``model:`` section -> its path in the nested config.
LEGACY_FIELDS: dict[str, tuple[str, ...]] = {
    "image_size": ("vision", "image_size"),
    "patch_size": ("vision", "patch_size"),
    "vision_width": ("vision", "width"),
    "vision_layers": ("vision", "layers"),
    "vision_heads": ("vision", "heads"),
    "text_width": ("text", "width"),
    "text_layers": ("text", "layers"),
    "text_heads": ("text", "heads"),
    "context_length": ("text", "context_length"),
}


def _check_heads(where: str, width: int, heads: int) -> None:
    if width % heads:
        raise ValueError(
            f"{where}.width={width} is not divisible by {where}.heads={heads}: "
            "pick a head count that divides the width"
        )


class ViTConfig(StrictModel):
    """A Vision Transformer image tower (OpenCLIP's ``vision_cfg``)."""

    image_size: int = Field(default=224, ge=8, description="input side, pixels")
    patch_size: int = Field(default=16, ge=1, description="patch side, pixels (divides image_size)")
    width: int = Field(default=768, ge=8, description="token width")
    layers: int = Field(default=12, ge=1, description="transformer blocks")
    heads: int = Field(default=12, ge=1, description="attention heads (divide width)")
    mlp_ratio: float = Field(default=4.0, gt=0, description="MLP hidden width / width")

    @property
    def mlp_width(self) -> int:
        """Hidden width of each block's MLP (``int(width * mlp_ratio)``, as OpenCLIP)."""
        return int(self.width * self.mlp_ratio)

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @model_validator(mode="after")
    def _check(self) -> ViTConfig:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"model.vision.image_size={self.image_size} is not a multiple of "
                f"model.vision.patch_size={self.patch_size}: pick sizes that divide"
            )
        _check_heads("model.vision", self.width, self.heads)
        return self


class TextConfig(StrictModel):
    """A causal text transformer tower (OpenCLIP's ``text_cfg``).

    `tokenizer` says which token ids the tower expects: ``byte`` is kiln's offline UTF-8
    byte tokenizer (`kiln.models.tokenizer`, 259 ids); ``clip-bpe`` is OpenAI CLIP's
    49,408-token BPE, which the standard flavors are sized for (their published parameter
    counts include its embedding table). kiln ships no BPE vocabulary (it runs offline):
    to train a standard flavor here, set ``model.text.tokenizer: byte`` (its ids fit any
    ``vocab_size >= 259``) and optionally ``model.text.vocab_size: 259``.
    """

    vocab_size: int = Field(default=49408, ge=4, description="token embedding rows")
    context_length: int = Field(
        default=77, ge=4, description="tokens per caption (longer ones are cut)"
    )
    width: int = Field(default=512, ge=8, description="token width")
    layers: int = Field(default=12, ge=1, description="transformer blocks")
    heads: int = Field(default=8, ge=1, description="attention heads (divide width)")
    mlp_ratio: float = Field(default=4.0, gt=0, description="MLP hidden width / width")
    tokenizer: Literal["byte", "clip-bpe"] = Field(
        default="clip-bpe",
        description="token ids the tower expects: byte (kiln's offline UTF-8 tokenizer, 259 "
        "ids) or clip-bpe (OpenAI CLIP's BPE, which kiln does not ship)",
    )

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)

    @model_validator(mode="after")
    def _check(self) -> TextConfig:
        _check_heads("model.text", self.width, self.heads)
        if self.tokenizer == "byte" and self.vocab_size < BYTE_VOCAB_SIZE:
            raise ValueError(
                f"model.text.vocab_size={self.vocab_size} is too small for the byte "
                f"tokenizer's {BYTE_VOCAB_SIZE} ids: set it to at least {BYTE_VOCAB_SIZE}"
            )
        return self


class TextDecoderConfig(StrictModel):
    """CoCa's multimodal text decoder and the attentional pooler feeding it.

    The pooler turns the image tower's tokens into ``1 + pooler_queries`` tokens: the first
    is the contrastive image embedding, the others are what the decoder cross-attends to.
    """

    width: int = Field(default=512, ge=8, description="token width")
    layers: int = Field(default=12, ge=1, description="decoder blocks")
    heads: int = Field(default=8, ge=1, description="attention heads (divide width)")
    mlp_ratio: float = Field(default=4.0, gt=0, description="MLP hidden width / width")
    pooler_queries: int = Field(
        default=256, ge=1, description="image tokens the pooler gives the decoder"
    )
    pooler_heads: int = Field(default=8, ge=1, description="the pooler's attention heads")

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)

    @model_validator(mode="after")
    def _check(self) -> TextDecoderConfig:
        _check_heads("model.decoder", self.width, self.heads)
        if self.width % self.pooler_heads:
            raise ValueError(
                f"model.decoder.width={self.width} is not divisible by "
                f"model.decoder.pooler_heads={self.pooler_heads}: pick a head count that divides it"
            )
        return self


class PixelDecoderConfig(StrictModel):
    """MAE's light decoder (over all patches) and the share of patches masked."""

    width: int = Field(default=512, ge=8, description="token width")
    layers: int = Field(default=8, ge=1, description="decoder blocks")
    heads: int = Field(default=16, ge=1, description="attention heads (divide width)")
    mlp_ratio: float = Field(default=4.0, gt=0, description="MLP hidden width / width")
    mask_ratio: float = Field(
        default=0.75, gt=0, lt=1, description="share of patches hidden from the encoder"
    )

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)

    @model_validator(mode="after")
    def _check(self) -> PixelDecoderConfig:
        _check_heads("model.pixel_decoder", self.width, self.heads)
        return self


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _from_legacy(data: dict[str, Any]) -> dict[str, Any]:
    """Map the flat pre-flavor fields onto the nested form (other keys pass through)."""
    out = {k: v for k, v in data.items() if k not in LEGACY_FIELDS}
    for key, path in LEGACY_FIELDS.items():
        if key not in data:
            continue
        section = out.get(path[0], {})
        if not isinstance(section, dict):
            raise ValueError(
                f"model.{key} (old flat form) cannot be combined with model.{path[0]}="
                f"{section!r}: write it as model.{'.'.join(path)}"
            )
        out[path[0]] = {**section, path[1]: data[key]}
    return out


class ModelConfig(StrictModel):
    """A model: its flavor name, family (`arch`) and one config per tower.

    Which sections a family uses: ``clip``/``siglip``: vision + text; ``coca``: vision +
    text + decoder; ``mae``: vision + pixel_decoder (no text).
    """

    flavor: str = Field(default=DEFAULT_FLAVOR, description="named size, see `kiln model list`")
    arch: Literal["clip", "siglip", "coca", "mae"] = Field(
        default="clip", description="model family (and default objective)"
    )
    vision: ViTConfig = Field(default_factory=ViTConfig, description="the image tower")
    text: TextConfig | None = Field(default=None, description="the text tower (clip, siglip, coca)")
    decoder: TextDecoderConfig | None = Field(
        default=None, description="coca: the multimodal text decoder and pooler"
    )
    pixel_decoder: PixelDecoderConfig | None = Field(
        default=None, description="mae: the pixel decoder and mask ratio"
    )
    embed_dim: int = Field(default=512, ge=8, description="shared image-text space")
    init_logit_scale: float = Field(
        default=2.6593, description="CLIP: log(1/0.07) = 2.6593; SigLIP: log(10)"
    )
    init_logit_bias: float = Field(default=-10.0, description="SigLIP only: the paper's -10")
    activation_checkpointing: bool = Field(
        default=False,
        description="recompute each transformer block's activations in the backward pass "
        "instead of keeping them: far less memory at large batch or resolution, about one "
        "more forward pass of compute; the same numbers",
    )

    @model_validator(mode="before")
    @classmethod
    def _resolve_flavor(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        from kiln.models.flavors import flavor_fields

        data = _from_legacy(data)
        base = flavor_fields(data.get("flavor", DEFAULT_FLAVOR))
        merged = _deep_merge(base, data)
        merged["flavor"] = base["flavor"]  # an alias resolves to the real name
        return merged

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        needs = {
            "clip": ("text",),
            "siglip": ("text",),
            "coca": ("text", "decoder"),
            "mae": ("pixel_decoder",),
        }[self.arch]
        for section in needs:
            if getattr(self, section) is None:
                raise ValueError(
                    f"model.arch={self.arch!r} needs a model.{section} section: use a "
                    f"{self.arch} flavor (model.flavor) or add model.{section}"
                )
        for section in ("text", "decoder", "pixel_decoder"):
            if section not in needs and getattr(self, section) is not None:
                raise ValueError(
                    f"model.arch={self.arch!r} has no model.{section}: remove it (flavor "
                    f"{self.flavor!r})"
                )
        if self.arch in ("clip", "coca") and self.init_logit_scale > math.log(MAX_LOGIT_SCALE):
            raise ValueError(
                f"model.init_logit_scale={self.init_logit_scale} exceeds log("
                f"{MAX_LOGIT_SCALE:g}) = {math.log(MAX_LOGIT_SCALE):.4f}, where the "
                "temperature is clamped: lower it"
            )
        return self

    @property
    def needs_text(self) -> bool:
        """True when the model reads captions (everything but MAE)."""
        return self.text is not None

    @property
    def image_size(self) -> int:
        """The image tower's input size (shortcut for ``vision.image_size``)."""
        return self.vision.image_size

    @property
    def context_length(self) -> int:
        """Tokens per caption, 0 for image-only models."""
        return self.text.context_length if self.text is not None else 0
