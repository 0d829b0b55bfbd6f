"""Rebuild a `tokenizers.Tokenizer` from the vocabulary a GGUF file carries (`tokenizer.ggml.*`).

llama.cpp's `llama-vocab.cpp` defines how these files tokenize, so the choices below follow it:
- model "gpt2": byte-level BPE over the file's merges. Text is first cut by a list of regexes chosen by
  `tokenizer.ggml.pre` (each regex splits every piece the previous one left, keeping matches and the text
  between them); then bytes map to the GPT-2 byte alphabet the vocabulary is spelled in.
- model "llama": SentencePiece BPE. llama.cpp merges the adjacent pair whose union is the best-scored vocab
  entry; as BPE merges that is "rank = score of the merged token", with byte fallback to <0xXX> tokens and
  "▁" for spaces (a leading one added at the start and after each special token).
- token_type CONTROL -> special tokens (matched whole, skipped on decode); USER_DEFINED -> added tokens that
  are matched whole but decode as text.
"""

from __future__ import annotations

import logging

# Imported with this module, i.e. before the vocabulary is decoded: a first import while ~100k vocabulary
# strings are alive would scatter its long-lived objects among them, and the allocator could not hand those
# pages back after the strings are freed (~4 MiB stayed resident when these imports sat in the functions).
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from turboinfer.errors import ModelLoadError, UnsupportedModelError

log = logging.getLogger(__name__)

# llama_token_type in GGUF
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

# tokenizer.ggml.pre -> (regexes applied in order, ignore_merges, add_bos default). ignore_merges: a word that
# is itself a vocab entry becomes that token without merging (Llama 3's tokenizer.json says the same).
_LLAMA3_FAMILY = ([_LLAMA3], True, True)
_QWEN2_FAMILY = ([_QWEN2], False, False)
_GPT2_FAMILY = ([_GPT2], False, False)
_DIGITS_FAMILY = ([r"\p{N}", _GPT2], False, False)  # single digits first (SmolLM, StarCoder)
PRE_TOKENIZERS: dict[str, tuple[list[str], bool, bool]] = {
    "default": ([r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"], False, False),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "dbrx", "smaug-bpe"],
                    _LLAMA3_FAMILY),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"], _QWEN2_FAMILY),
    **dict.fromkeys(["gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais", "roberta-bpe", "jina-es", "jina-de"],
                    _GPT2_FAMILY),
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"],
                    _DIGITS_FAMILY),
    "falcon": ([r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"], False, False),
}


def build_gguf_tokenizer(md: dict, source: str = "GGUF file"):
    """(tokenizers.Tokenizer, add_bos) from a file's `tokenizer.*` metadata."""
    model = md.get("tokenizer.ggml.model")
    tokens = md.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError(f"{source} has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    # llama.cpp renames empty entries so every id has a distinct, non-empty string
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    types = md.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if model == "gpt2":
        tok, add_bos = _byte_level_bpe(md, tokens, source)
    elif model == "llama":
        tok, add_bos = _sentencepiece_bpe(md, tokens, types, source)
    else:
        raise UnsupportedModelError(f"{source}: GGUF tokenizer model {model!r} is not supported "
                                    "(supported: gpt2 (byte-level BPE), llama (SentencePiece BPE))")
    _add_special(tok, tokens, types)
    return tok, bool(md.get("tokenizer.ggml.add_bos_token", add_bos))


def _add_special(tok, tokens: list[str], types: list[int]) -> None:
    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)


def _byte_level_bpe(md: dict, tokens: list[str], source: str):
    pre = md.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise UnsupportedModelError(f"{source}: GGUF pre-tokenizer {pre!r} is not supported "
                                    f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    regexes, ignore_merges, add_bos = PRE_TOKENIZERS[pre]
    merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges") or []]
    vocab = {t: i for i, t in enumerate(tokens)}
    try:
        model = models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges)
    except Exception as e:  # merges naming tokens that are not in the vocabulary
        raise ModelLoadError(f"{source}: inconsistent BPE vocabulary/merges: {e}") from None
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok, add_bos


def _sentencepiece_bpe(md: dict, tokens: list[str], types: list[int], source: str):
    scores = md.get("tokenizer.ggml.scores")
    if not scores or len(scores) != len(tokens):
        raise ModelLoadError(f"{source}: SentencePiece vocabulary without per-token scores")
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = next((t for t, ty in zip(tokens, types) if ty == UNKNOWN), None)
    model = models.BPE(vocab=vocab, merges=_merges_from_scores(tokens, scores, vocab), unk_token=unk,
                       fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(model)
    if md.get("tokenizer.ggml.add_space_prefix", True):
        # Applied per stretch of text between special tokens, which is where llama.cpp adds its prefix too.
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        strip = [decoders.Strip(" ", 1, 0)]
    else:
        tok.normalizer = normalizers.Replace(" ", "▁")
        strip = []
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    return tok, True


def _merges_from_scores(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a vocab entry into two vocab entries is a merge, ranked by the entry's score (best first).
    Ties keep vocabulary order, then longer left/right parts first, which is how transformers orders them."""
    merges = []
    for token, score in zip(tokens, scores):
        local = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges.extend((score, left, right) for left, right in local)
    merges.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)
    return [(left, right) for _, left, right in merges]
