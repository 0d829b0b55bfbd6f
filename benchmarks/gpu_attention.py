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
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
