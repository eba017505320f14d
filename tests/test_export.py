"""Export tests: tiny checkpoints of both vision shapes exported once, then the bundle and its graphs checked."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from smolvlm_edge.export import api, decoder, embed, fused_decoder, verify, vision  # noqa: E402
from conftest import CHECKPOINT_KINDS  # noqa: E402
from smolvlm_edge.runtime.errors import ExportError  # noqa: E402

GRAPH_NAMES = [vision.NAME, embed.NAME, decoder.NAME]


class Exported:
    """A tiny checkpoint, its bundle, the manifest, and the PyTorch model for references."""

    def __init__(self, checkpoint: Path, bundle: Path, lines: list[str]):
        from transformers import AutoModelForImageTextToText

        self.checkpoint, self.bundle, self.lines = checkpoint, bundle, lines
        self.manifest = json.loads((bundle / "manifest.json").read_text())
        self.model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()

    def session(self, name: str):
        file = self.manifest["graphs"][name]["fp32"]["file"]
        return ort.InferenceSession(str(self.bundle / file), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=list(CHECKPOINT_KINDS))
def exported(request, tiny_checkpoints, tiny_bundles) -> Exported:
    """The session's shared tiny bundles (conftest), exported once for all test files."""
    bundle = tiny_bundles(request.param)
    return Exported(tiny_checkpoints(request.param), bundle, tiny_bundles.progress_lines[request.param])


@pytest.fixture(scope="module")
def checkpoint_256m(tiny_checkpoints) -> Path:
    return tiny_checkpoints("256m")


# The bar for tiny checkpoints: features and logits within 1e-4 of PyTorch, absolute.
ABS_TOLERANCE = 1e-4


def within(got, ref, graph: str) -> tuple[float, float]:
    """Max |got - ref| and the allowed bound: the stricter of 1e-4 absolute and verify's own table."""
    ref = np.asarray(ref)
    diff = float(np.abs(np.asarray(got) - ref).max())
    return diff, min(ABS_TOLERANCE, verify.TOLERANCE[graph] * max(1.0, float(np.abs(ref).max())))


def leftovers(output: Path) -> list[str]:
    return sorted(p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}."))


# --- bundle layout and manifest -------------------------------------------------------------------


