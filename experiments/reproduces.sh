#!/usr/bin/env bash
# Does today's code still produce a study's committed numbers? Runs `experiments/STUDY.py --quick`
# at COMMIT (the commit that produced the study's results) and at the working tree, and diffs
# their Markdown tables. Usage: experiments/reproduces.sh STUDY COMMIT  (e.g. table2_init 6523296)
set -euo pipefail
study=$1; commit=$2
root=$(git rev-parse --show-toplevel); py=${PYTHON:-$root/.venv/bin/python}
tmp=$(mktemp -d); trap 'git -C "$root" worktree remove --force "$tmp/old" 2>/dev/null || true; rm -rf "$tmp"' EXIT
git -C "$root" worktree add -q --detach "$tmp/old" "$commit"
(cd "$tmp/old" && PYTHONPATH="$tmp/old/src" "$py" "experiments/$study.py" --quick --out "$tmp/out-old" >/dev/null)
(cd "$root" && PYTHONPATH="$root/src" "$py" "experiments/$study.py" --quick --out "$tmp/out-new" >/dev/null)
for f in "$tmp"/out-old/*.md; do
  b=$(basename "$f")
  if diff -q <(grep -v '^Command' "$f") <(grep -v '^Command' "$tmp/out-new/$b") >/dev/null; then echo "$study $b: same"
  else echo "$study $b: differs"; diff <(grep -v '^Command' "$f") <(grep -v '^Command' "$tmp/out-new/$b") || true; fi
done
