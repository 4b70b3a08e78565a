"""A local S3-compatible server for tests and the single-machine stack.

Uses a real `minio` binary when one is on PATH; otherwise the npm package `s3rver` (objects on disk;
a small middleware added here verifies each request's SigV4 signature against the credentials given
here, which s3rver 3 alone does not), installed on first use into
the git-ignored `.cache/s3rver/` with `npm install`. The server listens on 127.0.0.1 on a free port and
dies with its parent: s3rver watches its stdin, minio is stopped by `stop()` or the context manager.

    python -m services.dev.s3_server --dir /tmp/s3 --port 9000     # prints the BAGEL_S3_* exports
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from services.common.storage import StorageConfig
from services.dev.ports import free_port

S3RVER_VERSION = "3.7.1"
REPO_ROOT = Path(__file__).resolve().parents[2]
S3RVER_PREFIX = Path(os.environ.get("BAGEL_S3RVER_PREFIX", REPO_ROOT / ".cache" / "s3rver"))
DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY = "bagel-local", "bagel-local-secret"

# Runs inside node. s3rver 3 only looks up the access key of a SigV4 request and accepts unsigned
# ones, so this adds a middleware, first in the chain, that verifies every request's AWS Signature V4
# against our key pair, in the Authorization header or in the query string (a presigned URL, which
# also expires): a wrong secret or a tampered URL is SignatureDoesNotMatch, as with MinIO. It then
# pre-creates buckets, prints the bound address as one JSON line, and exits when its stdin closes
# (the parent is gone).
_LAUNCHER = r"""
const crypto = require('crypto');
const cfg = JSON.parse(process.env.BAGEL_S3RVER_CONFIG);
const S3rver = require(cfg.module);
const Account = require(cfg.module + '/lib/models/account');
const S3Error = require(cfg.module + '/lib/models/error');
Account.DUMMY_ACCOUNT.revokeAccessKey('S3RVER');
Account.DUMMY_ACCOUNT.createKeyPair(cfg.accessKey, cfg.secretKey);

const hmac = (key, data) => crypto.createHmac('sha256', key).update(data).digest();
const sha256hex = data => crypto.createHash('sha256').update(data).digest('hex');
const AUTH_RE = /^AWS4-HMAC-SHA256 Credential=([^/]+)\/(\d{8})\/([^/]+)\/([^/]+)\/aws4_request, ?SignedHeaders=([^,]+), ?Signature=([0-9a-f]{64})$/;

function verifySigV4(ctx) {
  const m = AUTH_RE.exec(ctx.get('authorization'));
  if (!m) throw new S3Error('AccessDenied', 'Requests must be signed with AWS Signature Version 4.');
  const [, accessKey, date, region, service, signedHeaders, signature] = m;
  if (accessKey !== cfg.accessKey) {
    throw new S3Error('InvalidAccessKeyId', 'The AWS Access Key Id you provided does not exist in our records.');
  }
  const url = ctx.req.url, q = url.indexOf('?');
  const path = q < 0 ? url : url.slice(0, q);
  const pairs = q < 0 || q === url.length - 1 ? [] : url.slice(q + 1).split('&').map(p => {
    const i = p.indexOf('=');
    return i < 0 ? [p, ''] : [p.slice(0, i), p.slice(i + 1)];
  });
  pairs.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : a[1] < b[1] ? -1 : a[1] > b[1] ? 1 : 0));
  const headers = signedHeaders.split(';')
    .map(n => n + ':' + String(ctx.req.headers[n] === undefined ? '' : ctx.req.headers[n]).replace(/ +/g, ' ').trim());
  const canonical = [ctx.method, path || '/', pairs.map(([k, v]) => k + '=' + v).join('&'), headers.join('\n'), '',
                     signedHeaders, ctx.get('x-amz-content-sha256') || 'UNSIGNED-PAYLOAD'].join('\n');
  const scope = [date, region, service, 'aws4_request'].join('/');
  const toSign = ['AWS4-HMAC-SHA256', ctx.get('x-amz-date'), scope, sha256hex(canonical)].join('\n');
  const key = hmac(hmac(hmac(hmac('AWS4' + cfg.secretKey, date), region), service), 'aws4_request');
  const expected = Buffer.from(hmac(key, toSign).toString('hex'));
  if (!crypto.timingSafeEqual(expected, Buffer.from(signature))) {
    throw new S3Error('SignatureDoesNotMatch',
      'The request signature we calculated does not match the signature you provided.');
  }
}

