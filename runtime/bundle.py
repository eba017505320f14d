"""An exported bundle on disk: its manifest, its graphs, and a check that its files are intact."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import BundleError

GRAPH_NAMES = ("vision_encoder", "embed_tokens", "decoder_model_merged")
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A bundle folder and its parsed manifest."""

    path: Path
    manifest: dict

    @property
    def text(self) -> dict:
        return self.manifest["text"]

    @property
    def vision(self) -> dict:
        return self.manifest["vision"]

    def precisions(self, graph: str) -> list[str]:
        return sorted(self.manifest["graphs"].get(graph, {}))

    def graph_file(self, graph: str, precision: str = "fp32") -> Path:
        """Path of one graph at one precision, or a BundleError listing what the bundle has."""
        entries = self.manifest["graphs"].get(graph)
        if not entries:
            raise BundleError(f"bundle {self.path} has no {graph} graph in {MANIFEST}")
        if precision not in entries:
            raise BundleError(
                f"bundle {self.path} has no {precision!r} build of {graph}; it has: {', '.join(sorted(entries))}"
            )
        return self.path / entries[precision]["file"]

    def files_read_with(self, picked: dict[str, str], ort: bool = False) -> list[str]:
        """The files a runtime that loads `picked` (graph -> precision) reads, relative to the bundle: the
        top-level files (configs, tokenizer, chat template) and per graph its build's graph and external data,
        or with `ort` its ORT-format file where it has one (which holds the weights), or for an embedding whose
        build recorded `table_rows` the file the runtime reads those rows from (no session). Other builds'
        files are not among them."""
        read = [rel for rel in self.manifest["files"] if "/" not in rel]
        for graph, precision in picked.items():
            entry = self.manifest["graphs"].get(graph, {}).get(precision)
            rows = (entry.get("info") or {}).get("table_rows") if entry and graph == "embed_tokens" else None
            if rows:
                read.append(rows["file"])
            elif entry and ort and entry.get("ort_file"):
                read.append(entry["ort_file"])
            elif entry:
                read += build_files(entry)
        return list(dict.fromkeys(read))


def build_files(entry: dict) -> list[str]:
    """One graph build's files (a manifest "graphs" entry), relative to the bundle: the graph and its external data."""
    extra = entry.get("external_data") or []
    return [entry["file"], *([extra] if isinstance(extra, str) else extra)]


def open_bundle(path: str | Path, check_files: bool = True) -> Bundle:
    """Read a bundle's manifest and, unless told not to, check every file's size and sha256."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"bundle folder not found: {path}")
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise BundleError(f"{path} has no {MANIFEST}: not an exported bundle (run `smolvlm-edge export` first)")
    try:
        manifest = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_file} is not valid JSON: {exc}") from exc
    for key in ("graphs", "text", "vision", "files"):
        if key not in manifest:
            raise BundleError(f"{manifest_file} lacks the {key!r} section; re-export the bundle")
    bundle = Bundle(path, manifest)
    if check_files:
        verify_files(bundle)
    return bundle


def verify_files(bundle: Bundle, only: Iterable[str] | None = None) -> None:
    """Every file the manifest lists, or those of `only` that it lists, exists with the recorded size and sha256."""
    check_sizes(bundle, only)
    check_digests(bundle, only)


def _listed(bundle: Bundle, only: Iterable[str] | None) -> list[str]:
    listed = bundle.manifest["files"]
    return list(listed) if only is None else [rel for rel in only if rel in listed]


def check_sizes(bundle: Bundle, only: Iterable[str] | None = None) -> None:
    """The listed files (or those of `only`) exist with the recorded sizes: a stat each, no reading."""
    for rel in _listed(bundle, only):
        file, entry = bundle.path / rel, bundle.manifest["files"][rel]
        if not file.is_file():
            raise BundleError(f"bundle {bundle.path} is missing {rel} (listed in {MANIFEST})")
        size = file.stat().st_size
        if "size" in entry and size != entry["size"]:
            raise BundleError(
                f"{file} is {size} bytes but {MANIFEST} says {entry['size']}: truncated or replaced"
            )


def check_digests(bundle: Bundle, only: Iterable[str] | None = None) -> None:
    """The listed files (or those of `only`) have the recorded sha256."""
    for rel in _listed(bundle, only):
        file, entry = bundle.path / rel, bundle.manifest["files"][rel]
        digest = sha256_file(file)
        if digest != entry["sha256"]:
            raise BundleError(
                f"{file} has sha256 {digest[:16]}… but {MANIFEST} says {entry['sha256'][:16]}…: the file was changed"
            )


@contextmanager
def checked_while_loading(bundle: Bundle, files: Iterable[str]) -> Iterator[None]:
    """Check `files` (relative, as the manifest lists them) around the block that loads them: their sizes
    first (a stat each: a missing or truncated file stops it before anything loads), their sha256 in a
    thread beside the block (hashlib lets go of the GIL; sessions read the same files). A mismatch raises
    when the block ends, and explains a load that failed on a changed file."""
    files = list(files)
    check_sizes(bundle, files)
    with ThreadPoolExecutor(1) as pool:
        digests = pool.submit(check_digests, bundle, files)
        try:
            yield
        except Exception:
            digests.result()
            raise
        digests.result()


def default_file_mode(path: Path) -> None:
    """Give a written file the mode open() gives a new one (0666 less the umask). onnx.save writes external
    data files 0600, so a bundle copied to a server or read by another user would open its graphs but
    not their weights."""
    umask = os.umask(0o022)  # the only way to read it: set and put back
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


class FileSwap:
    """Renames staged files into a bundle, keeping each file it replaces, so that `undo` puts all back."""

    def __init__(self, staging: Path):
        self.staging = staging
        self.backups: list[tuple[Path, Path]] = []
        self.moved: list[Path] = []

    def set_aside(self, path: Path) -> None:
        backup = self.staging / f"replaced-{path.name}"
        os.replace(path, backup)
        self.backups.append((path, backup))

    def install(self, staged: Path, final: Path) -> None:
        if final.exists():
            self.set_aside(final)
        default_file_mode(staged)
        os.replace(staged, final)
        self.moved.append(final)

    def undo(self) -> None:
        for final in self.moved:
            final.unlink(missing_ok=True)
        for final, backup in reversed(self.backups):
            os.replace(backup, final)


def replace_manifest(folder: Path, manifest: dict) -> None:
    """Write manifest.json atomically: a synced temporary file, then os.replace (the bundle's commit point)."""
    tmp = folder / f"{MANIFEST}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder / MANIFEST)
    finally:
        tmp.unlink(missing_ok=True)
