"""Text side of SmolVLM without transformers: chat template, image-token expansion, (de)tokenization.

Everything is read from a checkpoint or bundle folder (tokenizer.json, tokenizer_config.json, the chat
template, processor_config.json, config.json, generation_config.json); no id or size is hard-coded.
The output is meant to equal transformers' `Idefics3Processor` id for id (tests/test_prompt.py checks it).
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
from tokenizers import Tokenizer

from .errors import BundleError, PromptError

# Marker texts as Idefics3Processor writes them; their ids come from the tokenizer.
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"
IMAGE_MARKER = "<image>"  # what chat templates put where an image goes

# The named special tokens transformers passes to every chat template (`tokenizer.special_tokens_map`).
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BundleError(f"cannot read {path}: {e}; re-export the bundle or re-download the checkpoint") from e


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _pick_template(value, source: Path) -> str:
    """A chat template value: a string, or named templates (a list of {name, template} or a dict)."""
    if isinstance(value, list):
        value = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    if isinstance(value, dict):
        value = value.get("default")
    if not isinstance(value, str):
        raise BundleError(f"{source} has no usable chat template (need a string or one named 'default')")
    return value


def load_chat_template(folder: Path, tokenizer_config: dict) -> str:
    """chat_template.jinja, then chat_template.json, then tokenizer_config.json["chat_template"]."""
    if (f := folder / "chat_template.jinja").is_file():
        return f.read_text(encoding="utf-8")
    if (f := folder / "chat_template.json").is_file():
        return _pick_template(_read_json(f).get("chat_template"), f)
    if tokenizer_config.get("chat_template") is not None:
        return _pick_template(tokenizer_config["chat_template"], folder / "tokenizer_config.json")
    raise BundleError(
        f"no chat template in {folder}: expected chat_template.jinja, chat_template.json or a "
        "'chat_template' string in tokenizer_config.json; copy it from the original checkpoint"
    )


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` as transformers accepts it; here it only renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _TemplateDict:
    """`dict(...)` inside templates, without attribute access to the real type."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed names, as transformers' does."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile with the environment transformers uses (utils/chat_template_utils.py), so output is identical."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


