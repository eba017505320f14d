"""The qdq decoder on QNN HTP with CPU fallback: static decode steps over a fixed cache, the split, parity.

HTP takes no dynamic shape, so the runtime opens the decoder as one position per call over a KV cache of
fixed size (runtime/htp_decoder.py `StaticStepDecoder`). On the CPU that cache logic must equal the dynamic
graph exactly; on the HTP simulator the graph is split (GatherND of the mask on the CPU, the rest on HTP).

Floors for HTP vs the same qdq graph on the CPU (tiny 256m checkpoint, random weights, A16W8 minmax,
held-out prompt of 64 positions): cosine mean 0.9967, min 0.974, top-1 0.89 -> floors 0.99 / 0.95 / 0.8.
The qdq graph on the CPU is itself further from fp32 (mean 0.985, min 0.885 there).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

HTP_VS_CPU_COSINE_MEAN_MIN = 0.99
HTP_VS_CPU_COSINE_MIN = 0.95
HTP_VS_CPU_TOP1_MIN = 0.8
CONTEXT = 96
QDQ_DECODER = {"vision_encoder": "fp32", "embed_tokens": "fp32", "decoder_model_merged": "qdq"}
HELD_OUT = "Tell me a story about a cat. Then another one about a dog, and one about the sea."


@pytest.fixture(scope="module")
def plain_bundle(tiny_bundles, tmp_path_factory):
    """A plain-attention export of the tiny 256m checkpoint with a qdq decoder beside its fp32 graphs."""
    import shutil

    from smolvlm_edge.quantize.build import quantize_bundle

    bundle = Path(shutil.copytree(tiny_bundles("256m", "plain"), tmp_path_factory.mktemp("qnn-decoder") / "bundle"))
    quantize_bundle(bundle, "qdq", graphs={"vision": "none", "embed": "none", "decoder": "qdq"},
                    calibration_prompts=("Describe the picture in one sentence.", "Write a haiku about the sea.",
                                         "What is the capital of France? Answer briefly."),
                    progress=lambda line: None)
    return bundle


def static_cpu_decoder(path, text, capacity=CONTEXT):
    """The runtime's static-step decoder over a CPU session: the same axes fixed as on HTP."""
    import onnxruntime as ort

    from smolvlm_edge.runtime.htp_decoder import StaticStepDecoder, decode_step_dims

    options = ort.SessionOptions()
    for dim, size in decode_step_dims(capacity).items():
        options.add_free_dimension_override_by_name(dim, size)
    return StaticStepDecoder(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]), text)


def cosines(a, b) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_static_steps_equal_the_dynamic_graph_with_left_padding(plain_bundle):
    from smolvlm_edge.runtime import SmolVLM
    from smolvlm_edge.runtime.generate import position_ids_for

    vlm = SmolVLM(plain_bundle)
    inputs = vlm.prepare(["Hi.", HELD_OUT], [[], []])  # batch 2: the first row is left-padded
    embeds, mask = vlm.embed(inputs.input_ids), inputs.attention_mask
    positions = position_ids_for(mask)
    static = static_cpu_decoder(vlm.graph_files["decoder_model_merged"], vlm.bundle.text)
    ours, _ = static(embeds, mask, positions, static.empty_cache(2, mask.shape[1]))
    reference, _ = vlm.decoder(embeds, mask, positions, vlm.decoder.empty_cache(2))
    real = mask.astype(bool)
    assert np.abs(ours[real] - reference[real]).max() <= 1e-4
    # A whole generation through the static steps gives the same tokens.
    expected = vlm.generate(HELD_OUT, max_new_tokens=6, do_sample=False).token_ids
    vlm.decoder = static
    assert vlm.generate(HELD_OUT, max_new_tokens=6, do_sample=False).token_ids == expected


