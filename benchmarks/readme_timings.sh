#!/usr/bin/env bash
# The README's timings: a fresh clone of this checkout, each step of the README's two commands timed on
# its own (install, study, tests), then the --quick smoke run. Run it on an idle machine:
#   bash benchmarks/readme_timings.sh [scratch folder, default: a new temporary one]
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
scratch="${1:-$(mktemp -d)}"
clone="$scratch/clone"
rm -rf "$clone" && git clone -q "$repo" "$clone" && cd "$clone" || exit 1
step() {  # step NAME COMMAND...: run it, print its wall time and exit code
    local start end code
    start=$(date +%s.%N); "${@:2}" > "$scratch/$1.log" 2>&1; code=$?; end=$(date +%s.%N)
    printf '%-8s %7.1f s  exit %d  (log: %s)\n' "$1" "$(echo "$end - $start" | bc)" "$code" "$scratch/$1.log"
}
echo "commit $(git rev-parse --short HEAD), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
step install bash -c 'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e ".[test]"'
step study bash -c '. .venv/bin/activate && unlearn-fast study --out results'
step tests bash -c '. .venv/bin/activate && pytest'
step quick bash -c '. .venv/bin/activate && unlearn-fast study --quick --out quick --no-progress'