def test_bundle_layout_and_manifest(exported):
    b, m = exported.bundle, exported.manifest
    for name in ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
                 "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "manifest.json",
                 *(f"onnx/{g}.onnx" for g in GRAPH_NAMES)):
        assert (b / name).is_file(), name
    assert leftovers(b) == []

    assert m["format"] == "smolvlm-edge-bundle" and m["format_version"] == 1
    assert m["source"]["model"] == str(exported.checkpoint)
    assert m["source"]["model_type"] == exported.model.config.model_type
    assert m["source"]["architecture"] == type(exported.model).__name__
    assert m["onnx"] == {"opset": 18, "ir_version": 9}
    assert set(m["versions"]) == {"smolvlm_edge", "torch", "transformers", "onnx", "onnxscript", "onnxruntime"}
    assert set(m["graphs"]) == set(GRAPH_NAMES) == set(m["parity"]) == set(m["export_seconds"])
    assert all(m["parity"][g]["passed"] and m["parity"][g]["max_abs_diff"] <= m["parity"][g]["tolerance"]
               for g in GRAPH_NAMES)
    assert any(line.startswith("verifying") for line in exported.lines)

    on_disk = {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(m["files"]) == on_disk
    for rel, entry in m["files"].items():
        data = (b / rel).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}, rel

    config = exported.model.config
    tokens = (config.vision_config.image_size // config.vision_config.patch_size) ** 2 // config.scale_factor**2
    assert m["vision"] == {"image_size": config.vision_config.image_size, "patch_size": config.vision_config.patch_size,
                           "scale_factor": config.scale_factor, "tokens_per_image": tokens,
                           "attention": "fused", "attention_check": m["vision"]["attention_check"]}
    assert m["vision"]["attention_check"]["blocks"] == config.vision_config.num_hidden_layers
    assert m["text"]["num_kv_heads"] == config.text_config.num_key_value_heads
    assert m["text"]["image_token_id"] == config.image_token_id
    assert m["text"]["past_key_name"] % 0 == "past_key_values.0.key"

    # What transformers.js reads.
    pre = json.loads((b / "preprocessor_config.json").read_text())
    assert pre["processor_class"] == "Idefics3Processor" and pre["max_image_size"] == {"longest_edge": config.vision_config.image_size}
    assert json.loads((b / "processor_config.json").read_text())["image_seq_len"] == tokens
    template = json.loads((b / "tokenizer_config.json").read_text())["chat_template"]
    assert template == (b / "chat_template.jinja").read_text()


def _declared(values) -> dict:
    out = {}
    for v in values:
        dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        out[v.name] = (onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name, dims)
    return out


@pytest.mark.parametrize("graph", GRAPH_NAMES)
def test_graph_io_matches_contract(exported, graph):
    entry = exported.manifest["graphs"][graph]["fp32"]
    model = onnx.load(str(exported.bundle / entry["file"]), load_external_data=False)
    assert model.ir_version == 9 and {o.domain: o.version for o in model.opset_import}[""] == 18
    assert _declared(model.graph.input) == {t["name"]: (t["dtype"], t["shape"]) for t in entry["inputs"]}
    assert _declared(model.graph.output) == {t["name"]: (t["dtype"], t["shape"]) for t in entry["outputs"]}
    assert [i.name for i in model.graph.input] == [t["name"] for t in entry["inputs"]]
    assert all(t["shape"][0] == "batch_size" for t in entry["inputs"] if t["shape"])  # but scalars

    text = exported.model.config.text_config
    if graph == decoder.NAME:
        fused = exported.manifest["text"]["attention"] == "fused"
        inputs = entry["inputs"][:-1] if fused else entry["inputs"]  # fused: num_logits_to_keep comes last
        if fused:
            assert entry["inputs"][-1] == {"name": "num_logits_to_keep", "dtype": "int64", "shape": []}
        names = [t["name"] for t in inputs]
        assert names[:3] == ["inputs_embeds", "attention_mask", "position_ids"]
        assert names[3:] == decoder.kv_names(text.num_hidden_layers, "past")
        assert [t["name"] for t in entry["outputs"]][1:] == decoder.kv_names(text.num_hidden_layers, "present")
        kv = {t["name"]: t["shape"] for t in inputs[3:] + entry["outputs"][1:]}
        for name, shape in kv.items():
            # the fused graph's present has its buffer's length (the in-place cache), the plain one past + new
            present = "present_sequence_length" if fused else "total_sequence_length"
            length = "past_sequence_length" if name.startswith("past") else present
            assert shape == ["batch_size", text.num_key_value_heads, length, text.head_dim], name
    if graph == vision.NAME:
        size = exported.model.config.vision_config.image_size
        assert entry["inputs"][0]["shape"] == ["batch_size", "num_images", 3, size, size]
        assert entry["inputs"][1]["dtype"] == "bool"


# --- numerics against PyTorch ---------------------------------------------------------------------


def test_vision_features_match_pytorch(exported):
    """2 prompts x 2 frames, one all-zero padding frame, partial masks: same rows as get_image_features."""
    pixel_values, mask = verify.vision_inputs(exported.model.config, seed=7)
    with torch.no_grad():
        ref = torch.cat(list(exported.model.model.get_image_features(pixel_values, mask).pooler_output)).numpy()
    (got,) = exported.session(vision.NAME).run(None, {"pixel_values": pixel_values.numpy(),
                                                      "pixel_attention_mask": mask.numpy()})
    assert got.shape[0] == 3  # the padding frame is dropped inside the graph
    diff, bound = within(got.reshape(ref.shape), ref, vision.NAME)
    assert diff <= bound


def test_all_padding_frames_follow_transformers(exported):
    """Idefics3 drops every all-zero frame; SmolVLM keeps the first when none is real."""
    size = exported.model.config.vision_config.image_size
    zeros = np.zeros((1, 2, 3, size, size), np.float32)
    (got,) = exported.session(vision.NAME).run(None, {"pixel_values": zeros,
                                                      "pixel_attention_mask": np.ones((1, 2, size, size), bool)})
    assert got.shape[0] == (1 if exported.model.config.model_type == "smolvlm" else 0)


def test_bucket_table_equals_transformers_for_partial_masks(exported):
    """The integer position lookup equals transformers' bucketize path for every mask size."""
    config = exported.model.config.vision_config
    side = config.image_size // config.patch_size
    emb = exported.model.model.vision_model.embeddings
    masks = torch.zeros(side, side, side, dtype=torch.bool)
    for n in range(side):
        masks[n, : n + 1, : side - n] = True
    pixels = torch.randn(side, 3, config.image_size, config.image_size)
    with torch.no_grad():
        ref = emb(pixels, masks)
        table = vision.bucket_table(side)
        rows, cols = masks[:, :, 0].sum(1), masks[:, 0, :].sum(1)
        pos = (table[rows][:, :, None] * side + table[cols][:, None, :]).reshape(side, -1)
        ids = torch.where(masks.reshape(side, -1), pos, 0)
        mine = emb.patch_embedding(pixels).flatten(2).transpose(1, 2) + emb.position_embedding(ids)
    assert torch.equal(mine, ref)


def _reference_step(model, cache, ids, mask, positions):
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        out = model.model.text_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                     cache=cache, use_cache=True)
        return embeds, model.lm_head(out.last_hidden_state).numpy()