def test_static_cache_size_is_checked(plain_bundle):
    from smolvlm_edge.runtime.errors import PromptError
    from smolvlm_edge.runtime.bundle import open_bundle

    bundle = open_bundle(plain_bundle)
    static = static_cpu_decoder(plain_bundle / "onnx/decoder_model_merged_qdq.onnx", bundle.text, capacity=8)
    with pytest.raises(PromptError, match="holds 8 .*qnn_context"):
        static.empty_cache(1, 9)


def test_decoder_runs_split_between_htp_and_cpu(qnn, plain_bundle):
    from smolvlm_edge.quantize.qnn import session_split
    from smolvlm_edge.runtime import SmolVLM
    from smolvlm_edge.runtime.providers import QNN_EP

    htp = SmolVLM(plain_bundle, provider="qnn", precision=QDQ_DECODER, qnn_fallback=True, qnn_context=CONTEXT)
    assert htp.graph_providers["decoder_model_merged"] == [QNN_EP, "CPUExecutionProvider"]
    split = session_split(htp.decoder.session)
    assert {"MatMul", "Softmax", "Mul"} <= set(split[QNN_EP])  # the layers' work is on HTP
    assert "GatherND" in split["CPUExecutionProvider"]  # the mask lookup HTP refuses

    cpu = static_cpu_decoder(htp.graph_files["decoder_model_merged"], htp.bundle.text)
    embeds = htp.embed(htp.prepare([HELD_OUT], [[]]).input_ids)
    steps = embeds.shape[1]
    mask, positions = np.ones((1, steps), dtype=np.int64), np.arange(steps)[None]
    on_htp, _ = htp.decoder(embeds, mask, positions, htp.decoder.empty_cache(1, steps))
    on_cpu, _ = cpu(embeds, mask, positions, cpu.empty_cache(1, steps))
    cos = cosines(on_htp[0], on_cpu[0])
    assert cos.mean() >= HTP_VS_CPU_COSINE_MEAN_MIN and cos.min() >= HTP_VS_CPU_COSINE_MIN, (cos.mean(), cos.min())
    assert (on_htp[0].argmax(-1) == on_cpu[0].argmax(-1)).mean() >= HTP_VS_CPU_TOP1_MIN

    answer = htp.generate("Write a haiku about the sea.", max_new_tokens=4, do_sample=False)
    assert 1 <= len(answer.token_ids) <= 4 and answer.timings["prefill_ms"] > 0


def test_decoder_without_fallback_says_how_to_allow_it(qnn, plain_bundle):
    from smolvlm_edge.runtime import SmolVLM
    from smolvlm_edge.runtime.errors import ProviderError

    with pytest.raises(ProviderError, match="qnn_fallback=True"):
        SmolVLM(plain_bundle, provider="qnn", precision=QDQ_DECODER, qnn_context=CONTEXT)


@pytest.mark.parametrize("scale, overflows", [(0.005, 0), (0.01, 1)])  # reach ~164 (27k squared) or ~328 (107k)
def test_float_squares_that_overflow_fp16_are_counted(tmp_path, scale, overflows):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from smolvlm_edge.quantize.qnn import fp16_square_overflow

    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["x"]), helper.make_node("Pow", ["x", "two"], ["y"])],
        "square", [helper.make_tensor_value_info("q", TensorProto.UINT16, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(np.array(scale, np.float32), "s"),
         numpy_helper.from_array(np.array(32768, np.uint16), "z"), numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), tmp_path / "square.onnx")
    found = fp16_square_overflow(tmp_path / "square.onnx")
    assert found["float_squares"] == 1 and found["overflow_in_fp16"] == overflows


def test_tiny_decoder_squares_fit_fp16(plain_bundle):
    from smolvlm_edge.quantize.qnn import fp16_square_overflow

    found = fp16_square_overflow(plain_bundle / "onnx/decoder_model_merged_qdq.onnx")
    assert found["float_squares"] == 5 and found["overflow_in_fp16"] == 0  # 2 layers x 2 norms + the final one
