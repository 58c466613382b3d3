#!/usr/bin/env bash
# CI leg: llama-cpp-python built from its sdist (pip caches the built wheel, so later runs
# skip the build), then exported control vectors checked in a real llama.cpp against the
# TransformerLens path (tests/test_llamacpp.py; it fails here instead of skipping), and the
# benchmark script in its quick mode. Expects the venv that .ci/run creates.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate

LLAMA_CPP_PYTHON="llama-cpp-python==0.3.36"
if ! python -c "import llama_cpp" 2>/dev/null; then
    # Portable CPU build (no -march=native), without the multimodal library, tools or tests.
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        pip install --no-binary=llama-cpp-python "$LLAMA_CPP_PYTHON"
fi
python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"

ALPHASTEER_LENS_REQUIRE_LLAMACPP=1 python -m pytest -q tests/test_llamacpp.py tests/test_export.py
out="$(mktemp -d)"
python benchmarks/bench_llamacpp.py --quick --out "$out"
rm -rf "$out"
