#!/usr/bin/env bash
# The second environment, .venv-anemoi17: maelflow with the current anemoi line (anemoi-training
# 0.17.1, anemoi-models 0.19.0, anemoi-graphs 0.9.8, and anemoi-inference 0.13.0 for the operations
# family's forecasts), beside the main .venv's anemoi 0.10. The versions are pinned in pyproject.toml's
# [anemoi-current] extra.
#
# Run by `bash scripts/install.sh --anemoi-current` (after the Debian packages and the main .venv are
# in place); idempotent. Those releases declare torch<2.11 while this machine's torch is the CPU
# build 2.13.0, which pip cannot override: uv installs them with overrides-anemoi-current.txt (why
# that is safe: the file). uv itself comes from PyPI into this venv. The main .venv is not touched.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-anemoi17

if [ ! -x "$VENV/bin/python" ]; then
  /usr/bin/python3 -m venv --system-site-packages "$VENV"   # system site-packages: python3-ecflow
fi
[ -x "$VENV/bin/uv" ] || "$VENV/bin/python" -m pip install -q "uv>=0.9,<1"
# the CPU torch wheel lies where pip's configuration says (find-links): uv does not read pip's config
links=${PIP_FIND_LINKS:-$("$VENV/bin/python" -m pip config get global.find-links 2>/dev/null || true)}
uv_args=(--python "$VENV/bin/python" --override overrides-anemoi-current.txt -c constraints.txt)
for link in $links; do uv_args+=(--find-links "$link"); done
if [ -n "${PIP_CERT:-}" ] && [ -z "${SSL_CERT_FILE:-}" ]; then export SSL_CERT_FILE="$PIP_CERT"; fi
"$VENV/bin/uv" pip install -q "${uv_args[@]}" torch==2.13.0+cpu \
  -e ./transfer -e ./registry -e '.[test,anemoi-current]' -e ./sandbox -e ./tests/plugins/maelflow-testsched
# the same torchvision start-up shim as the main .venv (PyPI's torchvision is a CUDA build)
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import maelflow_sandbox.tvshim" > "$site/zz_maelflow_tvshim.pth"
"$VENV/bin/python" -c 'import importlib.metadata as m, ecflow, maelflow
print("install:", "'"$VENV"'", "anemoi-training", m.version("anemoi-training"), "anemoi-models",
      m.version("anemoi-models"), "anemoi-graphs", m.version("anemoi-graphs"), "anemoi-inference",
      m.version("anemoi-inference"), "torch", m.version("torch"))'
