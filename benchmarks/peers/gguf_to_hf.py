"""A plain Llama folder (fp32 safetensors + tokenizer) from the SmolLM2-135M-Instruct GGUF, for
onnxruntime-genai's model builder. Runs in the main venv (transformers, gguf, accelerate).

    .venv/bin/python -m benchmarks.peers.gguf_to_hf OUT
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from smolvlm_edge.export.demo_checkpoint import find_smollm2_gguf


def main(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_smollm2_gguf()
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # the weights are dequantized to fp32: nothing of the GGUF load is left
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(partial)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(partial)
    # transformers 5 names its fast tokenizer class TokenizersBackend, which onnxruntime-genai's
    # tokenizer does not know; the file itself is a byte-level BPE, as GPT-2's.
    tok_file = partial / "tokenizer_config.json"
    tok = json.loads(tok_file.read_text())
    tok["tokenizer_class"] = "GPT2Tokenizer"
    tok_file.write_text(json.dumps(tok, indent=2))
    partial.rename(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
