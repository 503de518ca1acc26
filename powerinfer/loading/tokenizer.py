"""Tokenizers from GGUF metadata or a Hugging Face `tokenizer.json`, with chat templates.

GGUF vocabularies (spec: ggml `docs/gguf.md`, `tokenizer.ggml.*`) come in two kinds that we rebuild with
the `tokenizers` library:
- `gpt2`: byte-level BPE from `tokens` + `merges`; the pre-tokenizer split follows llama.cpp's
  `tokenizer.ggml.pre` names (GPT-2, SmolLM's single digits, Llama 3, Qwen2).
- `llama`: SentencePiece BPE from `tokens` + `scores`, merged greedily by score as llama.cpp's SPM
  tokenizer does, with byte fallback (`<0xNN>` tokens) and the `▁` space marker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from powerinfer.errors import ModelFormatError, UnsupportedModelError

# GGUF token types (llama.cpp `llama_token_type`).
_CONTROL, _USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass
class Tokenizer:
    """A `tokenizers.Tokenizer` plus what generation needs: BOS/EOS ids and the chat template."""

    backend: object
    bos_token_id: int | None
    eos_token_ids: list[int]
    add_bos: bool
    chat_template: str | None = None
    kind: str = "bpe"
    special_ids: set[int] = field(default_factory=set)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_text(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        add_bos = self.add_bos if add_bos is None else add_bos
        if add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{role, content}]) with the model's Jinja chat template."""
        template = self.chat_template or _FALLBACK_CHAT_TEMPLATE
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self._special_text(self.bos_token_id),
                eos_token=self._special_text(self.eos_token_ids[0] if self.eos_token_ids else None))
        except jinja2.TemplateError as e:
            raise ModelFormatError(f"the model's chat template failed: {e}") from None

    def _special_text(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.backend.id_to_token(token_id) or "")


# Used when a model ships no template: ChatML, which most small instruct models understand.
_FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces without splitting multi-byte characters.

    Decodes only a short window of recent tokens: `prefix` (already returned, kept for context such as a
    leading-space rule) and the tokens after it.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_start = 0
        self.read_start = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        seen = self.tokenizer.decode(self.ids[self.prefix_start:self.read_start])
        text = self.tokenizer.decode(self.ids[self.prefix_start:])
        if len(text) <= len(seen) or text.endswith("\ufffd"):  # incomplete UTF-8: wait for more
            return ""
        self.prefix_start, self.read_start = self.read_start, len(self.ids)
        return text[len(seen):]


def tokenizer_from_gguf(fields: dict) -> Tokenizer:
    """Build the tokenizer from GGUF metadata (`fields`: key -> decoded value)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers, Regex
    from tokenizers import AddedToken

    kind = fields.get("tokenizer.ggml.model")
    tokens = fields.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelFormatError("GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}

    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])]
        backend = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=False))
        pre = fields.get("tokenizer.ggml.pre", "gpt2")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre == "smollm":
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif pre in ("llama-bpe", "llama3", "qwen2"):
            split = _QWEN2_SPLIT if pre == "qwen2" else _LLAMA3_SPLIT
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            backend.pre_tokenizer = byte_level
        backend.decoder = decoders.ByteLevel()
        add_bos_default = False
    elif kind == "llama":
        scores = fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        backend = HFTokenizer(models.BPE(vocab, _merges_from_scores(tokens, scores), byte_fallback=True,
                                         fuse_unk=True, unk_token=tokens[fields.get(
                                             "tokenizer.ggml.unknown_token_id", 0)]))
        prefix = [normalizers.Prepend("▁")] if fields.get("tokenizer.ggml.add_space_prefix", True) else []
        backend.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", "▁")])
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                             decoders.Fuse()] + ([decoders.Strip(" ", 1, 0)] if prefix else []))
        add_bos_default = True
    else:
        raise UnsupportedModelError(f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)")

    special = [i for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)]
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    bos = fields.get("tokenizer.ggml.bos_token_id")
    eos = fields.get("tokenizer.ggml.eos_token_id")
    eos_ids = [eos] if eos is not None else []
    eot = fields.get("tokenizer.ggml.eot_token_id")
    if eot is not None and eot not in eos_ids:
        eos_ids.append(eot)
    return Tokenizer(backend, bos, eos_ids, bool(fields.get("tokenizer.ggml.add_bos_token", add_bos_default)),
                     fields.get("tokenizer.chat_template"), kind, set(special))


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE has no merge list: a pair merges when the merged piece is in the vocabulary,
    the highest-scoring merged piece first."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = []
    for piece, piece_id in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-scores[piece_id], vocab[left], vocab[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def tokenizer_from_hf_dir(path: Path, config: dict) -> Tokenizer:
    """`tokenizer.json` (+ `tokenizer_config.json` for BOS/EOS and the chat template)."""
    from tokenizers import Tokenizer as HFTokenizer

    file = path / "tokenizer.json"
    if not file.exists():
        raise ModelFormatError(f"{path}: no tokenizer.json")
    try:
        backend = HFTokenizer.from_file(str(file))
    except Exception as e:  # the Rust library raises its own exception types
        raise ModelFormatError(f"{file}: cannot read tokenizer ({e})") from None
    tok_config = {}
    if (path / "tokenizer_config.json").exists():
        tok_config = json.loads((path / "tokenizer_config.json").read_text())

    def token_id(value):
        if isinstance(value, dict):
            value = value.get("content")
        return backend.token_to_id(value) if isinstance(value, str) else None

    bos = token_id(tok_config.get("bos_token"))
    if bos is None:
        bos = config.get("bos_token_id")
    eos_ids = [i for i in [token_id(tok_config.get("eos_token"))] if i is not None]
    cfg_eos = config.get("eos_token_id")
    for i in (cfg_eos if isinstance(cfg_eos, list) else [cfg_eos]):
        if i is not None and i not in eos_ids:
            eos_ids.append(i)
    special = {backend.token_to_id(t.content) for t in backend.get_added_tokens_decoder().values()
               if t.special}
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (path / "chat_template.jinja").exists():
        template = (path / "chat_template.jinja").read_text()
    return Tokenizer(backend, bos, eos_ids, bool(tok_config.get("add_bos_token", False)), template,
                     "hf", special)
