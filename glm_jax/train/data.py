"""Training data: documents -> packed `seq_len` rows -> a grain pipeline.

Two sources:
  * the embedded default: the Python standard library's own `.py` files (every Python
    install carries them, so plain `python train.py` needs no download), byte-level tokens:
    bytes 0..255, eos 256, bos 257 (the tiny config's specials);
  * a token folder written by `python -m glm_jax.train.data prepare` from text / JSONL files
    with a HuggingFace `tokenizers` tokenizer.json.

Either way a corpus is one flat token array (every document is [bos] + tokens + [eos]) plus
the start offset of each document, and optionally a per-token `loss_mask` (SFT conversations,
`glm_jax.sft.data`: 1 on the tokens the model writes, 0 on the prompt).

Two packings, both with `segment_ids` numbering the documents inside a row from 1 and
`positions` counting from 0 at every document start:
  * `PackedRows` (pretraining), concatenate-and-chunk: row i is tokens[i*T:(i+1)*T]; a
    document continued from the previous row restarts its positions at the row start. No
    token is padding, and the loss masks every target that belongs to another document.
  * `DocumentRows` (SFT), whole documents: documents are placed in corpus order, each in the
    current row if it still has room, else in a new one (next-fit), never split; the rest of
    a row is padding with segment id 0 and loss mask 0. A document longer than a row is cut to
    the row (its tail is lost; the count is reported).

The grain pipeline shuffles rows by seed (a new permutation each epoch), repeats forever,
batches, and gives process p of P the batches p, p+P, p+2P, ... of the global stream, so
a global batch is the same rows whatever the process count. Its iterator state is small
(an index per worker) and goes into every checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator

import grain
import numpy as np

BYTE_EOS, BYTE_BOS, BYTE_PAD = 256, 257, 258
BYTE_VOCAB = 259  # smallest vocab_size that holds the byte tokenizer


@dataclasses.dataclass(frozen=True)
class Corpus:
    tokens: np.ndarray  # [N] flat token ids (uint16 / int32; may be a memmap)
    doc_starts: np.ndarray  # [D] int64, sorted, doc_starts[0] == 0
    vocab_size: int  # smallest model vocab that holds every id
    description: str
    loss_mask: np.ndarray | None = None  # [N] float32: 1 where the token is a target

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])


def _pack_docs(docs: Iterable[np.ndarray], bos: int | None, eos: int | None,
               dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    pieces, starts, offset = [], [], 0
    for doc in docs:
        parts = ([np.array([bos], dtype)] if bos is not None else []) + [doc.astype(dtype)] + (
            [np.array([eos], dtype)] if eos is not None else [])
        doc = np.concatenate(parts)
        if doc.size == 0:
            continue
        starts.append(offset)
        pieces.append(doc)
        offset += doc.size
    if not pieces:
        raise ValueError("the corpus has no documents")
    return np.concatenate(pieces), np.asarray(starts, np.int64)


def stdlib_corpus(max_bytes: int) -> Corpus:
    """The standard library's `.py` files (no site-packages, no test suites), in sorted path
    order, byte tokens; at most `max_bytes` bytes of text (0 = all)."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorted in place so the walk order, and hence the corpus, is deterministic.
        dirnames[:] = sorted(d for d in dirnames if d not in
                             ("site-packages", "dist-packages", "test", "tests", "__pycache__"))
        paths += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    docs, total = [], 0
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        if max_bytes and total + len(data) > max_bytes:
            break
        docs.append(np.frombuffer(data, np.uint8))
        total += len(data)
    if not docs:
        raise FileNotFoundError(f"no Python source files under the stdlib folder {root}")
    tokens, starts = _pack_docs(docs, BYTE_BOS, BYTE_EOS, np.dtype(np.uint16))
    return Corpus(tokens, starts, BYTE_VOCAB,
                  f"embedded: {len(docs)} stdlib .py files from {root}, {total / 1e6:.1f} MB, bytes")


# ---------------------------------------------------------------- token folders
TOKENS_FILE, STARTS_FILE, META_FILE = "tokens.npy", "doc_starts.npy", "meta.json"


