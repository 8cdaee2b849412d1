"""Model flavors as data: registry, overrides, old flat configs, counts, `kiln model info`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from kiln.models.build import count_parameters
from kiln.models.config import ModelConfig
from kiln.models.flavors import FLAVORS, PUBLISHED_PARAMS, VIT_SIZES, flavor_names
from kiln.models.info import flops_per_sample
from kiln.platform.cli import main
from kiln.training.config import TrainConfig


@pytest.mark.parametrize("flavor", sorted(PUBLISHED_PARAMS))
def test_clip_flavors_have_openclip_parameter_counts(flavor: str) -> None:
    total = count_parameters(ModelConfig(flavor=flavor))["total"]
    assert round(total / 1e6, 2) == PUBLISHED_PARAMS[flavor]


def test_exact_counts_of_b16_and_l14() -> None:
    """Exact integers, tower by tower (OpenCLIP's ViT-B-16 / ViT-L-14 built the same way)."""
    b16 = count_parameters(ModelConfig(flavor="clip-vit-b-16"))
    assert (b16["vision"], b16["text"], b16["total"]) == (86_192_640, 63_428_096, 149_620_737)
    l14 = count_parameters(ModelConfig(flavor="clip-vit-l-14"))
    assert (l14["vision"], l14["text"], l14["total"]) == (303_966_208, 123_650_304, 427_616_513)


def test_every_size_in_every_family_builds_on_meta() -> None:
    for arch in ("clip", "siglip", "coca", "mae"):
        for size in VIT_SIZES:
            cfg = ModelConfig(flavor=f"{arch}-vit-{size}")
            counts = count_parameters(cfg)
            assert cfg.arch == arch and counts["total"] > 5_000_000
            assert ("text" in counts) == (arch != "mae")
    assert set(FLAVORS) >= {"clip-tiny", "siglip-tiny", "coca-tiny", "mae-tiny"}


def test_vit_sizes_are_the_standard_ones() -> None:
    g = ModelConfig(flavor="clip-vit-g-14").vision
    assert (g.width, g.layers, g.heads, g.mlp_width) == (1408, 40, 16, 6144)
    h = ModelConfig(flavor="mae-vit-h-14").vision
    assert (h.width, h.layers, h.heads, h.patch_size) == (1280, 32, 16, 14)
    ti = ModelConfig(flavor="clip-vit-ti-16").vision
    assert (ti.width, ti.layers, ti.heads) == (192, 12, 3)


def test_overrides_lay_over_the_flavor_and_round_trip() -> None:
    cfg = ModelConfig.model_validate({"flavor": "clip-vit-b-16", "vision": {"image_size": 160}})
    assert cfg.vision.image_size == 160 and cfg.vision.width == 768  # the rest kept
    assert cfg.text is not None and cfg.text.vocab_size == 49408
    assert ModelConfig.model_validate(cfg.model_dump()) == cfg
    assert count_parameters(cfg)["vision"] < 86_192_640  # fewer positional embeddings
    assert ModelConfig(flavor="tiny").flavor == "clip-tiny"  # alias resolves


def test_siglip_flavor_inits_scale_and_bias() -> None:
    cfg = ModelConfig(flavor="siglip-tiny")
    assert cfg.arch == "siglip" and cfg.init_logit_bias == -10.0
    assert abs(cfg.init_logit_scale - 2.302585) < 1e-6  # log 10
    assert count_parameters(cfg)["total"] == count_parameters(ModelConfig())["total"] + 1


def test_unknown_flavor_lists_the_valid_ones() -> None:
    with pytest.raises(ValidationError) as e:
        ModelConfig(flavor="clip-vit-b-17")
    msg = str(e.value)
    assert "unknown model flavor 'clip-vit-b-17'" in msg and "did you mean 'clip-vit-b-16'" in msg
    assert all(name in msg for name in flavor_names())


def test_old_flat_model_section_maps_to_the_nested_form() -> None:
    flat = {"image_size": 16, "patch_size": 4, "vision_width": 32, "text_layers": 1}
    flat.update(context_length=20, embed_dim=24)
    cfg = ModelConfig.model_validate(flat)
    assert cfg.flavor == "clip-tiny"
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.width) == (16, 4, 32)
    assert cfg.text is not None and (cfg.text.layers, cfg.text.context_length) == (1, 20)
    nested = {"vision": {"image_size": 16, "patch_size": 4, "width": 32}}
    nested["text"] = {"layers": 1, "context_length": 20}
    assert cfg == ModelConfig.model_validate({**nested, "embed_dim": 24})
    assert ModelConfig() == ModelConfig(flavor="clip-tiny")  # old defaults == clip-tiny


def test_bad_sections_name_the_fix() -> None:
    with pytest.raises(ValidationError, match=r"has no model\.text"):
        ModelConfig.model_validate({"flavor": "mae-tiny", "text": {"width": 64}})
    with pytest.raises(ValidationError, match=r"not divisible by model\.vision\.heads"):
        ModelConfig.model_validate({"flavor": "clip-tiny", "vision": {"heads": 5}})
    with pytest.raises(ValidationError, match="at least 259"):
        ModelConfig.model_validate({"text": {"vocab_size": 100}})


def test_objective_follows_the_flavor_and_must_match_it() -> None:
    data = {"data": {"dataset": "unused"}}
    assert TrainConfig.model_validate(data).objective.name == "clip"  # type: ignore[union-attr]
    mae = TrainConfig.model_validate({**data, "model": {"flavor": "mae-tiny"}})
    assert mae.objective is not None and mae.objective.name == "mae"
    with pytest.raises(ValidationError, match="does not train a 'clip' model"):
        TrainConfig.model_validate({**data, "objective": {"name": "siglip"}})


def test_flops_scale_with_the_work() -> None:
    b16, b32 = (flops_per_sample(ModelConfig(flavor=f)) for f in ("clip-vit-b-16", "clip-vit-b-32"))
    assert b16["train"] == 3 * b16["forward"]
    assert b16["vision"] > 3.5 * b32["vision"]  # 4x the patches
    assert b16["text"] == b32["text"]
    assert round(b16["forward"] / 1e9, 2) == 41.09  # OpenCLIP's profile lists 41.09 GFLOPs
    mae = flops_per_sample(ModelConfig(flavor="mae-vit-b-16"))
    assert mae["vision"] < b16["vision"] / 3  # the encoder sees a quarter of the patches


def test_model_info_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "info", "clip-vit-b-16"]) == 0
    out = capsys.readouterr().out
    assert "149,620,737" in out and "149.62M (OpenCLIP)" in out and "FLOPs per sample" in out
    assert main(["model", "info", "clip-vit-l-14", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"]["total"] == 427_616_513
    assert main(["model", "info", "clip-vit-b-16", "--set", "vision.image_size=160"]) == 0
    assert "160px" in capsys.readouterr().out
    assert main(["model", "info", "vit-huge"]) == 2
    assert "valid flavors are" in capsys.readouterr().err
    assert main(["model", "list"]) == 0
    assert "mae-vit-b-16" in capsys.readouterr().out


def test_reading_configs_does_not_import_torch() -> None:
    """Recipes are read by code that never trains (CLI, curation): keep that import cheap."""
    code = (
        "import sys, kiln.platform.recipes, kiln.training.config, kiln.models.flavors;"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
