"""Quantized linear methods. A method owns how a Linear stores its weight and does its matmul; loading
code hands a Linear decomposed quantized shards and `finalize_quantized` swaps the method in."""
