#!/usr/bin/env bash
# Create .venv with a Python >= 3.12, install the project, and run one job:
#   scripts/bootstrap.sh generate [args...]   jit-compiled generation on the embedded tiny MoE model
#   scripts/bootstrap.sh test [pytest args]   the whole test suite
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  local cands=("${PYTHON:-}" python3.13 python3.12 python3)
  if command -v pyenv >/dev/null 2>&1; then
    local root; root=$(pyenv root)
    for v in "$root"/versions/3.1[2-9]*; do [ -x "$v/bin/python" ] && cands+=("$v/bin/python"); done
  fi
  for p in "${cands[@]}"; do
    [ -n "$p" ] || continue
    if "$p" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; then
      echo "$p"; return 0
    fi
  done
  echo "no Python >= 3.12 found (tried: ${cands[*]}); set PYTHON=/path/to/python3.12" >&2
  return 1
}

job=${1:-test}; shift || true
if [ ! -x .venv/bin/python ]; then
  py=$(find_python)
  "$py" -m venv .venv
fi
case "$job" in
  generate)
    .venv/bin/python -m pip install -q -e .
    exec .venv/bin/samoyeds-generate "$@" ;;
  test)
    .venv/bin/python -m pip install -q -e ".[test]"
    exec .venv/bin/python -m pytest -q -n 2 "$@" ;;
  *) echo "usage: scripts/bootstrap.sh generate|test [args...]" >&2; exit 2 ;;
esac
