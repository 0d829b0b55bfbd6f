"""The CPU decode step in one C call (kernels/cpu/decode.c) for Llama-family models whose linear layers are kept
quantized — torch's packed int4 (GGUF Q4_0/Q4_1/Q4_K, `--quantization int4`) or group-wise int8 codes (GGUF Q8_0,
Q5_K, Q6_K), mixed freely between layers — which is where a batch-1 step is dominated by ~1,600 small PyTorch ops
rather than by reading the weights.

The C step reads the very tensors the PyTorch path uses (packed int4 weights, the Q8_0 embedding, the paged KV
cache), so turning it on costs no memory, and both paths can serve the same requests: prefill and large batches
stay on PyTorch, decode steps of up to MAX_BATCH sequences come here. `accepts()` says when a model qualifies;
anything else (an fp8 KV cache, q/k norms, another activation) keeps the PyTorch path."""

from __future__ import annotations

import contextlib
import ctypes
import logging

import torch

from turboinfer.kernels import cpu as cpu_kernels
from turboinfer.runner.decode_backend import DecodeBatch

log = logging.getLogger("turboinfer")

MAX_BATCH = 64  # decode batches up to this size (measured faster than the PyTorch path up to 64 on 2 cores)
# The Python side of kernels/cpu/ti_decode.h: index names (its D_*, P_*, G_*, META_*, F_* enums) and enum values.
# The loader compares them with the library's ti_interface() and refuses a library that disagrees.
DIMS = ("layers", "hidden", "heads", "kv_heads", "head_dim", "inter", "vocab", "block_size", "window",
        "bf16", "has_bias", "logits", "max_seq", "kv_kind", "logits_group", "rope_rows")
LOGITS_NONE, LOGITS_Q8, LOGITS_INT8 = 0, 1, 2  # how the step computes the logits (dims "logits")
KV_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}  # the KV cache's dtype (dims "kv_kind")
LAYER_PTRS = ("in_norm", "qkv_w", "qkv_s", "qkv_b", "o_w", "o_s", "post_norm", "gu_w", "gu_s", "down_w", "down_s",
              "k_cache", "v_cache", "k_scale", "v_scale", "qkv_is", "o_is", "gu_is", "down_is",
              "qkv_z", "o_z", "gu_z", "down_z", "lin_meta", "qkv2_w", "qkv2_s", "qkv2_z", "gu2_w", "gu2_s", "gu2_z")
GLOBAL_PTRS = ("final_norm", "cos", "sin", "emb_codes", "emb_scales", "emb_zeros")  # after every layer's pointers
LIN_INT4, LIN_INT8 = 0, 1  # a linear layer's weight format (lin_meta "*_format")
LIN_META = ("qkv_format", "qkv_group", "o_format", "o_group", "gu_format", "gu_group", "down_format", "down_group",
            "qkv2_rows", "qkv2_format", "qkv2_group", "gu2_rows", "gu2_format", "gu2_group")  # a layer's lin_meta
FPARAMS = ("eps", "attn_scale")


def c_interface() -> dict[str, str]:
    """These declarations as ti_interface() spells the library's: key -> names in index (value) order."""
    def by_value(values: dict[str, int]) -> str:
        names = {v: n for n, v in values.items()}
        return ",".join(names.get(i, "?") for i in range(max(values.values()) + 1))

    return {"dims": ",".join(DIMS), "logits": by_value({"none": LOGITS_NONE, "q8": LOGITS_Q8, "int8": LOGITS_INT8}),
            "kv_kinds": by_value({str(dt).removeprefix("torch."): v for dt, v in KV_KINDS.items()}),
            "lin_formats": by_value({"int4": LIN_INT4, "int8": LIN_INT8}), "layer_ptrs": ",".join(LAYER_PTRS),
            "global_ptrs": ",".join(GLOBAL_PTRS), "lin_meta": ",".join(LIN_META), "fparams": ",".join(FPARAMS)}


