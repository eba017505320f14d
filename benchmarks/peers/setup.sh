#!/usr/bin/env bash
# Environments and models for the peer engines of `python -m benchmarks.run --peers`, all under out/peers/.
#
#     bash benchmarks/peers/setup.sh [llama] [genai] [openvino]     # default: all three
#
# Needs what the README's first command makes: .venv with `pip install -e '.[export]'` and the demo
# checkpoint in ~/.cache/smolvlm-edge (or $SMOLVLM_EDGE_CACHE). Idempotent: a step whose result
# exists is skipped (delete the folder to redo it). Each peer gets its own venv:
#   llama    out/peers/llama-venv     llama-cpp-python built from source with AMX off (~6 min on 2 cores)
#   genai    out/peers/genai-venv     onnxruntime-genai + its model builder; out/peers/genai-int4
#   openvino out/peers/openvino-venv  optimum-intel + openvino; out/peers/openvino-{int4,fp32}
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PEERS=$ROOT/out/peers
MAIN_PY=${MAIN_PY:-$ROOT/.venv/bin/python}
TORCH=torch==2.13.0  # a CPU wheel on this disk; a looser spec downloads the CUDA build
mkdir -p "$PEERS"

step() { echo "== $* ($(date +%T))"; }

# make_venv DIR PACKAGES...: a venv with these packages; DIR/.ready marks it complete.
make_venv() {
    local dir=$1; shift
    if [[ -f $dir/.ready ]]; then echo "   $dir exists"; return; fi
    rm -rf "$dir"
    python3 -m venv "$dir"
    "$dir/bin/pip" install -q --upgrade pip
    "$dir/bin/pip" install -q "$@"
}

gguf_path() {
    "$MAIN_PY" -c 'from smolvlm_edge.export.demo_checkpoint import find_smollm2_gguf; print(find_smollm2_gguf())'
}

setup_llama() {
    step "llama.cpp: llama-cpp-python 0.3.36 built with AMX off"
    # GGML_NATIVE=ON compiles with -march=native, which ignores the GGML_AMX_* options and turns AMX
    # on where the CPU reports it; its AMX kernels crash here. GCC's explicit -mno-* beat -march.
    local noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
-DCMAKE_C_FLAGS='$noamx' -DCMAKE_CXX_FLAGS='$noamx'" CMAKE_BUILD_PARALLEL_LEVEL=2 \
        make_venv "$PEERS/llama-venv" --no-binary llama-cpp-python llama-cpp-python==0.3.36 numpy
    touch "$PEERS/llama-venv/.ready"
}

setup_genai() { echo "genai: not written yet"; }
setup_openvino() { echo "openvino: not written yet"; }

for peer in "${@:-llama genai openvino}"; do
    for p in $peer; do
        start=$SECONDS
        "setup_$p"
        echo "   $p done in $((SECONDS - start)) s; $(du -sh "$PEERS" | cut -f1) under out/peers"
    done
done