// Query-string SigV4 (a presigned URL), as S3 checks it: the canonical request is built from the
// decoded path and parameters, each URI-encoded again (RFC 3986 unreserved characters kept) and sorted
// by key, without X-Amz-Signature; the payload is UNSIGNED-PAYLOAD. Re-encoding, rather than taking the
// URL's text, means any other spelling of the same URL verifies the same way.
const uriEncode = s => encodeURIComponent(s).replace(/[!'()*]/g, c => '%' + c.charCodeAt(0).toString(16).toUpperCase());
const PRESIGN_PARAMS = ['X-Amz-Algorithm', 'X-Amz-Credential', 'X-Amz-Date', 'X-Amz-Expires', 'X-Amz-SignedHeaders',
                        'X-Amz-Signature'];
const CREDENTIAL_RE = /^([^/]+)\/(\d{8})\/([^/]+)\/([^/]+)\/aws4_request$/;
const AMZ_DATE_RE = /^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z$/;
const MAX_PRESIGN_S = 7 * 24 * 3600;

function queryError(message) {
  return new S3Error('AuthorizationQueryParametersError', message);
}

function verifyPresigned(ctx) {
  const url = ctx.req.url, q = url.indexOf('?');
  const decode = text => {
    try { return decodeURIComponent(text); } catch (e) { throw queryError('Malformed URL encoding: ' + text); }
  };
  const pairs = (q < 0 ? '' : url.slice(q + 1)).split('&').filter(p => p).map(p => {
    const i = p.indexOf('=');
    return i < 0 ? [decode(p), ''] : [decode(p.slice(0, i)), decode(p.slice(i + 1))];
  });
  const params = {};
  for (const [k, v] of pairs) {
    if (k in params) throw queryError('Query parameter ' + k + ' is given twice.');
    params[k] = v;
  }
  for (const name of PRESIGN_PARAMS) {
    if (!params[name]) {
      throw queryError('Query-string authentication version 4 requires the ' + PRESIGN_PARAMS.join(', ') +
                       ' parameters.');
    }
  }
  if (params['X-Amz-Algorithm'] !== 'AWS4-HMAC-SHA256') {
    throw queryError('X-Amz-Algorithm only supports "AWS4-HMAC-SHA256".');
  }
  const cred = CREDENTIAL_RE.exec(params['X-Amz-Credential']);
  const when = AMZ_DATE_RE.exec(params['X-Amz-Date']);
  const expires = /^\d+$/.test(params['X-Amz-Expires']) ? Number(params['X-Amz-Expires']) : NaN;
  if (!cred) throw queryError('Error parsing the X-Amz-Credential parameter.');
  if (!when) throw queryError('X-Amz-Date must be in the ISO8601 basic format YYYYMMDDTHHMMSSZ.');
  if (!(expires >= 1 && expires <= MAX_PRESIGN_S)) throw queryError('X-Amz-Expires must be 1 to 604800 seconds.');
  const [, accessKey, date, region, service] = cred;
  if (accessKey !== cfg.accessKey) {
    throw new S3Error('AccessDenied', 'The AWS Access Key Id you provided does not exist in our records.');
  }
  if (date !== params['X-Amz-Date'].slice(0, 8)) throw queryError('The credential date does not match X-Amz-Date.');

  // Each segment decoded then encoded again: an encoded '/' inside a key stays part of its segment.
  const path = (q < 0 ? url : url.slice(0, q)).split('/').map(seg => uriEncode(decode(seg))).join('/');
  const query = pairs.filter(([k]) => k !== 'X-Amz-Signature').map(([k, v]) => [uriEncode(k), uriEncode(v)])
    .sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : a[1] < b[1] ? -1 : a[1] > b[1] ? 1 : 0));
  const signedHeaders = params['X-Amz-SignedHeaders'];
  const headers = signedHeaders.split(';')
    .map(n => n + ':' + String(ctx.req.headers[n] === undefined ? '' : ctx.req.headers[n]).replace(/ +/g, ' ').trim());
  const canonical = [ctx.method, path || '/', query.map(kv => kv.join('=')).join('&'),
                     headers.join('\n'), '', signedHeaders, 'UNSIGNED-PAYLOAD'].join('\n');
  const scope = [date, region, service, 'aws4_request'].join('/');
  const toSign = ['AWS4-HMAC-SHA256', params['X-Amz-Date'], scope, sha256hex(canonical)].join('\n');
  const key = hmac(hmac(hmac(hmac('AWS4' + cfg.secretKey, date), region), service), 'aws4_request');
  const expected = Buffer.from(hmac(key, toSign).toString('hex'));
  const given = Buffer.from(params['X-Amz-Signature']);
  if (given.length !== expected.length || !crypto.timingSafeEqual(expected, given)) {
    throw new S3Error('SignatureDoesNotMatch',
      'The request signature we calculated does not match the signature you provided.');
  }
  // Checked once the URL is known to be genuine, so that a tampered one reads as tampered.
  const signedAt = Date.UTC(+when[1], +when[2] - 1, +when[3], +when[4], +when[5], +when[6]);
  if (Date.now() > signedAt + expires * 1000) throw new S3Error('AccessDenied', 'Request has expired');
  if (Date.now() < signedAt - 15 * 60 * 1000) throw new S3Error('AccessDenied', 'Request is not valid yet');
}

