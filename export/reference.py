"""The PyTorch reference that parity checks compare against: transformers' processor and generate()."""
from __future__ import annotations

from typing import Sequence


def load_reference(checkpoint: str):
    """The checkpoint's model (fp32, eval) and processor, padding on the left for batches."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    processor.tokenizer.padding_side = "left"
    return model, processor


def user_turn(prompt: str, num_images: int) -> list[dict]:
    """One user message, images first then the text, as in transformers' examples."""
    return [{"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": prompt}]}]


def through_eos(ids: list[int], eos: set[int]) -> list[int]:
    """generate() pads a row after its EOS; the runtime reports ids through the EOS."""
    for i, tok in enumerate(ids):
        if tok in eos:
            return ids[: i + 1]
    return ids


def greedy_reference(model, processor, conversations: Sequence, images: Sequence[Sequence], split: bool,
                     max_new_tokens: int) -> list[tuple[list[int], list[int]]]:
    """transformers' greedy generate for a batch: per row, the unpadded prompt ids and the new ids through EOS.

    `conversations` holds plain prompts (one user turn) or message lists; `images` one list per row.
    """
    import torch

    processor.image_processor.do_image_splitting = split
    texts = [
        processor.apply_chat_template(c if isinstance(c, list) else user_turn(c, len(imgs)), add_generation_prompt=True)
        for c, imgs in zip(conversations, images)
    ]
    kwargs = {"text": texts, "return_tensors": "pt", "padding": True}
    if any(images):
        # A flat list: the processor hands each prompt as many images as it has <image> markers.
        kwargs["images"] = [im for row in images for im in row]
    inputs = processor(**kwargs)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    new = out[:, inputs["input_ids"].shape[1]:]
    return [
        (ids[mask.bool()].tolist(), through_eos(row.tolist(), eos))
        for ids, mask, row in zip(inputs["input_ids"], inputs["attention_mask"], new)
    ]


class TorchReference:
    """The PyTorch original behind the same questions the parity report asks an ONNX build."""

    def __init__(self, checkpoint: str):
        self.model, self.processor = load_reference(checkpoint)

    def image_features(self, pixel_values, pixel_attention_mask):
        """Image features as rows [frames * tokens, D] for numpy pixels [B, N, 3, H, W] and mask [B, N, H, W]."""
        import torch

        with torch.no_grad():
            per_row = self.model.model.get_image_features(
                pixel_values=torch.from_numpy(pixel_values), pixel_attention_mask=torch.from_numpy(pixel_attention_mask)
            ).pooler_output
        return torch.cat(list(per_row), dim=0).numpy()

    def embeddings(self, ids):
        import torch

        with torch.no_grad():
            return self.model.get_input_embeddings()(torch.from_numpy(ids)).numpy()

    def logits(self, ids):
        """Teacher-forced logits [T, V] for one text-only row of ids [1, T]."""
        import torch

        with torch.no_grad():
            return self.model(input_ids=torch.from_numpy(ids)).logits[0].numpy()

    def greedy(self, prompt: str, images: list, new_tokens: int, split: bool = False) -> list[int]:
        [(_, new)] = greedy_reference(self.model, self.processor, [prompt], [images], split, new_tokens)
        return new
