#!/usr/bin/env bash
# Make sure wrk is installed for `make bench`: use it if present, else install Debian's package
# where apt-get can (root), else say that the bench falls back to its Python load generator.
set -u
if command -v wrk >/dev/null 2>&1; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "bench: installing wrk (apt-get install -y wrk)"
  if apt-get install -y -qq wrk >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq wrk >/dev/null 2>&1; }; then
    exit 0
  fi
fi
echo "bench: wrk is not installed and could not be; using the Python load generator" \
  "(slower client: JSON throughput figures will be client-bound)" >&2
exit 0
