"""The byte tokenizer and the CLIP towers: shapes, normalization, masking, init, counts."""

from __future__ import annotations

import math

import pytest
import torch

import kiln.models.text as text_module
from kiln.models import CLIP, MAX_LOGIT_SCALE
from kiln.models.build import build_model, count_parameters
from kiln.models.config import ModelConfig
from kiln.models.layers import Attention, Packing, packed_rows
from kiln.models.text import PACK_MIN_PADDING, worth_packing
from kiln.models.tokenizer import (
    BOS_ID,
    BYTE_OFFSET,
    EOS_ID,
    PAD_ID,
    VOCAB_SIZE,
    decode,
    tokenize,
)
from tests.helpers_training import clip_loss_of

SMALL = ModelConfig(
    image_size=16,
    patch_size=4,
    vision_width=32,
    vision_layers=2,
    vision_heads=4,
    text_width=32,
    text_layers=2,
    text_heads=2,
    context_length=16,
    embed_dim=24,
)


def _model(cfg: ModelConfig = SMALL, seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    return build_model(cfg).eval()


# --------------------------------------------------------------------------- tokenizer


def test_tokenize_layout_and_bytes() -> None:
    out = tokenize(["ab", "é"], context_length=8)
    assert out.dtype == torch.long and out.shape == (2, 8)
    a, b = BYTE_OFFSET + ord("a"), BYTE_OFFSET + ord("b")
    assert out[0].tolist() == [BOS_ID, a, b, EOS_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID]
    # "é" is two UTF-8 bytes, 0xC3 0xA9.
    assert out[1, :4].tolist() == [BOS_ID, 0xC3 + BYTE_OFFSET, 0xA9 + BYTE_OFFSET, EOS_ID]
    assert VOCAB_SIZE == 259 and int(out.max()) < VOCAB_SIZE


def test_tokenize_empty_text_is_bos_eos() -> None:
    out = tokenize([""], context_length=4)
    assert out.tolist() == [[BOS_ID, EOS_ID, PAD_ID, PAD_ID]]


def test_tokenize_truncation_keeps_eos() -> None:
    out = tokenize(["abcdefghij"], context_length=5)
    assert out.tolist() == [[BOS_ID, *(BYTE_OFFSET + ord(c) for c in "abc"), EOS_ID]]


def test_tokenize_non_ascii_round_trip_and_determinism() -> None:
    texts = ["naïve café 東京 🙂", "Ünïcödé"]
    first, second = tokenize(texts, 64), tokenize(list(texts), 64)
    assert torch.equal(first, second)
    assert [decode(row) for row in first] == texts


def test_tokenize_single_string_and_bad_input() -> None:
    assert torch.equal(tokenize("hi", 6), tokenize(["hi"], 6))
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tokenize(["ok", None], 8)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="context_length=1"):
        tokenize(["x"], 1)


# --------------------------------------------------------------------------- models


def test_encoders_shapes_and_unit_norm() -> None:
    model = _model()
    images = torch.randn(3, 3, 16, 16)
    tokens = tokenize(["a red dot", "", "blue"], SMALL.context_length)
    with torch.no_grad():
        out = model(images, tokens)
    img, txt, scale = out["image_embeds"], out["text_embeds"], out["logit_scale"]
    assert img.shape == (3, 24) and txt.shape == (3, 24)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    assert scale.ndim == 0
    assert math.isclose(scale.item(), math.exp(SMALL.init_logit_scale), rel_tol=1e-6)
    assert not torch.allclose(img[0], img[1])


def test_logit_scale_clamped_at_100() -> None:
    model = _model()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
        out = model(torch.zeros(1, 3, 16, 16), tokenize(["x"], SMALL.context_length))
    scale = out["logit_scale"]
    assert scale.item() == MAX_LOGIT_SCALE
    with pytest.raises(ValueError, match="init_logit_scale"):
        ModelConfig.model_validate({**SMALL.model_dump(), "init_logit_scale": 5.0})


def test_text_features_ignore_padding_and_later_text() -> None:
    """Causal mask + read-out at EOS: what follows EOS (padding) never changes the features."""
    model = _model()
    short = tokenize(["red"], SMALL.context_length)
    cut = short[:, :5]  # BOS r e d EOS, no padding at all
    with torch.no_grad():
        full = model.encode_text(short)
        trimmed = model.encode_text(cut)
    torch.testing.assert_close(full, trimmed, rtol=1e-5, atol=1e-6)
    # And a later token does influence it: a different text gives different features.
    with torch.no_grad():
        other = model.encode_text(tokenize(["reds"], SMALL.context_length))
    assert not torch.allclose(full, other, atol=1e-4)


