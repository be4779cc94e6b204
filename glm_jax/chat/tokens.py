"""Token ids for GLM-4.5's chat format, and the per-token loss mask of a rendered conversation.

Two tokenizers with one interface (`encode(text) -> (ids, char_starts)`, `decode(ids)`):
  * `HubChatTokenizer`: a hub tokenizer.json through HF `tokenizers`; the format's special
    tokens are the tokenizer's added tokens, found by name (a missing one is an error, except
    `/nothink`, which may also be ordinary text);
  * `ByteChatTokenizer`: the embedded byte-level default of `glm_jax.train.data` (bytes
    0..255, eos 256, bos 257, pad 258); `<|endoftext|>` is its eos and the other special
    tokens take the ids from 259 up, which the tiny configs' vocabulary (320) holds.

Both split the text on the special tokens' strings before anything else, as HF tokenizers
do with added tokens, so a special token's text in user content becomes that token, the same
as in a serving engine.

The loss mask comes from the renderer's character spans: a token is trained iff its first
character lies in a span. Span edges always sit at special-token boundaries (the spans
start after `<|assistant|>` and end after an end-of-turn token), so no token straddles one.
"""

from __future__ import annotations

import os
import re
from typing import Protocol

import numpy as np

from glm_jax.chat.render import ENDOFTEXT, NOTHINK, SPECIAL_TOKENS, Rendered
from glm_jax.train.data import BYTE_EOS, BYTE_PAD, BYTE_VOCAB

_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in
                                  sorted(SPECIAL_TOKENS, key=len, reverse=True)))


class ChatTokenizer(Protocol):
    vocab_size: int  # smallest model vocabulary that holds every id
    special_ids: dict[str, int]  # SPECIAL_TOKENS -> id (all but possibly /nothink)
    pad_id: int

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids [N] int32, start character of each token [N] int64)."""

    def decode(self, ids) -> str:
        """Text of `ids`, special tokens included."""


class ByteChatTokenizer:
    """UTF-8 bytes plus GLM-4.5's special tokens above the byte range."""

    def __init__(self):
        self.special_ids = {ENDOFTEXT: BYTE_EOS}
        for token in SPECIAL_TOKENS:
            if token not in self.special_ids:
                self.special_ids[token] = BYTE_VOCAB + len(self.special_ids) - 1
        self.vocab_size = max(self.special_ids.values()) + 1
        self.pad_id = BYTE_PAD
        self._names = {i: t for t, i in self.special_ids.items()}

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        ids: list[int] = []
        starts: list[int] = []
        pos = 0
        for m in [*_SPECIAL_RE.finditer(text), None]:
            end = m.start() if m else len(text)
            for i, ch in enumerate(text[pos:end], start=pos):
                raw = ch.encode("utf-8")
                ids.extend(raw)
                starts.extend([i] * len(raw))
            if m:
                ids.append(self.special_ids[m.group()])
                starts.append(m.start())
                pos = m.end()
        return np.asarray(ids, np.int32), np.asarray(starts, np.int64)

    def decode(self, ids) -> str:
        out, raw = [], bytearray()
        for i in np.asarray(ids).reshape(-1).tolist():
            if i < 256:
                raw.append(i)
                continue
            out.append(raw.decode("utf-8", errors="replace"))
            raw = bytearray()
            out.append(self._names.get(i, ""))  # bos / pad / unknown ids have no text
        out.append(raw.decode("utf-8", errors="replace"))
        return "".join(out)


class HubChatTokenizer:
    """A hub tokenizer.json (e.g. GLM-4.5's) through HF `tokenizers`."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer {path!r}: no such file (a hub tokenizer.json)")
        self._tok = Tokenizer.from_file(path)
        self.special_ids = {}
        for token in SPECIAL_TOKENS:
            tid = self._tok.token_to_id(token)
            if tid is None and token == NOTHINK:
                # The mode switch is plain text to the format: a tokenizer that does not
                # hold it as one token still renders it right (as ordinary text).
                continue
            if tid is None:
                raise ValueError(f"tokenizer {path}: special token {token!r} of GLM-4.5's chat "
                                 "format is not in its vocabulary (use GLM-4.5's tokenizer.json)")
            self.special_ids[token] = tid
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.pad_id = self.special_ids[ENDOFTEXT]  # GLM-4.5 pads with <|endoftext|>

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        enc = self._tok.encode(text, add_special_tokens=False)
        return (np.asarray(enc.ids, np.int32),
                np.asarray([start for start, _ in enc.offsets], np.int64))

    def decode(self, ids) -> str:
        return self._tok.decode(np.asarray(ids).reshape(-1).tolist(), skip_special_tokens=False)


def load_chat_tokenizer(path: str | None) -> ChatTokenizer:
    """A hub tokenizer.json, or the byte-level default when `path` is empty."""
    return HubChatTokenizer(path) if path else ByteChatTokenizer()


def tokenize(rendered: Rendered, tokenizer: ChatTokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(ids [N] int32, loss_mask [N] uint8): 1 on the tokens the model writes."""
    ids, starts = tokenizer.encode(rendered.text)
    mask = np.zeros(ids.shape, np.uint8)
    for a, b in rendered.spans:
        mask[(starts >= a) & (starts < b)] = 1
    return ids, mask
