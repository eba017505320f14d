"""runtime/prompt.py against transformers' Idefics3Processor: template, image tokens, ids, decoding."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from smolvlm_edge.export.tiny import make_tiny_checkpoint
from smolvlm_edge.runtime.errors import BundleError, PromptError
from smolvlm_edge.runtime.prompt import TextProcessor

transformers = pytest.importorskip("transformers")


def _image(w, h, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


WIDE, SQUARE = _image(700, 300), _image(200, 200, seed=1)


@pytest.fixture(scope="module", params=[("256m", "idefics3"), ("2b", "smolvlm")], ids=["256m", "2b-smolvlm"])
def ckpt(request, tmp_path_factory):
    shape, model_type = request.param
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(f"ckpt-{shape}"), shape=shape, model_type=model_type)
    return path, transformers.AutoProcessor.from_pretrained(path), TextProcessor.from_dir(path)


def _rows_cols(processor, images):
    out = processor.image_processor(images, return_row_col_info=True)
    return out["rows"][0], out["cols"][0]


def _check(processor, tp, messages, images, splitting=True):
    """render() equals apply_chat_template and the full prompt's ids equal the processor's."""
    ip = processor.image_processor
    saved, ip.do_image_splitting = ip.do_image_splitting, splitting
    try:
        text = tp.render(messages)
        assert text == processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if images:
            rows, cols = _rows_cols(processor, images)
            ref = processor(text=text, images=images)["input_ids"][0]
        else:
            rows, cols = [], []
            ref = processor(text=text)["input_ids"][0]
    finally:
        ip.do_image_splitting = saved
    ids = tp.encode(tp.expand_image_tokens(text, rows, cols))
    assert ids == list(ref)
    assert ids.count(tp.image_token_id) == tp.image_seq_len * sum(1 + r * c for r, c in zip(rows, cols))
    return rows, cols, ids


def test_one_image_split(ckpt):
    _, processor, tp = ckpt
    rows, cols, _ = _check(processor, tp, tp.messages_for("What is in this image?", 1), [WIDE])
    assert rows[0] > 0 and cols[0] > 0 and rows != cols


def test_one_image_no_split(ckpt):
    _, processor, tp = ckpt
    rows, cols, _ = _check(processor, tp, tp.messages_for("Describe it.", 1), [WIDE], splitting=False)
    assert rows == cols == [0]


def test_two_images(ckpt):
    _, processor, tp = ckpt
    _check(processor, tp, tp.messages_for("Compare the two pictures.", 2), [WIDE, SQUARE])


def test_text_only(ckpt):
    _, processor, tp = ckpt
    _check(processor, tp, tp.messages_for("Tell me about the sea.", 0), [])


def test_multi_turn(ckpt):
    _, processor, tp = ckpt
    messages = tp.messages_for("What is in this image?", 1) + [
        {"role": "assistant", "content": [{"type": "text", "text": "A small house with a blue door."}]},
        {"role": "user", "content": [{"type": "text", "text": "And the windows?"}]},
    ]
    _check(processor, tp, messages, [WIDE])


def test_unicode_prompt(ckpt):
    _, processor, tp = ckpt
    _check(processor, tp, tp.messages_for("Qu'est-ce que c'est ? 猫 🐱🏳️‍🌈 naïve—ok", 1), [SQUARE])


def test_render_without_generation_prompt_and_string_content(ckpt):
    _, processor, tp = ckpt
    messages = tp.messages_for("Hi there", 0)
    assert tp.render(messages, add_generation_prompt=False) == processor.apply_chat_template(
        messages, add_generation_prompt=False, tokenize=False)
    # transformers renders a bare-string content as nothing with this template; we treat it as one text block.
    assert tp.render([{"role": "user", "content": "Hi there"}]) == tp.render(messages)


def test_decode_matches_transformers(ckpt):
    _, processor, tp = ckpt
    text = tp.render(tp.messages_for("A cat 🐱 on a mat, café.", 1))
    ids = tp.encode(tp.expand_image_tokens(text, [1], [2]))
    for skip in (True, False):
        assert tp.decode(ids, skip_special_tokens=skip) == processor.tokenizer.decode(ids, skip_special_tokens=skip)
    assert "<image>" not in tp.decode(ids) and "🐱" in tp.decode(ids)


def test_stream_decoder_concatenates_to_decode(ckpt):
    _, _, tp = ckpt
    ids = tp.encode("The café serves 猫 tea 🐱🐶 and naïve crème brûlée.<end_of_utterance>")
    stream = tp.stream()
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == tp.decode(ids)
    assert "" in pieces[:-1], "multi-byte characters should have been held back at least once"
    assert not any("\ufffd" in p for p in pieces)


def test_stream_flush_emits_truncated_character(ckpt):
    _, _, tp = ckpt
    ids = tp.encode("ok 🐱")[:-1]  # cut inside the emoji's bytes
    stream = tp.stream()
    text = "".join(stream.push(i) for i in ids) + stream.flush()
    assert text == tp.decode(ids)


def test_marker_count_mismatch(ckpt):
    _, _, tp = ckpt
    text = tp.render(tp.messages_for("Two?", 2))
    with pytest.raises(PromptError, match=r"2 <image> marker.*1 image"):
        tp.expand_image_tokens(text, [1], [2])


def test_ids_read_from_files(ckpt):
    path, processor, tp = ckpt
    config = json.loads((path / "config.json").read_text())
    gen = json.loads((path / "generation_config.json").read_text())
    assert tp.image_token_id == config["image_token_id"] == processor.image_token_id
    assert tp.image_seq_len == processor.image_seq_len
    assert tp.pad_token_id == processor.tokenizer.pad_token_id
    assert tp.bos_token_id == processor.tokenizer.bos_token_id
    eou = processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    assert tp.stop_token_ids == frozenset({gen["eos_token_id"], eou})


def _copy_without_jinja(src, dst):
    shutil.copytree(src, dst)
    template = (dst / "chat_template.jinja").read_text()
    (dst / "chat_template.jinja").unlink()
    return template


def test_template_in_tokenizer_config_or_chat_template_json(ckpt, tmp_path):
    path, _, tp = ckpt
    messages = tp.messages_for("Hello", 1)
    expected = tp.render(messages)

    in_json = tmp_path / "json"
    template = _copy_without_jinja(path, in_json)
    (in_json / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    assert TextProcessor.from_dir(in_json).render(messages) == expected

    in_config = tmp_path / "config"
    _copy_without_jinja(path, in_config)
    cfg = json.loads((in_config / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (in_config / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert TextProcessor.from_dir(in_config).render(messages) == expected
    # chat_template.jinja wins over the others.
    (in_config / "chat_template.jinja").write_text("{{ 'jinja wins' }}")
    assert TextProcessor.from_dir(in_config).render(messages) == "jinja wins"

    bare = tmp_path / "bare"
    _copy_without_jinja(path, bare)
    with pytest.raises(BundleError, match=str(bare)):
        TextProcessor.from_dir(bare)


def test_post_processor_followed_like_transformers(ckpt, tmp_path):
    """BOS comes from tokenizer.json's post-processor; add_bos_token in tokenizer_config.json is ignored
    (as in transformers 5)."""
    path, _, tp = ckpt
    text = "Describe the picture."
    bos = tp.tokenizer.id_to_token(tp.bos_token_id)

    flag_only = tmp_path / "flag"
    shutil.copytree(path, flag_only)
    cfg = json.loads((flag_only / "tokenizer_config.json").read_text())
    cfg["add_bos_token"] = True
    (flag_only / "tokenizer_config.json").write_text(json.dumps(cfg))

    in_json = tmp_path / "post"
    shutil.copytree(path, in_json)
    tok = json.loads((in_json / "tokenizer.json").read_text())
    seq_a = {"Sequence": {"id": "A", "type_id": 0}}
    tok["post_processor"] = {"type": "TemplateProcessing",
                             "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, seq_a],
                             "pair": [seq_a, {"Sequence": {"id": "B", "type_id": 1}}],
                             "special_tokens": {bos: {"id": bos, "ids": [tp.bos_token_id], "tokens": [bos]}}}
    (in_json / "tokenizer.json").write_text(json.dumps(tok))

    for folder, first in ((flag_only, None), (in_json, tp.bos_token_id)):
        ref = list(transformers.AutoProcessor.from_pretrained(folder)(text=text)["input_ids"][0])
        ids = TextProcessor.from_dir(folder).encode(text)
        assert ids == ref
        assert ids == ([first] if first is not None else []) + tp.encode(text)


def test_image_seq_len_without_processor_config(ckpt, tmp_path):
    path, _, tp = ckpt
    folder = tmp_path / "noproc"
    shutil.copytree(path, folder)
    (folder / "processor_config.json").unlink()
    assert TextProcessor.from_dir(folder).image_seq_len == tp.image_seq_len


def test_runtime_prompt_imports_no_torch_or_transformers():
    code = ("import sys, smolvlm_edge.runtime.prompt; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
