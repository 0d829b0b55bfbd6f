"""The offline Python API, shaped like vLLM's: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from typing import Iterator, Sequence

from turboinfer.config import EngineConfig
from turboinfer.engine.engine import Engine
from turboinfer.errors import InvalidRequestError
from turboinfer.outputs import RequestOutput
from turboinfer.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict[str, str]


class LLM:
    def __init__(self, model: str | None = None, **kwargs) -> None:
        if model is not None:
            kwargs["model"] = model
        self.config = EngineConfig(**kwargs)
        self.engine = Engine(self.config)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams |
                 Sequence[SamplingParams] | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion, batched continuously; outputs come back in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise InvalidRequestError(f"{len(sampling_params)} sampling params for {len(prompts)} prompts")
            params = list(sampling_params)
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        # Validate every prompt and parameter set before queueing any, so a bad one leaves nothing half-run behind.
        token_ids = [self.engine.tokenize_prompt(p) for p in prompts]
        for sp in params:
            self.engine.check_params(sp)
        ids = []
        try:
            for p, tok, sp in zip(prompts, token_ids, params):
                ids.append(self.engine.add_request(tok, sp, prompt_text=p if isinstance(p, str) else None))
            return self._run(ids, use_tqdm and len(prompts) > 1)
        except BaseException:
            for rid in ids:  # Ctrl-C or an error mid-run: nothing stays queued or holds KV blocks
                self.engine.abort(rid)
            raise

    def _run(self, ids: list[str], progress: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="Processed prompts", unit="prompt", dynamic_ncols=True)
        wanted = set(ids)
        while len(results) < len(ids) and self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished and out.request_id in wanted:
                    results[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [results[i] for i in ids]

    def chat(self, messages: list[Message] | list[list[Message]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, add_generation_prompt) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        tok = self.engine.tokenizer
        text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        # The template already writes BOS where the model wants it; don't add a second one.
        return tok.encode(text, add_special_tokens=False)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield a RequestOutput per step for one prompt (its `outputs[0].delta` is the new text).
        Closing the generator early (Ctrl-C, break) aborts the request and frees its blocks."""
        rid = self.engine.add_request(prompt, sampling_params)
        done = False
        try:
            while not done and self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.request_id == rid:
                        done = out.finished
                        yield out
        finally:
            if not done:
                self.engine.abort(rid)
