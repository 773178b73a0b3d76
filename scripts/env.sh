# Sourced by the scripts and the Makefile's recipes: the venv first on PATH, nothing fetched from a hub.
RLHF_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export RLHF_ROOT
export VENV=${VENV:-$RLHF_ROOT/.venv}
export PATH="$VENV/bin:$PATH"
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
export TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
export RAY_USAGE_STATS_ENABLED=0
# Ray 2.60 enables token authentication at `ray start`; clients (ray job submit, ray.init) send the
# token from ~/.ray/auth_token when this is set. See README, "Ray authentication".
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
# DeepSpeed JIT-compiles its CPU ops (the shared-memory all-reduce, ~30 s of g++ on 2 cores) into torch's
# extension cache. Their build file names this venv's include path, so two venvs sharing the default
# cache (~/.cache/torch_extensions) rebuild the op every time the other one ran: one cache per venv.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}
