#!/usr/bin/env bash
# The peers environment of `make bench-peers`: LiteLLM's proxy (pinned) and py-spy, in their
# own venv at bench/.peers, never in the project's .venv.
#
# Pinned to 1.108.0: the newest litellm whose `[proxy]` extra resolves from PyPI as mirrored
# here (later releases need `litellm-proxy` / newer `litellm-proxy-extras` builds it lacks).
set -eu
cd "$(dirname "$0")"
LITELLM_VERSION=1.108.0  # keep in step with bench/config.py
PY_SPY_VERSION=0.4.3
PYTHON=${PYTHON:-python3}
stamp=".peers/.installed-$LITELLM_VERSION-$PY_SPY_VERSION"
if [ -f "$stamp" ]; then
  exit 0
fi
test -x .peers/bin/python || "$PYTHON" -m venv .peers
.peers/bin/python -m pip install -q --upgrade pip
echo "bench: installing litellm[proxy]==$LITELLM_VERSION and py-spy into bench/.peers (large)"
.peers/bin/python -m pip install -q "litellm[proxy]==$LITELLM_VERSION" "py-spy==$PY_SPY_VERSION"
rm -f .peers/.installed-*
touch "$stamp"