def _plain(value):
    """Only JSON-like data reaches the sandbox; anything else (a PIL image, an array) becomes "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def _normalize_message(message: dict) -> dict:
    if not isinstance(message, dict):
        raise PromptError(f"a chat message must be a dict with 'role' and 'content', got {message!r}")
    message = {k: v for k, v in message.items() if v is not None}
    if isinstance(message.get("content"), str):
        # SmolVLM templates iterate over content blocks; a bare string would render as nothing.
        message["content"] = [{"type": "text", "text": message["content"]}]
    return _plain(message)


class StreamDecoder:
    """Incremental detokenizer: push ids one at a time, get only complete new text back.

    Text is held back while the decoded window ends in U+FFFD (an incomplete UTF-8 sequence of
    byte-level pieces); the concatenation of all pieces plus flush() equals decode(all ids).
    """

    def __init__(self, processor: TextProcessor, skip_special_tokens: bool = True):
        self._proc = processor
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # ids before this were already emitted
        self._emitted: list[str] = []

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix_text = self._proc.decode(self._ids[self._prefix : self._read], self._skip)
        new_text = self._proc.decode(self._ids[self._prefix :], self._skip)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        piece = new_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        self._emitted.append(piece)
        return piece

    def flush(self) -> str:
        """Whatever is still held back (e.g. a truncated multi-byte character, as decode() renders it)."""
        full = self._proc.decode(self._ids, self._skip)
        done = "".join(self._emitted)
        if full.startswith(done):
            piece = full[len(done) :]
        else:  # a decoder that is not concatenative: emit the rest of the window
            window = self._proc.decode(self._ids[self._prefix :], self._skip)
            piece = window[len(self._proc.decode(self._ids[self._prefix : self._read], self._skip)) :]
        self._emitted.append(piece)
        self._prefix = self._read = len(self._ids)
        return piece


class TextProcessor:
    """Chat template, image-token expansion, tokenization and detokenization, read from a checkpoint/bundle folder."""

    def __init__(self, folder: Path, tokenizer: Tokenizer, tokenizer_config: dict, chat_template: str,
                 image_seq_len: int, image_token_id: int, eos_token_ids: list[int]):
        self.folder = folder
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self._template = compile_chat_template(chat_template)
        self.image_seq_len = int(image_seq_len)
        self.image_token_id = int(image_token_id)
        self.image_token = tokenizer.id_to_token(self.image_token_id)
        if self.image_token is None:
            raise BundleError(f"image_token_id {image_token_id} from {folder / 'config.json'} is not in tokenizer.json")
        added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        missing = [t for t in (self.image_token, FAKE_IMAGE_TOKEN) if t not in added]
        if missing:
            raise BundleError(
                f"tokenizer.json in {folder} lacks the added token(s) {missing}; is this a SmolVLM checkpoint?")
        self.fake_image_token = FAKE_IMAGE_TOKEN
        self.global_image_token = GLOBAL_IMAGE_TOKEN

        self.special_tokens = {k: _token_text(tokenizer_config[k]) for k in _NAMED_SPECIAL_TOKENS
                               if _token_text(tokenizer_config.get(k)) is not None}
        ids = {k: tokenizer.token_to_id(v) for k, v in self.special_tokens.items()}
        self.pad_token_id = ids.get("pad_token")
        self.bos_token_id = ids.get("bos_token")
        self.eos_token_ids = tuple(eos_token_ids) or ((ids["eos_token"],) if ids.get("eos_token") is not None else ())
        eou = tokenizer.token_to_id(END_OF_UTTERANCE)
        self.stop_token_ids = frozenset(self.eos_token_ids) | ({eou} if eou is not None else set())
        if not self.stop_token_ids:
            raise BundleError(f"no eos_token_id in {folder}/generation_config.json or config.json, "
                              f"and no {END_OF_UTTERANCE} token")
        # transformers skips its whitespace clean-up for BPE models; other models follow the config.
        self._clean_up_spaces = bool(tokenizer_config.get("clean_up_tokenization_spaces")) and (
            type(tokenizer.model).__name__ != "BPE"
        )

    @classmethod
    def from_dir(cls, path) -> TextProcessor:
        folder = Path(path)
        if not (folder / "tokenizer.json").is_file():
            raise BundleError(f"no tokenizer.json in {folder}; pass a SmolVLM checkpoint or an exported bundle folder")
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))

        def optional(name):
            return _read_json(folder / name) if (folder / name).is_file() else {}

        # older checkpoints name bos/eos/pad only in special_tokens_map.json
        tokenizer_config = {**optional("special_tokens_map.json"), **optional("tokenizer_config.json")}
        config, gen = optional("config.json"), optional("generation_config.json")

        image_token_id = config.get("image_token_id")
        if image_token_id is None:
            image_token_id = tokenizer.token_to_id(IMAGE_MARKER)
        if image_token_id is None:
            raise BundleError(
                f"no image_token_id in {folder / 'config.json'} and no {IMAGE_MARKER} token in tokenizer.json")

        image_seq_len = optional("processor_config.json").get("image_seq_len")
        v = config.get("vision_config", {})
        if image_seq_len is None and "image_size" in v and "patch_size" in v:
            # the formula in Idefics3Processor's docstring
            image_seq_len = (v["image_size"] // v["patch_size"]) ** 2 // config.get("scale_factor", 1) ** 2
        if image_seq_len is None:
            raise BundleError(
                f"no image_seq_len in {folder / 'processor_config.json'} and no vision_config in config.json")

        eos = gen.get("eos_token_id", config.get("eos_token_id", config.get("text_config", {}).get("eos_token_id")))
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        return cls(folder, tokenizer, tokenizer_config, load_chat_template(folder, tokenizer_config),
                   image_seq_len, image_token_id, eos_ids)

    # -- chat template --------------------------------------------------------------------------

    def messages_for(self, prompt: str, num_images: int) -> list[dict]:
        """One user turn, images first and then the text, as transformers' SmolVLM examples write it."""
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]
        return [{"role": "user", "content": content}]

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template applied as `processor.apply_chat_template(..., tokenize=False)` does."""
        chat = [_normalize_message(m) for m in messages]
        try:
            return self._template.render(messages=chat, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.exceptions.TemplateError as e:
            raise PromptError(f"the chat template of {self.folder} rejected the messages: {e}") from e

    # -- image tokens ---------------------------------------------------------------------------

    def image_tokens(self, rows: int, cols: int) -> str:
        """The text standing for one image: tiles row by row, then the global image (Idefics3Processor's layout)."""
        image = self.image_token * self.image_seq_len
        global_image = f"{self.fake_image_token}{self.global_image_token}{image}{self.fake_image_token}"
        if rows == 0 and cols == 0:
            return global_image
        tiles = "".join(
            "".join(f"{self.fake_image_token}<row_{r + 1}_col_{c + 1}>{image}" for c in range(cols)) + "\n"
            for r in range(rows)
        )
        return f"{tiles}\n{global_image}"

    def expand_image_tokens(self, text: str, rows: list[int], cols: list[int]) -> str:
        """Replace each image marker with its tile and global-image tokens, in order."""
        parts = text.split(self.image_token)
        markers = len(parts) - 1
        if markers != len(rows) or len(rows) != len(cols):
            raise PromptError(
                f"the prompt has {markers} {self.image_token} marker(s) but {len(rows)} image(s) were given "
                f"({len(cols)} column counts); put one {self.image_token} per image, or none to have them placed first"
            )
        out = [parts[0]]
        for r, c, rest in zip(rows, cols, parts[1:]):
            out += [self.image_tokens(int(r), int(c)), rest]
        return "".join(out)

    # -- tokens ---------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Ids as the processor gives them: tokenizer.json's own post-processor adds special tokens (none for
        SmolVLM). transformers 5 ignores add_bos_token/add_eos_token in tokenizer_config.json when a
        tokenizer.json exists, so this does too."""
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        text = self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self._clean_up_spaces:
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def stream(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

