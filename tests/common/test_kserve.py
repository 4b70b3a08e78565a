"""Both encoder servers through NVIDIA's tritonclient, the way a Triton/KServe user would call them."""

import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from service_helpers import noise_image, png_bytes


def _image_input(img) -> tc.InferInput:
    inp = tc.InferInput("IMAGE", [1], "BYTES")
    inp.set_data_from_numpy(np.array([png_bytes(img)], dtype=object))
    return inp


@pytest.fixture(scope="module")
def vit_client(vit_server):
    client = tc.InferenceServerClient(vit_server.address)
    yield client
    client.close()


@pytest.fixture(scope="module")
def vae_client(vae_server):
    client = tc.InferenceServerClient(vae_server.address)
    yield client
    client.close()


def test_vit_health_and_metadata(vit_client, tiny_ckpt):
    assert vit_client.is_server_live() and vit_client.is_server_ready()
    assert vit_client.is_model_ready("siglip_vit") and vit_client.is_model_ready("siglip_vit", "1")
    assert not vit_client.is_model_ready("no_such_model")
    assert not vit_client.is_model_ready("siglip_vit", "7")
    meta = vit_client.get_server_metadata(as_json=True)
    assert meta["name"] == "bagel-vit" and meta["version"]
    model = vit_client.get_model_metadata("siglip_vit", as_json=True)
    assert model["name"] == "siglip_vit" and model["versions"] == ["1"]
    assert model["inputs"] == [{"name": "IMAGE", "datatype": "BYTES", "shape": ["1"]}]
    hidden = str(tiny_ckpt.config.vit.hidden_size)
    assert model["outputs"] == [{"name": "FEATURES", "datatype": "FP32", "shape": ["-1", hidden]},
                                {"name": "GRID", "datatype": "INT32", "shape": ["2"]}]


def test_vit_infer_equals_the_in_process_engine(vit_client, vit_engine):
    img = noise_image(50, 28, seed=11)
    result = vit_client.infer("siglip_vit", [_image_input(img)], request_id="kserve-1")
    (ref,) = vit_engine.encode([img])
    feats, grid = result.as_numpy("FEATURES"), result.as_numpy("GRID")
    assert feats.dtype == np.float32 and grid.dtype == np.int32
    assert tuple(grid) == ref.grid and feats.shape == tuple(ref.features.shape)
    np.testing.assert_array_equal(feats, ref.features.numpy())
    assert result.get_response().id == "kserve-1"
    only_grid = vit_client.infer("siglip_vit", [_image_input(img)], outputs=[tc.InferRequestedOutput("GRID")])
    assert only_grid.as_numpy("FEATURES") is None and tuple(only_grid.as_numpy("GRID")) == ref.grid


def test_kserve_errors(vit_client):
    with pytest.raises(InferenceServerException) as info:
        vit_client.infer("no_such_model", [_image_input(noise_image(8, 8))])
    assert info.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as info:
        vit_client.get_model_metadata("no_such_model")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    wrong = tc.InferInput("IMAGE", [1], "FP32")
    wrong.set_data_from_numpy(np.zeros(1, dtype=np.float32))
    with pytest.raises(InferenceServerException) as info:
        vit_client.infer("siglip_vit", [wrong])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "datatype must be BYTES" in info.value.message()
    corrupt = tc.InferInput("IMAGE", [1], "BYTES")
    corrupt.set_data_from_numpy(np.array([b"not an image"], dtype=object))
    with pytest.raises(InferenceServerException) as info:
        vit_client.infer("siglip_vit", [corrupt])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "cannot decode image" in info.value.message()


def test_vae_models_through_tritonclient(vae_client, vae_engine, tiny_ckpt):
    assert vae_client.is_server_ready()
    assert vae_client.is_model_ready("flux_vae_encode") and vae_client.is_model_ready("flux_vae_decode")
    z = str(tiny_ckpt.config.ae.z_channels)
    enc_meta = vae_client.get_model_metadata("flux_vae_encode", as_json=True)
    assert enc_meta["outputs"] == [{"name": "LATENT", "datatype": "FP32", "shape": [z, "-1", "-1"]}]
    dec_meta = vae_client.get_model_metadata("flux_vae_decode", as_json=True)
    assert dec_meta["inputs"] == [{"name": "LATENT", "datatype": "FP32", "shape": [z, "-1", "-1"]}]

    img = noise_image(32, 48, seed=12)
    latent = vae_client.infer("flux_vae_encode", [_image_input(img)], parameters={"resize": "none"}).as_numpy("LATENT")
    ref = vae_engine.encode(img).latent
    assert latent.shape == (16, 6, 4)
    np.testing.assert_allclose(latent, ref.numpy(), rtol=0, atol=1e-5)

    lat_in = tc.InferInput("LATENT", list(latent.shape), "FP32")
    lat_in.set_data_from_numpy(latent)
    pixels = vae_client.infer("flux_vae_decode", [lat_in]).as_numpy("IMAGE")
    assert pixels.dtype == np.uint8 and pixels.shape == (48, 32, 3)
    np.testing.assert_array_equal(pixels, vae_engine.decode(torch.from_numpy(latent.copy())))

    bad = tc.InferInput("LATENT", [3, 4, 4], "FP32")
    bad.set_data_from_numpy(np.zeros((3, 4, 4), dtype=np.float32))
    with pytest.raises(InferenceServerException) as info:
        vae_client.infer("flux_vae_decode", [bad])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "shape must be" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        vae_client.infer("flux_vae_encode", [_image_input(img)], parameters={"resize": "sideways"})
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
