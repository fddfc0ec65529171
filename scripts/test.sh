#!/usr/bin/env bash
# README command 2: install everything the suite needs (Python packages and Debian tools), lint,
# then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
need=()
command -v skopeo >/dev/null || need+=(skopeo)
[ -x /usr/bin/docker-registry ] || need+=(docker-registry)
command -v htpasswd >/dev/null || need+=(apache2-utils)
command -v openssl >/dev/null || need+=(openssl)
command -v pkill >/dev/null || need+=(procps)
command -v prometheus >/dev/null || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
# The MLflow tracking server the tracker tests report to, in a venv of its own: the full `mlflow`
# pins pyarrow<26, tuner's client (mlflow-skinny) does not.
if [ ! -x .venv-mlflow/bin/mlflow ]; then
  "${PYTHON:-python3}" -m venv .venv-mlflow
  .venv-mlflow/bin/pip install -q --disable-pip-version-check "mlflow==3.17.2"
fi
. .venv/bin/activate
ruff check tuner tests scripts  # pyflakes, import order, bugbear ([tool.ruff] in pyproject.toml)
exec python -m pytest "$@"