def _int4pack_layout_ok() -> bool:
    """decode.c reads torch's CPU int4 packing directly; confirm this torch build packs as it expects."""
    n, k = 128, 64
    q = (torch.arange(n * k, dtype=torch.int32).view(n, k) * 7) % 16
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1).view(torch.uint8).reshape(n // 64, k, 32)
    want = q.view(n // 64, 2, 32, k).permute(0, 3, 1, 2)  # [block, k, half, j]
    return bool(torch.equal(packed.to(torch.int32), want[:, :, 0] | (want[:, :, 1] << 4)))


def accepts(model: torch.nn.Module, kv_dtype: torch.dtype, dtype: torch.dtype) -> str | None:
    """None when the C step can run this model, else the reason it cannot."""
    from turboinfer.layers.quantization.grouped_int8 import GroupedInt8CPUMethod
    from turboinfer.layers.quantization.q4 import Int4CPUMethod
    from turboinfer.models.registry import family_of

    arch = getattr(model, "arch", None)
    if arch is None or not family_of(arch).has_c_decode_step:
        return "the model family has no whole-step C decode path"
    layers = model.model.layers
    if dtype not in (torch.float32, torch.bfloat16) or kv_dtype not in (dtype, torch.int8):
        return f"activations {dtype} / KV cache {kv_dtype} (needs float32 or bfloat16; KV the same or int8)"
    if arch.hidden_act != "silu" or arch.qk_norm or arch.head_dim % 2 or arch.head_dim > 256:
        return "activation, q/k norm or head size not supported"
    from turboinfer.layers.quantization import PartsMethod

    any_int4 = False
    for layer in layers:
        for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            parts = lin.quant_method.methods if isinstance(lin.quant_method, PartsMethod) else [lin.quant_method]
            if len(parts) > 2 or (len(parts) == 2 and lin in (layer.self_attn.o_proj, layer.mlp.down_proj)):
                return "a linear layer in more than two formats"
            for qm in parts:
                if isinstance(qm, Int4CPUMethod):
                    if qm.out_features % 64:
                        return "an int4 layer's width is not a multiple of 64"
                    any_int4 = True
                elif not isinstance(qm, GroupedInt8CPUMethod):
                    return "linear layers are not all packed int4 or group-wise int8"
            if lin is not layer.self_attn.qkv_proj and lin.bias is not None:
                return "bias outside q/k/v"
    if any_int4 and not _int4pack_layout_ok():
        return "this torch build packs int4 differently"
    return None


class CPUDecoder:
    def __init__(self, lib: ctypes.CDLL, model: torch.nn.Module, dtype: torch.dtype, block_size: int,
                 max_seq_len: int) -> None:
        arch = model.arch
        layers = model.model.layers
        emb = model.model.embed_tokens
        self.lib, self.model = lib, model
        from turboinfer.layers.quantization.grouped_int8 import GroupedInt8CPUMethod

        # The output projection inside the step: the tied Q8_0 table, or an int8 one (tied Q6_K / Q5_K table, or
        # an untied lm_head kept as int8 codes); anything else returns the final hidden states.
        head = emb.grouped_method if model.lm_head is None else model.lm_head.quant_method
        if model.lm_head is None and emb.is_quantized:
            logits_mode, head_ptrs, logits_group = LOGITS_Q8, [emb.codes, emb.group_scales, None], 0
        elif isinstance(head, GroupedInt8CPUMethod):
            logits_mode, head_ptrs, logits_group = LOGITS_INT8, [head.w.q, head.w.scale, head.w.zero], head.group_size
        else:
            logits_mode, head_ptrs, logits_group = LOGITS_NONE, [None, None, None], 0
        self.step_logits = logits_mode != LOGITS_NONE  # the step returns logits
        attn0 = layers[0].self_attn
        d = dict(layers=len(layers), hidden=arch.hidden_size, heads=arch.num_heads, kv_heads=arch.num_kv_heads,
                 head_dim=arch.head_dim, inter=arch.intermediate_size, vocab=arch.vocab_size, block_size=block_size,
                 window=arch.sliding_window or 0,
                 bf16=int(dtype == torch.bfloat16), has_bias=int(attn0.qkv_proj.bias is not None),
                 logits=logits_mode, max_seq=max_seq_len, kv_kind=KV_KINDS[attn0.attn.k_cache.dtype],
                 logits_group=logits_group, rope_rows=attn0.rotary.cos.shape[0])
        self.dims = torch.tensor([d[name] for name in DIMS], dtype=torch.int64)
        self.fparams = torch.tensor([arch.rms_norm_eps, attn0.attn.scale], dtype=torch.float32)
        self.vocab = arch.vocab_size
        ptrs: list[int] = []
        self._keep: list[torch.Tensor] = []  # tensors made here whose pointers the C step holds
        for layer in layers:
            at, mlp = layer.self_attn, layer.mlp
            named = dict(in_norm=layer.input_layernorm.weight, post_norm=layer.post_attention_layernorm.weight,
                         qkv_b=at.qkv_proj.bias, k_cache=at.attn.k_cache, v_cache=at.attn.v_cache,
                         k_scale=at.attn.k_scale, v_scale=at.attn.v_scale)
            meta, second = [], []
            for key, lin in (("qkv", at.qkv_proj), ("o", at.o_proj), ("gu", mlp.gate_up_proj), ("down", mlp.down_proj)):
                parts = getattr(lin.quant_method, "methods", [lin.quant_method])  # PartsMethod: two formats
                for i, qm in enumerate(parts):
                    tag = key if i == 0 else f"{key}2"
                    if hasattr(qm, "packed"):  # Int4CPUMethod
                        named[f"{tag}_w"], named[f"{tag}_s"], named[f"{tag}_z"] = qm.packed, qm.scales_zeros, None
                        if i == 0:
                            named[f"{tag}_is"] = qm.input_scale
                        fmt = [LIN_INT4, qm.group_size]
                    else:  # GroupedInt8CPUMethod
                        named[f"{tag}_w"], named[f"{tag}_s"], named[f"{tag}_z"] = qm.w.q, qm.w.scale, qm.w.zero
                        if i == 0:
                            named[f"{tag}_is"] = None
                        fmt = [LIN_INT8, qm.group_size]
                    if i == 0:
                        meta += fmt
                    else:
                        second.append((key, [parts[0].out_features] + fmt))
                if key in ("qkv", "gu") and len(parts) == 1:
                    named[f"{key}2_w"] = named[f"{key}2_s"] = named[f"{key}2_z"] = None
            extra = dict(second)
            meta += extra.get("qkv", [0, 0, 0]) + extra.get("gu", [0, 0, 0])
            named["lin_meta"] = torch.tensor(meta, dtype=torch.int32)
            self._keep.append(named["lin_meta"])
            for name in LAYER_PTRS:
                t = named[name]
                if t is not None and name.endswith("_is") and t.dtype != torch.float32:
                    t = t.float()  # the C step reads float32 input scales
                    self._keep.append(t)
                if t is not None and not t.is_contiguous():
                    raise ValueError(f"{name} is not contiguous")
                ptrs.append(0 if t is None else t.data_ptr())
        rot = attn0.rotary
        self._keep += [rot.cos.contiguous(), rot.sin.contiguous()]
        ptrs += [model.model.norm.weight.data_ptr(), self._keep[-2].data_ptr(), self._keep[-1].data_ptr()]
        ptrs += [0 if t is None else t.data_ptr() for t in head_ptrs]
        self.ptrs = (ctypes.c_void_p * len(ptrs))(*ptrs)
        self.work = torch.empty(0)

    max_batch = MAX_BATCH
    step_threads: int | None = None  # inside host_threads(): the threads the C step takes

    @contextlib.contextmanager
    def host_threads(self):
        """The C step has its own threads. The small torch ops around it (embedding rows, sampling) run on one
        thread: on more, torch's OpenMP workers would spin after each op on the cores the next C step needs."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.step_threads = threads
        try:
            yield
        finally:
            self.step_threads = None
            torch.set_num_threads(threads)

    def __call__(self, batch: DecodeBatch, nthreads: int | None = None) -> torch.Tensor:
        """One token per sequence -> logits [M, vocab] float32 (or, when the output projection is not one the step
        computes, the model's own compute_logits over the step's final hidden states). `nthreads`: the C step's
        threads (default: torch's, or what it was outside host_threads())."""
        m = batch.size
        nthreads = nthreads or self.step_threads or torch.get_num_threads()
        need = self.lib.ti_workspace_floats(self.dims.data_ptr(), MAX_BATCH, nthreads)
        if self.work.numel() < need:
            self.work = torch.empty(need, dtype=torch.float32)
        x = self.model.model.embed_tokens(batch.input_ids, torch.float32).float().contiguous()
        (tables,) = batch.block_tables  # one KV group: create_cpu_decoder checked
        logits = torch.empty(m, self.vocab, dtype=torch.float32) if self.step_logits else None
        rc = self.lib.ti_decode_step(self.dims.data_ptr(), self.fparams.data_ptr(), self.ptrs, m, x.data_ptr(),
                                     batch.positions.data_ptr(), batch.seq_lens.data_ptr(), tables.data_ptr(),
                                     tables.shape[1], logits.data_ptr() if logits is not None else None,
                                     self.work.data_ptr(), nthreads)
        if rc != 0:
            raise RuntimeError("CPU decode step: a sequence length is past the cache or a position past the rotary table")
        if logits is None:
            logits = self.model.compute_logits(x.to(self.model.model.norm.weight.dtype)).float()
        return logits


def create_cpu_decoder(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, kv_dtype: torch.dtype,
                       block_size: int, max_seq_len: int, num_kv_groups: int) -> CPUDecoder | None:
    if device.type != "cpu" or not cpu_kernels.enabled():
        return None
    reason = "layers in more than one KV cache group (one block table per step)" if num_kv_groups != 1 else \
        accepts(model, kv_dtype, dtype)
    if reason is not None:
        log.debug("CPU decode kernels not used: %s", reason)
        return None
    lib = cpu_kernels.load_library()
    return None if lib is None else CPUDecoder(lib, model, dtype, block_size, max_seq_len)
