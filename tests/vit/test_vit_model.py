import re

import pytest
import torch

from services.attention import SDPABackend
from services.common.config import ViTConfig
from services.vit.model import SiglipVisionModel, patchify_image, vit_position_ids

TINY = ViTConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4)
SIDE = 70


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    return SiglipVisionModel(TINY, SIDE).eval()


def _encode(model, images, attention=None):
    """Pack [3, H, W] images the way the ViT service does and run one forward."""
    p = TINY.patch_size
    pixels = [patchify_image(im, p) for im in images]
    ids = [vit_position_ids(im.shape[1] // p, im.shape[2] // p, SIDE) for im in images]
    lens = [x.shape[0] for x in pixels]
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    with torch.no_grad():
        out = model(torch.cat(pixels), torch.cat(ids), cu, max(lens), attention=attention)
    return out.split(lens)


def test_tiny_key_names(tiny_vit):
    sd = tiny_vit.state_dict()
    layer_keys = [f"{m}.{t}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                        "self_attn.out_proj", "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")
                  for t in ("weight", "bias")]
    expected = {"embeddings.patch_embedding.weight", "embeddings.patch_embedding.bias",
                "embeddings.position_embedding.weight", "post_layernorm.weight", "post_layernorm.bias"}
    expected |= {f"encoder.layers.{i}.{k}" for i in range(2) for k in layer_keys}
    assert set(sd) == expected  # 2 of the 3 configured layers: the last is dropped
    assert sd["embeddings.position_embedding.weight"].shape == (4900, 48)
    assert sd["embeddings.patch_embedding.weight"].shape == (48, 588)


def test_full_size_shapes():
    with torch.device("meta"):
        vit = SiglipVisionModel(ViTConfig(), 70)
    sd = vit.state_dict()
    assert sd["embeddings.patch_embedding.weight"].shape == (1152, 588)
    assert sd["embeddings.position_embedding.weight"].shape == (4900, 1152)
    assert sd["encoder.layers.0.mlp.fc1.weight"].shape == (4304, 1152)
    assert sd["encoder.layers.25.self_attn.q_proj.weight"].shape == (1152, 1152)
    layers = {int(re.match(r"encoder\.layers\.(\d+)\.", k)[1]) for k in sd if k.startswith("encoder.layers.")}
    assert layers == set(range(26))


def test_patchify_order():
    p, h, w = 2, 4, 6
    img = torch.arange(3 * h * w, dtype=torch.float32).reshape(3, h, w)
    out = patchify_image(img, p)
    assert out.shape == ((h // p) * (w // p), p * p * 3)
    gw = w // p
    for r in range(h // p):
        for c in range(gw):
            for i in range(p):
                for j in range(p):
                    for ch in range(3):
                        assert out[r * gw + c, (i * p + j) * 3 + ch] == img[ch, r * p + i, c * p + j]


def test_linear_patch_embedding_equals_published_conv(tiny_vit):
    hidden, p = TINY.hidden_size, TINY.patch_size
    lin = tiny_vit.embeddings.patch_embedding
    conv = torch.nn.Conv2d(3, hidden, p, stride=p)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.reshape(hidden, p, p, 3).permute(0, 3, 1, 2))
        conv.bias.copy_(lin.bias)
        img = torch.randn(3, 3 * p, 5 * p)
        ref = conv(img[None])[0].flatten(1).T  # [h*w, hidden], row-major patches
        got = lin(patchify_image(img, p))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_packed_images_do_not_attend_to_each_other(tiny_vit):
    torch.manual_seed(1)
    a = torch.rand(3, 3 * 14, 5 * 14) * 2 - 1
    b = torch.rand(3, 4 * 14, 2 * 14) * 2 - 1
    fa, fb = _encode(tiny_vit, [a, b])
    (alone_a,), (alone_b,) = _encode(tiny_vit, [a]), _encode(tiny_vit, [b])
    assert fa.shape == (15, 48) and fb.shape == (8, 48)
    torch.testing.assert_close(fa, alone_a, rtol=0, atol=1e-5)
    torch.testing.assert_close(fb, alone_b, rtol=0, atol=1e-5)
    # The check above can fail: one attention over both images gives different features.
    pixels = torch.cat([patchify_image(a, 14), patchify_image(b, 14)])
    ids = torch.cat([vit_position_ids(3, 5, SIDE), vit_position_ids(4, 2, SIDE)])
    with torch.no_grad():
        mixed = tiny_vit(pixels, ids, torch.tensor([0, 23], dtype=torch.int32), 23)
    assert not torch.allclose(mixed[:15], fa, atol=1e-3)


def test_attention_goes_through_the_backend(tiny_vit):
    calls = []

    class Recording(SDPABackend):
        def varlen_attention(self, q, k, v, cu_seqlens, max_seqlen, scale):
            calls.append((tuple(q.shape), cu_seqlens.tolist(), max_seqlen, scale))
            return super().varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale)

    img = torch.rand(3, 28, 42)
    (default,) = _encode(tiny_vit, [img])
    (recorded,) = _encode(tiny_vit, [img], attention=Recording())
    torch.testing.assert_close(recorded, default)
    assert calls == [((6, 4, 12), [0, 6], 6, 12**-0.5)] * 2


def test_matches_transformers_siglip(tiny_vit):
    # An independent reference: HF SigLIP on a square image whose table is exactly our grid (ids r*k+c
    # with k patches per side = arange), with our linear patch weight turned back into the conv.
    transformers = pytest.importorskip("transformers")
    k, p = 4, TINY.patch_size
    torch.manual_seed(2)
    ours = SiglipVisionModel(TINY, k).eval()
    hf_cfg = transformers.SiglipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=k * p, patch_size=p)
    hf = transformers.SiglipVisionModel(hf_cfg).eval()
    # Older transformers nest the modules under `vision_model.`; match whichever this version uses.
    prefix = "vision_model." if any(key.startswith("vision_model.") for key in hf.state_dict()) else ""
    sd = {prefix + key: val for key, val in ours.state_dict().items()}
    w = sd[prefix + "embeddings.patch_embedding.weight"]
    sd[prefix + "embeddings.patch_embedding.weight"] = w.reshape(48, p, p, 3).permute(0, 3, 1, 2)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert unexpected == [] and all(m.startswith(prefix + "head.") for m in missing)
    img = torch.rand(3, k * p, k * p) * 2 - 1
    with torch.no_grad():
        ref = hf(pixel_values=img[None]).last_hidden_state[0]
        got = ours(patchify_image(img, p), vit_position_ids(k, k, k), torch.tensor([0, k * k], dtype=torch.int32),
                   k * k)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_position_ids():
    ids = vit_position_ids(3, 4, 70)
    assert ids.dtype == torch.long
    assert ids.tolist() == [r * 70 + c for r in range(3) for c in range(4)]
    assert vit_position_ids(70, 70, 70).max().item() == 4899
