#!/usr/bin/env bash
# Fuzz every parser that faces the outside for MINUTES each (default 10), two at a time.
# Inputs that crash or hang are saved under tests/fuzz/corpus/TARGET/crash-* and become
# regression tests of the normal test run once the bug is fixed (rename them regress-*).
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:-10}"
py=.venv/bin/python
"$py" -m tests.fuzz.run cty_decode task_config task_config_values --minutes "$minutes" &
a=$!
"$py" -m tests.fuzz.run image_reference oci_manifest layer_merge --minutes "$minutes" &
b=$!
rc=0
wait "$a" || rc=1
wait "$b" || rc=1
exit "$rc"
