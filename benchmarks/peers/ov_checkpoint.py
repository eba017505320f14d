"""A copy of the demo checkpoint (saved by transformers 5) that transformers 4.57, and so
optimum-intel's OpenVINO export, reads the same way (DESIGN.md, item 13). The weights are linked.

    python3 benchmarks/peers/ov_checkpoint.py SOURCE OUT
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def config(data: dict) -> None:
    data.pop("quantization_config", None)
    for part in (data, data.get("text_config", {})):
        part.pop("quantization_config", None)
        rope = part.pop("rope_parameters", None)
        if rope:  # 4.57 ignores rope_parameters and would silently use rope_theta = 10000
            part["rope_theta"] = rope["rope_theta"]
            if rope.get("rope_type", "default") != "default":
                part["rope_scaling"] = rope


def tokenizer(data: dict) -> None:
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = data.pop("extra_special_tokens", None)
    if extra:
        data["additional_special_tokens"] = extra


def main(source: Path, out: Path) -> None:
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for f in source.iterdir():
        if f.suffix == ".safetensors":
            (partial / f.name).symlink_to(f.resolve())
        elif f.is_file():
            shutil.copy(f, partial / f.name)
    edit(partial / "config.json", config)
    edit(partial / "tokenizer_config.json", tokenizer)
    processor = json.loads((partial / "processor_config.json").read_text())
    if "image_processor" in processor:  # 4.57 reads the image processor from its own file
        image = {**processor.pop("image_processor"), "processor_class": processor.get("processor_class", "Idefics3Processor")}
        (partial / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
        (partial / "processor_config.json").write_text(json.dumps(processor, indent=2))
    partial.rename(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
