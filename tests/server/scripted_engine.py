"""A stand-in for Engine with the same public surface, scripted and instant, for testing the layers above it
(AsyncEngine, the HTTP app) without a model."""

from __future__ import annotations

import time
from types import SimpleNamespace

from turboinfer.errors import InvalidRequestError
from turboinfer.outputs import CompletionOutput, RequestOutput

VOCAB = 128


class CharTokenizer:
    """One token per character (code point mod 128)."""

    eos_token_ids = frozenset()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % VOCAB for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


class ScriptedEngine:
    """Each running request emits one token ("a", "b", ...) per step until max_tokens (the prompt "endless"
    never ends: it runs until aborted); at most `max_running` run at once (the rest wait, in order); step() can
    be told to fail."""

    max_model_len = 256

    def __init__(self, max_running: int = 64, step_delay: float = 0.002) -> None:
        self.tokenizer = CharTokenizer()
        self.info = SimpleNamespace(vocab_size=VOCAB, max_model_len=self.max_model_len, model="scripted")
        self.max_running = max_running
        self.requests: dict[str, dict] = {}
        self.endless_ids = self.tokenizer.encode("endless")
        self.children: dict[str, list] = {}  # AsyncEngine copies prompt text onto these; none here
        self.aborted: list[str] = []
        self.fail_steps = 0
        self.num_has_unfinished_calls = 0
        self.step_delay = step_delay

    def tokenize_prompt(self, prompt):
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        return ids

    def check_params(self, params) -> None:
        params.validate()

    def add_request(self, prompt, params, request_id, prompt_text=None):
        self.requests[request_id] = {"ids": self.tokenize_prompt(prompt), "params": params, "out": []}
        return request_id

    def has_unfinished(self) -> bool:
        self.num_has_unfinished_calls += 1
        return bool(self.requests)

    def abort(self, request_id: str) -> None:
        if self.requests.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def step(self) -> list[RequestOutput]:
        time.sleep(self.step_delay)
        if self.fail_steps:
            self.fail_steps -= 1
            raise RuntimeError("kernel exploded")
        outs = []
        for rid, r in list(self.requests.items())[:self.max_running]:
            r["out"].append(chr(ord("a") + len(r["out"]) % 26))
            done = len(r["out"]) >= r["params"].max_tokens and r["ids"] != self.endless_ids
            outs.append(RequestOutput(
                request_id=rid, prompt=None, prompt_token_ids=r["ids"], prompt_logprobs=None, finished=done,
                outputs=[CompletionOutput(index=0, text="".join(r["out"]), token_ids=list(range(len(r["out"]))),
                                          cumulative_logprob=None, logprobs=None, delta=r["out"][-1],
                                          finish_reason="length" if done else None)]))
            if done:
                del self.requests[rid]
        return outs

    def stats(self) -> dict:
        running = min(len(self.requests), self.max_running)
        used = min(running, 8)  # one block per running request, 8 blocks in all
        return {"num_running": running, "num_waiting": len(self.requests) - running, "kv_usage": used / 8,
                "num_free_blocks": 8 - used, "num_blocks": 8, "prefix_cache_hit_rate": 0.0, "num_preemptions": 0}
