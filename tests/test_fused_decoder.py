"""The fused (GroupQueryAttention) decoder graph against PyTorch, in both ways of feeding its KV cache."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

ALL_LOGITS = {"num_logits_to_keep": np.array(0, dtype=np.int64)}  # the fused graph's scalar: every position

from smolvlm_edge.export import decoder, verify  # noqa: E402
from smolvlm_edge.export.fused_decoder import FUSED_OPS, build_fused_decoder  # noqa: E402
from conftest import CHECKPOINT_KINDS  # noqa: E402

PREFILL, DECODE_STEPS, MAX_LENGTH = 9, 3, 32
FACTOR = verify.TOLERANCE[decoder.NAME]  # the plain export's bar: FACTOR * max(1, max |ref|)


class Fused:
    """A tiny checkpoint's PyTorch model, its fused decoder graph and a CPU session on it."""

    def __init__(self, checkpoint, folder):
        from transformers import AutoModelForImageTextToText

        self.model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
        self.text = self.model.config.text_config
        self.path = build_fused_decoder(self.model, folder / f"{decoder.NAME}_fused.onnx")
        self.session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        self.past_names = decoder.kv_names(self.text.num_hidden_layers, "past")
        self.present_names = decoder.kv_names(self.text.num_hidden_layers, "present")


@pytest.fixture(scope="module", params=list(CHECKPOINT_KINDS))
def fused(request, tiny_checkpoints, tmp_path_factory) -> Fused:
    return Fused(tiny_checkpoints(request.param), tmp_path_factory.mktemp(f"fused-{request.param}"))


def reference_steps(model, batch: int, seed: int = 0):
    """PyTorch (the plain decoder wrapper): a prefill of PREFILL tokens with an empty past, then
    DECODE_STEPS single tokens, rows unpadded. Per step (embeds, mask, positions, logits, presents)."""
    text = model.config.text_config
    wrapper = decoder.decoder(model)
    gen = torch.Generator().manual_seed(seed)
    past = [torch.zeros(batch, text.num_key_value_heads, 0, text.head_dim)
            for _ in decoder.kv_names(text.num_hidden_layers, "past")]
    steps, total = [], 0
    for length in [PREFILL] + [1] * DECODE_STEPS:
        ids = torch.randint(0, text.vocab_size, (batch, length), generator=gen)
        positions = torch.arange(total, total + length).expand(batch, length)
        total += length
        mask = torch.ones(batch, total, dtype=torch.int64)
        with torch.no_grad():
            embeds = model.get_input_embeddings()(ids)
            logits, *past = wrapper(embeds, mask, positions, past)
        steps.append((embeds.numpy(), mask.numpy(), positions.numpy(), logits.numpy(), [t.numpy() for t in past]))
    return steps


def check(got, ref, what: str) -> float:
    diff = float(np.abs(np.asarray(got, np.float64) - ref).max())
    bound = FACTOR * max(1.0, float(np.abs(ref).max()))
    assert diff <= bound, f"{what}: max |diff| {diff:.3g} > {bound:.3g}"
    return diff


