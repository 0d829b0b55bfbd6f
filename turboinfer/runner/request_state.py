"""What a worker remembers about each request between steps, rebuilt from the step contract's plain data
(engine/batch.py): its tokens, its block tables, and its seeded generator. The runner owns these; it never sees the
engine's Request objects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from turboinfer.engine.batch import CachedRequestData, NewRequestData, SchedulerOutput
from turboinfer.sampling_params import SamplingParams


@dataclass
class RequestState:
    request_id: str
    token_ids: list[int]  # prompt + outputs, as the engine sent them
    num_prompt_tokens: int
    params: SamplingParams
    eos_token_ids: frozenset[int]
    block_ids: list[list[int]]  # per KV group
    generator: Any = None  # torch.Generator for a seeded request, made on its first random draw; kept across
    # preemption so a resumed request draws the same numbers it would have

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


class RequestStates(dict):
    """request id -> RequestState, updated from each SchedulerOutput before the step runs."""

    def apply(self, sched: SchedulerOutput) -> None:
        for rid in sched.finished_ids:
            self.pop(rid, None)
        for rid in sched.preempted_ids:  # its blocks are gone; it comes back as a new request with fresh tables
            state = self.get(rid)
            if state is not None:
                state.block_ids = [[] for _ in state.block_ids]
        for new in sched.new_requests:
            self._add(new)
        for diff in sched.cached_requests:
            self._update(diff)

    def _add(self, new: NewRequestData) -> None:
        old = self.get(new.request_id)
        self[new.request_id] = RequestState(new.request_id, list(new.token_ids), new.num_prompt_tokens, new.params,
                                            new.eos_token_ids, [list(t) for t in new.block_ids],
                                            old.generator if old is not None else None)

    def _update(self, diff: CachedRequestData) -> None:
        state = self[diff.request_id]
        state.token_ids.extend(diff.new_token_ids)
        for table, ids in zip(state.block_ids, diff.new_block_ids):
            table.extend(ids)
