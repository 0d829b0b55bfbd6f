"""`turboinfer` command line: generate, chat, models (and the commands other modules register).
Engine flags are generated from EngineConfig; a TurboInferError becomes one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import sys

from turboinfer.config import EngineConfig, add_cli_args, from_cli_args
from turboinfer.errors import InvalidRequestError, TurboInferError

SAMPLING_FLAGS = [
    # (flag, type, default, help)
    ("--max-tokens", int, 256, "most tokens to generate"),
    ("--temperature", float, 0.7, "sampling temperature; 0 is greedy"),
    ("--top-p", float, 0.9, "nucleus sampling: keep the smallest set of tokens whose probability reaches this"),
    ("--top-k", int, -1, "keep only the k most likely tokens (-1: off)"),
    ("--min-p", float, 0.0, "drop tokens less likely than this fraction of the most likely one"),
    ("--repetition-penalty", float, 1.0, "divide logits of tokens already seen (>1 discourages repeats)"),
    ("--presence-penalty", float, 0.0, "OpenAI presence penalty"),
    ("--frequency-penalty", float, 0.0, "OpenAI frequency penalty"),
    ("--seed", int, None, "seed for reproducible sampling"),
    ("--stop", str, None, "stop when this text appears (repeatable)"),
    ("--ignore-eos", bool, False, "keep generating past the end-of-sequence token (benchmarks)"),
]


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    for flag, typ, default, help_text in SAMPLING_FLAGS:
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


def cmd_generate(args) -> int:
    params = sampling_from_args(args)  # bad sampling values fail before the model loads
    llm = _make_llm(args)
    prompt = args.prompt
    if args.chat_template:
        prompt = llm.apply_chat_template([{"role": "user", "content": prompt}])
    try:
        for out in llm.stream(prompt, params):
            sys.stdout.write(out.outputs[0].delta)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
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
    while True:
        try:
            line = input(">>> ")
        except EOFError:
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
        reply = ""
        try:
            prompt = llm.apply_chat_template(history)
            for out in llm.stream(prompt, params):
                sys.stdout.write(out.outputs[0].delta)
                sys.stdout.flush()
                reply = out.outputs[0].text
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except TurboInferError as e:  # e.g. the conversation outgrew the context: say so, keep chatting
            history.pop()
            print(f"error: {e}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
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
