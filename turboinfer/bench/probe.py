"""Logits straight from an in-process engine's runner, for checking and measuring the decode paths: one prefill
of a whole sequence, and teacher-forced decoding through the whole-step decode backend (the C step), one token at
a time against the paged cache as generation runs it. Tools only: the engine itself never calls these."""

from __future__ import annotations

import contextlib

import torch

from turboinfer.engine.batch import NewRequestData, ScheduledSeq, SchedulerOutput
from turboinfer.sampling_params import SamplingParams

PROBE = "probe"


def runner_of(llm):
    """The model runner of an LLM whose engine runs its worker in this process."""
    return llm.engine.executor.worker.runner


@contextlib.contextmanager
def probe_request(llm, ids: list[int], num_rows: int):
    """A request of `ids` known to the runner, with cache blocks for `num_rows` rows; freed on exit."""
    eng, runner = llm.engine, runner_of(llm)
    if eng.kv.allocate_slots(PROBE, 0, num_rows) is None:
        raise RuntimeError(f"the KV cache has no room for {num_rows} probe rows")
    new = NewRequestData(PROBE, list(ids), len(ids), SamplingParams(max_tokens=1), frozenset(),
                         eng.kv.block_tables(PROBE))
    runner.requests.apply(SchedulerOutput([], [new], [], 0))
    try:
        yield runner
    finally:
        runner.requests.pop(PROBE, None)
        eng.kv.free(PROBE)


@torch.inference_mode()
def prefill(runner, num_tokens: int) -> torch.Tensor:
    """Run the probe's first num_tokens as one prefill (writing their K/V); -> logits [num_tokens, vocab]."""
    input_ids, positions, meta = runner.prepare([ScheduledSeq(PROBE, 0, num_tokens, False, False)])
    return runner.model.compute_logits(runner.model(input_ids, positions, meta)).float()


def full_logits(llm, ids: list[int]) -> torch.Tensor:
    """Full-sequence logits [len(ids), vocab] through the engine's paged-cache path (one prefill)."""
    with probe_request(llm, ids, len(ids)) as runner:
        return prefill(runner, len(ids))


@torch.inference_mode()
def teacher_forced_logits(llm, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), vocab]: the first position from a prefill, every later one from the decode backend."""
    with probe_request(llm, ids, len(ids)) as runner:
        backend = runner.decode_backend
        if backend is None:
            raise RuntimeError("this engine has no whole-step decode backend")
        rows = [prefill(runner, 1)]
        for i in range(1, len(ids)):
            rows.append(backend(runner.decode_batch([ScheduledSeq(PROBE, i, 1, True, False)])).float())
        return torch.cat(rows)
