"""Presigned GET URLs against the real local S3 server: fetched with a plain HTTP client (no
credentials), refused when tampered with, expired or signed with the wrong key, and signed for the
public endpoint when one is configured."""

from __future__ import annotations

import time
from dataclasses import replace
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import pytest

from services.common.contracts import InputError
from services.common.storage import MAX_PRESIGN_S, ObjectStore, StorageConfig
from services.dev.ports import free_port

KEY = "jobs/presign/images/a=b.png"  # '=' must be URI-encoded the same way by signer and server
OTHER = "jobs/presign/images/other.png"


@pytest.fixture(scope="module")
def objects(store):
    store.put_bytes(KEY, b"\x89PNG the image", "application/octet-stream")
    store.put_bytes(OTHER, b"someone else's image", "image/png")
    return store


def error_code(response: httpx.Response) -> str:
    """The <Code> of an S3 error answer."""
    text = response.text
    return text.split("<Code>", 1)[1].split("</Code>", 1)[0] if "<Code>" in text else ""


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


def test_a_presigned_url_fetches_the_object_without_credentials(objects):
    url = objects.presigned_get(KEY)
    r = httpx.get(url)
    assert r.status_code == 200 and r.content == b"\x89PNG the image"
    assert r.headers["content-type"] == "application/octet-stream"  # as stored
    typed = httpx.get(objects.presigned_get(KEY, response_content_type="image/png"))
    assert typed.status_code == 200 and typed.content == b"\x89PNG the image"
    assert typed.headers["content-type"] == "image/png"
    assert httpx.get(url.split("?", 1)[0]).status_code == 403  # the same address unsigned is refused


def test_the_query_order_does_not_matter(objects):
    """The server canonicalizes the query (sorted by key) as S3 does, not the URL's text."""
    parts = urlsplit(objects.presigned_get(KEY, response_content_type="image/png"))
    reordered = urlunsplit(parts._replace(query="&".join(reversed(parts.query.split("&")))))
    assert reordered != urlunsplit(parts)
    r = httpx.get(reordered)
    assert r.status_code == 200 and r.content == b"\x89PNG the image"


def test_a_tampered_url_is_refused(objects):
    url = objects.presigned_get(KEY)
    signature = dict(parse_qsl(urlsplit(url).query))["X-Amz-Signature"]
    flipped = ("0" if signature[0] != "0" else "1") + signature[1:]
    tampered = {
        "signature": with_query(url, **{"X-Amz-Signature": flipped}),
        "key": url.replace("a%3Db.png", "other.png", 1),  # an object that exists, with KEY's signature
        "expires": with_query(url, **{"X-Amz-Expires": "7200"}),
        "content type": with_query(url, **{"response-content-type": "text/html"}),
    }
    assert tampered["key"] != url
    for what, bad in tampered.items():
        r = httpx.get(bad)
        assert r.status_code == 403, what
        assert error_code(r) == "SignatureDoesNotMatch", (what, r.text)
        assert b"image" not in r.content, what
    assert httpx.get(url).status_code == 200  # the genuine one still works


def test_an_expired_url_is_refused(objects):
    url = objects.presigned_get(KEY, expires_s=1)
    time.sleep(2.2)
    r = httpx.get(url)
    assert r.status_code == 403 and error_code(r) == "AccessDenied" and "expired" in r.text


@pytest.mark.parametrize("field, value, codes", [("secret_key", "wrong-secret", {"SignatureDoesNotMatch"}),
                                                 ("access_key", "nobody", {"AccessDenied", "InvalidAccessKeyId"})])
def test_a_url_signed_with_wrong_credentials_is_refused(objects, field, value, codes):
    bad = ObjectStore(replace(objects.cfg, **{field: value}))
    r = httpx.get(bad.presigned_get(KEY))
    assert r.status_code == 403 and error_code(r) in codes, r.text


def test_urls_are_signed_for_the_public_endpoint(s3, objects):
    port = s3.endpoint.rsplit(":", 1)[1]
    public = ObjectStore(replace(objects.cfg, endpoint=f"localhost:{port}", public_endpoint=f"127.0.0.1:{port}"))
    url = public.presigned_get(KEY)
    assert urlsplit(url).netloc == f"127.0.0.1:{port}" and url.startswith("http://")
    r = httpx.get(url)
    assert r.status_code == 200 and r.content == b"\x89PNG the image"
    # The host is signed: the same URL presented under the internal name is refused.
    r = httpx.get(url, headers={"host": f"localhost:{port}"})
    assert r.status_code == 403 and error_code(r) == "SignatureDoesNotMatch"
    internal = ObjectStore(replace(objects.cfg, endpoint=f"localhost:{port}")).presigned_get(KEY)
    assert urlsplit(internal).netloc == f"localhost:{port}"


def test_the_public_endpoint_scheme_decides_tls():
    cfg = StorageConfig("minio:9000", "k", "s", "bucket", secure=False, public_endpoint="https://files.example.com/")
    url = ObjectStore(cfg).presigned_get(KEY)
    assert url.startswith("https://files.example.com/bucket/jobs/presign/images/")
    plain = replace(cfg, secure=True, public_endpoint="http://files.example.com:8080")
    assert ObjectStore(plain).presigned_get(KEY).startswith("http://files.example.com:8080/bucket/")
    assert ObjectStore(replace(cfg, public_endpoint="files.example.com")).presigned_get(KEY).startswith("http://")
    with pytest.raises(ValueError, match="scheme"):
        ObjectStore(replace(cfg, public_endpoint="ftp://files.example.com"))


def test_presigning_makes_no_request():
    """The region is configured, so the client never asks the store for it: presigning against an address
    where nothing listens succeeds at once."""
    cfg = StorageConfig(f"127.0.0.1:{free_port('127.0.0.1')}", "k", "s", "bucket", region="eu-west-1")
    started = time.monotonic()
    url = ObjectStore(cfg).presigned_get(KEY, expires_s=60)
    assert time.monotonic() - started < 1.0
    query = dict(parse_qsl(urlsplit(url).query))
    assert query["X-Amz-Expires"] == "60" and "/eu-west-1/s3/aws4_request" in query["X-Amz-Credential"]


@pytest.mark.parametrize("expires_s", [0, -1, MAX_PRESIGN_S + 1, 1.5, True, "60"])
def test_expiry_out_of_bounds_is_refused(expires_s):
    store = ObjectStore(StorageConfig("127.0.0.1:9", "k", "s", "bucket"))
    with pytest.raises(InputError, match="expires_s"):
        store.presigned_get(KEY, expires_s=expires_s)


def test_expiry_bounds_are_inclusive():
    store = ObjectStore(StorageConfig("127.0.0.1:9", "k", "s", "bucket"))
    for expires_s in (1, MAX_PRESIGN_S):
        assert dict(parse_qsl(urlsplit(store.presigned_get(KEY, expires_s)).query))["X-Amz-Expires"] == str(expires_s)


def test_presign_settings_from_env():
    env = {"BAGEL_S3_ENDPOINT": "minio:9000"}
    cfg = StorageConfig.from_env(env)
    assert cfg.public_endpoint is None and cfg.presign and ObjectStore(cfg).supports_presigned
    cfg = StorageConfig.from_env({**env, "BAGEL_S3_PUBLIC_ENDPOINT": "https://files.example.com",
                                  "BAGEL_S3_PRESIGN": "0"})
    assert cfg.public_endpoint == "https://files.example.com" and cfg.endpoint == "minio:9000"
    assert cfg.secure is False  # the public scheme is the public endpoint's only
    assert not ObjectStore(cfg).supports_presigned
