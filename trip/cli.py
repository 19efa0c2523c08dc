"""The `trip` command line: one subcommand per job, each with --help.

Heavy modules (torch, ray, deepspeed) are imported only by the subcommand that needs them,
so `trip --help` and `trip config validate` answer instantly.
"""

from __future__ import annotations

import argparse
import importlib
import sys


def add_config_args(p: argparse.ArgumentParser) -> None:
    """The run config (positional FILE or --config/-c FILE) and --set, shared by every job
    entry point (trip CLI and pipelines/*.py); parse with `parse_args` below."""
    p.add_argument("config_file", nargs="?", default=None, metavar="FILE",
                   help="run config YAML (see pipelines/configs/); same as --config")
    p.add_argument("--config", "-c", default=None, metavar="FILE", help="run config YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=100 (repeatable)")
    add_verbose_arg(p, default=argparse.SUPPRESS)


def add_verbose_arg(p: argparse.ArgumentParser, default: object = False) -> None:
    p.add_argument("--verbose", "-v", action="store_true", default=default,
                   help="show everything: debug logs, every rank's, and the dependencies' "
                        "(same as TRIP_LOG_LEVEL=debug)")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """`parser.parse_args`, then one run config path in `args.config`, whichever way it was
    given; argparse's usage error when there is none or two different ones. Sets up the
    console (`trip.log`) for this process, with --verbose if given."""
    from trip.log import set_verbose, setup

    args = parser.parse_args(argv)
    setup()
    set_verbose(bool(getattr(args, "verbose", False)))
    if hasattr(args, "config_file"):
        if args.config_file and args.config and args.config_file != args.config:
            parser.error(f"two run configs given: {args.config_file} and --config {args.config}")
        args.config = args.config_file or args.config
        if not args.config:
            parser.error(f"{getattr(args, 'command', None) or parser.prog}: a run config is required "
                         "(FILE or --config FILE)")
    return args


def _config_cmd(args: argparse.Namespace) -> int:
    from trip.config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)  # a ConfigError is reported by main()
    if args.action == "show":
        print(dump_config(cfg), end="")
    else:
        print(f"{args.config}: OK (config hash {cfg.hash()})")
    return 0


def _dispatch(target: str):
    module, func = target.split(":")

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), func)(args) or 0

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trip", description="TRIP image-to-video training platform")
    add_verbose_arg(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("config", help="show or validate a run config")
    p.add_argument("action", choices=["show", "validate"])
    add_config_args(p)
    p.set_defaults(func=_config_cmd)

    p = sub.add_parser("sample", help="image (+ caption) -> video with a trained TRIP model")
    p.add_argument("--model", required=True, help="TRIP model directory (trip export output, either format; "
                                                   "local or URL)")
    p.add_argument("--image", required=True, action="append",
                   help="first-frame image (png/jpg) or a video whose first frame is used (repeatable)")
    p.add_argument("--out", default="outputs/samples", help="output directory for MP4 and GIF files")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: model's sample config, 50)")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=None, help="random seed (same seed, same video)")
    p.add_argument("--fps", type=int, default=None, help="frame rate of the written files")
    p.add_argument("--prompt", default=None, help="caption (models trained with a text encoder only)")
    p.add_argument("--lora", default=None, help="LoRA adapters to add (a `trip export` of a LoRA run; local or URL)")
    p.add_argument("--png", action="store_true", help="also write every frame side by side as a lossless PNG")
    p.add_argument("--height", type=int, default=None, help="frame height in pixels (default: the trained size)")
    p.add_argument("--width", type=int, default=None, help="frame width in pixels (default: the trained size)")
    p.add_argument("--num-frames", type=int, default=None,
                   help="frames per video, up to the model's (default: the trained count)")
    p.set_defaults(func=_dispatch("trip.sampling:cli"))

    p = sub.add_parser("preprocess", help="WebVid CSV + videos -> latent shards (Ray job, a task a shard)")
    add_config_args(p)
    p.set_defaults(func=_dispatch("pipelines.preprocess:cli"))

    p = sub.add_parser("train", help="train with Ray Train + DeepSpeed ZeRO-3")
    add_config_args(p)
    p.set_defaults(func=_dispatch("pipelines.train:cli"))

    p = sub.add_parser("export", help="checkpoint -> TRIP model directory (diffusers pipeline layout)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (local or URL)")
    p.add_argument("--out", required=True, help="output model directory (local or URL)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument("--format", choices=["diffusers", "trip"], default="diffusers",
                   help="diffusers: a TRIPPipeline directory (model_index.json, unet/, fusion/, scheduler/, vae/, "
                        "model card); trip: config.json + model.safetensors")
    p.add_argument("--merge-lora", action="store_true",
                   help="LoRA runs: write the base model with the adapters merged in, instead of the adapters "
                        "alone (diffusers' pytorch_lora_weights.safetensors for TRIPPipeline.load_lora_weights)")
    p.set_defaults(func=_dispatch("trip.train.export:cli"))

    p = sub.add_parser("eval", help="PSNR, SSIM, motion, F-Consistency, FVD and FID of generated videos")
    p.add_argument("--generated", required=True, help="directory of generated MP4/GIF clips")
    p.add_argument("--reference", default=None, help="directory of reference clips or a latent shard set (PSNR/SSIM/motion of same-named clips; FVD/FID)")
    p.add_argument("--clip", default=None, help="CLIP model directory (for F-Consistency)")
    p.add_argument("--i3d", default=None, help="I3D weights (TorchScript or state dict) for FVD")
    p.add_argument("--inception", default=None, help="Inception weights (TorchScript or state dict) for FID")
    p.add_argument("--out", default="eval_report.json", help="JSON report path")
    p.add_argument("--num-frames", type=int, default=None,
                   help="frames per clip used by every metric (default: the shortest clip's length)")
    p.add_argument("--device", default="auto", help="torch device for the networks (auto: cuda if available)")
    p.add_argument("--limit", type=int, default=None, help="use at most this many clips of each set")
    p.add_argument("--codec", default=None,
                   help="VAE directory decoding a latent shard set given as --generated/--reference "
                        "(default: the one named in its index.json)")
    p.set_defaults(func=_dispatch("trip.eval.cli:main"))
    return parser


def main(argv: list[str] | None = None) -> int:
    from trip.config import ConfigError

    args = parse_args(build_parser(), argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError) as e:
        # user errors (bad config, missing path): one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
