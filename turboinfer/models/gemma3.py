"""Gemma 3 (text; descriptor: models/gemma3_family.py): Gemma3ForCausalLM, the 270M and 1B checkpoints. Against
the Llama family it differs in:
- four RMSNorms a layer: the attention and MLP outputs are normalised again before the residual add;
- norms multiply by (1 + weight) in the HF checkpoint; the stored weight + 1 is loaded, so the layers are the
  ordinary RMSNorm (GGUF files carry the + 1 already and are read back to the checkpoint's values);
- the embedding output is scaled by sqrt(hidden_size), in the activation dtype as the reference does;
- per-head q/k RMSNorm, attention scale query_pre_attn_scalar^-1/2, a GELU(tanh)-gated MLP;
- sliding-window layers (window and RoPE base of their own) interleaved with global ones (`layer_types`);
- optional final logit soft-capping (cap * tanh(logits / cap)).
Parameter names follow the HF checkpoint; q/k/v and gate/up are merged as in models/llama.py."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from turboinfer.kernels.metadata import AttentionMetadata
from turboinfer.layers.linear import Linear
from turboinfer.layers.norm import RMSNorm
from turboinfer.layers.rotary import RotaryEmbedding
from turboinfer.models.arch import ModelArch
from turboinfer.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP

NORM_SUFFIXES = ("layernorm.weight", "norm.weight")  # every RMSNorm weight of the checkpoint (q_norm, k_norm too)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, rotary: RotaryEmbedding, window: int | None) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(arch, rotary, window, arch.query_pre_attn_scalar ** -0.5)
        self.mlp = LlamaMLP(arch)
        eps = arch.rms_norm_eps
        self.input_layernorm = RMSNorm(arch.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(arch.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(arch.hidden_size, eps)

    def forward(self, positions, x, residual, meta):
        # (x, residual) -> (x, residual) as in the Llama layer: the hidden state is their sum
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(positions, x, meta))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class Gemma3Model(nn.Module):
    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        from turboinfer.layers.embedding import VocabEmbedding

        self.embed_tokens = VocabEmbedding(arch.vocab_size, arch.hidden_size)
        self.embed_scale = arch.hidden_size ** 0.5
        self._embed_scales: dict[torch.dtype, float] = {}  # the scale rounded to each activation dtype
        full = RotaryEmbedding(arch.head_dim, arch.max_position_embeddings, arch.rope_theta, arch.rope_scaling)
        local = RotaryEmbedding(arch.head_dim, arch.max_position_embeddings, arch.rope_local_theta or arch.rope_theta,
                                None)
        layers = []
        for i in range(arch.num_layers):
            window = arch.layer_window(i)
            layers.append(Gemma3DecoderLayer(arch, local if window else full, window))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(self, input_ids, positions, meta):
        dtype = self.norm.weight.dtype
        scale = self._embed_scales.get(dtype)
        if scale is None:  # the reference multiplies by the scale rounded to the activation dtype (25.25 in bf16)
            scale = self._embed_scales[dtype] = torch.tensor(self.embed_scale, dtype=dtype).item()
        x = self.embed_tokens(input_ids, dtype) * scale
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x


class Gemma3ForCausalLM(LlamaForCausalLM):
    def __init__(self, arch: ModelArch) -> None:
        nn.Module.__init__(self)
        self.arch = arch
        self.model = Gemma3Model(arch)
        self.lm_head = None if arch.tie_word_embeddings else Linear(arch.hidden_size, arch.vocab_size)
        self.softcap = arch.final_logit_softcapping

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """HF names and values; each norm weight w is stored as 1 + w (computed in float32)."""
        def shifted():
            for name, tensor in weights:
                if name.endswith(NORM_SUFFIXES) and isinstance(tensor, torch.Tensor):
                    tensor = (tensor.float() + 1).to(tensor.dtype)
                yield name, tensor
        super().load_weights(shifted())
