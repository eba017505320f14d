"""A fused ("builder-style") decoder_model_merged graph, written op by op from the weights.

The plain decoder (`decoder.py`) is a dynamo export of the transformers text model: attention is
spelled out in ai.onnx ops (MatMul, Softmax, the rotary arithmetic, the causal mask...). This module
writes the same contract graph directly with `onnx.helper`, the way onnxruntime-genai's model
builder does, out of onnxruntime's fused kernels:

- `SimplifiedLayerNormalization` (ai.onnx domain, an onnxruntime op) for the first RMSNorm, then
  `SkipSimplifiedLayerNormalization` (com.microsoft), which adds the residual and hands the sum on
  (its 4th output, `input_skip_bias_sum`) as the next residual;
- one MatMul with the q, k and v weights side by side ([hidden, (H + 2*KVH) * head_dim]) feeding
  `GroupQueryAttention` (com.microsoft) the packed QKV, with rotary embedding inside the op
  (`do_rotary=1`, `cos_cache`/`sin_cache` [max_position_embeddings, head_dim / 2]);
- one MatMul with the gate and up weights side by side, Split, silu(gate) * up as Sigmoid/Mul/Mul;
- the final norm as a SkipSimplifiedLayerNormalization, then the lm_head MatMul.

Every projection is a MatMul whose B is a constant 2-D initializer [K, N] (the transposed nn.Linear
weight), so the int8/int4 quantizers of `smolvlm_edge.quantize` find and quantize them as they do
in the plain graph.

Graph I/O is the decoder contract (`decoder.spec`): `inputs_embeds`, `attention_mask`,
`position_ids`, `past_key_values.{i}.key/value` in; `logits`, `present.{i}.key/value` out. The
present axis is named `present_sequence_length` (not `total_sequence_length`): see way (b) below.

Positions and padding. GroupQueryAttention takes no attention mask: it derives each row's length
from `seqlens_k = sum(attention_mask, axis 1) - 1` and the rotary position of the token at index j
of the sequence from that length (the new tokens sit at [total - S, total)). So the graph assumes
**no left padding**: position_ids must equal arange (it is declared for the contract and ignored by
the graph), which holds for batch 1 and for batches of right-aligned rows of equal length. A
left-padded batch (what the plain graph and transformers.js' generate do) gives wrong results here.

Two ways to call it (both checked in tests/test_fused_decoder.py):

(a) transformers.js style: past tensors of exactly the past length (0 at prefill); the present
    outputs are past + new, fed back as the next past.
(b) in-place cache: past buffers preallocated to a maximum length L ([B, KVH, L, head_dim]) and the
    present outputs bound (IOBinding) to the same buffers; onnxruntime's GQA sees that past and
    present share memory and writes the new keys/values at [total - S, total). The attention_mask
    still has the true total length; the present outputs then have length L, not the total.

Where the fused ops run (onnxruntime's kernel registrations, `docs/OperatorKernels.md` and the
web EPs): GroupQueryAttention, SimplifiedLayerNormalization and SkipSimplifiedLayerNormalization
have CPU and CUDA kernels, and the WebGPU and JS (JSEP) EPs implement them (only the CPU EP is
checked here). The mobile and NPU EPs do not take com.microsoft GroupQueryAttention: NNAPI,
CoreML and XNNPACK handle ai.onnx ops (plus QDQ) only and QNN has no com.microsoft GQA, so on those
the nodes would fall back to the CPU EP between partitions: keep the plain graph there.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from smolvlm_edge.export.decoder import NAME, kv_names
from smolvlm_edge.runtime.errors import ExportError

# A scalar int64 input after the cache: logits for the last N positions only, 0 = all. The name and
# meaning are onnxruntime-genai's and transformers.js' (which feeds 1 when a decoder declares it).
KEEP_LOGITS = "num_logits_to_keep"
FUSED_OPS = ("GroupQueryAttention", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")
MS_DOMAIN = "com.microsoft"
# Protobuf cannot hold 2 GiB; above this many weight bytes the weights go to one `.onnx_data` file.
EXTERNAL_DATA_THRESHOLD = int(1.9 * 2**30)


def rope_caches(text_config) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_position_embeddings, head_dim / 2] as transformers' default rope computes them (float32)."""
    import torch

    params = getattr(text_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ExportError(f"the fused decoder supports the default rope only, the config asks for {rope_type!r}")
    theta = params.get("rope_theta", getattr(text_config, "rope_theta", None))
    if theta is None:
        raise ExportError("the text config names no rope_theta")
    dim = _head_dim(text_config)
    # Same expressions as LlamaRotaryEmbedding: float32 throughout.
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    positions = torch.arange(text_config.max_position_embeddings, dtype=torch.float)
    freqs = positions[:, None] * inv_freq[None, :]
    return freqs.cos().numpy(), freqs.sin().numpy()


def _head_dim(tc) -> int:
    return getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads


def _array(t) -> np.ndarray:
    """A float32 numpy copy of a torch parameter."""
    return np.ascontiguousarray(t.detach().float().cpu().numpy())


@contextlib.contextmanager
def _ort_schemas():
    """Let the ONNX checker know SimplifiedLayerNormalization (an onnxruntime op in the ai.onnx domain)."""
    from onnx import defs

    if defs.has("SimplifiedLayerNormalization"):
        yield
        return
    schema = defs.OpSchema(
        "SimplifiedLayerNormalization", "", 1,
        "onnxruntime's RMSNorm: X / sqrt(mean(X^2 over axis..) + epsilon) * scale",
        inputs=[defs.OpSchema.FormalParameter("X", "T"), defs.OpSchema.FormalParameter("scale", "V")],
        outputs=[defs.OpSchema.FormalParameter("Y", "V"),
                 defs.OpSchema.FormalParameter("inv_std_var", "U",
                                               param_option=defs.OpSchema.FormalParameterOption.Optional)],
        type_constraints=[("T", ["tensor(float16)", "tensor(float)", "tensor(double)", "tensor(bfloat16)"], ""),
                          ("U", ["tensor(float)", "tensor(double)"], ""),
                          ("V", ["tensor(float16)", "tensor(float)", "tensor(double)", "tensor(bfloat16)"], "")],
        attributes=[defs.OpSchema.Attribute("axis", defs.OpSchema.AttrType.INT, required=False),
                    defs.OpSchema.Attribute("epsilon", defs.OpSchema.AttrType.FLOAT, required=False),
                    defs.OpSchema.Attribute("stash_type", defs.OpSchema.AttrType.INT, required=False)],
    )
    defs.register_schema(schema)
    try:
        yield
    finally:
        defs.deregister_schema("SimplifiedLayerNormalization", 1, "")


class _Builder:
    """Collects nodes and initializers; names follow the builder's /model/layers.{i}/... style."""

    def __init__(self):
        self.nodes, self.inits, self.weight_bytes = [], [], 0

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.require(array, requirements="C"), name))  # keeps 0-d arrays
        self.weight_bytes += array.nbytes
        return name

    def node(self, op: str, inputs, outputs, name: str, domain: str = "", **attrs):
        from onnx import helper

        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name, domain=domain, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def linear(self, x: str, weight, bias, prefix: str, out: str | None = None) -> str:
        """x @ weight.T (+ bias): a MatMul with a constant [K, N] initializer, then Add when there is a bias."""
        w = self.init(f"{prefix}.weight", weight.T)
        y = self.node("MatMul", [x, w], [out if out and bias is None else f"{prefix}/MatMul/output_0"],
                      name=f"{prefix}/MatMul")
        if bias is None:
            return y
        b = self.init(f"{prefix}.bias", bias)
        return self.node("Add", [y, b], [out or f"{prefix}/Add/output_0"], name=f"{prefix}/Add")


