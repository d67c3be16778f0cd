"""The `ember` command line."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from runtime.sampling_params import SamplingParams


def _generate(args: argparse.Namespace) -> int:
    from runtime.llm import LLM

    print(f"loading {args.model} ...", file=sys.stderr)
    llm = LLM(args.model, max_model_len=args.max_model_len)
    engine = llm.engine
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise ValueError(f"model {args.model!r} has no tokenizer, so no chat template")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    history: list[dict[str, Any]] = []
    interactive = args.prompt is None
    if interactive:
        print("Ember interactive generation. Type a message; /reset clears the chat, /quit leaves.", file=sys.stderr)
    while True:
        if interactive:
            try:
                line = input("you> ").strip()
            except EOFError:
                print(file=sys.stderr)
                return 0
            if line in ("/quit", "/exit"):
                return 0
            if line == "/reset":
                history.clear()
                continue
            if not line:
                continue
        else:
            line = args.prompt
        history.append({"role": "user", "content": line})
        prompt = list(tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True, return_dict=False))
        req = engine.add_request(prompt, params)
        print("ember> " if interactive else "", end="", flush=True)
        text = ""
        while engine.has_unfinished:
            for out in engine.step():
                if out.request_id == req.request_id:
                    print(out.delta_text, end="", flush=True)
                    text = out.text
                    if out.finished:
                        print(f"\n[{len(out.token_ids)} tokens, {out.num_cached_tokens} prompt tokens cached, {out.finish_reason}]", file=sys.stderr)
        print()
        history.append({"role": "assistant", "content": text})
        if not interactive:
            return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ember", description="Ember: an inference runtime for AI agents")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="interactive generation on a model, in this process")
    g.add_argument("--model", default="smollm2-135m", help="smollm2-135m, a .gguf file or a Hugging Face directory")
    g.add_argument("--prompt", help="generate once for this prompt and exit")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--max-model-len", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        return _generate(args)
    except ValueError as e:
        print(f"ember: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
