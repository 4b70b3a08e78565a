import pytest
import torch
from safetensors.torch import save

from services.common.protos import common_pb2
from services.common.tensor_codec import (RAW, SAFETENSORS, TensorCodecError, expect, safetensors_to_tensor,
                                          tensor_from_message, tensor_to_message, tensor_to_safetensors)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64, torch.uint8, torch.bool]


@pytest.mark.parametrize("encoding", [RAW, SAFETENSORS])
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_is_exact(dtype, encoding):
    t = (torch.randn(3, 5, 2, generator=torch.Generator().manual_seed(0)) * 50).to(dtype)
    msg = tensor_to_message(t, encoding)
    assert list(msg.shape) == [3, 5, 2]
    back = tensor_from_message(common_pb2.Tensor.FromString(msg.SerializeToString()))
    assert back.dtype == dtype and torch.equal(back, t)


def test_raw_layout_is_little_endian_row_major():
    msg = tensor_to_message(torch.tensor([[1, 2], [3, 256]], dtype=torch.int32))
    assert msg.data == bytes([1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 1, 0, 0])
    assert msg.dtype == common_pb2.DTYPE_INT32 and msg.encoding == common_pb2.TENSOR_ENCODING_RAW


def test_empty_and_non_contiguous_tensors():
    assert tensor_from_message(tensor_to_message(torch.zeros(0, 4))).shape == (0, 4)
    t = torch.arange(12.0).reshape(3, 4).t()  # a transposed view
    assert torch.equal(tensor_from_message(tensor_to_message(t)), t)


@pytest.mark.parametrize("msg, match", [
    (common_pb2.Tensor(shape=[2, 2], dtype=common_pb2.DTYPE_FLOAT32, data=b"\0" * 12), "needs 16 bytes, got 12"),
    (common_pb2.Tensor(shape=[2], dtype=common_pb2.DTYPE_UNSPECIFIED, data=b"\0" * 8), "DTYPE_UNSPECIFIED"),
    (common_pb2.Tensor(shape=[2], dtype=99, data=b"\0" * 8), "not a valid tensor dtype"),
    (common_pb2.Tensor(shape=[-1, 2], dtype=common_pb2.DTYPE_FLOAT32, data=b""), "is invalid"),
    (common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, data=b"\0" * 8), "needs its shape"),
    (common_pb2.Tensor(data=b"not safetensors", encoding=SAFETENSORS), "not a valid safetensors"),
    (common_pb2.Tensor(shape=[4], data=tensor_to_safetensors(torch.zeros(2, 2)), encoding=SAFETENSORS),
     "declared shape [4]"),
    (common_pb2.Tensor(dtype=common_pb2.DTYPE_INT64, data=tensor_to_safetensors(torch.zeros(2)), encoding=SAFETENSORS),
     "declared dtype DTYPE_INT64"),
    (common_pb2.Tensor(data=save({"a": torch.zeros(1), "b": torch.zeros(1)}), encoding=SAFETENSORS),
     "exactly one tensor"),
    (common_pb2.Tensor(shape=[1], dtype=common_pb2.DTYPE_FLOAT32, data=b"\0" * 4, encoding=7),
     "unknown tensor encoding"),
])
def test_malformed_messages_are_refused_with_a_reason(msg, match):
    with pytest.raises(TensorCodecError, match=match.replace("[", r"\[").replace("]", r"\]")) as info:
        tensor_from_message(msg, where="inputs[0].latent")
    assert "inputs[0].latent" in str(info.value)
    assert isinstance(info.value, ValueError)  # servers map it to INVALID_ARGUMENT


def test_safetensors_payload_takes_any_single_name():
    t = torch.arange(6, dtype=torch.int64)
    assert torch.equal(safetensors_to_tensor(save({"latent": t})), t)


def test_expect_checks_shape_and_dtype():
    t = torch.zeros(16, 4, 6)
    expect(t, (16, None, None), (torch.float32,), "latent")
    with pytest.raises(TensorCodecError, match=r"shape must be \[16, '\*', '\*'\], got \[16, 4\]"):
        expect(torch.zeros(16, 4), (16, None, None), (torch.float32,), "latent")
    with pytest.raises(TensorCodecError, match="DTYPE_INT32"):
        expect(t.int(), (16, None, None), (torch.float32,), "latent")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_expect_finite_refuses_nan_and_inf(bad):
    t = torch.zeros(16, 4, 6, dtype=torch.bfloat16)
    expect(t, (16, None, None), (torch.bfloat16,), "latent", finite=True)
    t[0, 0, 0] = bad
    expect(t, (16, None, None), (torch.bfloat16,), "latent")  # off unless asked for
    with pytest.raises(TensorCodecError, match="latent: values must be finite"):
        expect(t, (16, None, None), (torch.bfloat16,), "latent", finite=True)
