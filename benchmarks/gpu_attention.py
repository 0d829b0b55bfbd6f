"""Paged decode attention on a CUDA GPU: the Triton Flash-Decoding kernel against PyTorch SDPA and against the
memory-bandwidth floor.

    python benchmarks/gpu_attention.py [--json benchmarks/results/gpu_attention.json]

Shapes: 32 query heads, 8 KV heads, head_dim 128, bfloat16, 16-token cache blocks in shuffled order.
- batch 1 at contexts 1k .. 64k: our kernel over the paged cache vs SDPA over contiguous K/V [1, 8, L, 128];
- batch 32 with lengths spread over 1k .. 32k: our kernel vs SDPA over the batch padded to the longest sequence,
  with a key-padding mask.
SDPA gets the same grouped-query layout without repeated K/V: each KV head's 4 query heads are passed as 4 query
rows, so it reads K/V once, as we do. Decode must read every K/V byte of the context, so its floor is
K/V bytes / DRAM bandwidth; the bandwidth is measured as a large device-to-device copy (bytes read + written per
second). Times are medians from triton.testing.do_bench, which flushes the L2 cache between runs so short contexts
are not served from cache. Every configuration is also checked against SDPA before it is timed.

Then the int4 dequant-matmul (`kernels/triton/dequant_matmul.py`, group 128, float16 scales) against a dense
bfloat16 F.linear of the same (dequantized) weight, for 4096x4096 and 14336x4096 weights at M = 1 (decode: weight
bytes read per second, against the same copy bandwidth) and M = 2048 (prefill: TFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
CONTEXTS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
MIXED_BATCH, MIXED_MIN, MIXED_MAX = 32, 1024, 32768
MATMUL_WEIGHTS = [(4096, 4096), (14336, 4096)]  # [N, K]: a square projection, Llama-3-8B's gate / up
MATMUL_ROWS, MATMUL_GROUP = [1, 2048], 128


def bench(fn) -> float:
    """Median seconds per call."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3


