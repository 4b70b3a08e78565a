"""A latent as LLM tokens: patching order, its inverse, and position ids."""

import torch

from services.llm.latents import latent_position_ids, patchify_latent, unpatchify_latent


def test_patchify_round_trip():
    for c, h, w in [(16, 8, 6), (16, 2, 2), (4, 10, 4)]:
        lat = torch.randn(c, h, w)
        tok = patchify_latent(lat)
        assert tok.shape == ((h // 2) * (w // 2), 4 * c)
        torch.testing.assert_close(unpatchify_latent(tok, h // 2, w // 2, c=c), lat, rtol=0, atol=0)


def test_patchify_element_order():
    c, h, w = 3, 4, 6
    lat = torch.arange(c * h * w, dtype=torch.float32).reshape(c, h, w)
    tok = patchify_latent(lat, p=2)
    gw = w // 2
    for r in range(h // 2):
        for col in range(gw):
            for p in range(2):
                for q in range(2):
                    for ch in range(c):
                        assert tok[r * gw + col, (p * 2 + q) * c + ch] == lat[ch, 2 * r + p, 2 * col + q]


def test_latent_position_ids():
    ids = latent_position_ids(3, 5, 64)
    assert ids.dtype == torch.long
    assert ids.tolist() == [r * 64 + c for r in range(3) for c in range(5)]
