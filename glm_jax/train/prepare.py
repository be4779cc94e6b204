"""`python -m glm_jax.train.data prepare`: text / JSONL files -> a token folder for
`--config.data.path`.

Inputs: `.jsonl` / `.json` files hold one JSON object per line with the text under
`--text-key`; any other file is one document of UTF-8 text. Tokens come from a HuggingFace
`tokenizers` tokenizer.json, or with `--byte-level` from the byte-level scheme of train.py's
embedded default data (bytes 0..255, eos 256, bos 257), which the tiny configs' vocabulary
of 320 holds.

Real corpora have bad records. By default the first one stops the run with one line
naming file:line and the fault (malformed JSON, bytes that are not UTF-8, no text field,
text that is not a string); `--skip-bad-records` skips them and reports their count (and
the first few) at the end. Output is written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator

import numpy as np

from glm_jax.cli_errors import ArgumentParser, InputPathError, UserError, print_error
from glm_jax.train.data import (BYTE_BOS, BYTE_EOS, BYTE_VOCAB, META_FILE, STARTS_FILE,
                                TOKENS_FILE, Corpus, _pack_docs, load_token_dir)

PROG = "python -m glm_jax.train.data prepare"
BYTE_LEVEL = "byte-level"  # the tokenizer name recorded in meta.json


class BadRecord(UserError, ValueError):
    """A record of the input that cannot be read; the message is 'file:line: fault'."""


def _decode(raw: bytes, path: str, first_line: int) -> str:
    """UTF-8 text of `raw` (which starts at line `first_line` of `path`)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        newline = b"\n"
        line = first_line + raw.count(newline, 0, e.start)
        column = e.start - (raw.rfind(newline, 0, e.start) + 1) + 1
        raise BadRecord(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                        f"{column}); fix or drop the record, or pass --skip-bad-records"
                        ) from None


