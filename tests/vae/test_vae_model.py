import re

import numpy as np
import pytest
import torch

from services.common.config import AEConfig
from services.vae.model import AutoEncoder, to_uint8_image

TINY = AEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)


@pytest.fixture(scope="module")
def tiny_ae():
    torch.manual_seed(0)
    return AutoEncoder(TINY).eval()


def _blocks_per_level(keys, prefix):
    counts = {}
    for k in keys:
        m = re.match(rf"{prefix}\.(\d+)\.block\.(\d+)\.", k)
        if m:
            counts.setdefault(int(m[1]), set()).add(int(m[2]))
    return {level: len(blocks) for level, blocks in sorted(counts.items())}


def test_tiny_key_names_follow_flux_layout(tiny_ae):
    keys = set(tiny_ae.state_dict())
    expected = [
        "encoder.conv_in.weight", "encoder.conv_in.bias",
        "encoder.down.0.block.0.norm1.weight", "encoder.down.0.block.0.conv1.weight",
        "encoder.down.0.block.0.norm2.bias", "encoder.down.0.block.0.conv2.weight",
        "encoder.down.0.downsample.conv.weight", "encoder.down.2.downsample.conv.bias",
        "encoder.down.2.block.0.nin_shortcut.weight",  # 32 -> 64 channels
        "encoder.mid.block_1.conv1.weight", "encoder.mid.attn_1.norm.weight", "encoder.mid.attn_1.q.weight",
        "encoder.mid.attn_1.k.bias", "encoder.mid.attn_1.v.weight", "encoder.mid.attn_1.proj_out.weight",
        "encoder.mid.block_2.norm2.weight", "encoder.norm_out.weight", "encoder.conv_out.weight",
        "decoder.conv_in.weight", "decoder.mid.attn_1.proj_out.bias", "decoder.mid.block_2.conv2.weight",
        "decoder.up.0.block.1.conv2.weight", "decoder.up.1.block.0.nin_shortcut.weight",  # 64 -> 32
        "decoder.up.1.upsample.conv.weight", "decoder.up.3.upsample.conv.bias",
        "decoder.norm_out.bias", "decoder.conv_out.weight",
    ]
    assert [k for k in expected if k not in keys] == []
    assert _blocks_per_level(keys, "encoder.down") == {0: 1, 1: 1, 2: 1, 3: 1}
    # The decoder has one more block per level than the encoder.
    assert _blocks_per_level(keys, "decoder.up") == {0: 2, 1: 2, 2: 2, 3: 2}
    assert not any(k.startswith("encoder.down.3.downsample") for k in keys)
    assert not any(k.startswith("decoder.up.0.upsample") for k in keys)
    assert not any(".attn." in k for k in keys)
    # No shortcut where widths agree.
    assert "encoder.down.0.block.0.nin_shortcut.weight" not in keys
    assert "decoder.up.0.block.0.nin_shortcut.weight" not in keys
    assert tiny_ae.state_dict()["decoder.up.1.block.0.nin_shortcut.weight"].shape == (32, 64, 1, 1)


def test_full_size_shapes_match_published_ae():
    with torch.device("meta"):
        ae = AutoEncoder(AEConfig())
    sd = ae.state_dict()
    shapes = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.3.block.1.conv2.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (32, 512, 3, 3),
        "decoder.conv_in.weight": (512, 16, 3, 3),
        "decoder.up.3.block.2.conv1.weight": (512, 512, 3, 3),
        "decoder.up.1.block.0.conv1.weight": (256, 512, 3, 3),
        "decoder.up.0.block.0.conv1.weight": (128, 256, 3, 3),
        "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    assert sum(p.numel() for p in ae.parameters()) == 83_819_683
    assert _blocks_per_level(sd, "decoder.up") == {0: 3, 1: 3, 2: 3, 3: 3}


@torch.no_grad()
def test_encode_decode_shapes(tiny_ae):
    x = torch.rand(3, 64, 48) * 2 - 1
    z = tiny_ae.encode(x)
    assert z.shape == (16, 8, 6)
    assert tiny_ae.decode(z).shape == (3, 64, 48)
    zb = tiny_ae.encode(torch.stack([x, x]))
    assert zb.shape == (2, 16, 8, 6)
    torch.testing.assert_close(zb[1], z, rtol=1e-5, atol=1e-5)
    assert tiny_ae.decode(zb).shape == (2, 3, 64, 48)


@torch.no_grad()
def test_scale_and_shift(tiny_ae):
    cfg = tiny_ae.cfg
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    moments = tiny_ae.encoder(x)
    mean = moments[:, :16]
    torch.testing.assert_close(tiny_ae.encode(x), 0.3611 * (mean - 0.1159))
    assert (cfg.scale_factor, cfg.shift_factor) == (0.3611, 0.1159)
    z = torch.randn(1, 16, 4, 4)
    torch.testing.assert_close(tiny_ae.decode(z), tiny_ae.decoder(z / 0.3611 + 0.1159))


@torch.no_grad()
def test_posterior_sample_is_reproducible_and_uses_logvar(tiny_ae):
    x = torch.rand(3, 32, 32) * 2 - 1
    a = tiny_ae.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
    b = tiny_ae.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
    c = tiny_ae.encode(x, sample=True, generator=torch.Generator().manual_seed(8))
    mean = tiny_ae.encode(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, mean)
    logvar = tiny_ae.encoder(x[None])[0, 16:]
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, mean + 0.3611 * torch.exp(0.5 * logvar) * noise)


def test_to_uint8_truncates_and_clamps():
    v = 254.9 / 255 * 2 - 1  # maps to 254.9: truncation gives 254, rounding would give 255
    x = torch.tensor([v, -3.0, 3.0, 0.0], dtype=torch.float32).reshape(1, 1, 4).repeat(3, 1, 1)
    x[1] = -1.0  # green channel distinct, to check channel placement
    img = to_uint8_image(x)
    assert isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.shape == (1, 4, 3)
    assert img[0, :, 0].tolist() == [254, 0, 255, 127]
    assert img[0, :, 1].tolist() == [0, 0, 0, 0]
