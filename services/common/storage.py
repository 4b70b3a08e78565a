"""Object storage through the `minio` client: tensors as safetensors, images as PNG, predictable keys.

Keys are chosen so that a retried request writes the same object again instead of a new one:

    jobs/{job_id}/{kind}/{digest}.{ext}          the caller named a job (the orchestrator always does)
    requests/{request_id}/{kind}/{digest}.{ext}  otherwise; a client retrying with the same x-request-id
                                                 gets the same keys
    uploads/...                                  inputs clients (or operators' tooling) put in the bucket;
                                                 the only place a job's `image_key` may name

`digest` hashes the step's input (image bytes, latent bytes) and its parameters, so the same input in
the same job maps to one object, and two inputs never share one. A caller may also name a key itself,
under its own job's prefix (check_output_key). Model servers read inputs only from these namespaces
(check_input_key).
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Mapping

import numpy as np
import urllib3
from minio import Minio
from minio.error import MinioException, S3Error
from PIL import Image

from services.common.contracts import (FailedPrecondition, InputError, NotFound, PermissionDenied,
                                       Unavailable)
from services.common.settings import EnvSettings, setting

if TYPE_CHECKING:
    import torch

# Bounds what a single read may pull into memory: 7B ViT features of a 980 px image are ~22 MiB in fp32.
MAX_OBJECT_BYTES = 256 * 1024 * 1024
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/=]*$")
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "NoSuchObject", "ResourceNotFound"}
# S3 SigV4 accepts presigned URLs valid for 1 s up to 7 days.
MIN_PRESIGN_S, MAX_PRESIGN_S = 1, 7 * 24 * 3600


class StorageError(Unavailable):
    """The object store failed or refused the request (unreachable, bad credentials...)."""


class ObjectNotFound(NotFound, StorageError):
    """The bucket or key does not exist."""


class StorageNotConfigured(FailedPrecondition, StorageError):
    """This server runs without object storage, but the request needs it."""


class BadObjectKey(InputError):
    """A caller-supplied key is not acceptable, or names an object too large to read (the caller's fault)."""


class BucketNotAllowed(PermissionDenied):
    """A caller named a bucket other than this deployment's one."""


@dataclass(frozen=True)
class StorageConfig(EnvSettings):
    endpoint: str = setting("BAGEL_S3_ENDPOINT")  # host:port of the S3 API, no scheme (the minio client's form)
    access_key: str = setting("BAGEL_S3_ACCESS_KEY", "")
    secret_key: str = setting("BAGEL_S3_SECRET_KEY", "")
    bucket: str = setting("BAGEL_S3_BUCKET", "bagel")  # every object this deployment writes lives here
    secure: bool = setting("BAGEL_S3_SECURE", False)  # https to the store
    # set explicitly: saves a GetBucketLocation round trip per bucket
    region: str = setting("BAGEL_S3_REGION", "us-east-1")
    # Where clients outside the deployment reach the store (host:port, or an http(s):// URL whose scheme
    # decides TLS), when that differs from `endpoint` (e.g. minio:9000 inside a cluster). Only used to
    # presign URLs: it is never connected to.
    public_endpoint: str | None = setting("BAGEL_S3_PUBLIC_ENDPOINT", None)
    # Off for a store that cannot serve presigned URLs: ObjectStore.supports_presigned then says so.
    presign: bool = setting("BAGEL_S3_PRESIGN", True)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "StorageConfig | None":
        """The BAGEL_S3_* variables; None without an endpoint. The endpoint may carry a scheme: https://
        turns TLS on unless BAGEL_S3_SECURE says otherwise."""
        cfg = super().from_env(env, endpoint="")
        if not cfg.endpoint:
            return None
        scheme, sep, host = cfg.endpoint.partition("://")
        if sep and scheme in ("http", "https"):
            # The scheme is the default of `secure` (BAGEL_S3_SECURE still wins): read again with it.
            cfg = replace(super().from_env(env, secure=scheme == "https"), endpoint=host)
        return replace(cfg, endpoint=cfg.endpoint.rstrip("/"))


def _split_endpoint(endpoint: str, secure: bool) -> tuple[str, bool]:
    """(host:port, secure) of `endpoint`, which may carry an http:// or https:// scheme (that then decides
    `secure`) and a trailing '/'."""
    scheme, sep, host = endpoint.strip().partition("://")
    if sep:
        if scheme not in ("http", "https"):
            raise ValueError(f"S3 endpoint {endpoint!r}: the scheme must be http or https")
        secure = scheme == "https"
    else:
        host = endpoint.strip()
    return host.rstrip("/"), secure


# ---- keys ----------------------------------------------------------------------------------------
def check_key(key: str) -> str:
    if not key or len(key) > 512 or not _KEY_RE.fullmatch(key) or ".." in key or "//" in key:
        raise BadObjectKey(f"object key {key!r} is not allowed: use 1-512 characters of [A-Za-z0-9._-/=], "
                           "not starting with '/' or '.', without '..' or '//'")
    return key


# Where client inputs live: a job's `image_key` must lie here, so a client can never make the gateway read
# another job's objects (jobs/...) or anything else in the bucket.
UPLOADS_PREFIX = "uploads/"
# What model servers may read by reference: objects this deployment's own pipeline wrote (jobs/, and
# requests/ for direct calls without a job) and client uploads. Anything else in the bucket is not theirs.
READABLE_PREFIXES = ("jobs/", "requests/", UPLOADS_PREFIX)


def check_input_key(key: str) -> str:
    """`key` if a model server may read it (a valid key under READABLE_PREFIXES), else BadObjectKey."""
    check_key(key)
    if not key.startswith(READABLE_PREFIXES):
        raise BadObjectKey(f"object key {key!r} is not readable here: inputs must lie under "
                           + ", ".join(READABLE_PREFIXES))
    return key


def check_output_key(key: str, job_id: str) -> str:
    """An output key a caller named: it must lie under its own job's prefix, so a direct call cannot
    overwrite another job's objects (or anything outside jobs/). The job id is the caller's capability."""
    check_key(key)
    if not job_id:
        raise BadObjectKey("output_key needs a job_id: a named key must lie under jobs/{job_id}/")
    prefix = job_prefix(job_id)
    if not key.startswith(prefix) or key == prefix:
        raise BadObjectKey(f"output_key {key!r} must lie under this request's job prefix {prefix!r}")
    return key


def digest(*parts: bytes | str) -> str:
    """A short content hash of a step's inputs and parameters (32 hex chars = 128 bits)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else bytes(part)
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:32]


def job_prefix(job_id: str) -> str:
    """The folder of everything a job stores (input, features, latents, output)."""
    # One path segment: a job id with '/' could name a folder inside another job's.
    if not job_id or "/" in job_id:
        raise BadObjectKey(f"job id {job_id!r} must be non-empty and contain no '/'")
    return f"jobs/{job_id}/"


def output_key(kind: str, name: str, ext: str, *, job_id: str = "", request_id: str = "") -> str:
    """`jobs/{job_id}/{kind}/{name}.{ext}`, or under `requests/{request_id}/` when there is no job."""
    if job_id:
        prefix = job_prefix(job_id)
    elif request_id:
        prefix = f"requests/{request_id}/"
    else:
        raise BadObjectKey("an output key needs a job id or a request id")
    return check_key(f"{prefix}{kind}/{name}.{ext}")


# ---- the store -----------------------------------------------------------------------------------
class ObjectStore:
    """One bucket of an S3-compatible store. Reads and writes bytes, safetensors tensors and PNG images."""

    def __init__(self, cfg: StorageConfig, client: Minio | None = None):
        self.cfg, self.bucket = cfg, cfg.bucket
        # Short timeouts and few retries: a dead store should fail a request in seconds, not minutes.
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=5.0, read=60.0), maxsize=16,
                                   retries=urllib3.Retry(total=2, backoff_factor=0.2,
                                                         status_forcelist=[500, 502, 503, 504]))
        # region= matters: without it the client asks the store for the bucket's region before its
        # first request, and before presigning (which is otherwise offline).
        self.client = client or Minio(cfg.endpoint, access_key=cfg.access_key, secret_key=cfg.secret_key,
                                      secure=cfg.secure, region=cfg.region, http_client=http)
        self._presigner = self.client
        if cfg.public_endpoint:
            host, secure = _split_endpoint(cfg.public_endpoint, cfg.secure)
            # Same key pair and region; the signature covers the host, so URLs must be signed for the
            # address clients will use.
            self._presigner = Minio(host, access_key=cfg.access_key, secret_key=cfg.secret_key, secure=secure,
                                    region=cfg.region)

    @property
    def supports_presigned(self) -> bool:
        """Whether presigned_get() URLs may be handed out (BAGEL_S3_PRESIGN)."""
        return self.cfg.presign

    def presigned_get(self, key: str, expires_s: int = 3600, response_content_type: str | None = None) -> str:
        """A URL that GETs object `key` without credentials until `expires_s` seconds from now. Computed
        locally (no request to the store); the store checks signature and expiry when it is used.
        `response_content_type` makes the store answer with that Content-Type."""
        check_key(key)
        if isinstance(expires_s, bool) or not isinstance(expires_s, int) or \
                not MIN_PRESIGN_S <= expires_s <= MAX_PRESIGN_S:
            raise InputError(f"expires_s must be a whole number of seconds from {MIN_PRESIGN_S} to "
                             f"{MAX_PRESIGN_S} (7 days), got {expires_s!r}")
        headers = {"response-content-type": response_content_type} if response_content_type else None
        return self._call(f"presign {self.bucket}/{key}", self._presigner.presigned_get_object, self.bucket, key,
                          expires=timedelta(seconds=expires_s), response_headers=headers)

    def _bucket(self, bucket: str | None) -> str:
        if bucket and bucket != self.bucket:
            # The server's credentials may reach other buckets; callers only get this deployment's one.
            raise BucketNotAllowed(f"bucket {bucket!r} is not served here (this server uses {self.bucket!r})")
        return self.bucket

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except S3Error as e:
            if e.code in _NOT_FOUND_CODES:
                raise ObjectNotFound(f"{what}: not found ({e.code})") from None
            raise StorageError(f"{what}: {e.code}: {e.message}") from None
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as e:
            raise StorageError(f"{what}: object store at {self.cfg.endpoint} failed: {e}") from None

    def ensure_bucket(self) -> None:
        if not self._call(f"bucket {self.bucket}", self.client.bucket_exists, self.bucket):
            try:
                self._call(f"create bucket {self.bucket}", self.client.make_bucket, self.bucket)
            except StorageError as e:  # another process created it meanwhile
                if "BucketAlreadyOwnedByYou" not in str(e) and "BucketAlreadyExists" not in str(e):
                    raise

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        check_key(key)
        self._call(f"put {self.bucket}/{key}", self.client.put_object, self.bucket, key, io.BytesIO(data),
                   len(data), content_type=content_type)

    def get_bytes(self, key: str, bucket: str | None = None, max_bytes: int = MAX_OBJECT_BYTES) -> bytes:
        bucket = self._bucket(bucket)
        check_key(key)
        where = f"object {bucket}/{key}"
        stat = self._call(where, self.client.stat_object, bucket, key)
        if stat.size is not None and stat.size > max_bytes:
            raise BadObjectKey(f"{where} is {stat.size} bytes; the limit is {max_bytes}")
        response = self._call(where, self.client.get_object, bucket, key)
        try:
            return self._call(where, response.read)
        finally:
            response.close()
            response.release_conn()

    def exists(self, key: str) -> bool:
        try:
            self._call(f"object {self.bucket}/{key}", self.client.stat_object, self.bucket, check_key(key))
            return True
        except ObjectNotFound:
            return False

    def delete(self, key: str) -> None:
        self._call(f"delete {self.bucket}/{key}", self.client.remove_object, self.bucket, check_key(key))

    def keys(self, prefix: str) -> list[str]:
        """Every key under `prefix` (which must end with '/': a whole folder, never a name's prefix)."""
        if not prefix.endswith("/"):
            raise BadObjectKey(f"a key prefix must end with '/': {prefix!r}")
        check_key(prefix + "x")
        listing = self._call(f"list {self.bucket}/{prefix}", self.client.list_objects, self.bucket,
                             prefix=prefix, recursive=True)
        return self._call(f"list {self.bucket}/{prefix}", lambda: [o.object_name for o in listing])

    def delete_prefix(self, prefix: str, keep: frozenset[str] | set[str] = frozenset()) -> int:
        """Delete every object under `prefix` except the keys in `keep`; returns how many were deleted.
        One DELETE per object: a job has a handful, and s3rver (the local stack's server) fails S3's
        multi-object delete of two or more keys in one folder."""
        doomed = [k for k in self.keys(prefix) if k not in keep]
        for key in doomed:
            try:
                self.delete(key)
            except ObjectNotFound:
                pass  # deleted meanwhile (another sweep): the goal is met
        return len(doomed)

    # ---- typed objects ---------------------------------------------------------------------------
    # The tensor codec (and so torch) is imported on first use: the gateway and the worker only move
    # bytes and never load it.
    def put_tensor(self, key: str, tensor: torch.Tensor) -> None:
        from services.common.tensor_codec import tensor_to_safetensors

        self.put_bytes(key, tensor_to_safetensors(tensor), "application/vnd.safetensors")

    def get_tensor(self, key: str, bucket: str | None = None) -> torch.Tensor:
        from services.common.tensor_codec import safetensors_to_tensor

        data = self.get_bytes(key, bucket)
        return safetensors_to_tensor(data, where=f"object {self._bucket(bucket)}/{key}")

    def put_png(self, key: str, pixels: np.ndarray) -> bytes:
        data = encode_png(pixels)
        self.put_bytes(key, data, "image/png")
        return data


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes (lossless, so a decode returns the very same pixels)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


__all__ = ["StorageConfig", "ObjectStore", "StorageError", "ObjectNotFound", "StorageNotConfigured",
           "BadObjectKey", "BucketNotAllowed", "check_key", "check_input_key", "check_output_key", "digest", "job_prefix", "output_key", "encode_png",
           "MAX_OBJECT_BYTES", "UPLOADS_PREFIX", "READABLE_PREFIXES", "MIN_PRESIGN_S", "MAX_PRESIGN_S"]
