"""The executor: what the engine calls to run a step, and the only thing that knows where workers live.

The engine hands it a `SchedulerOutput` and gets a `ModelOutput` back (engine/batch.py: plain data). The
in-process executor owns one worker in this process; a multi-process one (tensor / pipeline parallel ranks,
torchrun across machines) would pickle the same two messages to its ranks. Either way the engine sees only
this interface and the frozen `EngineInfo` a worker reports once it has started, never the worker itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from turboinfer.engine.batch import ModelOutput, SchedulerOutput
from turboinfer.kv_cache.spec import KVCacheGroup


@dataclass(frozen=True)
class EngineInfo:
    """Facts a started engine reports to its front doors (CLI banner, server /v1/models, benchmarks)."""

    model: str  # display name (alias, file or directory)
    path: str  # the .gguf file or the model directory it was loaded from
    model_format: str  # "gguf" | "hf_dir"
    architecture: str  # HF class name
    dtype: str  # compute dtype name
    device: str  # "cpu", "cuda", "cuda:1"
    max_model_len: int  # longest prompt + completion a request may reach
    vocab_size: int
    eos_token_ids: frozenset[int]  # the model's and the tokenizer's end-of-sequence ids
    block_size: int
    kv_cache_groups: tuple[KVCacheGroup, ...]  # sized pools, one per layer spec (kv_cache/spec.py)
    kv_cache_bytes: int  # every KV tensor allocated, codes and scales
    weight_bytes: int  # parameters plus every tensor a quantized method keeps (what a decode step reads)
    load_seconds: float
    num_packed_layers: int  # linear layers computing from quantized weights
    decode_path: str  # which whole-step decode backend serves small decode steps ("" for none)
    memory_lines: tuple[str, ...] = field(default=())  # the estimator's breakdown with what was allocated

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the cache holds across sequences, counted in its largest group (full attention if any)."""
        return max((g.num_blocks - 1) for g in self.kv_cache_groups) * self.block_size

    def banner(self) -> list[str]:
        """What the CLI and the server print once at start-up."""
        lines = [f"Loaded {self.model} ({self.architecture}, {self.dtype}, {self.device}) in {self.load_seconds:.1f}s; "
                 f"KV cache {self.kv_capacity_tokens} tokens, max_model_len {self.max_model_len}"]
        if self.decode_path:
            lines.append(self.decode_path)
        if self.memory_lines:
            lines.append("Memory (turboinfer estimate's arithmetic, filled with what was allocated):")
            lines += self.memory_lines
        return lines


class Executor(Protocol):
    info: EngineInfo
    tokenizer: object

    def execute(self, sched: SchedulerOutput) -> ModelOutput: ...

    def kv_cache_resident_bytes(self) -> int | None: ...

    def shutdown(self) -> None: ...


class InProcessExecutor:
    """One worker in this process: the CPU and single-GPU case."""

    def __init__(self, config) -> None:
        from turboinfer.runner.worker import create_worker  # the torch side, kept out of the engine's imports

        self.worker = create_worker(config)
        self.info: EngineInfo = self.worker.info
        self.tokenizer = self.worker.tokenizer

    def execute(self, sched: SchedulerOutput) -> ModelOutput:
        return self.worker.runner.execute(sched)

    def kv_cache_resident_bytes(self) -> int | None:
        return self.worker.runner.kv_cache_resident_bytes()

    def shutdown(self) -> None:
        pass
