"""Tokenizer: GGUF-embedded vocab vs transformers' GGUF tokenizer, HF directories, chat templates."""

import json
import os

import pytest

from turboinfer.errors import InvalidRequestError
from turboinfer.loader.gguf_file import GGUFFile
from turboinfer.tokenizer.tokenizer import Tokenizer

TEXTS = [
    "Hello world! 123",
    "Hello, we can use",
    "  multiple   spaces",
    "Café déjà vu.",
    "12345678 3.14159 -42 1e10",
    "def f(x):\n    return x**2\n\n\nprint(f(3))",
    "emoji 😀🎉 family 👨‍👩‍👧 flags 🇫🇷",
    "中文测试，日本語テキスト、한국어",
    "Ελληνικά и русский текст",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>foo<repo_name>bar",
    "tabs\tand\r\nCRLF\r\n",
    "I'm you're it'll WE'LL they'D",
    "",
    " ",
    "\n\n\n",
    "non\u00a0breaking and zero\u200bwidth",
    "x=1;y=2 && z!=3 || w<=4",
    "   leading and trailing   ",
    "https://example.com/path?q=1&r=2#frag",
    "<|im_start|> spaced <|im_end|>",
]


@pytest.fixture(scope="module")
def gguf_tok(default_model_path):
    return Tokenizer.from_gguf(GGUFFile(default_model_path))


@pytest.fixture(scope="module")
def hf_tok(default_model_path):
    from transformers import AutoTokenizer

    folder, name = os.path.split(default_model_path)
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


def test_ids_equal_transformers_gguf_tokenizer(gguf_tok, hf_tok):
    for text in TEXTS:
        assert gguf_tok.encode(text) == hf_tok.encode(text, add_special_tokens=True), text
        assert gguf_tok.encode(text, add_special_tokens=False) == hf_tok.encode(text, add_special_tokens=False)


def test_known_llama_cpp_token_ids(gguf_tok):
    # Reference ids of SmolLM2's tokenizer (digits split one by one, the "smollm" pre-tokenizer of llama.cpp)
    assert gguf_tok.encode("Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]
    assert gguf_tok.encode("Café déjà vu.") == [51, 1939, 2756, 32564, 90, 16739, 386, 101, 30]
    assert gguf_tok.encode("  multiple   spaces") == [216, 2701, 256, 5600]
    assert gguf_tok.encode("\n") == [198]


def test_decode_round_trips(gguf_tok):
    for text in TEXTS:
        ids = gguf_tok.encode(text)
        assert gguf_tok.decode(ids, skip_special_tokens=False) == text
    ids = gguf_tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert gguf_tok.decode(ids) == "user\nhi"  # special tokens skipped by default


def test_special_ids(gguf_tok):
    assert (gguf_tok.bos_token_id, gguf_tok.eos_token_id, gguf_tok.pad_token_id) == (1, 2, 2)
    assert gguf_tok.bos_token == "<|im_start|>" and gguf_tok.eos_token == "<|im_end|>"
    assert gguf_tok.eos_token_ids == {0, 2}  # <|im_end|> (EOS) and <|endoftext|> (special, ends documents)
    assert gguf_tok.vocab_size == 49152
    assert gguf_tok.all_special_ids == list(range(17))
    assert gguf_tok.id_to_token(198) == "Ċ" and gguf_tok.token_to_id("<|im_end|>") == 2
    assert not gguf_tok.add_bos and gguf_tok.encode("hi")[0] != 1


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another, ünïcødé 😀"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["no_system", "system"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_transformers(gguf_tok, hf_tok, messages, add_generation_prompt):
    ours = gguf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_no_chat_template_is_a_clear_error(gguf_tok):
    tok = Tokenizer(gguf_tok._tok, eos_token_id=2, chat_template=None, name="plain-model")
    with pytest.raises(InvalidRequestError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_helpers_and_errors(gguf_tok):
    source = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no bad roles') }}"
              "{% endif %}{{ m | tojson }}{% endfor %}{% generation %}{{ strftime_now('%Y') | length }}"
              "{% endgeneration %}")
    tok = Tokenizer(gguf_tok._tok, bos_token_id=1, eos_token_id=2, chat_template=source)
    rendered = tok.apply_chat_template([{"role": "user", "content": "é<>"}])
    assert rendered == '<|im_start|>{"role": "user", "content": "é<>"}4'  # tojson keeps é and <> as they are
    with pytest.raises(InvalidRequestError, match="no bad roles"):
        tok.apply_chat_template([{"role": "bad", "content": ""}])


def test_hf_directory_tokenizer(tmp_path, hf_tok, gguf_tok):
    hf_tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    tok = Tokenizer.from_dir(tmp_path)
    for text in TEXTS:
        assert tok.encode(text) == hf_tok.encode(text), text
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2) and tok.eos_token_ids == {0, 2}
    for messages in CONVERSATIONS:
        assert tok.apply_chat_template(messages) == gguf_tok.apply_chat_template(messages)