def _run_decoder(session, text, embeds, mask, positions, past=None):
    names = decoder.kv_names(text.num_hidden_layers, "past")
    if past is None:  # prefill: empty past of length 0
        past = [np.zeros((embeds.shape[0], text.num_key_value_heads, 0, text.head_dim), np.float32)] * len(names)
    feeds = {"inputs_embeds": np.asarray(embeds), "attention_mask": np.asarray(mask),
             "position_ids": np.asarray(positions), **dict(zip(names, past))}
    if "num_logits_to_keep" in {i.name for i in session.get_inputs()}:  # the fused graph: every position
        feeds["num_logits_to_keep"] = np.array(0, dtype=np.int64)
    outputs = session.run(None, feeds)
    return outputs[0], outputs[1:]


def test_prefill_left_padded_with_empty_past_and_decode_step(exported):
    from transformers import DynamicCache

    model, text = exported.model, exported.model.config.text_config
    session = exported.session(decoder.NAME)
    steps = verify.decoder_steps(model.config, seed=3)
    if exported.manifest["text"]["attention"] == "fused":  # no left padding there: the unpadded row only
        steps = [tuple(t[1:2] for t in step) for step in steps]
    (ids, mask, positions), (step_ids, step_mask, step_positions) = steps
    cache = DynamicCache(config=text)

    embeds, ref = _reference_step(model, cache, ids, mask, positions)
    logits, present = _run_decoder(session, text, embeds.numpy(), mask.numpy(), positions.numpy())
    assert all(p.shape == (len(ids), text.num_key_value_heads, ids.shape[1], text.head_dim) for p in present)
    real = mask.numpy().astype(bool)  # left-padding positions are never read; only attended ones count
    diff, bound = within(logits[real], ref[real], decoder.NAME)
    assert diff <= bound, f"prefill logits differ by {diff}"

    step_embeds, step_ref = _reference_step(model, cache, step_ids, step_mask, step_positions)
    step_logits, step_present = _run_decoder(session, text, step_embeds.numpy(), step_mask.numpy(),
                                             step_positions.numpy(), present)
    assert step_present[0].shape[2] == ids.shape[1] + 1
    diff, bound = within(step_logits, step_ref, decoder.NAME)
    assert diff <= bound, f"decode-step logits differ by {diff}"

    # Cached decoding equals a full recompute of the longer sequence in the same graph.
    all_embeds = np.concatenate([embeds.numpy(), step_embeds.numpy()], axis=1)
    all_positions = np.concatenate([positions.numpy(), step_positions.numpy()], axis=1)
    full_logits, _ = _run_decoder(session, text, all_embeds, step_mask.numpy(), all_positions)
    diff, bound = within(step_logits[:, -1], full_logits[:, -1], decoder.NAME)
    assert diff <= bound


def test_embed_tokens_match_pytorch(exported):
    (ids,) = embed.dummy_inputs(exported.model.config, batch=3, length=4)
    (got,) = exported.session(embed.NAME).run(None, {"input_ids": ids.numpy()})
    with torch.no_grad():
        np.testing.assert_array_equal(got, exported.model.get_input_embeddings()(ids).numpy())


# --- refusing, replacing, failing cleanly ---------------------------------------------------------


def test_existing_output_is_refused(checkpoint_256m, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        api.export_checkpoint(str(checkpoint_256m), out, progress=lambda line: None)
    assert (out / "keep.txt").read_text() == "mine" and leftovers(out) == []


def test_overwrite_with_external_data_and_no_verify(checkpoint_256m, tmp_path):
    """overwrite=True swaps the new bundle in; a 0-byte threshold forces *.onnx_data, which loads and runs."""
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "old.txt").write_text("old bundle")
    lines: list[str] = []
    api.export_checkpoint(str(checkpoint_256m), out, overwrite=True, verify=False,
                          external_data_threshold=0, progress=lines.append)
    assert not (out / "old.txt").exists() and leftovers(out) == []
    assert any("WARNING" in line and "not" in line.lower() for line in lines)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"] == {"skipped": "--no-verify"}
    for name in GRAPH_NAMES:
        external = manifest["graphs"][name]["fp32"]["external_data"]
        assert external == f"onnx/{name}.onnx_data" and external in manifest["files"]
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.rglob("*") if p.is_file()}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes  # onnx.save writes external data 0600

    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(checkpoint_256m, dtype=torch.float32).eval()
    result = verify.verify_graph(vision.NAME, model, out / "onnx" / f"{vision.NAME}.onnx")
    assert result["passed"], result


