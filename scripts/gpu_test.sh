#!/usr/bin/env bash
# The whole test suite on a machine with an NVIDIA GPU: the Pallas kernels are compiled for the
# GPU (not interpreted) and the @pytest.mark.gpu tests run.
#   scripts/gpu_test.sh [test paths] [pytest args]   PYTHON: the interpreter (default python3, with this
#                                         project's dependencies and jax[cuda13] installed);
#                                         JOBS: pytest-xdist workers (default 8)
# Exits 2 without running anything when jax sees no GPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$py" - <<'PY'
import sys
try:
    import jax
except ImportError as err:
    sys.exit(f"cannot import jax ({err})")
if jax.default_backend() != "gpu":
    sys.exit(f"jax {jax.__version__} sees no GPU (backend {jax.default_backend()!r}, devices "
             f"{jax.devices()})")
print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x {len(jax.devices())}")
PY
then
  echo "scripts/gpu_test.sh: no GPU visible to jax through $py; install jax[cuda13]==0.11.2 on a" \
       "machine with an NVIDIA GPU (or run the CPU suite: scripts/bootstrap.sh test)" >&2
  exit 2
fi
# Each pytest worker allocates GPU memory as it goes instead of 75% of the card up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# Test paths among the arguments replace the default, the whole suite (tests/).
paths=(tests/)
for arg in "$@"; do [[ $arg == -* ]] || paths=(); done
exec "$py" -m pytest -q -n "${JOBS:-8}" -p no:cacheprovider -rf "${paths[@]}" "$@"
