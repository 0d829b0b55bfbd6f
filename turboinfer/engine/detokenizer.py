"""Incremental detokenization and stop strings.

Decoding token by token breaks multi-byte characters and merges (a byte-level BPE token can be half a
UTF-8 character), so each step decodes a short window of recent tokens and emits only text that is
complete (does not end in U+FFFD). Stop strings are searched in the text, holding back the last
len(longest stop) - 1 characters so a stop string split across steps is never streamed out."""

from __future__ import annotations

from dataclasses import dataclass

from turboinfer.engine.request import Request


@dataclass
class DetokState:
    text: str = ""  # everything decoded so far (the stop string, once found, cut away)
    prefix_offset: int = 0  # window start in output_token_ids
    read_offset: int = 0  # tokens before this index are already in `text`
    sent: int = 0  # characters of `text` already handed to the user


class Detokenizer:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def update(self, req: Request) -> str | None:
        """Append the request's newest tokens to its text. Returns the stop string if one was hit."""
        st: DetokState = req.detok
        if st is None:
            st = req.detok = DetokState()
        p = req.params
        if not p.detokenize:
            return None
        ids = req.output_token_ids
        # A stop/EOS token that ended the request is not part of the text.
        end = len(ids)
        if req.is_finished and req.finish_reason == "stop" and end and not p.include_stop_str_in_output and \
                (ids[-1] in req.eos_token_ids or ids[-1] in p.stop_token_ids):
            end -= 1
        skip = p.skip_special_tokens
        prefix = self.tokenizer.decode(ids[st.prefix_offset:st.read_offset], skip_special_tokens=skip)
        full = self.tokenizer.decode(ids[st.prefix_offset:end], skip_special_tokens=skip)
        if len(full) > len(prefix) and (not full.endswith("\ufffd") or req.is_finished):
            new_text = full[len(prefix):]
            search_from = max(0, len(st.text) - max((len(s) for s in p.stop_list), default=0) + 1)
            st.text += new_text
            st.prefix_offset, st.read_offset = st.read_offset, end
            for stop in p.stop_list:
                at = st.text.find(stop, search_from)
                if at != -1:
                    st.text = st.text[: at + (len(stop) if p.include_stop_str_in_output else 0)]
                    return stop
        return None

    @staticmethod
    def take_delta(req: Request) -> str:
        """Text not yet handed out, minus a tail that might be the start of a stop string."""
        st: DetokState = req.detok
        if st is None:
            return ""
        hold = 0 if req.is_finished else max((len(s) for s in req.params.stop_list), default=1) - 1
        upto = max(st.sent, len(st.text) - hold)
        delta = st.text[st.sent:upto]
        st.sent = upto
        return delta
