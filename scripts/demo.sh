#!/usr/bin/env bash
# Run the document-indexing demo (arguments go to it); installs what is missing first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m examples.document_indexing "$@"