def test_graph_is_fused_and_declares_the_contract(fused):
    model = onnx.load(str(fused.path))
    ops = [n.op_type for n in model.graph.node]
    assert set(FUSED_OPS) <= set(ops)
    assert ops.count("GroupQueryAttention") == fused.text.num_hidden_layers
    assert model.ir_version == 9
    assert {o.domain: o.version for o in model.opset_import} == {"": 18, "com.microsoft": 1}

    spec = decoder.spec(fused.model.config)  # the plain contract; the fused graph adds num_logits_to_keep

    def declared(values):
        return [(v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                 tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)) for v in values]

    # the contract's inputs, then num_logits_to_keep (int64 scalar; 0 = every position)
    assert declared(model.graph.input) == [(t.name, t.dtype, t.shape) for t in spec.inputs] + \
        [("num_logits_to_keep", "int64", ())]
    present = [(t.name, t.dtype, tuple("present_sequence_length" if d == "total_sequence_length" else d
                                       for d in t.shape)) for t in spec.outputs]
    assert declared(model.graph.output) == present

    # Every MatMul multiplies by a constant [K, N] initializer (what the weight quantizers look for):
    # per layer the packed QKV, o_proj, packed gate/up and down_proj, then the lm_head.
    inits = {t.name: t for t in model.graph.initializer}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 4 * fused.text.num_hidden_layers + 1
    assert all(n.input[1] in inits and len(inits[n.input[1]].dims) == 2 for n in matmuls)
    hidden, heads, kv, d = (fused.text.hidden_size, fused.text.num_attention_heads,
                            fused.text.num_key_value_heads, fused.text.head_dim)
    qkv = inits[matmuls[0].input[1]]
    assert list(qkv.dims) == [hidden, (heads + 2 * kv) * d]
    assert matmuls[-1].output[0] == "logits"
    cos = inits["cos_cache"]
    assert list(cos.dims) == [fused.text.max_position_embeddings, d // 2]


def test_past_of_exact_length_matches_pytorch(fused):
    """Way (a), batch 1: prefill with an empty past, then decode steps fed the graph's own presents."""
    past = [np.zeros((1, fused.text.num_key_value_heads, 0, fused.text.head_dim), np.float32)] * len(fused.past_names)
    diffs = []
    for step, (embeds, mask, positions, ref_logits, ref_present) in enumerate(reference_steps(fused.model, 1)):
        feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions, **ALL_LOGITS, **ALL_LOGITS,
                 **dict(zip(fused.past_names, past))}
        logits, *past = fused.session.run(None, feeds)
        diffs.append(check(logits, ref_logits, f"step {step} logits"))
        for name, got, ref in zip(fused.present_names, past, ref_present):
            assert got.shape == ref.shape, name
            diffs.append(check(got, ref, f"step {step} {name}"))
    print(f"\n{fused.model.config.model_type} way (a) batch 1: max |diff| {max(diffs):.3g}")


def test_in_place_cache_matches_pytorch(fused):
    """Way (b): past and present bound to the same preallocated buffers (GQA shares them in place)."""
    kv, d = fused.text.num_key_value_heads, fused.text.head_dim
    arrays = [np.zeros((1, kv, MAX_LENGTH, d), np.float32) for _ in fused.past_names]
    buffers = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
    binding = fused.session.io_binding()
    for past_name, present_name, buf in zip(fused.past_names, fused.present_names, buffers):
        binding.bind_ortvalue_input(past_name, buf)
        binding.bind_ortvalue_output(present_name, buf)
    diffs = []
    for step, (embeds, mask, positions, ref_logits, ref_present) in enumerate(reference_steps(fused.model, 1)):
        binding.bind_cpu_input("inputs_embeds", embeds)
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_cpu_input("position_ids", positions)
        binding.bind_cpu_input("num_logits_to_keep", ALL_LOGITS["num_logits_to_keep"])
        binding.bind_output("logits")
        fused.session.run_with_iobinding(binding)
        logits = binding.copy_outputs_to_cpu()[-1]  # outputs in binding order: the presents, then logits
        diffs.append(check(logits, ref_logits, f"step {step} logits"))
        total = mask.shape[1]
        for name, buf, array, ref in zip(fused.present_names, buffers, arrays, ref_present):
            held = buf.numpy()
            assert held.shape == (1, kv, MAX_LENGTH, d), name
            np.testing.assert_array_equal(held, array)  # the same memory: written in place
            diffs.append(check(held[:, :, :total], ref, f"step {step} {name}[:{total}]"))
            assert not held[:, :, total:].any(), f"step {step} {name}: written beyond {total}"
    print(f"\n{fused.model.config.model_type} way (b) in place: max |diff| {max(diffs):.3g}")