def test_hf_directory_config_variants(tmp_path, hf_tok, gguf_tok):
    """Special tokens written as {"content": ...} dicts, named templates as a list, add_bos_token."""
    hf_tok.save_pretrained(tmp_path)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["bos_token"] = {"content": "<|im_start|>", "lstrip": False}
    cfg["eos_token"] = {"content": "<|endoftext|>"}
    cfg["pad_token"] = None
    cfg["add_bos_token"] = True
    cfg["chat_template"] = [{"name": "default", "template": "D{{ messages | length }}"},
                            {"name": "tool_use", "template": "T{{ tools | length }}"}]
    cfg_path.write_text(json.dumps(cfg))
    if (tmp_path / "chat_template.jinja").exists():
        os.remove(tmp_path / "chat_template.jinja")
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 0, 0)
    assert tok.encode("hi")[0] == 1 and tok.encode("hi", add_special_tokens=False)[0] != 1
    assert tok.encode("<|im_start|>hi").count(1) == 1  # BOS is not doubled
    assert tok.eos_token_ids == {0, 2}
    msgs = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(msgs) == "D1"
    assert tok.apply_chat_template(msgs, tools=[{"name": "f"}, {"name": "g"}]) == "T2"


# ---- SentencePiece ("llama") vocabularies ------------------------------------------------------------------

SPM_PIECES = ["▁t", "he", "▁the", "in", "ing", "▁th", "▁a", "an", "▁and", "er", "ov", "▁over", "▁d", "og",
              "▁dog", "▁s", "▁sing", "▁sings", "▁m", "or", "▁mor", "▁morning", "▁q", "ui", "ck", "▁quick"]
SPM_TEXTS = ["the quick dog", "The Quick", "sings in the morning", "over and over", "zebra ümlaut 😀 ok",
             "a\nb", "\n", "", "thethe andand", "x  y", "ends with space "]


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    """A tiny SentencePiece-style vocabulary: <unk>, <s>, </s>, 256 byte tokens, scored merges, single chars."""
    import numpy as np

    from gguf_writer import write_gguf_file

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    for i, piece in enumerate(SPM_PIECES):
        tokens.append(piece), types.append(1), scores.append(-float(i))
    for i, ch in enumerate(sorted(set("".join(SPM_PIECES).replace("▁", "")) | {"▁", "b", "x", "y"})):
        if ch not in tokens:
            tokens.append(ch), types.append(1), scores.append(-1000.0 - i)
    tokens.append("<|user|>"), types.append(4), scores.append(0.0)
    tokens.append("<end_of_turn>"), types.append(3), scores.append(0.0)
    kv = {"llama.embedding_length": 64, "llama.block_count": 1, "llama.attention.head_count": 4,
          "llama.feed_forward_length": 96, "llama.context_length": 512, "tokenizer.ggml.model": "llama",
          "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
          "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    return write_gguf_file(path, "llama", {"token_embd.weight": np.zeros((len(tokens), 64), np.float32)}, kv)


def test_end_of_turn_token_stops_without_eot_key(spm_gguf):
    """The file names only an EOS; like llama.cpp, a control token that ends a chat turn (Gemma's <end_of_turn>)
    is an end-of-generation token too."""
    tok = Tokenizer.from_gguf(GGUFFile(spm_gguf))
    assert tok.eos_token_id == 2
    assert tok.eos_token_ids == {2, tok.token_to_id("<end_of_turn>")}


def test_sentencepiece_vocab_equals_transformers(spm_gguf):
    from transformers import AutoTokenizer

    tok = Tokenizer.from_gguf(GGUFFile(spm_gguf))
    hf = AutoTokenizer.from_pretrained(os.path.dirname(spm_gguf), gguf_file=os.path.basename(spm_gguf))
    assert tok.add_bos  # SentencePiece vocabularies add BOS unless the file says otherwise
    for text in SPM_TEXTS:
        assert tok.encode(text) == hf.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    # byte fallback: a character outside the vocabulary becomes its UTF-8 bytes (after the "▁" prefix)
    assert tok.encode("😀", add_special_tokens=False) == [tok.token_to_id("▁")] + [3 + b for b in "😀".encode()]


def test_sentencepiece_follows_llama_cpp_around_spaces_and_special_tokens(spm_gguf):
    """llama.cpp prefixes "▁" to every stretch of text that starts the input or follows a special token, even
    when the text already starts with a space (transformers' Metaspace skips it there)."""
    tok = Tokenizer.from_gguf(GGUFFile(spm_gguf))
    space, the = tok.token_to_id("▁"), tok.token_to_id("▁the")
    assert tok.encode(" the", add_special_tokens=False) == [space, the]
    assert tok.encode("</s>the", add_special_tokens=False) == [2, the]
    assert tok.encode("<|user|>the", add_special_tokens=False) == [tok.token_to_id("<|user|>"), the]
