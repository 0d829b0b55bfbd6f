"""Benchmarks behind `turboinfer bench`: latency (batch-1 TTFT/TPOT), offline throughput, and load tests of
any OpenAI-compatible endpoint, optionally against HF transformers and llama.cpp on the same model. Each writes
a JSON record that benchmarks/report.py renders into BENCHMARKS.md."""