def _jsonl_records(path: str, text_key: str) -> Iterator[tuple[str, str | BadRecord]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                line = _decode(raw, path, lineno).rstrip("\r\n")
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BadRecord(f"{where}: not valid JSON ({e.msg} column {e.colno}); "
                                    "fix or drop the line, or pass --skip-bad-records") from None
                if not isinstance(record, dict) or text_key not in record:
                    fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise BadRecord(f"{where}: no {text_key!r} field (has {fields}); choose "
                                    "the field with --text-key, or pass --skip-bad-records")
                if not isinstance(record[text_key], str):
                    raise BadRecord(f"{where}: field {text_key!r} is a "
                                    f"{type(record[text_key]).__name__}, not text")
                yield where, record[text_key]
            except BadRecord as e:
                yield where, e


def read_documents(paths: list[str], text_key: str, *, skip_bad: bool,
                   skipped: list[str]) -> Iterator[str]:
    """The text of every document; bad records raise BadRecord, or with `skip_bad` are
    left out and their messages appended to `skipped`."""
    for path in paths:
        if path.endswith((".jsonl", ".json")):
            records = _jsonl_records(path, text_key)
        else:  # a text file is one document
            with open(path, "rb") as f:
                raw = f.read()
            try:
                records = iter([(path, _decode(raw, path, 1))])
            except BadRecord as e:
                records = iter([(path, e)])
        for _, text in records:
            if isinstance(text, BadRecord):
                if not skip_bad:
                    raise text
                skipped.append(str(text))
                continue
            yield text


def _byte_tokenizer(texts: list[str]) -> list[np.ndarray]:
    return [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]


def prepare(inputs: list[str], tokenizer_path: str | None, output: str, *,
            text_key: str = "text", bos_token: str | None = None,
            eos_token: str | None = None, skip_bad_records: bool = False,
            batch_docs: int = 256) -> tuple[Corpus, list[str]]:
    """Tokenize text / JSONL files into a token folder at `output`. tokenizer_path: a
    tokenizer.json, or None for byte-level tokens (bos/eos are then the byte scheme's).
    Returns (the corpus as loaded back, the messages of skipped records)."""
    missing = [p for p in inputs + ([tokenizer_path] if tokenizer_path else [])
               if not os.path.isfile(p)]
    if missing:
        raise InputPathError(f"no such file(s): {missing}")
    if tokenizer_path is None:
        if bos_token or eos_token:
            raise UserError("--bos-token / --eos-token name tokens of a --tokenizer; byte-level "
                            f"text always gets bos {BYTE_BOS} and eos {BYTE_EOS}")
        encode: Callable[[list[str]], list[np.ndarray]] = _byte_tokenizer
        bos, eos, vocab, name = BYTE_BOS, BYTE_EOS, BYTE_VOCAB, BYTE_LEVEL
    else:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(tokenizer_path)

        def special(token: str | None, flag: str) -> int | None:
            if token is None:
                return None
            tid = tok.token_to_id(token)
            if tid is None:
                raise UserError(f"{flag} {token!r}: not a token of {tokenizer_path}")
            return tid

        bos, eos = special(bos_token, "--bos-token"), special(eos_token, "--eos-token")
        vocab = tok.get_vocab_size(with_added_tokens=True)
        name = os.path.abspath(tokenizer_path)

        def encode(texts: list[str]) -> list[np.ndarray]:
            return [np.asarray(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]

    dtype = np.dtype(np.uint16 if vocab <= 2 ** 16 else np.int32)
    skipped: list[str] = []

    def encoded() -> Iterator[np.ndarray]:
        batch: list[str] = []
        for text in read_documents(inputs, text_key, skip_bad=skip_bad_records,
                                   skipped=skipped):
            batch.append(text)
            if len(batch) == batch_docs:
                yield from (ids.astype(dtype) for ids in encode(batch))
                batch = []
        if batch:
            yield from (ids.astype(dtype) for ids in encode(batch))

    try:
        tokens, starts = _pack_docs(encoded(), bos, eos, dtype)
    except ValueError as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{inputs}: {e}") from None  # no documents at all
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".prepare-", dir=parent)
    try:
        np.save(os.path.join(tmp, TOKENS_FILE), tokens)
        np.save(os.path.join(tmp, STARTS_FILE), starts)
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump({"tokenizer": name, "vocab_size": vocab, "bos_id": bos, "eos_id": eos,
                       "num_docs": int(starts.size), "num_tokens": int(tokens.size),
                       "skipped_records": len(skipped), "inputs": inputs}, f, indent=1)
        if os.path.exists(output):
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_token_dir(output), skipped


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m glm_jax.train.data",
                            description="Prepare training data for --config.data.path.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize text / JSONL into a token folder",
                       description=__doc__.split("\n\n", 1)[1])
    p.add_argument("inputs", nargs="+", help=".jsonl files (one JSON object per line) or "
                   "text files (one document each)")
    p.add_argument("--output", required=True, help="the token folder to write")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--tokenizer", help="a HF tokenizers tokenizer.json")
    which.add_argument("--byte-level", action="store_true", help="byte-level tokens (bytes "
                       f"0..255, eos {BYTE_EOS}, bos {BYTE_BOS}), as train.py's embedded data "
                       "and the tiny configs")
    p.add_argument("--text-key", "--text_key", default="text",
                   help="JSONL field holding the text (default: text)")
    p.add_argument("--bos-token", "--bos_token", default=None,
                   help="with --tokenizer: a token put before every document, e.g. '<s>'")
    p.add_argument("--eos-token", "--eos_token", default=None,
                   help="with --tokenizer: a token put after every document, e.g. '</s>'")
    p.add_argument("--skip-bad-records", action="store_true",
                   help="skip records that are not valid JSON / UTF-8 / have no text field, "
                   "and report their count (default: stop at the first)")
    args = parser.parse_args(argv)
    try:
        corpus, skipped = prepare(args.inputs, args.tokenizer, args.output,
                                  text_key=args.text_key, bos_token=args.bos_token,
                                  eos_token=args.eos_token,
                                  skip_bad_records=args.skip_bad_records)
    except UserError as e:
        sys.exit(print_error(PROG, e))
    if skipped:
        shown = "; ".join(skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
        print(f"skipped {len(skipped)} bad record(s): {shown}", file=sys.stderr)
    print(f"wrote {corpus.description}", file=sys.stderr)