def test_text_causal_prefix_independence() -> None:
    """Changing a token after position t leaves hidden states at <= t unchanged."""
    model = _model()
    a = tokenize(["abcdef"], SMALL.context_length)
    b = a.clone()
    b[0, 5] = BYTE_OFFSET + ord("z")
    tower = model.text
    with torch.no_grad():
        ha = tower.transformer(tower.token_embedding(a) + tower.positional_embedding, causal=True)
        hb = tower.transformer(tower.token_embedding(b) + tower.positional_embedding, causal=True)
    torch.testing.assert_close(ha[:, :5], hb[:, :5], rtol=0, atol=1e-6)
    assert not torch.allclose(ha[:, 5:], hb[:, 5:], atol=1e-4)


def test_batch_independence_in_eval() -> None:
    model = _model()
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        batched = model.encode_image(images)
        single = torch.cat([model.encode_image(images[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)


def test_init_is_a_function_of_the_seed() -> None:
    a, b, c = _model(seed=3), _model(seed=3), _model(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["visual.patch_embed.weight"], sc["visual.patch_embed.weight"])


def test_parameter_count_matches_architecture() -> None:
    """Every parameter is registered up front, and the tiny flavor has a pinned size (the
    published sizes of the standard flavors are pinned in test_flavors.py)."""
    cfg = ModelConfig()  # the default recipe's model (flavor clip-tiny)
    model = build_model(cfg)
    count = sum(p.numel() for p in model.parameters())
    assert count == 241_601
    assert count_parameters(cfg)["total"] == count  # built on the meta device
    names_before = [n for n, _ in model.named_parameters()]
    model(torch.zeros(1, 3, 32, 32), tokenize(["x"], cfg.context_length))
    assert [n for n, _ in model.named_parameters()] == names_before


def test_no_dropout_training_is_bitwise_reproducible() -> None:
    def run() -> list[torch.Tensor]:
        model = _model(seed=1).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(4, 3, 16, 16, generator=gen)
        tokens = tokenize(["red", "green", "blue", "black"], SMALL.context_length)
        for _ in range(2):
            opt.zero_grad()
            clip_loss_of(model(images, tokens)).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    first, second = run(), run()
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))


def test_wrong_input_shapes_name_the_fix() -> None:
    model = _model()
    with pytest.raises(ValueError, match="image_size=16"):
        model.encode_image(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="context_length=16"):
        model.encode_text(torch.ones(1, 20, dtype=torch.long))


@pytest.mark.parametrize("arch", ["clip", "siglip", "coca", "mae"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(arch: str) -> None:
    """Recomputing each block in the backward pass changes memory, not numbers: the same
    outputs and, bitwise, the same gradients (CPU fp32)."""
    from kiln.models.build import build_model
    from kiln.models.config import ModelConfig
    from kiln.models.layers import TransformerBlock
    from tests.helpers_training import tiny_flavor

    flavor = tiny_flavor(arch)
    flavor["vision"] = {**flavor["vision"], "layers": 2}
    size = flavor["vision"]["image_size"]
    g = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, size, size, generator=g)
    second = (
        torch.arange(4, dtype=torch.int64)
        if arch == "mae"
        else torch.randint(3, 200, (4, flavor["text"]["context_length"]), generator=g)
    )
    if arch != "mae":  # captions of mixed length (CLIP's and SigLIP's text towers pack them)
        ctx = flavor["text"]["context_length"]
        for row, length in enumerate((ctx, ctx // 2, ctx // 3, 3)):
            second[row, length:] = PAD_ID
    grads = []
    for on in (False, True):
        torch.manual_seed(0)
        model = build_model(ModelConfig.model_validate({**flavor, "activation_checkpointing": on}))
        calls: list[int] = []
        block = next(m for m in model.modules() if isinstance(m, TransformerBlock))
        block.register_forward_hook(lambda *_, seen=calls: seen.append(1))
        out = model(images, second)
        loss = sum(v.float().square().mean() for v in out.values() if v.is_floating_point())
        loss.backward()  # type: ignore[union-attr]
        assert len(calls) == (2 if on else 1)  # recomputed, hooks and all, in the backward
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        assert torch.equal(grad, grads[1][name]), name


def test_pooled_only_towers_equal_the_full_computation() -> None:
    """CLIP's towers compute their last block for the pooled token only (and the text tower
    drops positions after the batch's last EOS): same embeddings and gradients as reading
    that token out of the full computation, up to float rounding."""
    model = _model(seed=2).train()
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 16, 16, generator=gen)
    tokens = tokenize(["red", "a green dot", "b"], SMALL.context_length)  # padded, unequal

    def full() -> tuple[torch.Tensor, torch.Tensor]:
        vis = model.visual
        x = vis.transformer(vis.ln_pre(vis.embed(images)), causal=False)
        img = vis.proj(vis.ln_post(x[:, 0]))
        txt = model.text(tokens)[0]  # the per-position path CoCa uses
        return img, txt

    def pooled() -> tuple[torch.Tensor, torch.Tensor]:
        return model.visual(images), model.text(tokens, pooled_only=True)[0]

    grads = []
    for fn in (full, pooled):
        model.zero_grad()
        img, txt = fn()
        (img.square().sum() + (txt * torch.arange(24.0)).sum()).backward()
        grads.append([p.grad.clone() if p.grad is not None else None for p in model.parameters()])
        if fn is full:
            want = (img.detach(), txt.detach())
    torch.testing.assert_close(img, want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(txt, want[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads, strict=True):
        if a is None or b is None:
            assert a is None and b is None
            continue
        # relative to the gradient's scale: single entries can be sums that nearly cancel
        assert (a - b).abs().max() <= 1e-5 * a.abs().max(), (a - b).abs().max() / a.abs().max()
    with torch.no_grad():  # the EOS-only path trims the padding of the batch
        _, at_eos = model.text(tokens, pooled_only=True)
    assert at_eos.shape == (3, 1, 32)


def _assert_same_gradients(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """The same parameters got gradients, equal up to float rounding relative to each
    gradient's scale (single entries can be sums that nearly cancel)."""
    assert got.keys() == want.keys() and got
    for name, grad in got.items():
        assert (grad - want[name]).abs().max() <= 1e-5 * want[name].abs().max(), name


def test_packing_moves_rows_and_gradients_both_ways() -> None:
    """`Packing` keeps the marked positions row after row and puts them back with zeros
    at the padding; its hand-written backward is the gradient autograd would compute
    (gradcheck in float64, both directions)."""
    keep = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    packing = Packing(keep)
    assert packing.tokens == 8 and packing.index.tolist() == [0, 1, 2, 4, 8, 9, 10, 11]
    padded = torch.arange(3 * 4 * 2, dtype=torch.float64).reshape(3, 4, 2)
    packed = packing.pack(padded)
    assert torch.equal(packed, padded[keep])
    back = packing.unpack(packed)
    assert torch.equal(back[keep], padded[keep]) and not back[~keep].any()
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(packing.unpack, (x,))
    y = torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(packing.pack, (y,))


def test_packing_rounds_its_rows_up_with_zero_rows() -> None:
    """A packed tensor's row count is the token count rounded up (so a run's batches reuse
    a few sizes): the rows past the tokens are zeros, `unpack` drops them and passes them
    no gradient, and a tensor of any other row count is refused."""
    keep = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    packing = Packing(keep, multiple=4)
    assert (packing.tokens, packing.rows) == (7, 8)
    padded = torch.randn(3, 4, 2, dtype=torch.float64)
    packed = packing.pack(padded)
    assert packed.shape == (8, 2) and torch.equal(packed[:7], padded[keep])
    assert not packed[7:].any()
    back = packing.unpack(packed)
    assert torch.equal(back[keep], padded[keep]) and not back[~keep].any()
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(packing.unpack, (x,))
    packing.unpack(x).sum().backward()
    assert x.grad is not None and not x.grad[7:].any() and (x.grad[:7] == 1).all()
    y = torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(packing.pack, (y,))
    with pytest.raises(ValueError, match="7 rows given, this packing has 8"):
        packing.unpack(x[:7])
    with pytest.raises(ValueError, match="multiple=0 must be at least 1"):
        Packing(keep, multiple=0)
    assert Packing(keep).rows == packed_rows(7) == 8  # the default: packed_rows's sizes
    assert [packed_rows(t) for t in (1, 8, 9, 255, 256, 2048, 2049, 2100)] == [
        8, 8, 16, 256, 256, 2048, 2112, 2112,
    ]  # fmt: skip
    for t in range(256, 70_000, 97):  # at most 1/32 more rows from 256 up
        assert t <= packed_rows(t) <= t * 33 / 32
    assert len({packed_rows(t) for t in range(2049, 4097)}) == 32  # 2112, ..., 4096


def test_text_tower_packs_mixed_lengths_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Captions of mixed length are packed (a tenth or more of the positions would be
    padding), a batch of equal lengths is not; packed or not, the pooled features and
    their gradients agree up to float rounding."""
    assert worth_packing(tokenize(["a", "a green dot"], SMALL.context_length)[:, :12] != PAD_ID)
    assert not worth_packing(tokenize(["abc", "xyz"], SMALL.context_length)[:, :5] != PAD_ID)
    model = _model(seed=3).train()
    tokens = tokenize(["a", "a green dot", "red", "a long red line"], SMALL.context_length)
    packed_tokens: list[int] = []

    class Recorded(Packing):
        def __init__(self, keep: torch.Tensor) -> None:
            super().__init__(keep)
            packed_tokens.append(self.tokens)

    monkeypatch.setattr(text_module, "Packing", Recorded)
    results = []
    for threshold in (PACK_MIN_PADDING, 2.0):  # packed, then never packed
        model.zero_grad()
        monkeypatch.setattr(text_module, "PACK_MIN_PADDING", threshold)
        pooled = model.text(tokens, pooled_only=True)[0]
        (pooled * torch.linspace(-1, 1, pooled.numel()).reshape(pooled.shape)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((pooled.detach(), grads))
    assert packed_tokens == [3 + 13 + 5 + 16]  # BOS + bytes + EOS of each (the last cut at 16)
    (packed, packed_grads), (plain, plain_grads) = results
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-6)
    _assert_same_gradients(packed_grads, plain_grads)


def test_attention_rejects_rows_with_packing() -> None:
    attn = Attention(8, 2, std=0.1, out_std=0.1)
    packing = Packing(torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="unpack x first"):
        attn(torch.randn(3, 8), causal=True, rows=torch.tensor([2]), packing=packing)


def test_coca_computes_each_captions_own_positions(monkeypatch: pytest.MonkeyPatch) -> None:
    """CoCa's towers and decoder run on each caption's tokens only (packed): one logit row
    per token through its end-of-text, each with the next token as its target, and the
    same contrastive and captioning losses and gradients as the padded computation."""
    from kiln.training.objectives.clip import clip_loss
    from kiln.training.objectives.coca import caption_loss
    from tests.helpers_training import tiny_flavor

    flavor = tiny_flavor("coca")
    ctx, size = flavor["text"]["context_length"], flavor["vision"]["image_size"]
    torch.manual_seed(0)
    model = build_model(ModelConfig.model_validate(flavor)).train()
    images = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    tokens = tokenize(["a", "a green dot", "red", "two red lines"], ctx)
    lengths = (tokens != PAD_ID).sum(dim=1)
    results = []
    for threshold in (PACK_MIN_PADDING, 2.0):  # packed, then padded
        monkeypatch.setattr(text_module, "PACK_MIN_PADDING", threshold)
        model.zero_grad()
        out = model(images, tokens)
        contrastive = clip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"])
        caption = caption_loss(out["caption_logits"], out["caption_targets"])
        (contrastive + caption).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out["caption_targets"], contrastive.detach(), caption.detach(), grads))
    with torch.no_grad():  # the whole context, every position (what CoCa computed before)
        _, image_tokens = model._image(images)
        logits = model._decode(model.text(tokens)[1], image_tokens)
        full = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            tokens[:, 1:].reshape(-1),
            ignore_index=PAD_ID,
        )
    (packed_targets, *packed), (padded_targets, *padded) = results
    torch.testing.assert_close(packed[1], full, rtol=1e-5, atol=1e-6)
    # packed: one row per token through EOS, then PAD_ID rows up to the rounded row count
    # (which the losses above must skip); padded: cut at the longest caption
    total = int(lengths.sum())
    assert packed_rows(total) > total and packed_targets.shape == (packed_rows(total),)
    assert (packed_targets[total:] == PAD_ID).all()
    assert padded_targets.shape == (4, int(lengths.max()))
    assert torch.equal(
        packed_targets[:total],
        padded_targets[torch.arange(int(lengths.max())) < lengths[:, None]],
    )
    first = tokens[1, 1 : int(lengths[1])]  # "a green dot": its bytes then EOS, then nothing
    row = packed_targets[int(lengths[0]) : int(lengths[:2].sum())]
    assert torch.equal(row[:-1], first) and int(row[-1]) == PAD_ID
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed[1], padded[1], rtol=1e-5, atol=1e-6)
    _assert_same_gradients(packed[2], padded[2])


def test_text_tower_rejects_a_packing_of_other_tokens() -> None:
    model = _model()
    tokens, packing = text_module.cut_captions(tokenize(["a", "a green dot"], 16))
    assert packing is not None and tokens.shape == (2, 13)
    with pytest.raises(ValueError, match="pass the tokens and packing cut_captions returns"):
        model.text(tokenize(["a", "a green dot"], 16), packing=packing)  # uncut tokens
    with pytest.raises(ValueError, match="without pooled_only"):
        model.text(tokens, packing=packing, pooled_only=True)
    pooled, features = model.text(tokens, packing=packing)
    assert pooled.shape == (2, SMALL.embed_dim) and features.shape == (
        3 + 13,
        32,
    )  # packed: 3 + 13 tokens, width 32