def test_non_smolvlm_checkpoint_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "llama")
    with pytest.raises(ExportError, match=r"is a 'llama' checkpoint; smolvlm-edge exports Idefics3/SmolVLM "
                                          r"checkpoints \(model_type idefics3 or smolvlm\)"):
        api.export_checkpoint(str(tmp_path / "llama"), tmp_path / "out", progress=lambda line: None)
    with pytest.raises(ExportError, match="does not exist"):
        api.export_checkpoint(str(tmp_path / "missing"), tmp_path / "out", progress=lambda line: None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no config.json"):
        api.export_checkpoint(str(tmp_path / "empty"), tmp_path / "out", progress=lambda line: None)
    assert not (tmp_path / "out").exists()


def test_failed_verification_leaves_nothing(checkpoint_256m, tmp_path, monkeypatch):
    """A graph that disagrees with PyTorch (here: wrong position buckets) fails the export, leaving no files."""
    original = vision.bucket_table
    monkeypatch.setattr(vision, "bucket_table", lambda side: original(side).flip(-1))
    out = tmp_path / "bundle"
    with pytest.raises(ExportError, match=r"vision_encoder.*disagree") as info:
        api.export_checkpoint(str(checkpoint_256m), out, progress=lambda line: None)
    assert "max |diff|" in str(info.value) and "FAILED" in str(info.value)
    assert not out.exists() and leftovers(out) == []


def test_interrupt_keeps_the_old_bundle_and_leaves_no_partial(checkpoint_256m, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fused_decoder, "export", interrupted)  # the default decoder exporter
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "old.txt").write_text("old bundle")
    with pytest.raises(KeyboardInterrupt):
        api.export_checkpoint(str(checkpoint_256m), out, overwrite=True, progress=lambda line: None)
    assert (out / "old.txt").read_text() == "old bundle" and leftovers(out) == []
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]


def test_batch_of_one_single_token(exported):
    """Batch 1 and one new token (what a simple runtime feeds) work although the trace used sizes >= 2."""
    from transformers import DynamicCache

    model, text = exported.model, exported.model.config.text_config
    ids, mask, positions = torch.tensor([[5]]), torch.ones(1, 1, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.int64)
    embeds, ref = _reference_step(model, DynamicCache(config=text), ids, mask, positions)
    logits, _ = _run_decoder(exported.session(decoder.NAME), text, embeds.numpy(), mask.numpy(), positions.numpy())
    diff, bound = within(logits, ref, decoder.NAME)
    assert diff <= bound
    size = model.config.vision_config.image_size
    pixels = np.random.default_rng(0).standard_normal((1, 1, 3, size, size), dtype=np.float32)
    (features,) = exported.session(vision.NAME).run(None, {"pixel_values": pixels,
                                                           "pixel_attention_mask": np.ones((1, 1, size, size), bool)})
    assert features.shape == (1, exported.manifest["vision"]["tokens_per_image"], text.hidden_size)


def test_vision_graph_has_no_softmax_nan_guards(tiny_bundles):
    """Padding frames are dropped before the encoder, so the traced Where(IsNaN(softmax)) guards are removed
    (from the plain graph: the fused one has no Softmax at all)."""
    bundle = tiny_bundles("256m", "plain")
    manifest = json.loads((bundle / "manifest.json").read_text())
    model = onnx.load(str(bundle / manifest["graphs"][vision.NAME]["fp32"]["file"]))
    ops = [n.op_type for n in model.graph.node]
    layers = json.loads((bundle / "config.json").read_text())["vision_config"]["num_hidden_layers"]
    assert "IsNaN" not in ops and ops.count("Softmax") == layers


def test_hard_linked_weights_are_refused_with_a_clear_error(tmp_path):
    """onnx will not read external data from a file with several hard links (`cp -al` copies): the error names
    the graph and the way out, and the same graph loads from a plain copy."""
    import os

    from onnx import TensorProto, helper, numpy_helper

    from smolvlm_edge.export.graph import load_with_weights
    from smolvlm_edge.runtime.errors import BundleError

    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], initializer=[weight])
    path = tmp_path / "graph.onnx"
    onnx.save_model(helper.make_model(graph), str(path), save_as_external_data=True, location="graph.onnx_data",
                    size_threshold=0)
    assert load_with_weights(path).graph.initializer[0].raw_data  # read from beside the graph
    os.link(tmp_path / "graph.onnx_data", tmp_path / "linked.onnx_data")
    with pytest.raises(BundleError, match=r"graph\.onnx: onnx will not read weights .* hard links.*cp -r"):
        load_with_weights(path)
