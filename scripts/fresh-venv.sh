# Sourced by the other scripts: a throw-away venv in $work (removed on exit), its interpreter in $python, and the
# working directory at the repository root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
python="$work/venv/bin/python"
$python -m pip install -q --upgrade pip
