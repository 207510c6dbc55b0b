#!/usr/bin/env bash
# Install the test requirements into two virtual environments and run the tests:
#   A1111 set (requirements-test.txt): ruff, mypy on lib_ti, then the whole suite;
#   Forge set (requirements-test-forge.txt): the version-sensitive tests (-m versioned).
# The environments are cached under $TI_VENV_DIR (default ~/.cache/sd-webui-ti/venvs), keyed by the
# requirements file, so a second run installs nothing. Real-host tests run only with SD_WEBUI_DIR set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENVS=${TI_VENV_DIR:-$HOME/.cache/sd-webui-ti/venvs}
mkdir -p "$VENVS"

make_venv() {  # make_venv NAME REQUIREMENTS
  local dir=$VENVS/$1 key
  key=$( (cat "$2"; "$PY" --version) | sha256sum | cut -c1-16)
  if [[ -f $dir/.ti-ok && $(cat "$dir/.ti-ok") == "$key" ]] && "$dir/bin/python" -c "import torch, pytest" 2>/dev/null; then
    echo "[$1] using cached environment $dir"
    return 0
  fi
  echo "[$1] installing $2 into $dir"
  rm -rf "$dir"
  "$PY" -m venv "$dir"
  "$dir/bin/python" -m pip install --quiet --disable-pip-version-check --progress-bar off -r "$2" \
      > "$VENVS/$1.install.log" 2>&1 || { grep -v "^WARNING: Location" "$VENVS/$1.install.log" | tail -40; return 1; }
  echo "$key" > "$dir/.ti-ok"
}

make_venv a1111 requirements-test.txt &
pid_a=$!
make_venv forge requirements-test-forge.txt &
pid_f=$!
wait "$pid_a"
wait "$pid_f"

A=$VENVS/a1111/bin/python
F=$VENVS/forge/bin/python
echo "== ruff"
"$A" -m ruff check .
"$A" -m ruff format --check .
echo "== mypy (lib_ti, A1111 set)"
"$A" -m mypy
echo "== Forge set (gradio 4.40, pydantic 2, transformers 4.46): version-sensitive tests"
"$F" -m pytest -q -m versioned -p no:cacheprovider
echo "== A1111 set (gradio 3.41, pydantic 1, transformers 4.30): all tests"
"$A" -m pytest -q -p no:cacheprovider "$@"
