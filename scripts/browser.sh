#!/usr/bin/env bash
# What the dashboard's browser test (tests/dashboard/test_browser.py) needs: Debian's chromium and
# chromedriver. Idempotent: installs them only when /usr/bin/chromedriver is missing (needs root,
# as in CI; elsewhere it says what to run).
set -euo pipefail
if [ -x /usr/bin/chromedriver ] && [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "the browser test needs chromium and chromedriver: run as root: apt-get update && apt-get install -y chromium chromium-driver" >&2
    exit 1
fi
echo "installing chromium and chromium-driver for the dashboard's browser test"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium chromium-driver >/dev/null
