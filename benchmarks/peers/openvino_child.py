"""OpenVINO (optimum-intel) on the demo SmolVLM checkpoint exported with `optimum-cli export openvino`:
time to first token for one 512x512 picture (no tiles) and text prefill/decode through its
stateful language model, driven step by step as the other engines are.

    out/peers/openvino-venv/bin/python -m benchmarks.peers.openvino_child --model out/peers/openvino-int4 ...
"""
from __future__ import annotations

import time

import torch
from optimum.intel import OVModelForVisualCausalLM
from transformers import AutoProcessor

from benchmarks.peers.common import emit, parse, record, size_mb, text_figures
from benchmarks.run import QUESTION, picture, repeated, spread


class OpenVinoEngine:
    def __init__(self, folder, threads: int):
        torch.set_num_threads(threads)
        self.model = OVModelForVisualCausalLM.from_pretrained(
            folder, device="CPU", ov_config={"INFERENCE_NUM_THREADS": str(threads), "PERFORMANCE_HINT": "LATENCY"})
        self.processor = AutoProcessor.from_pretrained(folder)
        self.processor.image_processor.do_image_splitting = False  # transformers 4.57 ignores it as a call argument
        self.lm = self.model.language_model
        self.lm.compile()
        self.encode = lambda text: self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]

    def ttft(self, image) -> float:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        t0 = time.perf_counter()
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self.processor(text=prompt, images=[image], return_tensors="pt")
        self.model.generate(**inputs, max_new_tokens=1, do_sample=False)
        return time.perf_counter() - t0

    def text(self, ids, steps: int) -> tuple[float, float]:
        """past_key_values=None resets the model's state (the KV cache lives inside the request)."""
        lm, n = self.lm, ids.shape[1]
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = lm(input_ids=torch.from_numpy(ids), attention_mask=torch.ones((1, n), dtype=torch.long))
            t1 = time.perf_counter()
            for i in range(steps):
                out = lm(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=torch.ones((1, n + i + 1), dtype=torch.long),
                         past_key_values=((),))
            return t1 - t0, time.perf_counter() - t1

    def logits(self, ids):
        """Every position's logits of one prefill from a fresh state."""
        with torch.inference_mode():
            out = self.lm(input_ids=torch.from_numpy(ids), attention_mask=torch.ones((1, ids.shape[1]), dtype=torch.long))
            return out.logits[0].float().numpy()


def main() -> None:
    args = parse(__doc__)
    engine = OpenVinoEngine(args.model, args.threads)
    ready_at = time.time()
    image = picture(512)
    figures = {"ttft_ms": spread([1000 * t for t in repeated(lambda: engine.ttft(image), args.repeats)]),
               **text_figures(engine, args)}
    precision = args.model.name.rsplit("-", 1)[-1]
    rec = record(f"openvino:{precision}", precision, args, ("openvino", "optimum-intel", "transformers"), figures,
                 ready_at, size=size_mb(args.model, "openvino_*_model.*"))
    # the CPU plugin computes in bf16 where the CPU has it, unless told INFERENCE_PRECISION_HINT=f32
    rec["inference_precision"] = engine.lm.request.get_compiled_model().get_property("INFERENCE_PRECISION_HINT").to_string()
    emit(rec, engine, args)


if __name__ == "__main__":
    main()
