#!/usr/bin/env bash
# The whole test suite, from a clean clone: set-up, then pytest (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The page's test drives Debian's chromium (never a browser downloaded at run time): install it where we can
# (root with apt-get); elsewhere that test is skipped with its reason.
if { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; } && command -v apt-get >/dev/null \
    && [ "$(id -u)" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } \
    || echo "note: could not install chromium; the browser test will be skipped"
fi
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
