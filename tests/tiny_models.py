"""Tiny random-weight checkpoints of each supported architecture, written by transformers itself."""

from __future__ import annotations

import torch

from turboinfer.bench.probe import full_logits  # noqa: F401  (tests import it from here)

ARCHS = {
    # name: (transformers config class, overrides). Each exercises a different feature of models/llama.py.
    "llama-gqa-llama3rope-tied": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=True,
                                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama-mha-linearrope": ("LlamaConfig", dict(num_key_value_heads=4, rope_scaling={"rope_type": "linear",
                                                                                      "factor": 2.0})),
    "llama-mqa": ("LlamaConfig", dict(num_key_value_heads=1)),
    "mistral-window": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=24)),
    "qwen2-bias": ("Qwen2Config", dict(num_key_value_heads=2)),
    "qwen3-qknorm": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=16)),
    # head sizes of real models, where the CPU decode step has register-tiled attention
    "llama-hd64": ("LlamaConfig", dict(num_key_value_heads=2, head_dim=64)),
    "llama-mqa-hd128": ("LlamaConfig", dict(num_key_value_heads=1, head_dim=128)),
    # models/gemma3.py: a window of 8 (so the longer prompts slide) beside a global layer with its own RoPE base
    # and linear scaling, a query scale other than head_dim's, tied embeddings and soft-capped logits
    "gemma3-window-softcap": ("Gemma3TextConfig", dict(
        num_key_value_heads=2, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=24, final_logit_softcapping=30.0, tie_word_embeddings=True,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}})),
}

BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            tie_word_embeddings=False)


def _tokenizer(path: str) -> None:
    """A small byte-level BPE tokenizer with a chat template, saved next to the model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>",
                                                                   "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["The quick brown fox jumps over the lazy dog. " * 3, "Paris is the capital of France.",
            "def f(x):\n    return x * 2\n", "Hello, world! How are you today?"]
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(path)


def make_tiny_model(tmp_path_factory, name: str):
    import transformers

    cls_name, overrides = ARCHS[name]
    cfg = getattr(transformers, cls_name)(**{**BASE, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    # Larger weights than the default init so logits are peaked: greedy comparisons then test the model,
    # not ties between near-equal logits.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15)
            elif "norm" in n:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, 0.05)
    model.eval()
    path = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(path, safe_serialization=True)
    _tokenizer(path)
    return path, model
