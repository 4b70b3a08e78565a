import grpc
import pytest
import torch

from services.common.protos import common_pb2, vit_pb2, vit_pb2_grpc
from services.common.tensor_codec import tensor_from_message
from service_helpers import expect_status, noise_image, png_bytes

IMAGES = [noise_image(40, 30, seed=1), noise_image(20, 36, seed=2)]  # different sizes -> different grids


def _request(*images, **kw):
    return vit_pb2.ViTEncodeRequest(
        inputs=[vit_pb2.ViTEncodeInput(image=common_pb2.ImageRef(encoded=png_bytes(im))) for im in images], **kw)


@pytest.fixture(scope="module")
def stub(vit_server):
    return vit_pb2_grpc.ViTServiceStub(vit_server.channel)


def test_two_images_packed_equal_each_encoded_in_process(stub, vit_engine):
    resp = stub.Encode(_request(*IMAGES, delivery=common_pb2.DELIVERY_INLINE))
    assert len(resp.features) == 2
    for out, img in zip(resp.features, IMAGES):
        (ref,) = vit_engine.encode([img])  # one image per forward
        got = tensor_from_message(out.inline)
        assert (out.grid.rows, out.grid.cols) == ref.grid
        assert got.shape == ref.features.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, ref.features, rtol=1e-5, atol=1e-5)
        assert (out.resized.width, out.resized.height) == (ref.grid[1] * 14, ref.grid[0] * 14)
        assert not out.HasField("ref")  # inline only: nothing stored
    assert tuple(resp.features[0].inline.shape) != tuple(resp.features[1].inline.shape)


def test_object_delivery_writes_safetensors_under_idempotent_keys(stub, store, vit_engine):
    resp = stub.Encode(_request(*IMAGES, delivery=common_pb2.DELIVERY_OBJECT, job_id="job-vit-1"))
    keys = [f.ref.key for f in resp.features]
    assert all(k.startswith("jobs/job-vit-1/features/") and k.endswith(".safetensors") for k in keys)
    assert keys[0] != keys[1]
    for f, img in zip(resp.features, IMAGES):
        assert not f.HasField("inline")
        stored = store.get_tensor(f.ref.key)
        assert list(f.ref.shape) == list(stored.shape) and f.ref.dtype == common_pb2.DTYPE_FLOAT32
        assert f.ref.bucket == store.bucket
        torch.testing.assert_close(stored, vit_engine.encode([img])[0].features, rtol=1e-5, atol=1e-5)
    again = stub.Encode(_request(*IMAGES, delivery=common_pb2.DELIVERY_OBJECT, job_id="job-vit-1"))
    assert [f.ref.key for f in again.features] == keys  # a retry overwrites, it does not add objects


def test_both_deliveries_bf16_safetensors_and_explicit_key(stub, store):
    req = _request(IMAGES[0], delivery=common_pb2.DELIVERY_BOTH, output_dtype=common_pb2.DTYPE_BFLOAT16,
                   inline_encoding=common_pb2.TENSOR_ENCODING_SAFETENSORS, job_id="job-vit-named")
    req.inputs[0].output_key = "jobs/job-vit-named/custom/feat-1.safetensors"  # named keys stay in the job
    (f,) = stub.Encode(req).features
    inline = tensor_from_message(f.inline)
    assert inline.dtype == torch.bfloat16 and f.inline.encoding == common_pb2.TENSOR_ENCODING_SAFETENSORS
    assert f.ref.key == "jobs/job-vit-named/custom/feat-1.safetensors" and f.ref.dtype == common_pb2.DTYPE_BFLOAT16
    assert torch.equal(store.get_tensor(f.ref.key), inline)


def test_request_id_names_the_keys_without_a_job(stub):
    resp, call = stub.Encode.with_call(_request(IMAGES[0], delivery=common_pb2.DELIVERY_OBJECT),
                                       metadata=[("x-request-id", "req-42")])
    assert resp.features[0].ref.key.startswith("requests/req-42/features/")
    assert ("x-request-id", "req-42") in [(m.key, m.value) for m in call.initial_metadata()]


def test_image_from_an_object_key(stub, store):
    store.put_bytes("uploads/vit-in.png", png_bytes(IMAGES[1]), "image/png")
    req = vit_pb2.ViTEncodeRequest(delivery=common_pb2.DELIVERY_INLINE, inputs=[
        vit_pb2.ViTEncodeInput(image=common_pb2.ImageRef(object=common_pb2.ObjectRef(key="uploads/vit-in.png")))])
    from_object = tensor_from_message(stub.Encode(req).features[0].inline)
    direct_resp = stub.Encode(_request(IMAGES[1], delivery=common_pb2.DELIVERY_INLINE))
    direct = tensor_from_message(direct_resp.features[0].inline)
    assert torch.equal(from_object, direct)


def test_bad_inputs_get_clear_statuses(stub):
    bad = grpc.StatusCode.INVALID_ARGUMENT
    junk = common_pb2.ImageRef(encoded=b"\x89PNG junk")
    corrupt = vit_pb2.ViTEncodeRequest(inputs=[vit_pb2.ViTEncodeInput(image=junk)])
    err = expect_status(bad, stub.Encode, corrupt, match="inputs[0].image: cannot decode image")
    assert "0x" not in err.details()  # no heap address of the decoder's buffer
    expect_status(bad, stub.Encode, vit_pb2.ViTEncodeRequest(), match="at least one")
    expect_status(bad, stub.Encode, vit_pb2.ViTEncodeRequest(inputs=[vit_pb2.ViTEncodeInput()]), match="no image given")
    expect_status(bad, stub.Encode, _request(IMAGES[0], output_dtype=common_pb2.DTYPE_INT32), match="output_dtype")
    expect_status(bad, stub.Encode, _request(*[IMAGES[1]] * 17), match="at most 16")
    missing = vit_pb2.ViTEncodeRequest(inputs=[vit_pb2.ViTEncodeInput(
        image=common_pb2.ImageRef(object=common_pb2.ObjectRef(key="uploads/nope.png")))])
    expect_status(grpc.StatusCode.NOT_FOUND, stub.Encode, missing, match="uploads/nope.png")
    other = vit_pb2.ViTEncodeRequest(inputs=[vit_pb2.ViTEncodeInput(
        image=common_pb2.ImageRef(object=common_pb2.ObjectRef(bucket="elsewhere", key="uploads/a.png")))])
    expect_status(grpc.StatusCode.PERMISSION_DENIED, stub.Encode, other)
    bad_key = _request(IMAGES[0], delivery=common_pb2.DELIVERY_OBJECT)
    bad_key.inputs[0].output_key = "../escape"
    expect_status(bad, stub.Encode, bad_key, match="not allowed")


def test_object_delivery_without_storage_is_a_failed_precondition(make_server):
    s = make_server("vit")  # no store
    stub = vit_pb2_grpc.ViTServiceStub(s.channel)
    expect_status(grpc.StatusCode.FAILED_PRECONDITION, stub.Encode,
                  _request(IMAGES[0], delivery=common_pb2.DELIVERY_OBJECT), match="no object storage")
    (f,) = stub.Encode(_request(IMAGES[0])).features  # unspecified delivery falls back to inline
    assert f.HasField("inline") and not f.HasField("ref")
