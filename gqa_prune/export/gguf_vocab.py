"""The tokenizer of a Hugging Face folder as GGUF metadata, so that llama.cpp tokenizes exactly as it does.

Byte-level BPE tokenizers (GPT-2, SmolLM2, Llama-3, Qwen2/3) are written as llama.cpp's ``gpt2`` model with
the pre-tokenizer that splits text the same way: which one is read from the tokenizer's own pre-tokenizer
(its type and split regex), never guessed from the model's name. SmolLM2 staged from its GGUF has the plain
byte-level pre-tokenizer that transformers' GGUF conversion builds (no digit split), so it is exported as
``gpt-2``, which is what the Hugging Face path tokenizes with. Qwen2's NFC normalizer is accepted: llama.cpp
does not normalize, which tokenizes NFC text (nearly all text) identically. Any other tokenizer is refused in
one line.
"""

from __future__ import annotations

import json

import gguf
from transformers import PreTrainedTokenizerBase

from ..errors import GqaPruneError

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# None, or Qwen2's NFC: llama.cpp normalizes nothing, which is the same on NFC text (nearly all text is NFC)
_NORMALIZERS = (None, "NFC")
# the split regex of a Split pre-tokenizer in front of a regex-free ByteLevel -> llama.cpp's pre-tokenizer name
_SPLIT_PRE_TOKENIZERS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


def _byte_level(step: dict, use_regex: bool) -> bool:
    return (
        step.get("type") == "ByteLevel"
        and bool(step.get("use_regex", True)) == use_regex
        and not step.get("add_prefix_space", False)
    )


def pre_tokenizer_name(pre_tokenizer: dict | None) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer that splits text identically, or a refusal."""
    steps = [] if pre_tokenizer is None else pre_tokenizer.get("pretokenizers", [pre_tokenizer])
    if len(steps) == 1 and _byte_level(steps[0], use_regex=True):
        return "gpt-2"
    if (
        len(steps) == 2
        and steps[0].get("type") == "Digits"
        and steps[0].get("individual_digits")
        and _byte_level(steps[1], use_regex=True)
    ):
        return "smollm"
    if len(steps) == 2 and steps[0].get("type") == "Split" and _byte_level(steps[1], use_regex=False):
        pattern = steps[0].get("pattern", {}).get("Regex")
        if pattern in _SPLIT_PRE_TOKENIZERS and steps[0].get("behavior") == "Isolated":
            return _SPLIT_PRE_TOKENIZERS[pattern]
    described = json.dumps(pre_tokenizer, sort_keys=True)
    raise GqaPruneError(
        f"tokenizer pre-tokenizer {described[:160]} has no llama.cpp equivalent gqa-prune knows; exportable: "
        "byte-level BPE as in GPT-2, SmolLM2, Llama-3 and Qwen2/3"
    )


def _merges(model: dict) -> list[str]:
    return [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]


def add_vocab(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """Write tokens, types, merges, pre-tokenizer, special ids and chat template for ``vocab_size`` embedding rows."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GqaPruneError("the model's tokenizer has no tokenizer.json (a fast tokenizer); GGUF export needs one")
    description = json.loads(backend.to_str())
    model = description["model"]
    normalizer = (description.get("normalizer") or {}).get("type")
    if model.get("type") != "BPE" or normalizer not in _NORMALIZERS:
        raise GqaPruneError(
            f"tokenizer model {model.get('type')!r} with normalizer "
            f"{(description.get('normalizer') or {}).get('type')!r} is not exportable; "
            "exportable: byte-level BPE without a normalizer or with NFC (GPT-2, SmolLM2, Llama-3, Qwen2/3)"
        )
    pre = pre_tokenizer_name(description.get("pre_tokenizer"))
    if not model.get("merges"):
        raise GqaPruneError("the tokenizer has no BPE merges; llama.cpp's byte-level BPE (gpt2) tokenizer needs them")
    tokens: list[str | None] = [None] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, index in model["vocab"].items():
        if index < vocab_size:
            tokens[index], types[index] = text, gguf.TokenType.NORMAL
    for added in description.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    largest = max(list(model["vocab"].values()) + [added["id"] for added in description.get("added_tokens", [])])
    if largest >= vocab_size:
        raise GqaPruneError(f"the tokenizer has token id {largest} but the model only {vocab_size} embedding rows")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([text if text is not None else f"[PAD{index}]" for index, text in enumerate(tokens)])
    writer.add_token_types(types)
    writer.add_token_merges(_merges(model))
    probe = tokenizer("a").input_ids
    bare = tokenizer("a", add_special_tokens=False).input_ids
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and probe[:1] != bare[:1])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1:] != bare[-1:])
    for name, add in (("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            add(token_id)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)