def copy_bandwidth() -> float:
    """Bytes moved (read + written) per second by a 1 GiB device-to-device copy."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / bench(lambda: dst.copy_(src))


def paged_case(seq_lens: list[int], gen: torch.Generator) -> dict:
    """K/V for the sequences as contiguous per-sequence tensors and as the same rows in a shuffled paged cache."""
    blocks = [-(-n // BLOCK_SIZE) for n in seq_lens]
    num_blocks = sum(blocks) + 1
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, generator=gen, device="cuda").to(DTYPE)
    v_cache = torch.randn(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, generator=gen, device="cuda").to(DTYPE)
    ids = torch.randperm(num_blocks - 1, generator=gen, device="cuda") + 1
    width = max(blocks)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int64, device="cuda")
    start = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = ids[start:start + n]
        start += n
    q = torch.randn(len(seq_lens), NUM_HEADS, HEAD_DIM, generator=gen, device="cuda").to(DTYPE)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=tables,
                seq_lens=torch.tensor(seq_lens, device="cuda"), max_seq_len=max(seq_lens))


def contiguous_kv(case: dict, seq_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """[batch, kv_heads, max_len, head_dim] K and V gathered out of the paged cache, plus the key-padding mask
    [batch, 1, 1, max_len] (None when every sequence has the same length)."""
    max_len = max(seq_lens)
    width = -(-max_len // BLOCK_SIZE)
    flat = case["block_tables"][:, :width].reshape(-1)
    shape = (len(seq_lens), width * BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k = case["k_cache"][flat].view(shape)[:, :max_len].transpose(1, 2).contiguous()
    v = case["v_cache"][flat].view(shape)[:, :max_len].transpose(1, 2).contiguous()
    if len(set(seq_lens)) == 1:
        return k, v, None
    mask = torch.arange(max_len, device="cuda")[None, :] < case["seq_lens"][:, None]
    return k, v, mask[:, None, None, :]


def sdpa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    # q [batch, heads, dim] -> [batch, kv_heads, group, dim]: the group's query heads become query rows
    batch = q.shape[0]
    qg = q.view(batch, NUM_KV_HEADS, NUM_HEADS // NUM_KV_HEADS, HEAD_DIM)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=HEAD_DIM ** -0.5)
    return out.reshape(batch, NUM_HEADS, HEAD_DIM)


def run_case(name: str, seq_lens: list[int], bandwidth: float, gen: torch.Generator) -> dict:
    from turboinfer.kernels.triton import decode

    case = paged_case(seq_lens, gen)
    args = (case["q"], case["k_cache"], case["v_cache"], case["block_tables"], case["seq_lens"],
            case["max_seq_len"], HEAD_DIM ** -0.5)
    k, v, mask = contiguous_kv(case, seq_lens)
    ours = decode.decode_attention(*args)
    theirs = sdpa_decode(case["q"], k, v, mask)
    max_err = (ours.float() - theirs.float()).abs().max().item()
    if max_err > 2e-2:
        raise AssertionError(f"{name}: kernel and SDPA disagree by {max_err}")
    t_ours = bench(lambda: decode.decode_attention(*args))
    t_sdpa = bench(lambda: sdpa_decode(case["q"], k, v, mask))
    kv_bytes = 2 * sum(seq_lens) * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
    floor = kv_bytes / bandwidth
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    row = dict(name=name, batch=len(seq_lens), max_seq_len=max(seq_lens), total_tokens=sum(seq_lens),
               num_splits=decode.num_kv_splits(len(seq_lens), NUM_KV_HEADS, max(seq_lens), sms),
               kv_bytes=kv_bytes, triton_us=t_ours * 1e6, sdpa_us=t_sdpa * 1e6, floor_us=floor * 1e6,
               triton_gb_s=kv_bytes / t_ours / 1e9, pct_of_floor=100 * floor / t_ours,
               speedup_vs_sdpa=t_sdpa / t_ours, max_abs_err_vs_sdpa=max_err)
    return row


def run_matmul_case(n: int, k: int, m: int, bandwidth: float, gen: torch.Generator) -> dict:
    from turboinfer.kernels.torch_ref.dequant_matmul import dequantize_int4, pack_int4
    from turboinfer.kernels.triton.dequant_matmul import int4_matmul

    qweight = pack_int4(torch.randint(0, 16, (n, k), generator=gen, device="cuda", dtype=torch.uint8))
    scale = (torch.rand(k // MATMUL_GROUP, n, generator=gen, device="cuda") * 0.01).half()
    zero = (torch.randn(k // MATMUL_GROUP, n, generator=gen, device="cuda") * 0.05).half()
    dense = dequantize_int4(qweight, scale, zero, MATMUL_GROUP).to(DTYPE)  # [N, K]
    x = torch.randn(m, k, generator=gen, device="cuda").to(DTYPE)
    ours = int4_matmul(x, qweight, scale, zero, MATMUL_GROUP)
    theirs = F.linear(x, dense)
    max_err = ((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max()).item()
    if max_err > 2e-2:
        raise AssertionError(f"int4_matmul {m}x{n}x{k}: off from dense by {max_err} of max|y|")
    t_ours = bench(lambda: int4_matmul(x, qweight, scale, zero, MATMUL_GROUP))
    t_dense = bench(lambda: F.linear(x, dense))
    int4_bytes = qweight.numel() + 2 * scale.numel() * scale.element_size()
    row = dict(n=n, k=k, m=m, int4_us=t_ours * 1e6, dense_bf16_us=t_dense * 1e6, speedup_vs_dense=t_dense / t_ours,
               max_rel_err_vs_dense=max_err)
    if m == 1:  # decode: the weight read is all that counts
        row.update(int4_weight_gb_s=int4_bytes / t_ours / 1e9, dense_weight_gb_s=dense.nbytes / t_dense / 1e9,
                   int4_pct_of_copy=100 * int4_bytes / t_ours / bandwidth)
    else:
        row.update(int4_tflop_s=2 * m * n * k / t_ours / 1e12, dense_tflop_s=2 * m * n * k / t_dense / 1e12)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                       "gpu_attention.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    import triton

    gen = torch.Generator(device="cuda").manual_seed(0)
    bandwidth = copy_bandwidth()
    mixed = torch.randint(MIXED_MIN, MIXED_MAX + 1, (MIXED_BATCH,), generator=torch.Generator().manual_seed(0))
    mixed[0] = MIXED_MAX  # the padded batch is as long as its longest sequence: make that the stated maximum
    cases = [(f"batch1-{n // 1024}k", [n]) for n in CONTEXTS]
    cases.append((f"batch{MIXED_BATCH}-mixed-1k-32k", mixed.tolist()))
    rows = []
    for name, seq_lens in cases:
        rows.append(run_case(name, seq_lens, bandwidth, gen))
        torch.cuda.empty_cache()  # the previous case's caches and padded copies
    try:
        matmul_rows = [run_matmul_case(n, k, m, bandwidth, gen) for n, k in MATMUL_WEIGHTS for m in MATMUL_ROWS]
    except Exception as e:  # a kernel not yet run on a GPU must not cost the attention numbers above
        matmul_rows = [dict(error=repr(e))]

    props = torch.cuda.get_device_properties(0)
    result = {
        "benchmark": "gpu_attention",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/gpu_attention.py",
        "machine": {"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
                    "triton": triton.__version__, "cuda": torch.version.cuda},
        "shape": {"num_heads": NUM_HEADS, "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM,
                  "block_size": BLOCK_SIZE, "dtype": str(DTYPE).replace("torch.", "")},
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "results": rows,
        "int4_matmul": matmul_rows,
    }
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)

    print(f"{props.name}, copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")
    head = f"{'case':<24}{'splits':>7}{'triton us':>11}{'sdpa us':>10}{'floor us':>10}{'GB/s':>8}{'% floor':>9}" \
           f"{'vs sdpa':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['name']:<24}{r['num_splits']:>7}{r['triton_us']:>11.1f}{r['sdpa_us']:>10.1f}{r['floor_us']:>10.1f}"
              f"{r['triton_gb_s']:>8.0f}{r['pct_of_floor']:>8.0f}%{r['speedup_vs_sdpa']:>8.2f}x")
    print(f"\nint4_matmul (group {MATMUL_GROUP}) vs dense bf16 F.linear")
    for r in matmul_rows:
        if "error" in r:
            print(f"failed: {r['error']}")
            continue
        rate = f"{r['int4_weight_gb_s']:.0f} GB/s ({r['int4_pct_of_copy']:.0f}% of copy)" if r["m"] == 1 else \
            f"{r['int4_tflop_s']:.0f} TFLOP/s (dense {r['dense_tflop_s']:.0f})"
        print(f"  {r['n']}x{r['k']} M={r['m']:<5} int4 {r['int4_us']:9.1f} us  dense {r['dense_bf16_us']:9.1f} us  "
              f"{r['speedup_vs_dense']:5.2f}x  {rate}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
