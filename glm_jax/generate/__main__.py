"""`python -m glm_jax.generate --ckpt CKPT --prompt "..." [--tokenizer tokenizer.json]
[--speculative mtp] [--max-new-tokens 200] [--temperature 0] [--top-p 1] [--top-k K]`

CKPT: a checkpoint of `convert_hf.py to-jax`, or of `train.py` (its workdir, its
`checkpoints` folder (latest step) or one step folder). Without --tokenizer the text is
byte-level, as the embedded default data of train.py: bytes 0..255, the prompt starts with
the config's bos token and generation stops at its eos token. Tokens are printed as they
come, then tokens/s (and the MTP acceptance rate with --speculative mtp) on stderr.
"""

from __future__ import annotations

import argparse
import codecs
import os
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from glm_jax import orbax_stream
from glm_jax.config import GlmConfig
from glm_jax.generate import generate
from glm_jax.model.transformer import GlmForCausalLM


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A folder holding the 'params' and 'config' items: `path` itself, its latest step
    (a CheckpointManager root), or that of its `checkpoints` folder (a train.py workdir)."""
    path = Path(path).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"--ckpt {path}: no such folder")
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    steps = [d for d in path.iterdir() if d.name.isdigit() and d.is_dir()]
    if steps:
        path = max(steps, key=lambda d: int(d.name))
    if not ((path / "params").is_dir() and (path / "config").is_dir()):
        raise FileNotFoundError(f"--ckpt {path}: not a glm-jax checkpoint (expected 'params' "
                                "and 'config' items, as train.py and convert_hf.py write)")
    return path


def load_model(path: str | os.PathLike, **compute_options) -> GlmForCausalLM:
    """Load a train.py checkpoint (its config item is the run config, with a 'model'
    section) or a converter checkpoint (config item = the hub config.json)."""
    import orbax.checkpoint as ocp

    path = resolve_checkpoint(path)
    stored = orbax_stream.read_config(path)
    if "model" not in stored:
        from glm_jax.convert import load_checkpoint

        return load_checkpoint(path, **compute_options)
    config = GlmConfig.from_dict({**stored["model"], **compute_options})
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GlmForCausalLM(config,
                                                                       rngs=nnx.Rngs(0))))
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(state))
    pure = ocp.StandardCheckpointer().restore(path / "params", target)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m glm_jax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--tokenizer", default=None, help="a tokenizers tokenizer.json")
    p.add_argument("--speculative", choices=("none", "mtp"), default="none")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--moe-backend", default=None, help="override the config's moe_backend")
    args = p.parse_args(argv)
    if args.tokenizer and not os.path.isfile(args.tokenizer):
        p.error(f"--tokenizer {args.tokenizer}: no such file")
    resolve_checkpoint(args.ckpt)  # a wrong path fails before jax does any work

    options = {"moe_backend": args.moe_backend} if args.moe_backend else {}
    model = load_model(args.ckpt, **options)
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
