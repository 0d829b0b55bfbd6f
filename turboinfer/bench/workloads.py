"""What the benchmarks send: seeded prompt and output lengths, token-id prompts for the offline engines, and
text prompts for HTTP endpoints (random words, a shared prefix, or a ShareGPT file).

Everything draws from one `random.Random(seed)`, so a run is repeatable and two engines see the same work."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from turboinfer.errors import InvalidRequestError

# Common English words that byte-level BPE vocabularies keep as one token (with their leading space), so a
# prompt of N words is close to N tokens for most tokenizers. The count is approximate by design: an HTTP
# endpoint's tokenizer is not ours to know.
WORDS = list(dict.fromkeys("""the of and to in is was for on that with as by at from his it an were are which this
be or has had but not also first one their its new after who they two have her she been other when time during
there into school more may years over only year most would world city some where between later three state such then
national used made known under many university united while part season team these american than film second
born south became states war through being including both until north before high however people family early
history album area them series against work company river end group since next called well found number game
make each year home life road water light house small large long great little good place part way story state
point city play day night music word book paper market price power field voice river plant ocean stone animal
color table window garden letter summer winter morning evening island bridge forest""".split()))


@dataclass(frozen=True)
class LengthSpec:
    """A token count: fixed ("128") or drawn uniformly from an inclusive range ("100:1024")."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str | int, what: str = "length") -> "LengthSpec":
        try:
            parts = [int(p) for p in str(text).split(":")]
        except ValueError:
            raise InvalidRequestError(f"{what} {text!r} is not N or LOW:HIGH") from None
        if len(parts) == 1:
            parts *= 2
        if len(parts) != 2 or parts[0] < 1 or parts[1] < parts[0]:
            raise InvalidRequestError(f"{what} {text!r} must be N or LOW:HIGH with 1 <= LOW <= HIGH")
        return cls(parts[0], parts[1])

    def sample(self, rng: random.Random, n: int) -> list[int]:
        return [rng.randint(self.low, self.high) for _ in range(n)]

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"


def random_token_prompts(rng: random.Random, lengths: list[int], vocab_size: int,
                         skip_ids: frozenset[int] = frozenset()) -> list[list[int]]:
    """Token-id prompts (no tokenizer needed, exact lengths). Special ids are left out so no prompt contains
    an EOS or a chat-turn marker that some engine might treat specially."""
    allowed = [i for i in range(min(vocab_size, 200_000)) if i not in skip_ids]
    return [[allowed[rng.randrange(len(allowed))] for _ in range(n)] for n in lengths]


def random_text(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


@dataclass
class ServeRequest:
    prompt: str
    prompt_len: int  # target (random workloads) or estimated (datasets) prompt tokens; the server's usage wins
    output_len: int  # max_tokens sent


def random_workload(rng: random.Random, num: int, input_len: LengthSpec, output_len: LengthSpec) -> list[ServeRequest]:
    ins, outs = input_len.sample(rng, num), output_len.sample(rng, num)
    return [ServeRequest(random_text(rng, i), i, o) for i, o in zip(ins, outs)]


def shared_prefix_workload(rng: random.Random, num: int, prefix_len: int, input_len: LengthSpec,
                           output_len: LengthSpec) -> list[ServeRequest]:
    """Every prompt starts with the same `prefix_len` words (a system prompt, a document) followed by its own
    `input_len` words: an engine with prefix caching prefills the prefix once."""
    prefix = random_text(rng, prefix_len)
    ins, outs = input_len.sample(rng, num), output_len.sample(rng, num)
    return [ServeRequest(prefix + " " + random_text(rng, i), prefix_len + i, o) for i, o in zip(ins, outs)]


def _estimate_tokens(text: str, tokenizer) -> int:
    if tokenizer is not None:
        return len(tokenizer.encode(text, add_special_tokens=False))
    return max(1, round(len(text) / 4))  # ~4 characters per token for English BPE vocabularies


def _first_exchange(item: dict) -> tuple[str, str] | None:
    """(user text, reply text) of a ShareGPT entry: {"conversations": [{"from": "human", "value": ...}, ...]};
    OpenAI-style {"role", "content"} turns are read too."""
    turns = item.get("conversations") or item.get("conversation") or item.get("messages") or []
    texts = []
    for t in turns:
        if not isinstance(t, dict):
            return None
        texts.append((t.get("from") or t.get("role") or "", t.get("value") or t.get("content") or ""))
    for (who, text), (_, reply) in zip(texts, texts[1:]):
        if who in ("human", "user") and text.strip() and reply.strip():
            return text, reply
    return None


def sharegpt_workload(rng: random.Random, num: int, path: str, output_len: LengthSpec | None = None,
                      tokenizer=None, max_prompt_len: int | None = None) -> list[ServeRequest]:
    """Prompts are the first user turns of a ShareGPT-format JSON file; each request asks for as many tokens
    as the recorded reply had (or `output_len`). Entries are shuffled with the seed; the file is cycled if it
    holds fewer than `num` usable conversations."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidRequestError(f"cannot read dataset {path}: {e}") from None
    if not isinstance(data, list):
        raise InvalidRequestError(f"dataset {path} must be a JSON list of conversations")
    pairs = [p for p in (_first_exchange(x) for x in data if isinstance(x, dict)) if p]
    if not pairs:
        raise InvalidRequestError(f"dataset {path} has no conversation with a user turn followed by a reply")
    rng.shuffle(pairs)
    reqs = []
    for k in range(num):
        prompt, reply = pairs[k % len(pairs)]
        n_in = _estimate_tokens(prompt, tokenizer)
        if max_prompt_len is not None and n_in > max_prompt_len:
            words = prompt.split()
            prompt = " ".join(words[:max(1, len(words) * max_prompt_len // n_in)])
            n_in = _estimate_tokens(prompt, tokenizer)
        n_out = output_len.sample(rng, 1)[0] if output_len else _estimate_tokens(reply, tokenizer)
        reqs.append(ServeRequest(prompt, n_in, n_out))
    return reqs


def poisson_arrivals(rng: random.Random, num: int, rate: float) -> list[float]:
    """Send times in seconds from the start: exponential gaps of mean 1/rate (all zero for rate = inf)."""
    if rate == float("inf"):
        return [0.0] * num
    t, times = 0.0, []
    for _ in range(num):
        times.append(t)
        t += rng.expovariate(rate)
    return times