def test_batch_of_equal_rows_matches_pytorch(fused):
    """Way (a), batch 2, rows of equal length (no padding)."""
    past = [np.zeros((2, fused.text.num_key_value_heads, 0, fused.text.head_dim), np.float32)] * len(fused.past_names)
    diffs = []
    for step, (embeds, mask, positions, ref_logits, ref_present) in enumerate(reference_steps(fused.model, 2, seed=1)):
        feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions, **ALL_LOGITS, **ALL_LOGITS,
                 **dict(zip(fused.past_names, past))}
        logits, *past = fused.session.run(None, feeds)
        diffs.append(check(logits, ref_logits, f"step {step} logits"))
        diffs += [check(got, ref, f"step {step} {name}") for name, got, ref in zip(fused.present_names, past, ref_present)]
    print(f"\n{fused.model.config.model_type} way (a) batch 2: max |diff| {max(diffs):.3g}")


def test_external_data_gives_the_same_graph(fused, tmp_path):
    """Above the threshold the weights go to one `.onnx_data` file beside the graph (checked by path)."""
    path = build_fused_decoder(fused.model, tmp_path / f"{decoder.NAME}_fused.onnx", external_data_threshold=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.with_suffix(".onnx_data").name]
    assert path.stat().st_size < path.with_suffix(".onnx_data").stat().st_size
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    embeds, mask, positions, _, _ = reference_steps(fused.model, 1)[0]
    past = [np.zeros((1, fused.text.num_key_value_heads, 0, fused.text.head_dim), np.float32)] * len(fused.past_names)
    feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions, **ALL_LOGITS,
             **dict(zip(fused.past_names, past))}
    for got, want in zip(session.run(None, feeds), fused.session.run(None, feeds)):
        np.testing.assert_array_equal(got, want)


def test_logits_for_the_last_positions_only(fused):
    """num_logits_to_keep=1 gives the last position's logits, equal to the full run's last row."""
    embeds, mask, positions, _, _ = reference_steps(fused.model, 1)[0]
    past = [np.zeros((1, fused.text.num_key_value_heads, 0, fused.text.head_dim), np.float32)] * len(fused.past_names)
    feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions, **ALL_LOGITS,
             **dict(zip(fused.past_names, past))}
    full = fused.session.run(["logits"], feeds)[0]
    last = fused.session.run(["logits"], {**feeds, "num_logits_to_keep": np.array(1, dtype=np.int64)})[0]
    assert last.shape == (1, 1, full.shape[-1])
    np.testing.assert_allclose(last[0, 0], full[0, -1], rtol=0, atol=1e-5)


def test_prefill_chunks_take_a_short_tail_along():
    from smolvlm_edge.runtime.generate import chunk_bounds

    assert chunk_bounds(81, 64) == [(0, 81)]  # 64 + 17 would stream the weights twice
    assert chunk_bounds(100, 64) == [(0, 64), (64, 100)]
    assert chunk_bounds(256, 64) == [(0, 64), (64, 128), (128, 192), (192, 256)]
    assert chunk_bounds(270, 64)[-1] == (192, 270)
    assert chunk_bounds(50, 64) == chunk_bounds(50, 0) == [(0, 50)]


