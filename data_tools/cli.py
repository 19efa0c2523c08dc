"""The `data_tools` command line: synth, inspect, validate.

    data_tools synth --out DIR [--num 48 --seed 0 --size 64 --seconds 4 --fps 8 --holdout 4]
    data_tools inspect PREFIX [--shard NAME|POS] [--limit N] [--gif OUT.gif [--key KEY]]
    data_tools validate PREFIX

The preprocessing job itself is `trip preprocess --config ...` (pipelines/preprocess.py).
Exit codes: 0 fine, 1 the dataset has problems, 2 bad arguments or input.
"""

from __future__ import annotations

import argparse
import sys


def _synth(args: argparse.Namespace) -> int:
    from data_tools.synth import make_dataset

    csv_path = make_dataset(args.out, num=args.num, seed=args.seed, size=args.size,
                            seconds=args.seconds, fps=args.fps, holdout=args.holdout, motion=args.motion)
    print(f"synth: {args.num} videos + {args.holdout} hold-out first frames; CSV {csv_path}, "
          f"videos under {args.out}/videos (use preprocess.video_root={args.out}/videos)")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from data_tools.check import (
        bucket_lines,
        build_codec_from_index,
        describe_sample,
        sample_to_gif,
        shard_url,
    )
    from trip.data.shards import read_index, read_shard

    index = read_index(args.prefix)
    print(f"{args.prefix}: {index['num_samples']} samples in {len(index['shards'])} shards; "
          f"latents {index['latent_shape']} {index['latent_dtype']}, text {index.get('text_shape')}, "
          f"codec {index.get('codec', {}).get('kind')}, scaling factor {index.get('scaling_factor')}")
    for line in bucket_lines(index):
        print("  " + line)
    url = shard_url(args.prefix, index, args.shard)
    contents = read_shard(url)
    samples = contents.samples
    print(f"{url}: {len(contents.keys)} samples")
    for sample in samples[:args.limit]:
        print("  " + describe_sample(sample))
    for key, why in contents.bad.items():
        print(f"  {key}: bad sample: {why}")
    if contents.error:
        print(f"  {contents.error}")
    if args.gif:
        chosen = [s for s in samples if args.key in (None, s.key)]
        if not chosen:
            print(f"error: no sample with key {args.key!r} in {url}", file=sys.stderr)
            return 2
        codec = build_codec_from_index(index, args.codec_path)
        path = sample_to_gif(chosen[0], codec, args.gif, fps=args.fps, scale=args.scale)
        print(f"wrote {path} (sample {chosen[0].key}: {chosen[0].caption!r})")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from data_tools.check import validate_dataset

    index, problems = validate_dataset(args.prefix)
    for p in problems:
        print(f"problem: {p}")
    verdict = "OK" if not problems else f"{len(problems)} problem(s)"
    buckets = f" in {len(index['buckets'])} buckets" if index.get("buckets") else ""
    print(f"{args.prefix}: {len(index['shards'])} shards{buckets}, {index['num_samples']} samples: {verdict}")
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="data_tools", description="WebVid ingestion and latent shard tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic WebVid-format dataset of moving shapes")
    p.add_argument("--out", required=True, help="output directory (results.csv, videos/, holdout/)")
    p.add_argument("--num", type=int, default=48, help="number of videos")
    p.add_argument("--seed", type=int, default=0, help="same seed, same dataset")
    p.add_argument("--size", type=int, default=64, help="frame width and height (even)")
    p.add_argument("--seconds", type=float, default=4.0, help="clip length")
    p.add_argument("--fps", type=int, default=8, help="frame rate")
    p.add_argument("--holdout", type=int, default=4, help="extra first-frame images for sampling")
    p.add_argument("--motion", choices=["random", "by_color"], default="random",
                   help="by_color: each colour always moves the same way (learnable from the first frame)")
    p.set_defaults(func=_synth)

    p = sub.add_parser("inspect", help="print a shard's samples; decode one to a GIF")
    p.add_argument("prefix", help="dataset prefix holding index.json (path or URL)")
    p.add_argument("--shard", default=None, help="shard name or position (default: the first)")
    p.add_argument("--limit", type=int, default=10, help="samples to print")
    p.add_argument("--gif", default=None, help="write the first (or --key) sample as this GIF")
    p.add_argument("--key", default=None, help="sample key for --gif")
    p.add_argument("--codec-path", default=None, help="VAE directory, if not where index.json says")
    p.add_argument("--fps", type=int, default=4, help="GIF frame rate")
    p.add_argument("--scale", type=int, default=4, help="GIF enlargement (nearest neighbour)")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("validate", help="check every shard against index.json")
    p.add_argument("prefix", help="dataset prefix holding index.json (path or URL)")
    p.set_defaults(func=_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
