"""Memory estimator: how many bytes a model needs to serve or fine-tune, from its config and tensor shapes.

Pure arithmetic: nothing here loads weights or imports torch. The engine sizes its KV pool with
`kv_cache_bytes_per_token` / `num_kv_blocks_for_budget` and prints `estimate_inference(...).breakdown()` at
startup; `turboinfer estimate` (cli_estimate.py) prints the same numbers. Formulas and constants: docs/memory.md.

  shapes.py       ModelShape and the config readers (ModelArch, HF config.json of many families)
  params.py       the parameter inventory, tensor-parallel shards, weight bytes (float / int8 / int4 / nf4)
  gguf_header.py  exact GGUF weight bytes from the file header
  kv.py           KV-cache bytes of the paged layout
  inference.py    InferenceEstimate and the inverse questions (longest context, most sequences, KV tokens)
  training.py     TrainingEstimate: full / LoRA / QLoRA fine-tuning
"""

from turboinfer.memory.gguf_header import GGUFWeights, read_gguf_header, shape_from_gguf, weight_bytes_from_gguf
from turboinfer.memory.inference import (InferenceEstimate, activation_bytes, estimate_inference, kv_tokens_that_fit,
                                         max_context_len, max_num_seqs, resolve_compute_dtype)
from turboinfer.memory.kv import (kv_bytes_for_sequences, kv_cache_bytes, kv_cache_bytes_per_token,
                                  num_kv_blocks_for_budget)
from turboinfer.memory.params import num_active_params, num_params, param_tensors, weight_bytes_from_hf
from turboinfer.memory.shapes import ModelShape, model_shape, shape_from_hf_config
from turboinfer.memory.training import TrainingEstimate, estimate_training

__all__ = [
    "GGUFWeights", "InferenceEstimate", "ModelShape", "TrainingEstimate", "activation_bytes", "estimate_inference",
    "estimate_training", "kv_bytes_for_sequences", "kv_cache_bytes", "kv_cache_bytes_per_token",
    "kv_tokens_that_fit", "max_context_len", "max_num_seqs", "model_shape", "num_active_params",
    "num_kv_blocks_for_budget", "num_params", "param_tensors", "read_gguf_header", "resolve_compute_dtype",
    "shape_from_gguf", "shape_from_hf_config", "weight_bytes_from_gguf", "weight_bytes_from_hf",
]
