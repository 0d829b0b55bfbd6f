"""The Llama family's model (descriptor: models/llama_family.py): Llama 2/3/3.x, Mistral, Qwen2/2.5 (qkv bias),
Qwen3 (q/k RMSNorm), SmolLM2, TinyLlama. MHA, GQA and MQA differ only in num_kv_heads. Parameter names follow the
HF checkpoints, except that q/k/v and gate/up are merged into one matmul each (`STACKED` says how checkpoint names
land in them)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from turboinfer.errors import ModelLoadError
from turboinfer.kernels.metadata import AttentionMetadata
from turboinfer.layers.activation import gated_act
from turboinfer.layers.attention import Attention
from turboinfer.layers.embedding import VocabEmbedding
from turboinfer.layers.linear import Linear
from turboinfer.layers.norm import RMSNorm
from turboinfer.layers.rotary import RotaryEmbedding
from turboinfer.models.arch import ModelArch

# checkpoint name fragment -> (merged parameter fragment, shard)
STACKED = {
    ".q_proj.": (".qkv_proj.", "q"),
    ".k_proj.": (".qkv_proj.", "k"),
    ".v_proj.": (".qkv_proj.", "v"),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}


class LlamaAttention(nn.Module):
    def __init__(self, arch: ModelArch, rotary: RotaryEmbedding, window: int | None,
                 scale: float | None = None) -> None:
        """window: this layer's attention window (None: the whole context); scale: the q.k scale (default:
        head_dim^-1/2)."""
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(arch.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size}, bias=arch.attention_bias)
        self.o_proj = Linear(q_size, arch.hidden_size, bias=arch.o_bias)
        if arch.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, arch.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, arch.rms_norm_eps)
        self.qk_norm = arch.qk_norm
        self.rotary = rotary
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, scale or self.head_dim ** -0.5,
                              window)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n, nh, nkv = x.shape[0], self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x).view(n, nh + 2 * nkv, self.head_dim)  # heads: q | k | v
        if self.qk_norm:
            qk = torch.cat([self.q_norm(qkv[:, :nh]), self.k_norm(qkv[:, nh:nh + nkv])], dim=1)
        else:
            qk = qkv[:, :nh + nkv]
        qk = self.rotary(qk, meta.rope)  # q and k heads rotated in one pass, by the step's gathered tables
        o = self.attn(qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv:], meta)  # [n, num_heads, head_dim]
        return self.o_proj(o.reshape(n, -1))


class LlamaMLP(nn.Module):
    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.gate_up_proj = Linear(arch.hidden_size, {0: arch.intermediate_size, 1: arch.intermediate_size},
                                   bias=arch.mlp_bias)
        self.down_proj = Linear(arch.intermediate_size, arch.hidden_size, bias=arch.mlp_bias)
        self.act = arch.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gated_act(self.gate_up_proj(x), self.act))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(arch, rotary, arch.sliding_window)
        self.mlp = LlamaMLP(arch)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(self, positions, x, residual, meta):
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(arch.vocab_size, arch.hidden_size)
        rotary = RotaryEmbedding(arch.head_dim, arch.max_position_embeddings, arch.rope_theta, arch.rope_scaling)
        self.layers = nn.ModuleList([LlamaDecoderLayer(arch, rotary) for _ in range(arch.num_layers)])
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(self, input_ids, positions, meta):
        x = self.embed_tokens(input_ids, self.norm.weight.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.arch = arch
        self.model = LlamaModel(arch)
        if arch.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(arch.hidden_size, arch.vocab_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)  # [num_tokens, hidden]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return self.model.embed_tokens.as_logits(hidden)
        return self.lm_head(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        owners = {name: mod for mod_name, mod in self.named_modules() for name in
                  (f"{mod_name}.weight", f"{mod_name}.bias") if isinstance(mod, Linear)}
        owners["model.embed_tokens.weight"] = self.model.embed_tokens
        loaded: dict[str, set] = {}
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: some checkpoints store the copy anyway
            shard = None
            for frag, (merged, shard_id) in STACKED.items():
                if frag in name:
                    name, shard = name.replace(frag, merged), shard_id
                    break
            param = params.get(name)
            if param is None:
                raise ModelLoadError(f"checkpoint tensor {name!r} has no place in {self.arch.architecture}")
            if name == "model.embed_tokens.weight":
                self.model.embed_tokens.weight_loader(param, tensor)
            elif name in owners:
                owners[name].weight_loader(param, tensor, shard)
            else:
                if tuple(tensor.shape) != tuple(param.shape):
                    raise ModelLoadError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected "
                                         f"{tuple(param.shape)}")
                param.data.copy_(tensor)
            loaded.setdefault(name, set()).add(shard)
        missing = []
        for name, param in params.items():
            owner = owners.get(name)
            need = set(owner.shard_sizes) if isinstance(owner, Linear) else {None}
            if not need <= loaded.get(name, set()):
                missing.append(name)
        if missing:
            raise ModelLoadError(f"checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
