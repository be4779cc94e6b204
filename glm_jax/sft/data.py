"""SFT data: conversations -> token ids + a per-token `loss_mask` -> a `Corpus` that
`glm_jax.train.data.make_dataset(..., whole_documents=True)` packs like pretraining data.

A conversations file is JSONL, one conversation per line:

    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...,
                   "reasoning_content": ..., "tool_calls": [...]}, ...],
     "tools": [...]}                                    (optional; other keys are ignored)

Each conversation is rendered in GLM-4.5's format (`glm_jax.chat.render`) and tokenized;
its loss mask is 1 on what the model writes (reasoning, content, tool calls and the
end-of-turn token of every assistant turn) and 0 on everything else (system, user, tool
results, role tokens). A malformed record fails with `file:line: what is wrong`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from glm_jax.chat.render import ChatFormatError, render
from glm_jax.chat.tokens import ChatTokenizer, tokenize
from glm_jax.train.data import Corpus


def read_conversations(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (`path:line`, record) for every non-blank line of a JSONL file."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot open the conversations file ({e.strerror})"
                                ) from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})"
                                 ) from None
            if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
                raise ValueError(f"{where}: a record must be an object with a \"messages\" "
                                 "list")
            yield where, record


def encode_conversation(record: Mapping[str, Any], tokenizer: ChatTokenizer,
                        where: str = "conversation") -> tuple[np.ndarray, np.ndarray]:
    """(ids [N] int32, loss_mask [N] uint8) of one record; errors are prefixed by `where`."""
    try:
        rendered = render(record["messages"], record.get("tools"), for_training=True)
    except ChatFormatError as e:
        raise ValueError(f"{where}: {e}") from None
    return tokenize(rendered, tokenizer)


def conversation_corpus(records: Iterable[tuple[str, Mapping[str, Any]]],
                        tokenizer: ChatTokenizer, description: str) -> Corpus:
    """Tokenize (where, record) pairs into one Corpus with a per-token loss_mask."""
    ids, masks, starts, offset = [], [], [], 0
    for where, record in records:
        tokens, mask = encode_conversation(record, tokenizer, where)
        starts.append(offset)
        ids.append(tokens)
        masks.append(mask)
        offset += tokens.size
    if not ids:
        raise ValueError(f"{description}: no conversations")
    dtype = np.uint16 if tokenizer.vocab_size <= 2 ** 16 else np.int32
    tokens = np.concatenate(ids).astype(dtype)
    weights = np.concatenate(masks).astype(np.float32)
    return Corpus(tokens, np.asarray(starts, np.int64), tokenizer.vocab_size,
                  f"{description}: {len(ids)} conversations, {tokens.size} tokens, "
                  f"{int(weights.sum())} trained", loss_mask=weights)


def load_conversations(paths: list[str], tokenizer: ChatTokenizer) -> Corpus:
    """JSONL conversation files -> Corpus (see the module docstring)."""

    def records():
        for path in paths:
            yield from read_conversations(path)

    return conversation_corpus(records(), tokenizer, ", ".join(paths))


def embedded_corpus(tokenizer: ChatTokenizer, *, seed: int = 0, train_problems: int = 2000,
                    eval_problems: int = 100, tasks: tuple[str, ...] | None = None,
                    max_digits: int | None = None) -> tuple[Corpus, list[dict[str, Any]]]:
    """The embedded default task set (glm_jax.sft.tasks; `tasks` a subset of its TASKS,
    default all; `max_digits` its difficulty cap): (training Corpus, held-out records)."""
    from glm_jax.sft.tasks import TASKS, default_sft_set

    train, held_out = default_sft_set(seed, train_problems, eval_problems, tasks or TASKS,
                                      max_digits)
    corpus = conversation_corpus(((f"embedded record {r['id']}", r) for r in train), tokenizer,
                                 f"embedded task set (seed {seed})")
    return corpus, held_out


def export_embedded(output: str, *, seed: int = 0, train_problems: int = 2000,
                    eval_problems: int = 100) -> None:
    """Write the embedded task set as `output`/train.jsonl and `output`/held_out.jsonl
    (each written to a temporary file, then renamed)."""
    import os
    import tempfile

    from glm_jax.sft.tasks import default_sft_set

    train, held_out = default_sft_set(seed, train_problems, eval_problems)
    os.makedirs(output, exist_ok=True)
    for name, records in (("train.jsonl", train), ("held_out.jsonl", held_out)):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=output)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for record in records:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
            os.replace(tmp, os.path.join(output, name))
        except BaseException:
            os.unlink(tmp)
            raise


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m glm_jax.sft.data")
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write the embedded task set as JSONL")
    e.add_argument("output", help="folder for train.jsonl and held_out.jsonl")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--train_problems", type=int, default=2000)
    e.add_argument("--eval_problems", type=int, default=100)
    c = sub.add_parser("check", help="tokenize JSONL conversations and report (or the error)")
    c.add_argument("inputs", nargs="+")
    c.add_argument("--tokenizer", default=None, help="a hub tokenizer.json (default: bytes)")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            if args.train_problems < 1 or args.eval_problems < 0:
                raise ValueError("--train_problems must be >= 1 and --eval_problems >= 0")
            export_embedded(args.output, seed=args.seed, train_problems=args.train_problems,
                            eval_problems=args.eval_problems)
            print(f"wrote {args.output}/train.jsonl ({2 * args.train_problems} records) and "
                  f"held_out.jsonl ({2 * args.eval_problems})", file=sys.stderr)
        else:
            from glm_jax.chat.tokens import load_chat_tokenizer

            corpus = load_conversations(args.inputs, load_chat_tokenizer(args.tokenizer))
            print(corpus.description)
    except (OSError, ValueError) as err:
        print(f"python -m glm_jax.sft.data: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
