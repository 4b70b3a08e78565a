import grpc
import numpy as np
import pytest
import torch

from services.common.images import ImageError, vae_resize
from services.common.protos import common_pb2, vae_pb2, vae_pb2_grpc
from services.common.tensor_codec import tensor_from_message, tensor_to_message
from service_helpers import decode_png, expect_status, noise_image, png_bytes

SMALL = [noise_image(48, 32, seed=3), noise_image(32, 32, seed=4)]  # sides multiple of 16: RESIZE_NONE


def _encode_input(img, **kw):
    return vae_pb2.VAEEncodeInput(image=common_pb2.ImageRef(encoded=png_bytes(img)), **kw)


@pytest.fixture(scope="module")
def stub(vae_server):
    return vae_pb2_grpc.VAEServiceStub(vae_server.channel)


def test_encode_to_s3_then_decode_equals_the_in_process_engine(stub, store, vae_engine):
    img = noise_image(24, 24, seed=5)  # the official resize makes it 512x512
    resp = stub.Encode(vae_pb2.VAEEncodeRequest(inputs=[_encode_input(img)], delivery=common_pb2.DELIVERY_OBJECT,
                                                job_id="job-vae-1"))
    (lat,) = resp.latents
    assert (lat.size.width, lat.size.height) == (512, 512)
    assert lat.ref.key.startswith("jobs/job-vae-1/latents/") and not lat.HasField("inline")
    ref_latent = vae_engine.encode(vae_resize(img)).latent
    stored = store.get_tensor(lat.ref.key)
    assert list(lat.ref.shape) == [16, 64, 64]
    torch.testing.assert_close(stored, ref_latent, rtol=0, atol=1e-5)

    dec = stub.Decode(vae_pb2.VAEDecodeRequest(inputs=[vae_pb2.VAEDecodeInput(latent=common_pb2.Latent(
        ref=lat.ref))], delivery=common_pb2.DELIVERY_BOTH, job_id="job-vae-1"))
    (out,) = dec.images
    assert (out.size.width, out.size.height) == (512, 512)
    assert out.object.key.startswith("jobs/job-vae-1/images/") and out.object.key.endswith(".png")
    assert store.get_bytes(out.object.key) == out.png
    pixels = decode_png(out.png)
    expected = vae_engine.decode(stored)
    assert pixels.dtype == np.uint8 and np.array_equal(pixels, expected)


def test_batched_encode_and_decode_inline(stub, vae_engine):
    resp = stub.Encode(vae_pb2.VAEEncodeRequest(
        inputs=[_encode_input(im, resize=vae_pb2.RESIZE_NONE) for im in SMALL], delivery=common_pb2.DELIVERY_INLINE,
        inline_encoding=common_pb2.TENSOR_ENCODING_SAFETENSORS))
    latents = [tensor_from_message(lat.inline) for lat in resp.latents]
    assert [tuple(t.shape) for t in latents] == [(16, 4, 6), (16, 4, 4)]
    assert [(lat.size.width, lat.size.height) for lat in resp.latents] == [(48, 32), (32, 32)]
    for got, im in zip(latents, SMALL):
        torch.testing.assert_close(got, vae_engine.encode(im).latent, rtol=0, atol=1e-5)

    dec = stub.Decode(vae_pb2.VAEDecodeRequest(delivery=common_pb2.DELIVERY_INLINE, inputs=[
        vae_pb2.VAEDecodeInput(latent=common_pb2.Latent(inline=tensor_to_message(t))) for t in latents]))
    assert [not im.HasField("object") for im in dec.images] == [True, True]
    for out, t in zip(dec.images, latents):
        assert np.array_equal(decode_png(out.png), vae_engine.decode(t))


def test_posterior_sampling_is_seeded(stub):
    def run(**kw):
        req = vae_pb2.VAEEncodeRequest(inputs=[_encode_input(SMALL[1], resize=vae_pb2.RESIZE_NONE, **kw)],
                                       delivery=common_pb2.DELIVERY_INLINE)
        return tensor_from_message(stub.Encode(req).latents[0].inline)

    mean, a, b, c = run(), run(sample=True, seed=7), run(sample=True, seed=7), run(sample=True, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, mean)


def test_encode_keys_are_idempotent_per_job_and_input(stub):
    def keys(job, images):
        req = vae_pb2.VAEEncodeRequest(inputs=[_encode_input(im, resize=vae_pb2.RESIZE_NONE) for im in images],
                                       delivery=common_pb2.DELIVERY_OBJECT, job_id=job)
        return [lat.ref.key for lat in stub.Encode(req).latents]

    first = keys("job-vae-2", SMALL)
    assert keys("job-vae-2", SMALL) == first and len(set(first)) == 2
    assert keys("job-vae-3", SMALL[:1])[0] == first[0].replace("job-vae-2", "job-vae-3")


def _decode(latent_msg):
    return vae_pb2.VAEDecodeRequest(inputs=[vae_pb2.VAEDecodeInput(latent=latent_msg)],
                                    delivery=common_pb2.DELIVERY_INLINE)


