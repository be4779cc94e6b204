"""Convert GLM-4.5 checkpoints between the HuggingFace hub layout and glm-jax (orbax).

    python convert_hf.py to-jax --hf DIR --out CKPT [--dtype bfloat16] [--drop-mtp | --init-mtp]
    python convert_hf.py to-hf --ckpt CKPT --out DIR [--max-shard-size 5GB] [--no-mtp-copies]
                               [--fp8 channel|block]

to-jax reads FP8 hub folders (GLM-4.5-FP8's per-channel `weight_scale`, DeepSeek-style
128 x 128 `weight_scale_inv`), detected from config.json, dequantized to --dtype.

to-hf's CKPT is a train.py workdir (its latest step), one of its step folders, or a
checkpoint written by to-jax. Both stream a tensor group at a time (memory does not grow
with depth); see glm_jax/convert.py.
"""

from __future__ import annotations

import sys

PROG = "glm-jax-convert"


def _parser():
    from glm_jax.cli_errors import ArgumentParser

    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    to_jax = sub.add_parser("to-jax", help="hub safetensors folder -> orbax checkpoint")
    to_jax.add_argument("--hf", required=True, help="folder with config.json and *.safetensors")
    to_jax.add_argument("--out", required=True, help="checkpoint directory to create")
    to_jax.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="cast weights (default: keep each tensor's dtype)")
    mtp = to_jax.add_mutually_exclusive_group()
    mtp.add_argument("--drop-mtp", action="store_const", const="drop", dest="missing_mtp",
                     help="a folder saved by transformers (no MTP layer): convert without "
                     "MTP (num_nextn_predict_layers 0 in the output)")
    mtp.add_argument("--init-mtp", action="store_const", const="init", dest="missing_mtp",
                     help="a folder saved by transformers (no MTP layer): initialise a fresh "
                     "MTP layer, to train it")
    to_jax.add_argument("--seed", type=int, default=0, help="random seed of --init-mtp")
    to_hf = sub.add_parser("to-hf", help="glm-jax checkpoint -> hub safetensors folder")
    to_hf.add_argument("--ckpt", required=True, help="a train.py workdir (latest step), one "
                       "of its step folders, or a checkpoint written by to-jax")
    to_hf.add_argument("--out", required=True, help="folder to create")
    to_hf.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB (default 5GB)")
    to_hf.add_argument("--no-mtp-copies", action="store_true",
                       help="leave out the MTP layer's copies of the embedding and head")
    to_hf.add_argument("--fp8", choices=["channel", "block"], default=None,
                       help="write the decoder Linears in float8_e4m3fn: 'channel' = "
                            "GLM-4.5-FP8's compressed-tensors layout, 'block' = 128x128 "
                            "weight_scale_inv (DeepSeek-V3 / transformers quant_method fp8)")
    for p in (to_jax, to_hf):
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    from glm_jax.cli_errors import UserError, print_error
    from glm_jax.convert import convert_to_hf, convert_to_jax

    try:
        if args.command == "to-jax":
            stats = convert_to_jax(args.hf, args.out, dtype=args.dtype,
                                   progress=not args.no_progress,
                                   missing_mtp=args.missing_mtp, seed=args.seed)
        else:
            stats = convert_to_hf(args.ckpt, args.out, max_shard_size=args.max_shard_size,
                                  mtp_copies=not args.no_mtp_copies, fp8_layout=args.fp8,
                                  progress=not args.no_progress)
    except (UserError, FileExistsError) as e:
        return print_error(PROG, e)
    if stats.get("mtp") == "dropped":
        print("no MTP layer in the folder: converted without it (num_nextn_predict_layers 0)")
    elif stats.get("mtp") == "initialised":
        print(f"no MTP layer in the folder: initialised a fresh one (seed {args.seed})")
    read = stats.get("read_bytes", stats["bytes"])
    print(f"wrote {args.out}: {stats['bytes'] / 1e6:.1f} MB in the output dtypes, from "
          f"{read / 1e6:.1f} MB read, in {stats['seconds']:.1f} s "
          f"({read / 1e6 / max(stats['seconds'], 1e-9):.1f} MB/s read)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
