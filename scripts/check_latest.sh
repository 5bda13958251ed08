#!/usr/bin/env bash
# Drift check: install the newest versions the registry serves of every dreamtune dependency, optional extras
# included (ignoring pyproject's upper bounds and the lock), list what moved against constraints.txt, and run
# the smoke (scripts/smoke.py). Run it before changing constraints.txt; the lock then moves in one reviewed commit.
#   bash scripts/check_latest.sh            # venv in /tmp/dreamtune-latest
#   TORCH_SPEC='torch' VENV=/tmp/v bash scripts/check_latest.sh
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/dreamtune-latest}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
rm -rf "$VENV" && python3 -m venv "$VENV" && . "$VENV/bin/activate" || exit 2
pip install -q --upgrade pip >/dev/null 2>&1
# Direct dependencies by name, without version ranges: the resolver picks the newest set that installs.
deps=$(python3 - <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
deps = project["dependencies"] + [d for name, reqs in extras.items() if name != "test" for d in reqs]
print(" ".join(re.split(r"[<>=!~; \[]", d, maxsplit=1)[0] for d in deps if not d.startswith("torch")))
PY
)
echo "== installing $TORCH_SPEC and the newest: $deps"
pip install -q "$TORCH_SPEC" $deps pytest 2> >(grep -v "^WARNING: Location" >&2) || { echo "verdict: the newest versions do not install together"; exit 1; }
pip install -q --no-deps -e . >/dev/null 2>&1 || exit 2
echo "== moved against constraints.txt (locked -> newest)"
pip freeze | python3 -c '
import re, sys
lock = dict(l.strip().split("==", 1) for l in open("constraints.txt") if "==" in l and not l.startswith("#"))
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
lock = {norm(k): v for k, v in lock.items()}
moved = new = 0
for line in sys.stdin:
    if "==" not in line or line.startswith("#"): continue
    name, version = line.strip().split("==", 1)
    if norm(name) == "torch": continue
    old = lock.get(norm(name))
    if old is None: print(f"  new   {name} {version}"); new += 1
    elif old != version: print(f"  moved {name} {old} -> {version}"); moved += 1
print(f"  {moved} moved, {new} not in the lock")
'
echo "== dreamtune doctor (the start-up guard's view of this set)"
python -m dreamtune.cli doctor --output-dir /tmp | grep -E "^(fail|verdict)" || true
echo "== smoke, with the start-up guard off so that what actually breaks shows"
DREAMTUNE_SKIP_VERSION_CHECK=1 python scripts/smoke.py
status=$?
[ $status -eq 0 ] && echo "verdict: the newest versions pass the smoke; update constraints.txt from this venv's pip freeze" \
                  || echo "verdict: the newest versions break dreamtune (above); keep the lock and record it in docs/dependencies.md"
exit $status
