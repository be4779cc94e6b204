"""`python -m glm_jax.generate --ckpt CKPT --prompt "..." [--tokenizer tokenizer.json]
[--speculative mtp] [--max-new-tokens 200] [--temperature 0] [--top-p 1] [--top-k K]`

CKPT: a `train.py` workdir (its latest step), one of its step folders, or a checkpoint of
`convert_hf.py to-jax` (glm_jax.checkpoint_source). Without --tokenizer the text is
byte-level, as the embedded default data of train.py: bytes 0..255, the prompt starts with
the config's bos token and generation stops at its eos token. Tokens are printed as they
come, then tokens/s (and the MTP acceptance rate with --speculative mtp) on stderr.
"""

from __future__ import annotations

import argparse
import codecs
import os
import sys

import numpy as np

from glm_jax.checkpoint_source import resolve_checkpoint
from glm_jax.cli_errors import ArgumentParser, fail, report_user_errors
from glm_jax.config import GlmConfig
from glm_jax.convert import load_checkpoint
from glm_jax.generate import generate


class _ByteText:
    """Byte-level ids <-> text: ids < 256 are bytes, the rest are special tokens."""

    def __init__(self, config: GlmConfig):
        if config.vocab_size < 256:
            raise ValueError(f"byte-level text needs vocab_size >= 256, the checkpoint has "
                             f"{config.vocab_size}: pass --tokenizer")
        self.bos = config.bos_token_id
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def encode(self, text: str) -> list[int]:
        return ([self.bos] if self.bos is not None else []) + list(text.encode("utf-8"))

    def stream(self, ids: list[int]) -> str:
        return self._decoder.decode(bytes(i for i in ids if i < 256))


class _HubText:
    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(path)
        self._ids: list[int] = []
        self._shown = ""

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def stream(self, ids: list[int]) -> str:
        # Decoding the whole continuation each time keeps multi-token characters intact.
        self._ids += ids
        text = self.tok.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""  # an incomplete character: wait for its remaining tokens
        new, self._shown = text[len(self._shown):], text
        return new


PROG = "python -m glm_jax.generate"


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a train.py workdir (its latest step), one of "
                   "its step folders, or a checkpoint of glm-jax-convert to-jax")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--tokenizer", default=None, help="a HF tokenizers tokenizer.json (default: "
                   "byte-level text, as train.py's embedded data)")
    p.add_argument("--speculative", choices=("none", "mtp"), default="none",
                   help="mtp: the model's MTP layer drafts a token that the next step checks "
                   "(same output at temperature 0, fewer steps); needs an MTP layer")
    p.add_argument("--max-new-tokens", type=int, default=200,
                   help="stop after this many new tokens (or at an eos token)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: keep the smallest set of tokens with this much "
                   "probability (1 = off)")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample among the k most likely tokens (default: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampling")
    p.add_argument("--moe-backend", choices=("ragged_dot", "buckets", "dense"), default=None,
                   help="override the checkpoint's moe_backend (buckets on CPU, ragged_dot on "
                   "GPU/TPU)")
    return p


def main(argv: list[str] | None = None) -> None:
    p = _parser()
    args = p.parse_args(argv)
    if args.tokenizer and not os.path.isfile(args.tokenizer):
        p.error(f"--tokenizer {args.tokenizer}: no such file")
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1 or (
            args.top_k is not None and args.top_k < 1):
        p.error("need --max-new-tokens >= 1, --temperature >= 0, 0 < --top-p <= 1, "
                "--top-k >= 1")
    # A wrong path or option fails before jax does any work.
    source = report_user_errors(PROG, lambda: resolve_checkpoint(args.ckpt, what="--ckpt"))
    if args.speculative == "mtp" and source.config.num_mtp_layers == 0:
        fail(PROG, f"--speculative mtp: the checkpoint {args.ckpt} has no MTP layer "
             "(num_nextn_predict_layers 0); leave the flag out")
    if not args.tokenizer and source.config.vocab_size < 256:
        fail(PROG, f"--ckpt {args.ckpt}: its vocab_size {source.config.vocab_size} is too "
             "small for byte-level text; pass --tokenizer")

    options = {"moe_backend": args.moe_backend} if args.moe_backend else {}
    model = load_checkpoint(args.ckpt, **options)
    cfg = model.config
    text = _HubText(args.tokenizer) if args.tokenizer else _ByteText(cfg)
    eos = cfg.eos_token_id
    eos_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)

    def show(rows: list[list[int]]) -> None:
        sys.stdout.write(text.stream(rows[0]))
        sys.stdout.flush()

    sys.stdout.write(args.prompt)
    out = generate(model, [np.array(text.encode(args.prompt), np.int32)],
                   max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, top_k=args.top_k, eos_ids=eos_ids, seed=args.seed,
                   speculative=args.speculative, on_tokens=show)
    sys.stdout.write("\n")
    line = (f"[{int(out.lengths[0])} tokens; prefill {out.prefill_seconds:.2f}s (compilation "
            f"included); decode {out.decode_tokens_per_second():.1f} tokens/s over "
            f"{out.steps} steps (the first step, which compiles, left out)")
    if out.acceptance_rate is not None:
        line += f"; MTP acceptance {out.acceptance_rate:.1%} ({out.accepted}/{out.drafted})"
    print(line + "]", file=sys.stderr)


if __name__ == "__main__":
    main()
