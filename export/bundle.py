"""Writing a bundle folder: staged in a hidden sibling, checkpoint files copied, manifest last, renamed into place."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from smolvlm_edge.runtime.bundle import default_file_mode
from smolvlm_edge.runtime.errors import ExportError

FORMAT = "smolvlm-edge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# Copied as the checkpoint ships them, when present. config.json and the tokenizer are required.
REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
OPTIONAL_FILES = (
    "generation_config.json", "chat_template.jinja", "chat_template.json",
    "processor_config.json", "preprocessor_config.json", "special_tokens_map.json", "added_tokens.json",
)
PROCESSOR_CLASS = "Idefics3Processor"  # what transformers.js looks for, for SmolVLM and SmolVLM2 alike


def refuse_existing(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise ExportError(f"the output folder {output} already exists; choose another path or pass overwrite=True "
                          "(--overwrite) to replace it")
    if output.exists() and not output.is_dir():
        raise ExportError(f"the output path {output} exists and is not a folder; remove it or choose another path")


@contextlib.contextmanager
def staged(output: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty `.{name}.partial-XXXX` folder beside `output`; on success rename it to `output`.

    Any exception, KeyboardInterrupt included, removes the partial folder. With `overwrite`, an
    existing `output` is moved aside first and deleted only once the new folder is in place.
    """
    output = Path(output).absolute()
    refuse_existing(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        os.chmod(partial, 0o755)  # mkdtemp makes it private; the bundle is an ordinary folder
        yield partial
        _swap_in(partial, output, overwrite)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _swap_in(partial: Path, output: Path, overwrite: bool) -> None:
    refuse_existing(output, overwrite)  # again: the export took a while, someone may have written there
    for file in partial.rglob("*"):
        if file.is_file() and not file.is_symlink():
            default_file_mode(file)
    if not output.exists():
        os.rename(partial, output)
        return
    old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(output, old)
    try:
        os.rename(partial, output)
    except BaseException:
        os.rename(old, output)  # put the previous bundle back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _locate(model: str, filename: str) -> Path | None:
    """A checkpoint file as a local path (hub ids go through transformers' cache), or None if absent."""
    local = Path(model)
    if local.is_dir():
        found = local / filename
        return found if found.is_file() else None
    from transformers.utils import cached_file

    found = cached_file(model, filename, _raise_exceptions_for_missing_entries=False)
    return Path(found) if found else None


def copy_checkpoint_files(model: str, folder: Path, *, image_seq_len: int, generation_config=None) -> list[str]:
    """Copy the checkpoint's config, tokenizer, chat template and processor files, then add what transformers.js reads.

    Returns a list of warnings (e.g. no chat template) for the caller to print.
    """
    warnings = []
    for name in REQUIRED_FILES + OPTIONAL_FILES:
        source = _locate(model, name)
        if source is None:
            if name in REQUIRED_FILES:
                raise ExportError(f"the checkpoint {model} has no {name}; a SmolVLM checkpoint ships config.json, "
                                  "tokenizer.json and tokenizer_config.json")
            continue
        shutil.copyfile(source, folder / name)
    if not (folder / "generation_config.json").exists() and generation_config is not None:
        generation_config.to_json_file(folder / "generation_config.json")

    processor = _read_json(folder / "processor_config.json") or {}
    flat = _read_json(folder / "preprocessor_config.json")
    if flat is None:
        # transformers 5 nests the image processor in processor_config.json; transformers.js wants it flat.
        if "image_processor" not in processor:
            raise ExportError(f"the checkpoint {model} has neither preprocessor_config.json nor an image_processor "
                              "entry in processor_config.json; the image processor settings are needed")
        flat = dict(processor["image_processor"])
    flat["processor_class"] = PROCESSOR_CLASS
    _write_json(folder / "preprocessor_config.json", flat)
    processor.setdefault("processor_class", PROCESSOR_CLASS)
    processor["image_seq_len"] = processor.get("image_seq_len", image_seq_len)
    _write_json(folder / "processor_config.json", processor)

    # transformers.js reads the chat template only from tokenizer_config.json.
    tokenizer_config = _read_json(folder / "tokenizer_config.json")
    template = tokenizer_config.get("chat_template") or _chat_template(folder)
    if template is None:
        warnings.append(f"the checkpoint {model} ships no chat template; chat prompts will need one")
    else:
        tokenizer_config["chat_template"] = template
        _write_json(folder / "tokenizer_config.json", tokenizer_config)
    return warnings


def _chat_template(folder: Path) -> str | None:
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    data = _read_json(folder / "chat_template.json")
    return data.get("chat_template") if data else None


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def file_table(folder: Path) -> dict[str, dict]:
    """sha256 and size of every file in the folder (posix relative paths), manifest.json excepted."""
    table = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST:
            continue
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        table[rel] = {"sha256": digest.hexdigest(), "size": path.stat().st_size}
    return table


def write_manifest(folder: Path, manifest: dict) -> dict:
    """Write manifest.json last, with the file table of everything already in the folder."""
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": file_table(folder)}
    _write_json(folder / MANIFEST, manifest)
    return manifest
