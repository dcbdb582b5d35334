#!/bin/sh
# Entry point for a fresh Debian machine, as root: installs make and Python's
# venv if missing, then runs the Makefile target (demo, test, bench, lint, install).
set -eu
cd "$(dirname "$0")"
need=""
command -v make >/dev/null 2>&1 || need="$need make"
command -v python3 >/dev/null 2>&1 || need="$need python3"
python3 -c "import venv, ensurepip" >/dev/null 2>&1 || need="$need python3-venv"
if [ -n "$need" ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
fi
exec make "${1:-test}"