def test_bad_latents_are_invalid_argument(stub, store):
    bad = grpc.StatusCode.INVALID_ARGUMENT
    wrong_dtype = common_pb2.Latent(inline=tensor_to_message(torch.zeros(16, 4, 4, dtype=torch.int32)))
    expect_status(bad, stub.Decode, _decode(wrong_dtype), match="dtype must be one of")
    wrong_shape = common_pb2.Latent(inline=tensor_to_message(torch.zeros(3, 4, 4)))
    expect_status(bad, stub.Decode, _decode(wrong_shape), match="shape must be [16, '*', '*'], got [3, 4, 4]")
    too_big = common_pb2.Latent(inline=tensor_to_message(torch.zeros(16, 4, 200)))
    expect_status(bad, stub.Decode, _decode(too_big), match="latent sides")
    nan = torch.zeros(16, 4, 4)
    nan[3, 1, 2] = float("nan")  # one NaN is enough to make the whole image NaN
    expect_status(bad, stub.Decode, _decode(common_pb2.Latent(inline=tensor_to_message(nan))),
                  match="inputs[0].latent: values must be finite")
    short = common_pb2.Latent(inline=common_pb2.Tensor(shape=[16, 4, 4], dtype=common_pb2.DTYPE_FLOAT32,
                                                       data=b"\0" * 10))
    expect_status(bad, stub.Decode, _decode(short), match="needs 1024 bytes, got 10")
    expect_status(bad, stub.Decode, _decode(common_pb2.Latent()), match="no tensor given")

    store.put_tensor("jobs/bad/latents/l.safetensors", torch.zeros(16, 4, 4))
    lie = common_pb2.Latent(ref=common_pb2.TensorRef(key="jobs/bad/latents/l.safetensors", shape=[16, 8, 8]))
    expect_status(bad, stub.Decode, _decode(lie), match="declared shape [16, 8, 8]")
    missing = common_pb2.Latent(ref=common_pb2.TensorRef(key="jobs/bad/latents/missing.safetensors"))
    expect_status(grpc.StatusCode.NOT_FOUND, stub.Decode, _decode(missing), match="missing.safetensors")


def test_named_output_keys_stay_under_the_requests_own_job(stub, store):
    theirs = "jobs/job-vae-victim/latents/out.safetensors"
    store.put_tensor(theirs, torch.ones(16, 4, 4))
    before = store.get_bytes(theirs)

    def encode(job_id, key):
        return stub.Encode(vae_pb2.VAEEncodeRequest(
            inputs=[_encode_input(SMALL[1], resize=vae_pb2.RESIZE_NONE),
                    _encode_input(SMALL[1], resize=vae_pb2.RESIZE_NONE, output_key=key)],
            delivery=common_pb2.DELIVERY_OBJECT, job_id=job_id))

    bad = grpc.StatusCode.INVALID_ARGUMENT
    for job_id, key in [("job-vae-attacker", theirs), ("", theirs), ("job-vae-attacker", "uploads/x.safetensors")]:
        expect_status(bad, encode, job_id, key, match="output_key")
    assert store.get_bytes(theirs) == before
    assert store.keys("jobs/job-vae-attacker/") == []  # refused before any input was written
    dec = vae_pb2.VAEDecodeRequest(inputs=[vae_pb2.VAEDecodeInput(latent=common_pb2.Latent(
        inline=tensor_to_message(torch.zeros(16, 4, 4))), output_key="jobs/job-vae-victim/images/x.png")],
        delivery=common_pb2.DELIVERY_OBJECT, job_id="job-vae-attacker")
    expect_status(bad, stub.Decode, dec, match="output_key")

    mine = "jobs/job-vae-own/latents/named.safetensors"
    (_, lat) = encode("job-vae-own", mine).latents
    assert lat.ref.key == mine and store.get_tensor(mine).shape == (16, 4, 4)


def test_refs_outside_the_deployments_namespaces_are_not_read(stub, store):
    store.put_tensor("private/l.safetensors", torch.zeros(16, 4, 4))
    outside = common_pb2.Latent(ref=common_pb2.TensorRef(key="private/l.safetensors"))
    expect_status(grpc.StatusCode.INVALID_ARGUMENT, stub.Decode, _decode(outside), match="not readable")
    store.put_bytes("private/cat.png", png_bytes(SMALL[1]))
    req = vae_pb2.VAEEncodeRequest(inputs=[vae_pb2.VAEEncodeInput(
        image=common_pb2.ImageRef(object=common_pb2.ObjectRef(key="private/cat.png")))])
    expect_status(grpc.StatusCode.INVALID_ARGUMENT, stub.Encode, req, match="not readable")
    store.put_bytes("uploads/vae/cat.png", png_bytes(SMALL[1]))
    req.inputs[0].image.object.key = "uploads/vae/cat.png"
    req.inputs[0].resize = vae_pb2.RESIZE_NONE
    req.delivery = common_pb2.DELIVERY_INLINE
    assert stub.Encode(req).latents[0].size.width == 32


def test_sizes_the_vae_cannot_take_are_refused_in_process_and_by_the_server(stub, vae_engine):
    with pytest.raises(ImageError, match="multiples of 16.*got 30x32"):
        vae_engine.encode(noise_image(30, 32))
    assert vae_engine.encode(noise_image(1040, 16)).latent.shape == (16, 2, 130)  # only the server bounds sides
    for (w, h), match in [((30, 32), "multiples of 16"), ((32, 40), "multiples of 16"), ((1040, 16), "at most 1024")]:
        req = vae_pb2.VAEEncodeRequest(inputs=[_encode_input(noise_image(w, h), resize=vae_pb2.RESIZE_NONE)])
        err = expect_status(grpc.StatusCode.INVALID_ARGUMENT, stub.Encode, req, match=match)
        assert f"got {w}x{h}" in err.details()


def test_bad_images_are_invalid_argument(stub):
    odd = vae_pb2.VAEEncodeRequest(inputs=[_encode_input(noise_image(30, 32), resize=vae_pb2.RESIZE_NONE)])
    expect_status(grpc.StatusCode.INVALID_ARGUMENT, stub.Encode, odd, match="multiples of 16")
    corrupt = vae_pb2.VAEEncodeRequest(inputs=[vae_pb2.VAEEncodeInput(image=common_pb2.ImageRef(encoded=b"GIF89a..."))])
    expect_status(grpc.StatusCode.INVALID_ARGUMENT, stub.Encode, corrupt, match="cannot decode image")
