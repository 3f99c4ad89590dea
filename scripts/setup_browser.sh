#!/usr/bin/env bash
# Headless Chromium for the report test (tests/report/test_html.py screenshots report.html). Idempotent.
# DEPTHFOLD_BROWSER=0 skips it (the screenshot test then skips, saying why).
set -euo pipefail
[[ "${DEPTHFOLD_BROWSER:-1}" == 0 ]] && exit 0
for b in chromium chromium-browser google-chrome; do command -v "$b" >/dev/null && exit 0; done
die() { echo "browser setup FAILED: $*" >&2; exit 1; }
command -v apt-get >/dev/null || die "no chromium and no apt-get: install Chromium, or set DEPTHFOLD_BROWSER=0"
[[ $(id -u) -eq 0 ]] || die "chromium missing; install with: sudo apt-get install -y chromium (or DEPTHFOLD_BROWSER=0)"
export DEBIAN_FRONTEND=noninteractive
for i in 1 2 3; do  # mirrors hiccup: retry
    if apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; then exit 0; fi
    echo "browser setup: apt-get failed (try $i of 3), retrying in 5 s" >&2
    sleep 5
done
die "apt-get install chromium failed"
