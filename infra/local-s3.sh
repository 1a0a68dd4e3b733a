#!/usr/bin/env bash
# The embedded object store on its own, for trying stages by hand:
#   infra/local-s3.sh 9000 &
#   export AWS_ENDPOINT_URL=http://127.0.0.1:9000 AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
# moto's server speaks the S3 HTTP API and keeps everything in memory.
set -euo pipefail
exec "${PYTHON:-.venv/bin/python}" -m moto.server -H 127.0.0.1 -p "${1:-9000}"
