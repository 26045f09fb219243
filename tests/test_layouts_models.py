"""Layouts measured on real architectures (random weights, small inputs, nothing downloaded).

torchvision Swin-T and MaxVit, timm SwinV2-CR, Hugging Face Wav2Vec2, Dinov2 and BERT built
from tiny configs. Each check compares the drawn tensor with the one built from the output by
hand. ``FM_TODAYS_RULES=1`` reads them by the name-based rules instead (tests/measuring.py).
Chained backward passes read every layer of these and of timm ResNet, ViT and ConvNeXt as the
full passes do.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from measuring import chained_and_full, on_grid, output_of, read

from fm_lightning.layouts import Fallback

transformers = pytest.importorskip("transformers")  # the dev extra installs it
pytestmark = pytest.mark.slow  # importing transformers alone takes seconds


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_torchvision_swin_t_every_stage_is_channels_last():
    model = torchvision.models.swin_t()
    x = torch.randn(2, 3, 64, 96)
    for i in range(8):  # features.0 is Conv2d, Permute, LayerNorm: (N, 16, 24, 96)
        name = f"features.{i}"
        _, maps = read(model, name, x)
        assert torch.equal(maps.act, output_of(model, name, x).permute(0, 3, 1, 2)), name
        assert maps.note == "measured: channels-last -> NCHW", name


def _maxvit() -> torch.nn.Module:
    return torchvision.models.MaxVit(
        input_size=(64, 64),
        stem_channels=8,
        partition_size=2,
        block_channels=[8, 16],
        block_layers=[1, 1],
        head_dim=4,
        stochastic_depth_prob=0.0,
        num_classes=10,
    )


def _swinv2_cr() -> torch.nn.Module:
    return timm.create_model("swinv2_cr_tiny_ns_224", img_size=(64, 64), window_size=4)


def test_maxvit_window_and_grid_attention_are_nchw():
    model = _maxvit()
    x = torch.randn(2, 3, 64, 64)
    names = [
        n for n, _ in model.named_modules() if n.endswith(("window_attention", "grid_attention"))
    ]
    assert len(names) == 4
    for name in names:  # only LayerNorm and Linear inside, but they departition to NCHW
        _, maps = read(model, name, x)
        assert torch.equal(maps.act, output_of(model, name, x)), name
        assert maps.note == "measured: NCHW", name


def test_timm_swinv2_cr_stages_are_nchw():
    model = _swinv2_cr()
    x = torch.randn(2, 3, 64, 64)
    for i in range(4):
        name = f"stages.{i}"
        _, maps = read(model, name, x)
        assert torch.equal(maps.act, output_of(model, name, x)), name
        assert maps.note == "measured: NCHW", name


@pytest.fixture(scope="module")
def wav2vec2():
    return _wav2vec2()


def _wav2vec2() -> torch.nn.Module:
    config = transformers.Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        conv_dim=(16, 16, 16),
        conv_stride=(5, 2, 2),
        conv_kernel=(10, 3, 3),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer",  # Wav2Vec2LayerNormConvLayer: "LayerNorm" in a conv's name
        do_stable_layer_norm=True,
    )
    return transformers.Wav2Vec2Model(config)


@pytest.mark.parametrize(
    ("name", "steps"),
    [
        ("feature_extractor.conv_layers.0", 199),
        ("feature_extractor.conv_layers.1", 99),
        ("feature_extractor", 49),
    ],
)
def test_wav2vec2_conv_layers_are_1d_maps_along_time(wav2vec2, name, steps):
    x = torch.randn(2, 1000)  # (N, T) audio
    _, maps = read(wav2vec2, name, x)
    out = output_of(wav2vec2, name, x)  # (N, 16, T')
    assert torch.equal(maps.act, out[:, :, None])
    assert maps.note == f"measured: 1-D, {steps} positions, 16 channels"


def test_wav2vec2_encoder_frames_are_a_1d_sequence_not_a_square(wav2vec2):
    x = torch.randn(2, 1000)
    _, maps = read(wav2vec2, "encoder", x)
    frames = output_of(wav2vec2, "encoder", x).last_hidden_state  # (N, 49, 32): not 7 x 7
    assert torch.equal(maps.act, frames.transpose(1, 2)[:, :, None])
    assert (
        maps.note
        == "last_hidden_state of BaseModelOutput; measured: 1-D, 49 positions, 32 channels"
    )


def _dinov2() -> torch.nn.Module:
    config = transformers.Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=32,
        patch_size=8,
    )
    return transformers.Dinov2Model(config)


def test_dinov2_at_a_non_square_input_draws_its_real_4x6_grid_without_cls():
    model = _dinov2()
    x = torch.randn(2, 3, 32, 48)  # 4 x 6 patches + CLS; the config says 4 x 4
    for name in ("embeddings", "encoder.layer.0", "encoder.layer.1"):
        _, maps = read(model, name, x)
        out = output_of(model, name, x)
        tokens = out if isinstance(out, torch.Tensor) else out[0]
        assert torch.equal(maps.act, on_grid(tokens, 1, 4, 6)), name
        assert maps.note.endswith("measured: tokens 4x6 +1 prefix, 32 channels"), name


def _bert() -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
    )
    return transformers.BertModel(config)


def test_bert_tokens_fall_back_to_a_sequence_with_none_dropped():
    model = _bert()
    probe = {"input_ids": torch.randint(0, 100, (2, 12))}  # integer ids: no gradient to take
    reading, maps = read(model, "encoder.layer.0", probe)
    out = output_of(model, "encoder.layer.0", probe)
    tokens = out if isinstance(out, torch.Tensor) else out[0]  # (N, 12, 32): "3x3 +3" before
    assert torch.equal(maps.act, tokens.transpose(1, 2)[:, :, None])
    assert isinstance(reading, Fallback) and not reading.image_input
    why = "no floating-point input to take gradients from"
    assert maps.note.endswith(f"fallback ({why}): sequence of 12 steps, 32 channels")


def _timm(name: str, **kwargs: object) -> torch.nn.Module:
    return timm.create_model(name, pretrained=False, **kwargs)


CHAINED = {  # id: (model, probe, layers, how many layers the chained pass should shortcut)
    "swin_t": (torchvision.models.swin_t, (2, 3, 64, 96), [f"features.{i}" for i in range(8)], 7),
    "maxvit": (_maxvit, (2, 3, 64, 64), ["blocks.*.layers.0.layers.*_attention"], 3),
    "swinv2_cr": (_swinv2_cr, (2, 3, 64, 64), ["stages.*"], 3),
    "wav2vec2": (
        _wav2vec2,
        (2, 1000),
        ["feature_extractor.conv_layers.*", "feature_extractor", "encoder"],
        4,
    ),
    "dinov2 32x48": (_dinov2, (2, 3, 32, 48), ["embeddings", "encoder.layer.*"], 2),
    "bert": (_bert, {"input_ids": (2, 12)}, ["embeddings", "encoder.layer.*"], 0),
    "timm resnet18": (lambda: _timm("resnet18"), (2, 3, 64, 64), ["layer*"], 3),
    "timm vit 32x48": (
        lambda: _timm(
            "vit_tiny_patch16_224",
            img_size=(32, 48),
            patch_size=8,
            depth=4,
            embed_dim=48,
            num_heads=3,
        ),
        (2, 3, 32, 48),
        ["patch_embed", "blocks.*"],
        4,
    ),
    "timm convnext_atto": (lambda: _timm("convnext_atto"), (2, 3, 64, 64), ["stem", "stages.*"], 4),
}


@pytest.mark.parametrize("case", CHAINED)
def test_chained_readings_equal_the_full_ones(case):
    build, shape, layers, shortcuts = CHAINED[case]
    if isinstance(shape, dict):  # BERT's token ids
        probe = {key: torch.randint(0, 100, size) for key, size in shape.items()}
    else:
        probe = torch.randn(shape)
    readings, full, taken = chained_and_full(build(), probe, layers)
    assert readings == full
    assert taken == shortcuts
