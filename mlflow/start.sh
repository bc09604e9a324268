#!/usr/bin/env bash
# Starts the MLflow tracking server the way qabot uses it: bound to loopback, one worker, a SQLite backend
# and artifacts served (proxied) by the server itself, all under $MLFLOW_HOME (default $QABOT_HOME/mlflow).
#
# For a team server, point the backend at PostgreSQL and the artifacts at an object store, e.g.
#   MLFLOW_BACKEND_URI=postgresql://mlflow:***@db/mlflow MLFLOW_ARTIFACTS=s3://bucket/mlflow \
#   MLFLOW_HOST=0.0.0.0 MLFLOW_WORKERS=4 mlflow/start.sh
# and set MLFLOW_TRACKING_URI on every client (qabot then starts no server of its own).
# s3:// needs boto3 (the `s3` extra); a service other than AWS S3 (MinIO, ...) its URL in MLFLOW_S3_ENDPOINT_URL;
# the credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or wherever else boto3 finds them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=server.env
set -a; . "$here/server.env"; set +a
home=${MLFLOW_HOME:-${QABOT_HOME:-./.qabot}/mlflow}
artifacts=${MLFLOW_ARTIFACTS:-$home/artifacts}
mkdir -p "$home"
[[ $artifacts == *:* ]] || mkdir -p "$artifacts" # a local directory; an s3://... store is not created here
echo "mlflow/start.sh: starting the MLflow server on ${MLFLOW_HOST:-127.0.0.1}:${MLFLOW_PORT:-5000}" \
  "(home $home, artifacts $artifacts)"
exec "${MLFLOW_BIN:-mlflow}" server \
  --backend-store-uri "${MLFLOW_BACKEND_URI:-sqlite:///$home/mlflow.db}" \
  --artifacts-destination "$artifacts" \
  --serve-artifacts \
  --host "${MLFLOW_HOST:-127.0.0.1}" \
  --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-1}"
