#!/usr/bin/env bash
# The two commands of the README. Both set everything up on first use (see scripts/setup.sh).
#   ./run.sh [generate options]   generate text (built-in small model unless -m MODEL is given)
#   ./run.sh test [pytest args]   run the test suite, then the kernel tests under ASan + UBSan
set -euo pipefail
ROOT="$(cd "$(dirname "$0")" && pwd)"
"$ROOT/scripts/setup.sh"
# shellcheck disable=SC1091
. "$ROOT/.venv/bin/activate"
cd "$ROOT"
case "${1:-}" in
  test)
    shift
    python -m pytest -q "$@"
    PYTHON=python scripts/sanitize-tests.sh -q
    ;;
  generate) shift; exec pi-backend generate "$@" ;;
  "") exec pi-backend generate ;;
  -*) exec pi-backend generate "$@" ;;
  *) exec pi-backend "$@" ;;
esac
