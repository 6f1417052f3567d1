#!/usr/bin/env bash
# The main job on a fresh machine: set-up, then train on the built-in digits (no data, no GPU
# needed) and evaluate the checkpoint it wrote (the same top-1 as training logged).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/metaformer train --output runs/digits --overwrite
.venv/bin/metaformer eval --checkpoint runs/digits/best.pth
