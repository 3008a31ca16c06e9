#!/usr/bin/env bash
# Set up dssm on a fresh machine: Graphviz's `dot` (where a package manager
# and the rights for it exist), torch 2.13.0 (the CPU build where pip is
# configured with it, see README.md), then the package itself in editable
# mode with its test and speech extras.
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v dot >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq graphviz >/dev/null
    elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then
        sudo apt-get update -qq && sudo apt-get install -y -qq graphviz >/dev/null
    elif command -v brew >/dev/null 2>&1; then
        brew install graphviz
    else
        echo "note: Graphviz's dot was not found and could not be installed;" \
             "drawings other than .dot need it (https://graphviz.org/download/)" >&2
    fi
fi

python3 -m pip install -q "torch==2.13.0"
# The speech extras (pesq, pystoi) score `dssm resynth`. pesq builds from
# source, so it needs a C compiler and the Python headers.
python3 -m pip install -q -e ".[test,speech]"
