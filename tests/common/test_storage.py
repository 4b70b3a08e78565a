from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load

from services.common.storage import (BadObjectKey, BucketNotAllowed, ObjectNotFound, ObjectStore, StorageConfig,
                                     StorageError, check_input_key, check_key, check_output_key, digest, encode_png,
                                     job_prefix, output_key)
from service_helpers import decode_png


def test_tensors_are_stored_as_safetensors(store):
    t = torch.randn(16, 6, 8)
    store.put_tensor("jobs/t1/latents/a.safetensors", t)
    raw = store.get_bytes("jobs/t1/latents/a.safetensors")
    assert torch.equal(load(raw)["tensor"], t)  # a plain safetensors file, readable by anyone
    assert torch.equal(store.get_tensor("jobs/t1/latents/a.safetensors"), t)
    assert store.exists("jobs/t1/latents/a.safetensors")


def test_png_objects_round_trip(store):
    pixels = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    data = store.put_png("jobs/t1/images/a.png", pixels)
    assert store.get_bytes("jobs/t1/images/a.png") == data
    assert np.array_equal(decode_png(data), pixels)


def test_missing_key_raises_not_found(store):
    with pytest.raises(ObjectNotFound, match="jobs/none/latents/x.safetensors"):
        store.get_tensor("jobs/none/latents/x.safetensors")
    assert not store.exists("jobs/none/latents/x.safetensors")


@pytest.mark.parametrize("field, value", [("secret_key", "wrong-secret"), ("access_key", "nobody")])
def test_the_server_checks_credentials(s3, store, field, value):
    store.put_bytes("jobs/t1/cred.bin", b"x")
    bad = ObjectStore(replace(store.cfg, **{field: value}))
    with pytest.raises(StorageError) as info:
        bad.get_bytes("jobs/t1/cred.bin")
    assert not isinstance(info.value, ObjectNotFound)
    with pytest.raises(StorageError):
        bad.put_bytes("jobs/t1/cred2.bin", b"y")
    assert not store.exists("jobs/t1/cred2.bin")


def test_only_the_configured_bucket_is_readable(store):
    with pytest.raises(BucketNotAllowed, match="not served here"):
        store.get_bytes("jobs/t1/latents/a.safetensors", bucket="someone-elses")


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", ".hidden", "with space", "x" * 600, "a\nb",
                                 "trailing\n"])
def test_bad_keys_are_refused(key):
    with pytest.raises(BadObjectKey):
        check_key(key)


def test_output_keys_are_predictable():
    d = digest("vae-encode", b"image bytes")
    assert d == digest("vae-encode", b"image bytes") and len(d) == 32
    assert d != digest("vae-encode", b"other bytes")
    assert digest("ab", "c") != digest("a", "bc")  # parts are length-framed
    assert output_key("latents", d, "safetensors", job_id="j1") == f"jobs/j1/latents/{d}.safetensors"
    assert output_key("images", d, "png", request_id="r9") == f"requests/r9/images/{d}.png"
    with pytest.raises(BadObjectKey):
        output_key("images", d, "png")


def test_named_output_keys_stay_in_their_job_and_inputs_in_known_namespaces():
    assert check_output_key("jobs/j1/mine.safetensors", "j1") == "jobs/j1/mine.safetensors"
    for key, job_id in [("jobs/j2/theirs.png", "j1"), ("jobs/j10/x.png", "j1"), ("uploads/x.png", "j1"),
                        ("jobs/j1/", "j1"), ("jobs/j1/x.png", "")]:
        with pytest.raises(BadObjectKey):
            check_output_key(key, job_id)
    for job_id in ("", "j1/sub"):  # a '/' would reach into a folder of another job
        with pytest.raises(BadObjectKey):
            job_prefix(job_id)
    for key in ("jobs/j1/a.safetensors", "requests/r1/a.safetensors", "uploads/u/cat.png"):
        assert check_input_key(key) == key
    for key in ("secrets/x", "job/x", "uploadsx/y", "../jobs/x"):
        with pytest.raises(BadObjectKey):
            check_input_key(key)


def test_config_from_env():
    assert StorageConfig.from_env({}) is None
    cfg = StorageConfig.from_env({"BAGEL_S3_ENDPOINT": "https://s3.local:9000/", "BAGEL_S3_ACCESS_KEY": "a",
                                  "BAGEL_S3_SECRET_KEY": "b", "BAGEL_S3_BUCKET": "bk"})
    assert (cfg.endpoint, cfg.access_key, cfg.secret_key, cfg.bucket, cfg.secure) == ("s3.local:9000", "a", "b",
                                                                                      "bk", True)
    assert StorageConfig.from_env({"BAGEL_S3_ENDPOINT": "minio:9000"}).secure is False
    # to_env() is what child processes get: it must read back as the same config, https included.
    for original in (cfg, StorageConfig("minio:9000", "k", "s", "b2", secure=False, region="eu-west-1")):
        assert StorageConfig.from_env(original.to_env()) == original


def test_encode_png_is_lossless():
    pixels = np.random.default_rng(1).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    assert np.array_equal(decode_png(encode_png(pixels)), pixels)


def test_a_folder_is_listed_and_deleted_but_what_is_kept_stays(store):
    folder = "jobs/folder-test/"
    for name in ("input", "features/a.safetensors", "latents/b.safetensors", "output.png"):
        store.put_bytes(folder + name, name.encode())
    store.put_bytes("jobs/folder-test-2/input", b"a neighbour sharing the name's prefix")
    assert sorted(store.keys(folder)) == [folder + n for n in
                                          ("features/a.safetensors", "input", "latents/b.safetensors", "output.png")]
    assert store.delete_prefix(folder, keep={folder + "output.png"}) == 3
    assert store.keys(folder) == [folder + "output.png"] and store.get_bytes(folder + "output.png") == b"output.png"
    assert store.exists("jobs/folder-test-2/input")
    assert store.delete_prefix(folder) == 1 and store.keys(folder) == [] and store.delete_prefix(folder) == 0
    with pytest.raises(BadObjectKey):
        store.keys("jobs/folder-test")  # a name's prefix would also match jobs/folder-test-2/
