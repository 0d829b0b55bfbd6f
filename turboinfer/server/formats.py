"""The JSON shapes of OpenAI's completions and chat completions, built from engine outputs: whole responses,
and stream chunks (which remember how much of each choice they already sent)."""

from __future__ import annotations

import time

from turboinfer.outputs import CompletionOutput, Logprob, RequestOutput


class ResponseFormat:
    """Shapes engine outputs into one endpoint's JSON. Streaming state (tokens already sent) lives here."""

    object_name = ""
    chunk_object_name = ""

    def __init__(self, rid: str, model: str, n: int, logprobs: int | None) -> None:
        self.rid, self.model, self.n, self.logprobs = rid, model, n, logprobs
        self.created = int(time.time())
        self.num_sent: dict[int, int] = {}  # choice index -> tokens already streamed
        self.done: set[int] = set()  # choice indices whose finish_reason was streamed

    def head(self, obj: str) -> dict:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model}

    def usage(self, finals: list[RequestOutput | None]) -> dict:
        prompt = sum(len(f.prompt_token_ids) for f in finals if f is not None)
        completion = sum(len(o.token_ids) for f in finals if f is not None for o in f.outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def usage_chunk(self, finals: list[RequestOutput | None]) -> dict:
        return {**self.head(self.chunk_object_name), "choices": [], "usage": self.usage(finals)}

    def opening_chunks(self, num_prompts: int) -> list[dict]:
        return []

    def chunks(self, prompt_idx: int, out: RequestOutput) -> list[dict]:
        choices = []
        for o in out.outputs:
            idx = prompt_idx * self.n + o.index
            start = self.num_sent.get(idx, 0)
            new_tokens = len(o.token_ids) - start
            finishing = o.finish_reason is not None and idx not in self.done
            if not o.delta and new_tokens <= 0 and not finishing:
                continue
            self.num_sent[idx] = len(o.token_ids)
            if finishing:
                self.done.add(idx)
            choices.append(self.stream_choice(idx, o, start, out))
        return [{**self.head(self.chunk_object_name), "choices": choices}] if choices else []

    def stream_choice(self, idx: int, o: CompletionOutput, start: int, out: RequestOutput) -> dict:
        raise NotImplementedError

    def response(self, finals: list[RequestOutput]) -> dict:
        raise NotImplementedError


def _top(position: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    return sorted(((t, lp) for t, lp in position.items() if lp.rank <= k), key=lambda x: x[1].rank)[:k]


class CompletionFormat(ResponseFormat):
    chunk_object_name = "text_completion"

    def __init__(self, rid: str, model: str, n: int, echo: list[str] | None, logprobs: int | None) -> None:
        super().__init__(rid, model, n, logprobs)
        self.echo = echo  # per prompt, the text to put before each completion
        self.echoed: set[int] = set()  # streamed choices that already carried their echo
        self.offsets: dict[int, int] = {}  # streamed choice -> text_offset of its next token

    def _logprobs(self, o: CompletionOutput, start: int, out: RequestOutput, offset: int,
                  with_prompt: bool) -> dict | None:
        if self.logprobs is None:
            return None
        tokens, token_lps, tops, offsets = [], [], [], []
        positions: list[tuple[int, dict | None]] = []
        if with_prompt and out.prompt_logprobs is not None:
            positions += list(zip(out.prompt_token_ids, out.prompt_logprobs))
        positions += list(zip(o.token_ids[start:], (o.logprobs or [])[start:]))
        for token_id, position in positions:
            lp = position.get(token_id) if position else None
            text = lp.decoded_token if lp is not None and lp.decoded_token is not None else ""
            tokens.append(text)
            token_lps.append(lp.logprob if lp is not None else None)
            tops.append({t.decoded_token or "": t.logprob for _, t in _top(position, self.logprobs)}
                        if position else None)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def stream_choice(self, idx: int, o: CompletionOutput, start: int, out: RequestOutput) -> dict:
        prefix = ""
        if self.echo is not None and idx not in self.echoed:
            self.echoed.add(idx)
            prefix = self.echo[idx // self.n]
        lps = self._logprobs(o, start, out, self.offsets.get(idx, 0), with_prompt=bool(prefix))
        if lps is not None and lps["tokens"]:
            self.offsets[idx] = lps["text_offset"][-1] + len(lps["tokens"][-1])
        return {"index": idx, "text": prefix + o.delta, "logprobs": lps, "finish_reason": o.finish_reason}

    def response(self, finals: list[RequestOutput]) -> dict:
        choices = []
        for p, out in enumerate(finals):
            for o in out.outputs:
                prefix = self.echo[p] if self.echo is not None else ""
                choices.append({"index": p * self.n + o.index, "text": prefix + o.text,
                                "logprobs": self._logprobs(o, 0, out, 0, with_prompt=self.echo is not None),
                                "finish_reason": o.finish_reason})
        return {**self.head("text_completion"), "choices": choices, "usage": self.usage(finals)}


class ChatFormat(ResponseFormat):
    chunk_object_name = "chat.completion.chunk"

    def _logprobs(self, o: CompletionOutput, start: int) -> dict | None:
        if self.logprobs is None:
            return None
        content = []
        for token_id, position in zip(o.token_ids[start:], (o.logprobs or [])[start:]):
            lp = position.get(token_id)
            text = lp.decoded_token if lp is not None and lp.decoded_token is not None else ""
            content.append({"token": text, "logprob": lp.logprob if lp is not None else None,
                            "bytes": list(text.encode("utf-8", "replace")),
                            "top_logprobs": [{"token": t.decoded_token or "", "logprob": t.logprob,
                                              "bytes": list((t.decoded_token or "").encode("utf-8", "replace"))}
                                             for _, t in _top(position, self.logprobs)]})
        return {"content": content, "refusal": None}

    def opening_chunks(self, num_prompts: int) -> list[dict]:
        return [{**self.head(self.chunk_object_name),
                 "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(self.n)]}]

    def stream_choice(self, idx: int, o: CompletionOutput, start: int, out: RequestOutput) -> dict:
        delta = {"content": o.delta} if o.delta else {}
        return {"index": idx, "delta": delta, "logprobs": self._logprobs(o, start),
                "finish_reason": o.finish_reason}

    def response(self, finals: list[RequestOutput]) -> dict:
        out = finals[0]
        choices = [{"index": o.index, "message": {"role": "assistant", "content": o.text},
                    "logprobs": self._logprobs(o, 0), "finish_reason": o.finish_reason}
                   for o in out.outputs]
        return {**self.head("chat.completion"), "choices": choices, "usage": self.usage(finals)}