def _bias(*linears):
    """Concatenated biases of the given nn.Linear modules, or None when none has one."""
    if all(m.bias is None for m in linears):
        return None
    return np.concatenate([_array(m.bias) if m.bias is not None else np.zeros(m.out_features, np.float32)
                           for m in linears])


def build_fused_decoder(model, path: Path, *, opset: int = 18, ir_version: int = 9,
                        external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Write the fused decoder graph of an Idefics3/SmolVLM `model` to `path`; return `path`.

    Weights go into the file, or into one `path.with_suffix('.onnx_data')` file beside it when they
    pass EXTERNAL_DATA_THRESHOLD. The written file is run through the ONNX checker.
    """
    import onnx
    from onnx import TensorProto, helper

    tc = model.config.text_config
    text = model.model.text_model
    act = getattr(tc, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ExportError(f"the fused decoder implements silu MLPs only, the config has hidden_act={act!r}")
    hidden, heads, kv_heads = tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads
    head_dim, layers, vocab = _head_dim(tc), tc.num_hidden_layers, tc.vocab_size
    inter = tc.intermediate_size
    eps = float(tc.rms_norm_eps)

    b = _Builder()
    # Shared by every layer: GQA's per-row lengths (minus one) and the batch's total length, int32.
    b.init("/model/constants/axis_1", np.array([1], np.int64))
    b.init("/model/constants/one", np.array(1, np.int64))
    b.node("ReduceSum", ["attention_mask", "/model/constants/axis_1"], ["/model/attn_mask/ReduceSum/output_0"],
           name="/model/attn_mask/ReduceSum", keepdims=0)
    b.node("Sub", ["/model/attn_mask/ReduceSum/output_0", "/model/constants/one"],
           ["/model/attn_mask/Sub/output_0"], name="/model/attn_mask/Sub")
    seqlens_k = b.node("Cast", ["/model/attn_mask/Sub/output_0"], ["/model/attn_mask/seqlens_k"],
                       name="/model/attn_mask/seqlens_k/Cast", to=TensorProto.INT32)
    b.node("Shape", ["attention_mask"], ["/model/attn_mask/Shape/output_0"], name="/model/attn_mask/Shape")
    b.node("Gather", ["/model/attn_mask/Shape/output_0", "/model/constants/one"],
           ["/model/attn_mask/Gather/output_0"], name="/model/attn_mask/Gather", axis=0)
    total_len = b.node("Cast", ["/model/attn_mask/Gather/output_0"], ["/model/attn_mask/total_seq_len"],
                       name="/model/attn_mask/total_seq_len/Cast", to=TensorProto.INT32)
    cos, sin = rope_caches(tc)
    b.init("cos_cache", cos)
    b.init("sin_cache", sin)
    b.init("/model/constants/gate_up_split", np.array([inter, inter], np.int64))

    past, present = kv_names(layers, "past"), kv_names(layers, "present")
    residual, pending = "inputs_embeds", None  # pending: the last MLP output, not yet added to the residual
    for i, layer in enumerate(text.layers):
        p = f"/model/layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        ln = b.init(f"model.layers.{i}.input_layernorm.weight", _array(layer.input_layernorm.weight))
        if pending is None:
            x = b.node("SimplifiedLayerNormalization", [residual, ln], [f"{p}/input_layernorm/output_0"],
                       name=f"{p}/input_layernorm/LayerNorm", axis=-1, epsilon=eps, stash_type=1)
        else:
            x, residual = b.node("SkipSimplifiedLayerNormalization", [pending, residual, ln],
                                 [f"{p}/input_layernorm/output_0", "", "", f"{p}/input_layernorm/output_3"],
                                 name=f"{p}/input_layernorm/SkipLayerNorm", domain=MS_DOMAIN, epsilon=eps)[::3]

        qkv_w = np.concatenate([_array(attn.q_proj.weight), _array(attn.k_proj.weight), _array(attn.v_proj.weight)])
        qkv = b.linear(x, qkv_w, _bias(attn.q_proj, attn.k_proj, attn.v_proj), f"{p}/attn/qkv_proj")
        a = b.node("GroupQueryAttention",
                   [qkv, "", "", past[2 * i], past[2 * i + 1], seqlens_k, total_len, "cos_cache", "sin_cache"],
                   [f"{p}/attn/GroupQueryAttention/output_0", present[2 * i], present[2 * i + 1]],
                   name=f"{p}/attn/GroupQueryAttention", domain=MS_DOMAIN, num_heads=heads, kv_num_heads=kv_heads,
                   do_rotary=1, rotary_interleaved=0, local_window_size=-1)[0]
        o_bias = None if attn.o_proj.bias is None else _array(attn.o_proj.bias)
        o = b.linear(a, _array(attn.o_proj.weight), o_bias, f"{p}/attn/o_proj")

        post = b.init(f"model.layers.{i}.post_attention_layernorm.weight", _array(layer.post_attention_layernorm.weight))
        x, residual = b.node("SkipSimplifiedLayerNormalization", [o, residual, post],
                             [f"{p}/post_attention_layernorm/output_0", "", "", f"{p}/post_attention_layernorm/output_3"],
                             name=f"{p}/post_attention_layernorm/SkipLayerNorm", domain=MS_DOMAIN, epsilon=eps)[::3]

        gu_w = np.concatenate([_array(mlp.gate_proj.weight), _array(mlp.up_proj.weight)])
        gu = b.linear(x, gu_w, _bias(mlp.gate_proj, mlp.up_proj), f"{p}/mlp/gate_up_proj")
        gate, up = b.node("Split", [gu, "/model/constants/gate_up_split"], [f"{p}/mlp/gate", f"{p}/mlp/up"],
                          name=f"{p}/mlp/Split", axis=-1)
        sig = b.node("Sigmoid", [gate], [f"{p}/mlp/act_fn/Sigmoid/output_0"], name=f"{p}/mlp/act_fn/Sigmoid")
        silu = b.node("Mul", [gate, sig], [f"{p}/mlp/act_fn/Mul/output_0"], name=f"{p}/mlp/act_fn/Mul")
        h = b.node("Mul", [silu, up], [f"{p}/mlp/Mul/output_0"], name=f"{p}/mlp/Mul")
        d_bias = None if mlp.down_proj.bias is None else _array(mlp.down_proj.bias)
        pending = b.linear(h, _array(mlp.down_proj.weight), d_bias, f"{p}/mlp/down_proj")

    norm = b.init("model.norm.weight", _array(text.norm.weight))
    y = b.node("SkipSimplifiedLayerNormalization", [pending, residual, norm], ["/model/norm/output_0"],
               name="/model/norm/SkipLayerNorm", domain=MS_DOMAIN, epsilon=eps)
    # Logits for the last `num_logits_to_keep` positions only (0, the default, keeps all): a prompt of
    # 256 tokens otherwise pays 256 lm_head rows of which generation reads one.
    b.init("/model/constants/keep_shape", np.array([1], np.int64))
    b.init("/model/constants/int64_max", np.array([np.iinfo(np.int64).max], np.int64))
    keep = b.node("Reshape", [KEEP_LOGITS, "/model/constants/keep_shape"], ["/model/keep/Reshape/output_0"],
                  name="/model/keep/Reshape")
    start = b.node("Neg", [keep], ["/model/keep/Neg/output_0"], name="/model/keep/Neg")
    y = b.node("Slice", [y, start, "/model/constants/int64_max", "/model/constants/axis_1"],
               ["/model/keep/Slice/output_0"], name="/model/keep/Slice")
    head_bias = None if getattr(model.lm_head, "bias", None) is None else _array(model.lm_head.bias)
    b.linear(y, _array(model.lm_head.weight), head_bias, "/lm_head", out="logits")

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    kv_in = [helper.make_tensor_value_info(n, f32, ["batch_size", kv_heads, "past_sequence_length", head_dim])
             for n in past]
    kv_out = [helper.make_tensor_value_info(n, f32, ["batch_size", kv_heads, "present_sequence_length", head_dim])
              for n in present]
    graph = helper.make_graph(
        b.nodes, NAME,
        inputs=[helper.make_tensor_value_info("inputs_embeds", f32, ["batch_size", "sequence_length", hidden]),
                helper.make_tensor_value_info("attention_mask", i64, ["batch_size", "total_sequence_length"]),
                helper.make_tensor_value_info("position_ids", i64, ["batch_size", "sequence_length"]),
                *kv_in, helper.make_tensor_value_info(KEEP_LOGITS, i64, [])],
        outputs=[helper.make_tensor_value_info("logits", f32, ["batch_size", "sequence_length", vocab]), *kv_out],
        initializer=b.inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name="smolvlm_edge.fused_decoder")
    proto.ir_version = ir_version

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_suffix(".onnx_data")
    if data.exists():
        data.unlink()  # onnx appends to an existing data file; this one belonged to the graph we overwrite
    external = b.weight_bytes > external_data_threshold
    with _ort_schemas():
        try:
            if external:
                onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=data.name, size_threshold=1024)
                onnx.checker.check_model(str(path))
            else:
                onnx.checker.check_model(proto)
                onnx.save_model(proto, str(path))
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"{NAME} (fused): the graph {path} fails the ONNX checker: {exc}") from exc
    return path


def spec(config):
    """The contract spec (decoder.spec) with the present axis named for way (b): the buffer's length."""
    from dataclasses import replace

    from smolvlm_edge.export import decoder

    from smolvlm_edge.export.graph import TensorSpec

    plain = decoder.spec(config)
    outputs = tuple(t if t.name == "logits" else replace(t, shape=(*t.shape[:2], "present_sequence_length", t.shape[3]))
                    for t in plain.outputs)
    return replace(plain, inputs=(*plain.inputs, TensorSpec(KEEP_LOGITS, "int64", ())), outputs=outputs)


def export(model, folder: Path, *, opset: int = 18, ir_version: int = 9, external_data_threshold: int | None = None):
    """Write the fused decoder into `folder` as the bundle's decoder_model_merged; a WrittenGraph like decoder.export."""
    import time

    from smolvlm_edge.export.graph import WrittenGraph

    started = time.perf_counter()
    path = Path(folder) / f"{NAME}.onnx"
    threshold = EXTERNAL_DATA_THRESHOLD if external_data_threshold is None else external_data_threshold
    build_fused_decoder(model, path, opset=opset, ir_version=ir_version, external_data_threshold=threshold)
    data = path.with_suffix(".onnx_data")
    return WrittenGraph(spec(model.config), path, data if data.exists() else None, time.perf_counter() - started)
