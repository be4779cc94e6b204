"""`python -m glm_jax.chat --ckpt CKPT [--tokenizer tokenizer.json] [--no-think]
[--system TEXT] [--message TEXT] [--no-tools] [--max-new-tokens N] [--temperature T]`

An interactive chat in GLM-4.5's format with a checkpoint of train.py or convert_hf.py.
Reasoning and answer print separately; when the model calls the calculator tool, the call
runs and its result goes back to the model. --no-think is the non-thinking mode (/nothink).
--message asks one question and exits (no prompt loop). Without --tokenizer the text is the
byte-level default (the tiny configs' vocabulary). An empty line or end of input quits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from glm_jax.cli_errors import ArgumentParser, fail

PROG = "python -m glm_jax.chat"


def _fail(message: str) -> None:
    fail(PROG, message)


def _show(message: dict, out=sys.stdout) -> None:
    if message["role"] == "tool":
        print(f"[tool result] {message['content']}", file=out)
        return
    if message.get("reasoning_content"):
        print(f"[reasoning] {message['reasoning_content']}", file=out)
    for call in message.get("tool_calls", ()):
        fn = call["function"]
        print(f"[tool call] {fn['name']}({json.dumps(fn['arguments'], ensure_ascii=False)})",
              file=out)
    if message.get("content") or not message.get("tool_calls"):
        print(f"[answer] {message['content']}", file=out)
    out.flush()


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a train.py workdir or checkpoint folder")
    p.add_argument("--tokenizer", default=None, help="a hub tokenizer.json (GLM-4.5's)")
    p.add_argument("--no-think", action="store_true", help="non-thinking mode (/nothink)")
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--message", default=None, help="ask this and exit")
    p.add_argument("--no-tools", action="store_true", help="do not offer the calculator")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    # Every check on the arguments before jax starts.
    if args.max_new_tokens < 1:
        _fail(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    if args.temperature < 0:
        _fail(f"--temperature {args.temperature}: must be >= 0")
    if args.tokenizer and not os.path.isfile(args.tokenizer):
        _fail(f"--tokenizer {args.tokenizer}: no such file (a hub tokenizer.json)")
    from glm_jax.chat.tokens import load_chat_tokenizer
    from glm_jax.checkpoint_source import resolve_checkpoint
    from glm_jax.convert import load_checkpoint

    try:
        resolve_checkpoint(args.ckpt, what="--ckpt")
        tokenizer = load_chat_tokenizer(args.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))

    from glm_jax.chat.session import Conversation, model_policy, respond
    from glm_jax.sft.calculator import CALCULATOR_TOOL
    from glm_jax.sft.evaluate import run_tool

    model = load_checkpoint(args.ckpt)
    try:
        policy = model_policy(model, tokenizer, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, seed=args.seed)
    except ValueError as e:
        _fail(f"--ckpt {args.ckpt}: {e} (pass the tokenizer the model was trained with)")
    conversation = Conversation(
        [{"role": "system", "content": args.system}] if args.system else [],
        None if args.no_tools else [CALCULATOR_TOOL], thinking=not args.no_think)
    mode = "non-thinking" if args.no_think else "thinking"
    if args.message is None:
        print(f"[{mode} mode; an empty line quits]", file=sys.stderr)
    while True:
        if args.message is not None:
            text = args.message
        else:
            try:
                text = input("user> ")
            except EOFError:
                break
            if not text.strip():
                break
        conversation.messages.append({"role": "user", "content": text})
        respond([conversation], policy, tokenizer, run_tool,
                on_message=lambda _, message: _show(message))
        if not conversation.finished:
            print(f"[cut off at --max-new-tokens {args.max_new_tokens}]", file=sys.stderr)
        if args.message is not None:
            break


if __name__ == "__main__":
    main()