def load_token_dir(path: str) -> Corpus:
    """A folder written by `prepare`; memory-mapped, so workers share the pages."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"data.path={path!r}: no such folder (write one with "
                                "`python -m glm_jax.train.data prepare`, or leave data.path "
                                "empty for the embedded default)")
    for name in (TOKENS_FILE, STARTS_FILE, META_FILE):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"data.path={path!r}: missing {name}; not a prepared "
                                    "token folder")
    with open(os.path.join(path, META_FILE)) as f:
        meta = json.load(f)
    tokens = np.load(os.path.join(path, TOKENS_FILE), mmap_mode="r")
    starts = np.load(os.path.join(path, STARTS_FILE))
    return Corpus(tokens, starts, int(meta["vocab_size"]),
                  f"{path}: {meta['num_docs']} docs, {tokens.shape[0]} tokens, "
                  f"tokenizer {meta['tokenizer']}")


def _read_documents(paths: list[str], text_key: str) -> Iterator[str]:
    for path in paths:
        if path.endswith((".jsonl", ".json")):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if text_key not in record:
                        raise KeyError(f"{path}:{lineno}: no {text_key!r} field")
                    yield record[text_key]
        else:  # a text file is one document
            with open(path, encoding="utf-8") as f:
                yield f.read()


def prepare(inputs: list[str], tokenizer_path: str, output: str, *, text_key: str = "text",
            bos_token: str | None = None, eos_token: str | None = None,
            batch_docs: int = 256) -> Corpus:
    """Tokenize text / JSONL files with a HF `tokenizers` tokenizer.json into a token folder.
    Written to a temporary folder next to `output`, then renamed."""
    from tokenizers import Tokenizer

    missing = [p for p in inputs + [tokenizer_path] if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"prepare: no such file(s): {missing}")
    tok = Tokenizer.from_file(tokenizer_path)

    def special(name: str | None) -> int | None:
        if name is None:
            return None
        tid = tok.token_to_id(name)
        if tid is None:
            raise ValueError(f"prepare: token {name!r} is not in {tokenizer_path}")
        return tid

    bos, eos = special(bos_token), special(eos_token)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = np.dtype(np.uint16 if vocab <= 2 ** 16 else np.int32)

    def encoded() -> Iterator[np.ndarray]:
        batch: list[str] = []
        for text in _read_documents(inputs, text_key):
            batch.append(text)
            if len(batch) == batch_docs:
                yield from (np.asarray(e.ids, dtype) for e in
                            tok.encode_batch(batch, add_special_tokens=False))
                batch = []
        if batch:
            yield from (np.asarray(e.ids, dtype) for e in
                        tok.encode_batch(batch, add_special_tokens=False))

    tokens, starts = _pack_docs(encoded(), bos, eos, dtype)
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".prepare-", dir=parent)
    try:
        np.save(os.path.join(tmp, TOKENS_FILE), tokens)
        np.save(os.path.join(tmp, STARTS_FILE), starts)
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump({"tokenizer": os.path.abspath(tokenizer_path), "vocab_size": vocab,
                       "bos_id": bos, "eos_id": eos, "num_docs": int(starts.size),
                       "num_tokens": int(tokens.size), "inputs": inputs}, f, indent=1)
        if os.path.exists(output):
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_token_dir(output)


# ---------------------------------------------------------------- packing + grain
class PackedRows:
    """grain random-access source: row i of the concatenated corpus, with document
    segment ids (1, 2, ... inside the row) and in-document positions."""

    def __init__(self, corpus: Corpus, seq_len: int):
        self.tokens, self.doc_starts, self.seq_len = corpus.tokens, corpus.doc_starts, seq_len
        self._len = corpus.num_tokens // seq_len

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        lo = int(i) * self.seq_len
        idx = np.arange(lo, lo + self.seq_len, dtype=np.int64)
        doc = np.searchsorted(self.doc_starts, idx, side="right") - 1
        return {"tokens": np.asarray(self.tokens[lo:lo + self.seq_len], np.int32),
                "segment_ids": (doc - doc[0] + 1).astype(np.int32),
                # A document continued from the previous row restarts at 0 too: positions
                # stay below seq_len, as they will be at inference.
                "positions": (idx - np.maximum(self.doc_starts[doc], lo)).astype(np.int32)}


class DocumentRows:
    """grain random-access source: whole documents packed next-fit into `seq_len` rows,
    padded with `pad_id` (segment id 0, position 0, loss mask 0). Rows carry
    `loss_mask` [T] float32 (the corpus's, or 1 on every document token)."""

    def __init__(self, corpus: Corpus, seq_len: int, pad_id: int):
        self.corpus, self.seq_len, self.pad_id = corpus, seq_len, pad_id
        starts = corpus.doc_starts
        ends = np.append(starts[1:], corpus.num_tokens)
        lengths = np.minimum(ends - starts, seq_len)
        self.truncated = int(np.sum(ends - starts > seq_len))
        rows, used = [[]], 0  # each row: the indices of its documents
        for d, n in enumerate(lengths.tolist()):
            if used + n > seq_len:
                rows.append([])
                used = 0
            rows[-1].append(d)
            used += n
        self._rows = [r for r in rows if r]
        self._lengths = lengths

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        c, t = self.corpus, self.seq_len
        out = {"tokens": np.full(t, self.pad_id, np.int32),
               "segment_ids": np.zeros(t, np.int32),
               "positions": np.zeros(t, np.int32),
               "loss_mask": np.zeros(t, np.float32)}
        pos = 0
        for seg, d in enumerate(self._rows[int(i)], start=1):
            lo, n = int(c.doc_starts[d]), int(self._lengths[d])
            out["tokens"][pos:pos + n] = c.tokens[lo:lo + n]
            out["segment_ids"][pos:pos + n] = seg
            out["positions"][pos:pos + n] = np.arange(n)
            out["loss_mask"][pos:pos + n] = (
                1.0 if c.loss_mask is None else c.loss_mask[lo:lo + n])
            pos += n
        return out


def make_corpus(data_cfg) -> Corpus:
    return load_token_dir(data_cfg.path) if data_cfg.path else stdlib_corpus(data_cfg.max_bytes)


def make_dataset(corpus: Corpus, *, seq_len: int, global_batch: int, seed: int,
                 process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                 worker_buffer_size: int = 2, whole_documents: bool = False,
                 pad_id: int = BYTE_PAD) -> grain.IterDataset:
    """The endless stream of this process's batches: dicts of [global_batch / processes,
    seq_len] arrays (tokens / segment_ids / positions int32; with whole_documents=True also
    loss_mask float32, and rows are `DocumentRows` padded with `pad_id`)."""
    if global_batch % process_count:
        raise ValueError(f"train.batch_size={global_batch} must divide over the "
                         f"{process_count} processes")
    local_batch = global_batch // process_count
    rows = (DocumentRows(corpus, seq_len, pad_id) if whole_documents
            else PackedRows(corpus, seq_len))
    if len(rows) < global_batch:
        raise ValueError(f"the corpus ({corpus.num_tokens} tokens) gives {len(rows)} rows of "
                         f"seq_len={seq_len}, fewer than one batch of {global_batch}")
    ds = (grain.MapDataset.source(rows).shuffle(seed=seed).repeat(None)
          .batch(local_batch, drop_remainder=True))
    ds = ds[process_index::process_count]  # this host's slice of every global batch
    it = ds.to_iter_dataset()
    if num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (library use)
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=worker_buffer_size))
    return it


# ---------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m glm_jax.train.data")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize text / JSONL into a token folder")
    p.add_argument("inputs", nargs="+", help=".txt files (one document each) or .jsonl")
    p.add_argument("--tokenizer", required=True, help="a HF tokenizers tokenizer.json")
    p.add_argument("--output", required=True, help="the token folder to write")
    p.add_argument("--text_key", default="text", help="JSONL field holding the text")
    p.add_argument("--bos_token", default=None, help="e.g. '<|begin_of_text|>'")
    p.add_argument("--eos_token", default=None, help="e.g. '<|endoftext|>'")
    args = parser.parse_args(argv)
    corpus = prepare(args.inputs, args.tokenizer, args.output, text_key=args.text_key,
                     bos_token=args.bos_token, eos_token=args.eos_token)
    print(f"wrote {corpus.description}", file=sys.stderr)


if __name__ == "__main__":
    main()
