"""Tiny random SmolVLM checkpoints built in code: the offline test fixtures.

Each one is a real `Idefics3ForConditionalGeneration` saved with a locally trained byte-level
BPE tokenizer, the SmolVLM special tokens, an `Idefics3ImageProcessor` and the SmolVLM chat
template, so the whole path (processor, export, runtime) runs without a model hub.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# The SmolVLM chat template, as SmolVLM-256M/500M-Instruct ship it.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

SPECIAL_TOKENS = (
    ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    + ["<fake_token_around_image>", "<image>", "<global-img>"]
    + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    + ["<end_of_utterance>"]
)

_CORPUS = [
    "A cat sits on a red mat in the sun. The dog runs across the green field.",
    "What is in this image? There is a small house with a blue door and two windows.",
    "User: Describe the picture. Assistant: The picture shows a bright sky over the sea.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation, like commas; colons: and full stops.",
    "The quick brown fox jumps over the lazy dog while the bird sings in the tall tree.",
    "Edge devices run small vision language models with onnx runtime on phones and boards.",
]


@dataclass(frozen=True)
class TinyShape:
    """Vision geometry of a SmolVLM family, shrunk in width and depth but not in resolution."""

    name: str
    image_size: int
    patch_size: int
    scale_factor: int

    @property
    def image_seq_len(self) -> int:
        return (self.image_size // self.patch_size) ** 2 // self.scale_factor**2


# SigLIP-B/16 at 512 px, pixel-shuffle 4 (SmolVLM-256M/500M) and SO400M/14 at 384 px, shuffle 3 (2.2B).
SHAPES = {
    "256m": TinyShape("256m", image_size=512, patch_size=16, scale_factor=4),
    "2b": TinyShape("2b", image_size=384, patch_size=14, scale_factor=3),
}


def train_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained here, with SmolVLM's special tokens at the front."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def make_tiny_checkpoint(
    path: str | Path,
    shape: str = "256m",
    model_type: str = "idefics3",
    seed: int = 0,
    longest_edge_tiles: int = 2,
) -> Path:
    """Save a tiny random checkpoint of the given vision shape to `path` and return it.

    `longest_edge_tiles` sets the processor's resize target in tiles, so image splitting gives at
    most that many tiles per side (SmolVLM ships 4; 2 keeps the PyTorch reference quick).
    """
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        PreTrainedTokenizerFast,
    )

    geo = SHAPES[shape]
    path = Path(path)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(),
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
        model_input_names=["input_ids", "attention_mask"],
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = len(tokenizer)

    config = Idefics3Config(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=geo.image_size, patch_size=geo.patch_size, initializer_range=0.2,
        ),
        text_config=dict(
            model_type="llama", vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0,
            # Wide weights make the logits peaked, so greedy choices are not near ties.
            initializer_range=0.3, tie_word_embeddings=False,
            bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<end_of_utterance>"],
            pad_token_id=ids["<|im_end|>"],
        ),
        scale_factor=geo.scale_factor,
        image_token_id=ids["<image>"],
        tie_word_embeddings=False,
        bos_token_id=ids["<|im_start|>"],
        eos_token_id=ids["<end_of_utterance>"],
        pad_token_id=ids["<|im_end|>"],
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    model.generation_config.bos_token_id = ids["<|im_start|>"]
    model.generation_config.eos_token_id = ids["<end_of_utterance>"]
    model.generation_config.pad_token_id = ids["<|im_end|>"]

    image_processor = Idefics3ImageProcessor(
        do_image_splitting=True,
        max_image_size={"longest_edge": geo.image_size},
        size={"longest_edge": longest_edge_tiles * geo.image_size},
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer,
        image_seq_len=geo.image_seq_len, chat_template=SMOLVLM_CHAT_TEMPLATE,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    if model_type == "smolvlm":
        _relabel_as_smolvlm(path)
    elif model_type != "idefics3":
        raise ValueError(f"model_type must be 'idefics3' or 'smolvlm', got {model_type!r}")
    return path


def _relabel_as_smolvlm(path: Path) -> None:
    """Mark a saved checkpoint as SmolVLM2 (`model_type` smolvlm); weights and layout are the same."""
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["model_type"] = "smolvlm"
    cfg["architectures"] = ["SmolVLMForConditionalGeneration"]
    cfg["vision_config"]["model_type"] = "smolvlm_vision"
    cfg_file.write_text(json.dumps(cfg, indent=2))