const server = new S3rver({
  address: cfg.host, port: cfg.port, directory: cfg.directory, silent: true,
  configureBuckets: cfg.buckets.map(name => ({ name, configs: [] })),
});
server.middleware.unshift(async (ctx, next) => {
  if (/[?&]X-Amz-Algorithm=/.test(ctx.req.url)) {
    if (ctx.get('authorization')) {
      throw new S3Error('InvalidArgument',
        'Only one auth mechanism allowed: the query string or the Authorization header.');
    }
    verifyPresigned(ctx);
  } else {
    verifySigV4(ctx);
  }
  await next();
});
const quit = () => server.close().catch(() => {}).finally(() => process.exit(0));
server.run().then(({ address, port }) => {
  process.stdout.write(JSON.stringify({ address, port }) + '\n');
}).catch(err => { console.error(String(err)); process.exit(1); });
process.on('SIGTERM', quit);
process.on('SIGINT', quit);
process.stdin.on('end', quit);
process.stdin.on('error', quit);
process.stdin.resume();
"""


class LocalS3Error(RuntimeError):
    """The local S3 server could not be installed or started; the message says why."""


@dataclass
class LocalS3:
    endpoint: str                  # host:port, as the minio client takes it
    access_key: str
    secret_key: str
    directory: Path
    kind: str                      # "minio" or "s3rver"
    process: subprocess.Popen = field(repr=False)

    def config(self, bucket: str = "bagel") -> StorageConfig:
        return StorageConfig(endpoint=self.endpoint, access_key=self.access_key, secret_key=self.secret_key,
                             bucket=bucket, secure=False)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()

    def __enter__(self) -> "LocalS3":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def ensure_s3rver(prefix: Path = S3RVER_PREFIX, timeout: float = 300.0) -> Path:
    """The s3rver package directory, installed with npm into `prefix` when missing (once, under a lock)."""
    package = prefix / "node_modules" / "s3rver"
    if (package / "package.json").is_file():
        return package
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise LocalS3Error("neither a `minio` binary nor node/npm is on PATH: install one of them to run a local "
                           "S3 server")
    prefix.mkdir(parents=True, exist_ok=True)
    with open(prefix / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits, then finds the package installed
        if not (package / "package.json").is_file():
            cmd = [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--loglevel=error",
                   f"s3rver@{S3RVER_VERSION}"]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise LocalS3Error(f"`{' '.join(cmd)}` did not finish in {timeout:.0f} s") from None
            if done.returncode != 0 or not (package / "package.json").is_file():
                raise LocalS3Error(f"`{' '.join(cmd)}` failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return package


def _wait_http(url: str, process: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise LocalS3Error(f"{what} exited with code {process.returncode} before answering")
        try:
            urllib.request.urlopen(url, timeout=1.0).close()
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer (403 for an unsigned request) means it is up
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise LocalS3Error(f"{what} did not answer at {url} within {timeout:.0f} s") from None
            time.sleep(0.1)


def _start_minio(binary: str, directory: Path, host: str, port: int, access_key: str, secret_key: str,
                 timeout: float) -> LocalS3:
    port = port or free_port(host)
    env = {**os.environ, "MINIO_ROOT_USER": access_key, "MINIO_ROOT_PASSWORD": secret_key}
    cmd = [binary, "server", str(directory), "--address", f"{host}:{port}",
           "--console-address", f"{host}:{free_port(host)}", "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=tempfile.TemporaryFile())
    _wait_http(f"http://{host}:{port}/minio/health/live", proc, timeout, "minio")
    return LocalS3(f"{host}:{port}", access_key, secret_key, directory, "minio", proc)


def _start_s3rver(directory: Path, host: str, port: int, access_key: str, secret_key: str, buckets: list[str],
                  timeout: float) -> LocalS3:
    package = ensure_s3rver()
    node = shutil.which("node")
    errors = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty server never blocks on it
    cfg = {"module": str(package), "host": host, "port": port, "directory": str(directory),
           "accessKey": access_key, "secretKey": secret_key, "buckets": buckets}
    proc = subprocess.Popen([node, "-e", _LAUNCHER], env={**os.environ, "BAGEL_S3RVER_CONFIG": json.dumps(cfg)},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True)
    line = proc.stdout.readline()  # the launcher's one line, or "" when it died
    try:
        bound = json.loads(line)["port"]
    except (ValueError, KeyError, TypeError):
        proc.kill()
        proc.wait()
        errors.seek(0)
        raise LocalS3Error(f"s3rver did not start: {errors.read().strip()[-2000:] or line!r}") from None
    _wait_http(f"http://{host}:{bound}/", proc, timeout, "s3rver")
    return LocalS3(f"{host}:{bound}", access_key, secret_key, directory, "s3rver", proc)


def start_local_s3(directory: str | Path, *, access_key: str = DEFAULT_ACCESS_KEY,
                   secret_key: str = DEFAULT_SECRET_KEY, host: str = "127.0.0.1", port: int = 0,
                   buckets: tuple[str, ...] = (), prefer: str | None = None, timeout: float = 30.0) -> LocalS3:
    """Start minio (when on PATH, or prefer="minio") or s3rver on host:port (0 = a free port)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    minio = shutil.which("minio")
    if prefer == "minio" and minio is None:
        raise LocalS3Error("prefer='minio' but no `minio` binary is on PATH")
    if minio is not None and prefer != "s3rver":
        s3 = _start_minio(minio, directory, host, port, access_key, secret_key, timeout)
        if buckets:
            from services.common.storage import ObjectStore

            for name in buckets:
                ObjectStore(s3.config(name)).ensure_bucket()
        return s3
    return _start_s3rver(directory, host, port, access_key, secret_key, list(buckets), timeout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run a local S3-compatible server (minio if on PATH, else s3rver).")
    p.add_argument("--dir", default=str(REPO_ROOT / ".cache" / "s3-data"), help="where objects are kept")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000, help="0 picks a free port")
    p.add_argument("--access-key", default=os.environ.get("BAGEL_S3_ACCESS_KEY", DEFAULT_ACCESS_KEY))
    p.add_argument("--secret-key", default=os.environ.get("BAGEL_S3_SECRET_KEY", DEFAULT_SECRET_KEY))
    p.add_argument("--bucket", default=os.environ.get("BAGEL_S3_BUCKET", "bagel"))
    p.add_argument("--prefer", choices=("minio", "s3rver"), default=None)
    args = p.parse_args(argv)
    s3 = start_local_s3(args.dir, access_key=args.access_key, secret_key=args.secret_key, host=args.host,
                        port=args.port, buckets=(args.bucket,), prefer=args.prefer)
    print(f"# {s3.kind} serving {s3.directory} at http://{s3.endpoint} (Ctrl-C stops it)")
    print("\n".join(f"export {k}={v}" for k, v in s3.config(args.bucket).to_env().items()), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        s3.process.wait()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        s3.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
