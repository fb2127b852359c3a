#!/usr/bin/env bash
# Run the whole test suite (arguments go to pytest): installs what is missing, then one pytest
# run is the verdict: ruff, mypy --strict and import-linter run inside it (test_quality.py),
# and the tests start their own Redis, RabbitMQ, SQS (moto) and Ray on free loopback ports.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh --servers
exec .venv/bin/pytest "$@"
