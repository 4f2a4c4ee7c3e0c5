#!/usr/bin/env bash
# Create .venv with a Python >= 3.12, install the project, and run one job:
#   scripts/bootstrap.sh generate [args...]   jit-compiled generation on the embedded tiny MoE model
#   scripts/bootstrap.sh test [pytest args]   the whole test suite
# The install is skipped when .venv already holds it: a stamp per extra in .venv records the
# hash of pyproject.toml and the extra it was installed with (the package itself is editable,
# so source changes need no reinstall).

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

# The stamp of an install with extra $1 ("" for none): sha256 of pyproject.toml and the extra.
install_stamp() {
  .venv/bin/python - "$1" <<'EOF'
import hashlib, sys
with open("pyproject.toml", "rb") as f:
    print(hashlib.sha256(f.read() + b"\0extra=" + sys.argv[1].encode()).hexdigest())
EOF
}

# Install the project (editable) with extra $1 into .venv unless its stamp is up to date.
ensure_installed() {
  local extra=$1 spec=. stamp_file want
  [ -n "$extra" ] && spec=".[$extra]"
  stamp_file=".venv/.samoyeds-install-${extra:-base}"
  want=$(install_stamp "$extra") || return
  if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$want" ]; then
    return 0
  fi
  .venv/bin/python -m pip install -q -e "$spec" || return  # no stamp for a failed install
  echo "$want" > "$stamp_file"
}

main() {
  set -euo pipefail
  cd "$(dirname "${BASH_SOURCE[0]}")/.."
  local job=${1:-test}; shift || true
  case "$job" in
    generate|test) ;;
    *) echo "usage: scripts/bootstrap.sh generate|test [args...]" >&2; exit 2 ;;
  esac
  if [ ! -x .venv/bin/python ]; then
    local py; py=$(find_python)
    "$py" -m venv .venv
    rm -f .venv/.samoyeds-install-*  # a new interpreter: nothing is installed for it yet
  fi
  case "$job" in
    generate)
      ensure_installed ""
      exec .venv/bin/samoyeds-generate "$@" ;;
    test)
      ensure_installed test
      exec .venv/bin/python -m pytest -q -n 2 "$@" ;;
  esac
}

# Run when executed; sourcing only defines the functions.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
