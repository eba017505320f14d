#!/usr/bin/env bash
# Environments and models for the peer engines of `python -m benchmarks.run --peers`, all under out/peers/.
#
#     bash benchmarks/peers/setup.sh [llama] [genai] [openvino]     # default: all three
#
# Needs what the README's first command makes: .venv with `pip install -e '.[export]'` and the demo
# checkpoint in ~/.cache/smolvlm-edge (or $SMOLVLM_EDGE_CACHE). Idempotent: a step whose result
# exists is skipped (delete that folder to redo it). Each peer gets its own venv:
#   llama    out/peers/llama-venv     llama-cpp-python built from source, AMX off (~10 min on 2 cores)
#   genai    out/peers/genai-venv     onnxruntime-genai + its model builder -> out/peers/genai-int4 (~2 min)
#   openvino out/peers/openvino-venv  optimum-intel + openvino -> out/peers/openvino-{int4,fp32} (~3 min)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PEERS=$ROOT/out/peers
MAIN_PY=${MAIN_PY:-$ROOT/.venv/bin/python}
TORCH=torch==2.13.0  # a CPU wheel on this disk; a looser spec downloads the CUDA build
[[ -x $MAIN_PY ]] || { echo "no $MAIN_PY: run the README's first command first" >&2; exit 1; }
mkdir -p "$PEERS"

step() { echo "== $* ($(date +%T))"; }

# new_venv DIR PACKAGES...: a fresh venv with these packages (DIR/.ready marks a complete one).
new_venv() {
    local dir=$1; shift
    rm -rf "$dir"
    python3 -m venv "$dir"
    "$dir/bin/pip" install -q --upgrade pip
    "$dir/bin/pip" install -q "$@"
}

setup_llama() {
    step "llama.cpp: llama-cpp-python 0.3.36 built with AMX off"
    [[ -f $PEERS/llama-venv/.ready ]] && return
    # GGML_NATIVE=ON compiles with -march=native, which ignores the GGML_AMX_* options and turns AMX
    # on where the CPU reports it; its AMX kernels crash on this CPU. GCC's explicit -mno-* beat -march.
    local noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
-DCMAKE_C_FLAGS='$noamx' -DCMAKE_CXX_FLAGS='$noamx'" CMAKE_BUILD_PARALLEL_LEVEL=2 \
        new_venv "$PEERS/llama-venv" --no-binary llama-cpp-python llama-cpp-python==0.3.36 numpy
    touch "$PEERS/llama-venv/.ready"
}

setup_genai() {
    step "genai: onnxruntime-genai 0.18.0 and its model builder"
    if [[ ! -f $PEERS/genai-venv/.ready ]]; then
        new_venv "$PEERS/genai-venv" onnxruntime-genai==0.18.0 "$TORCH" transformers==5.24.0 onnx==1.23.2 onnx-ir tqdm
        touch "$PEERS/genai-venv/.ready"
    fi
    step "genai: int4 (accuracy level 4, block 32) from a plain Llama folder made from the GGUF"
    [[ -f $PEERS/genai-int4/genai_config.json ]] && return
    rm -rf "$PEERS/genai-int4" "$PEERS/genai-cache" "$PEERS/smollm2-135m-hf"
    (cd "$ROOT" && "$MAIN_PY" -m benchmarks.peers.gguf_to_hf "$PEERS/smollm2-135m-hf")
    "$PEERS/genai-venv/bin/python" -m onnxruntime_genai.models.builder -i "$PEERS/smollm2-135m-hf" \
        -o "$PEERS/genai-int4" -p int4 -e cpu -c "$PEERS/genai-cache" \
        --extra_options accuracy_level=4 block_size=32 hf_token=false
    rm -rf "$PEERS/genai-cache" "$PEERS/smollm2-135m-hf"
}

setup_openvino() {
    step "openvino: optimum-intel 2.2.0 + openvino 2026.4.1 (transformers 4.57.6)"
    if [[ ! -f $PEERS/openvino-venv/.ready ]]; then
        new_venv "$PEERS/openvino-venv" "$TORCH" optimum-intel==2.2.0 openvino==2026.4.1 openvino-tokenizers==2026.4.1.0 \
            nncf==3.4.0 transformers==4.57.6 protobuf pillow
        # pip pulls a torchvision built for another torch; it breaks imports beside the CPU torch
        "$PEERS/openvino-venv/bin/pip" uninstall -q -y torchvision
        touch "$PEERS/openvino-venv/.ready"
    fi
    step "openvino: the demo checkpoint as transformers 4.57 reads it"
    if [[ ! -d $PEERS/demo-checkpoint-457 ]]; then
        local source
        source=$("$MAIN_PY" -c 'from smolvlm_edge.export.demo_checkpoint import default_cache_dir; print(default_cache_dir() / "demo-checkpoint-256m")')
        python3 "$ROOT/benchmarks/peers/ov_checkpoint.py" "$source" "$PEERS/demo-checkpoint-457"
    fi
    local format
    for format in int4 fp32; do
        step "openvino: export $format"
        [[ -f $PEERS/openvino-$format/openvino_language_model.xml ]] && continue
        rm -rf "$PEERS/openvino-$format" "$PEERS/openvino-$format.partial"
        local extra=()
        [[ $format == int4 ]] && extra=(--group-size 64)  # 576 channels: not divisible by the default 128
        "$PEERS/openvino-venv/bin/optimum-cli" export openvino --model "$PEERS/demo-checkpoint-457" \
            --task image-text-to-text --weight-format "$format" "${extra[@]}" "$PEERS/openvino-$format.partial"
        mv "$PEERS/openvino-$format.partial" "$PEERS/openvino-$format"
    done
}

for peer in ${*:-llama genai openvino}; do
    start=$SECONDS
    "setup_$peer"
    echo "   $peer ready in $((SECONDS - start)) s; out/peers holds $(du -sh "$PEERS" | cut -f1)"
done
