"""Convert GLM-4.5 checkpoints between the HuggingFace hub layout and glm-jax (orbax).

    python convert_hf.py to-jax --hf DIR --out CKPT [--dtype bfloat16]
    python convert_hf.py to-hf --ckpt CKPT --out DIR [--max-shard-size 5GB] [--no-mtp-copies]
                               [--fp8 channel|block]

to-jax reads FP8 hub folders (GLM-4.5-FP8's per-channel `weight_scale`, DeepSeek-style
128 x 128 `weight_scale_inv`), detected from config.json, dequantized to --dtype.

Both stream a tensor group at a time (memory does not grow with depth); see glm_jax/convert.py.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="glm-jax-convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    to_jax = sub.add_parser("to-jax", help="hub safetensors folder -> orbax checkpoint")
    to_jax.add_argument("--hf", required=True, help="folder with config.json and *.safetensors")
    to_jax.add_argument("--out", required=True, help="checkpoint directory to create")
    to_jax.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="cast weights (default: keep each tensor's dtype)")
    to_hf = sub.add_parser("to-hf", help="orbax checkpoint -> hub safetensors folder")
    to_hf.add_argument("--ckpt", required=True, help="checkpoint directory written by to-jax")
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
    args = parser.parse_args(argv)

    from glm_jax.convert import convert_to_hf, convert_to_jax
    from glm_jax.safetensors_io import ConversionError

    try:
        if args.command == "to-jax":
            stats = convert_to_jax(args.hf, args.out, dtype=args.dtype,
                                   progress=not args.no_progress)
        else:
            stats = convert_to_hf(args.ckpt, args.out, max_shard_size=args.max_shard_size,
                                  mtp_copies=not args.no_mtp_copies, fp8_layout=args.fp8,
                                  progress=not args.no_progress)
    except (ConversionError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {stats['bytes'] / 1e6:.1f} MB in {stats['seconds']:.1f} s "
          f"({stats['bytes'] / 1e6 / max(stats['seconds'], 1e-9):.1f} MB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