@pytest.mark.parametrize("chunk", [4, 3, 0])
def test_runtime_prefill_in_chunks_matches_pytorch(fused, chunk):
    """The runtime's Decoder reads a prompt `chunk` positions at a time (9 = 4 + 5, 3 + 3 + 3; 0: at once):
    each chunk attends to the cache the chunks before it wrote, so every logit matches PyTorch's."""
    from smolvlm_edge.runtime.generate import Decoder

    layers = fused.text.num_hidden_layers
    text = {"num_layers": layers, "past_key_name": "past_key_values.%d.key", "past_value_name": "past_key_values.%d.value",
            "present_key_name": "present.%d.key", "present_value_name": "present.%d.value", "attention": "fused",
            "max_position_embeddings": MAX_LENGTH}
    assert Decoder(fused.session, text).prefill_chunk > 0  # on by default for fused graphs
    runner = Decoder(fused.session, text)
    runner.prefill_chunk = chunk
    cache = runner.empty_cache(1, capacity=PREFILL + DECODE_STEPS)
    for step, (embeds, mask, positions, ref_logits, _) in enumerate(reference_steps(fused.model, 1, seed=2)):
        logits, cache = runner(embeds, mask, positions, cache)
        assert logits.shape == ref_logits.shape
        check(logits, ref_logits, f"chunk {chunk}, step {step} logits")
    assert cache.lengths == [PREFILL + DECODE_STEPS]
    embeds, mask, positions, ref_logits, _ = reference_steps(fused.model, 1, seed=2)[0]
    last, _ = runner(embeds, mask, positions, runner.empty_cache(1, capacity=PREFILL), last_only=True)
    check(last, ref_logits[:, -1:], f"chunk {chunk}, last position only")


def test_runtime_decode_steps_keep_their_logits(fused):
    """Last-position logits of decode steps land in one bound buffer per row (no per-step output): each step
    still matches PyTorch, and an earlier step's logits are not overwritten by the next, also across a
    cache that outgrows its capacity (rebound buffers)."""
    from smolvlm_edge.runtime.generate import Decoder

    text = {"num_layers": fused.text.num_hidden_layers, "past_key_name": "past_key_values.%d.key",
            "past_value_name": "past_key_values.%d.value", "present_key_name": "present.%d.key",
            "present_value_name": "present.%d.value", "attention": "fused", "max_position_embeddings": MAX_LENGTH}
    runner = Decoder(fused.session, text)
    cache = runner.empty_cache(1, capacity=PREFILL)  # the first decode step grows it
    kept = []
    for step, (embeds, mask, positions, ref_logits, _) in enumerate(reference_steps(fused.model, 1, seed=3)):
        logits, cache = runner(embeds, mask, positions, cache, last_only=True)
        check(logits, ref_logits[:, -1:], f"step {step}, last position")
        kept.append((logits, logits.copy(), ref_logits[:, -1:]))
    assert cache.bound_to_last == [True]  # the decode steps wrote into the row's buffer
    for step, (logits, copy, ref) in enumerate(kept):
        np.testing.assert_array_equal(logits, copy, err_msg=f"step {step}'s logits changed by a later step")


def test_the_cache_lives_on_the_sessions_device_and_stays_put(fused):
    """CUDA sessions get their cache buffers on the GPU (no host copy of the cache per step), CPU ones in host
    memory; decode steps write into the same buffers (same addresses) until the cache has to grow."""
    from types import SimpleNamespace

    from smolvlm_edge.runtime.generate import Decoder, cache_device

    gpu = SimpleNamespace(get_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
                          get_provider_options=lambda: {"CUDAExecutionProvider": {"device_id": "1"}})
    assert cache_device(gpu) == ("cuda", 1)
    assert cache_device(fused.session) == ("cpu", 0)
    text = {"num_layers": fused.text.num_hidden_layers, "past_key_name": "past_key_values.%d.key",
            "past_value_name": "past_key_values.%d.value", "present_key_name": "present.%d.key",
            "present_value_name": "present.%d.value", "attention": "fused", "max_position_embeddings": MAX_LENGTH}
    runner = Decoder(fused.session, text)
    cache = runner.empty_cache(1, capacity=PREFILL + DECODE_STEPS)
    addresses = [v.data_ptr() for v in cache.values[0]]
    assert {v.device_name() for v in cache.values[0]} == {"cpu"}
    for embeds, mask, positions, _, ref_present in reference_steps(fused.model, 1, seed=4):
        runner(embeds, mask, positions, cache, last_only=True)
    assert [v.data_ptr() for v in cache.values[0]] == addresses
    total = PREFILL + DECODE_STEPS
    for value, ref in zip(cache.values[0], ref_present):
        check(value.numpy()[:, :, :total], ref, "cache after the last step")
