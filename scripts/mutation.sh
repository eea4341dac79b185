#!/usr/bin/env bash
# Mutation score of the pure-torch core (`make mutation`): mutmut 3 with the config in pyproject.toml
# ([tool.mutmut]); prints killed / total and writes mutants/mutmut-cicd-stats.json. Resumable: mutmut keeps
# its results under mutants/ and re-runs only mutants whose function changed: after adding tests, delete mutants/
# (or reset the survivors' exit codes in mutants/**/*.meta) so that cached survivors are judged again.
set -euo pipefail
PY=${1:-.venv/bin/python}
cd "$(dirname "$0")/.."
"$PY" -m pip install -q --prefer-binary 'mutmut>=3.8,<4'
# the tests run from mutants/, so the data path must be absolute
export IMAML_OMNIGLOT_ROOT=${IMAML_OMNIGLOT_ROOT:-$(cd .. && pwd)/shared/omniglot}
"$PY" -m mutmut run --max-children "${MUTATION_JOBS:-2}" || true
"$PY" -m mutmut export-cicd-stats
"$PY" - <<'PY'
import json
s = json.load(open("mutants/mutmut-cicd-stats.json"))
judged = s["killed"] + s["survived"] + s["timeout"] + s["suspicious"] + s["segfault"] + s["no_tests"]
killed = s["killed"] + s["timeout"]  # a mutant that hangs the tests is caught
print(json.dumps(s))
print(f"mutation score: {killed} of {judged} mutants killed ({100 * killed / max(1, judged):.1f} %); "
      f"survivors: {s['survived']}, not covered by any test: {s['no_tests']}")
print("list them: .venv/bin/mutmut results; one in full: .venv/bin/mutmut show <name>")
PY
