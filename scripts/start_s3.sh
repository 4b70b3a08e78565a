#!/usr/bin/env bash
# Run a local S3-compatible server for the single-machine stack: MinIO when a `minio` binary is on
# PATH, otherwise s3rver (installed on first use with npm into .cache/s3rver). Prints the BAGEL_S3_*
# exports for the servers, then runs in the foreground until Ctrl-C / SIGTERM.
#
#   scripts/start_s3.sh                        # 127.0.0.1:9000, data in .cache/s3-data, bucket "bagel"
#   scripts/start_s3.sh --port 0 --dir /tmp/s3 --bucket mybucket
#   BAGEL_S3_ACCESS_KEY=... BAGEL_S3_SECRET_KEY=... scripts/start_s3.sh
#
# All options: python -m services.dev.s3_server --help
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PYTHON" -m services.dev.s3_server "$@"
