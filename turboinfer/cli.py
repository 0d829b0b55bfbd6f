"""`turboinfer` command line: generate, chat, models (and the commands other modules register).
Engine flags are generated from EngineConfig; a TurboInferError becomes one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import sys

from turboinfer.config import EngineConfig, add_cli_args, from_cli_args
from turboinfer.errors import InvalidRequestError, TurboInferError

SAMPLING_FLAGS = [
    # (flag, type, help); defaults come from sampling_params (CLI_DEFAULTS, else the SamplingParams field)
    ("--max-tokens", int, "most tokens to generate"),
    ("--temperature", float, "sampling temperature; 0 is greedy"),
    ("--top-p", float, "nucleus sampling: keep the smallest set of tokens whose probability reaches this"),
    ("--top-k", int, "keep only the k most likely tokens (-1: off)"),
    ("--min-p", float, "drop tokens less likely than this fraction of the most likely one"),
    ("--repetition-penalty", float, "divide logits of tokens already seen (>1 discourages repeats)"),
    ("--presence-penalty", float, "OpenAI presence penalty"),
    ("--frequency-penalty", float, "OpenAI frequency penalty"),
    ("--seed", int, "seed for reproducible sampling"),
    ("--stop", str, "stop when this text appears (repeatable)"),
    ("--ignore-eos", bool, "keep generating past the end-of-sequence token (benchmarks)"),
]


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    from turboinfer.sampling_params import cli_default

    for flag, typ, help_text in SAMPLING_FLAGS:
        default = cli_default(flag[2:].replace("-", "_"))
        if flag == "--stop":
            p.add_argument(flag, action="append", default=None, help=help_text)
        elif typ is bool:
            p.add_argument(flag, action="store_true", help=help_text)
        elif flag == "--seed":
            p.add_argument(flag, type=typ, default=default, dest="sampling_seed", help=help_text)
        else:
            p.add_argument(flag, type=typ, default=default, help=f"{help_text} (default: {default})")


def sampling_from_args(args: argparse.Namespace):
    from turboinfer.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          seed=args.sampling_seed, stop=args.stop, ignore_eos=args.ignore_eos)


def _engine_parser(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    add_cli_args(p, EngineConfig, skip=("seed",))  # --seed is the per-request sampling seed here
    return p


def _make_llm(args):
    from turboinfer.llm import LLM

    cfg = from_cli_args(args, EngineConfig)
    print(f"Loading {cfg.model} ...", file=sys.stderr, flush=True)
    llm = LLM(**{k: v for k, v in vars(cfg).items()})
    print("\n".join(llm.engine.info.banner()), file=sys.stderr, flush=True)
    return llm


class CtrlC:
    """The SIGINT handler of `generate` and `chat`. Only at the chat prompt does Ctrl-C raise KeyboardInterrupt
    (so that input() returns); anywhere else it just sets `stop`, which the reply loop checks after each step.
    A KeyboardInterrupt raised at an arbitrary bytecode could land inside an engine step, the generator's abort,
    a write to stdout or a finalizer (where Python prints and drops it, and the reply runs on): deferring it
    makes every Ctrl-C during a reply end the same way, with the engine between steps."""

    def __init__(self) -> None:
        self.at_prompt = False  # input() is waiting: raise, once (the handler clears it, so a second press defers)
        self.stop = False  # Ctrl-C came while not at the prompt: end the reply after this step
        self._prev = None  # the handler to restore; None when none was installed

    def __call__(self, signum, frame) -> None:
        if self.at_prompt:
            self.at_prompt = False
            raise KeyboardInterrupt
        self.stop = True

    def leave_prompt(self) -> None:
        """input() returned: later presses stop the coming reply. In this order, a press in between raises."""
        self.stop = False
        self.at_prompt = False

    def __enter__(self) -> "CtrlC":
        import signal
        import threading

        # Only the main thread may set handlers; and a SIGINT the parent told us to ignore stays ignored.
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._prev = signal.signal(signal.SIGINT, self)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self._prev is not None:
            signal.signal(signal.SIGINT, self._prev)
            self._prev = None


def stream_reply(llm, prompt, params, ctrl_c: CtrlC) -> tuple[str, bool]:
    """Write one completion to stdout as it is generated. Returns (its text, whether Ctrl-C stopped it)."""
    text, stopped = "", False
    stream = llm.stream(prompt, params)
    try:
        for out in stream:
            sys.stdout.write(out.outputs[0].delta)
            sys.stdout.flush()
            text = out.outputs[0].text
            if ctrl_c.stop and not out.finished:
                stopped = True
                break
    finally:
        stream.close()  # aborts the request (frees its KV blocks) unless it finished
    return text, stopped


def cmd_generate(args) -> int:
    params = sampling_from_args(args)  # bad sampling values fail before the model loads
    llm = _make_llm(args)
    prompt = args.prompt
    if args.chat_template:
        prompt = llm.apply_chat_template([{"role": "user", "content": prompt}])
    with CtrlC() as ctrl_c:  # Ctrl-C ends the completion where it is
        stream_reply(llm, prompt, params, ctrl_c)
        sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    params = sampling_from_args(args)
    llm = _make_llm(args)
    if llm.get_tokenizer().chat_template is None:
        raise InvalidRequestError(f"the model {args.model or ''} has no chat template (a base model, not a chat "
                                  "one): use `turboinfer generate PROMPT` for plain completions")
    history: list[dict] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("Chat with the model. /reset clears the conversation, /exit (or Ctrl-D) quits, "
          "Ctrl-C stops a reply.", file=sys.stderr)
    with CtrlC() as ctrl_c:
        while True:
            try:
                ctrl_c.at_prompt = True
                line = input(">>> ")
                ctrl_c.leave_prompt()
            except EOFError:
                ctrl_c.leave_prompt()
                print(file=sys.stderr)
                return 0
            except KeyboardInterrupt:
                print("\n(use /exit or Ctrl-D to quit)", file=sys.stderr)
                continue
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit", "/bye"):
                return 0
            if text == "/reset":
                history = history[:1] if args.system else []
                print("(conversation cleared)", file=sys.stderr)
                continue
            history.append({"role": "user", "content": line})
            try:
                reply, stopped = stream_reply(llm, llm.apply_chat_template(history), params, ctrl_c)
            except TurboInferError as e:  # e.g. the conversation outgrew the context: say so, keep chatting
                history.pop()
                print(f"error: {e}", file=sys.stderr)
                continue
            sys.stdout.write(" [stopped]\n" if stopped else "\n")
            history.append({"role": "assistant", "content": reply})


def cmd_models(args) -> int:
    from turboinfer.loader.resolve import list_models

    rows = list_models()
    print(f"{'NAME':32} {'SOURCE':40} CACHED")
    for r in rows:
        print(f"{r['name']:32} {r['source']:40} {r.get('path') or '-'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turboinfer", description="Fast, correct LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = _engine_parser(sub, "generate", "complete a prompt and stream the text to stdout")
    p.add_argument("prompt", help="the text to continue")
    p.add_argument("--chat-template", action="store_true", help="wrap the prompt as a user turn of the chat template")
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = _engine_parser(sub, "chat", "interactive multi-turn chat with streamed replies")
    p.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("models", help="list model aliases and cached models")
    p.set_defaults(func=cmd_models)

    # Subcommands that live with their feature: each module has add_parser(subparsers) and run(args) -> int.
    for name, module in (("estimate", "turboinfer.cli_estimate"), ("serve", "turboinfer.server.cli"),
                         ("bench", "turboinfer.bench.cli"), ("quantize", "turboinfer.quantize_cli")):
        try:
            mod = __import__(module, fromlist=["add_parser"])
        except ModuleNotFoundError:
            continue
        mod.add_parser(sub)
        sub.choices[name].set_defaults(func=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except TurboInferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
