"""The `posttrain` command line: one entry point with subcommands.

    posttrain scenes generate --seeds 0:64 --frames 16 --size 64 --workers 2 --out data/tabletop
    posttrain models init --arch llama --layers 4 --width 128 --out models/llama-wm
    posttrain --help
"""

from __future__ import annotations

import argparse
import os
import sys


def _scenes_generate(args: argparse.Namespace) -> int:
    from posttrain.envs3d import SceneConfig, generate_dataset, parse_seeds

    config = SceneConfig(image_size=args.size).override(args.scene or [])
    seeds = parse_seeds(args.seeds)
    out = generate_dataset(seeds, args.frames, args.out, config, workers=args.workers,
                           overwrite=args.overwrite, progress=not args.quiet)
    print(f"wrote {len(seeds)} episodes x {args.frames} frames at {config.image_size}px to {out}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from posttrain.runner import run_recipe

    run_recipe(args.recipe, args.overrides, resume=args.resume, overwrite=args.overwrite)
    return 0


def _models_init(args: argparse.Namespace) -> int:
    from pathlib import Path

    from posttrain.models.registry import init_model, resolve_model_path
    from posttrain.runfolder import check_not_overlapping

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not an empty folder; choose a new one")
    if args.arch in ("flow", "unet2d"):
        return _flow_init(args, out)
    check_not_overlapping(out, {"tokenizer's model folder": resolve_model_path(args.tokenizer)})
    model = init_model(args.arch, args.layers, args.width, args.heads, args.tokenizer,
                       max_frames=args.max_frames, seed=args.seed)
    model.save_pretrained(out, metadata={"init": {"arch": args.arch, "layers": args.layers, "width": args.width,
                                                  "heads": model.backbone.config.num_attention_heads,
                                                  "tokenizer": str(args.tokenizer), "seed": args.seed}})
    params = sum(p.numel() for p in model.backbone.parameters())
    print(f"wrote an untrained {args.arch} world model ({params / 1e6:.2f} M backbone parameters, "
          f"{model.tokens_per_frame} tokens/frame, up to {model.max_frames} frames) to {out}")
    return 0


def _flow_init(args: argparse.Namespace, out) -> int:
    """`models init --arch flow` (or `unet2d`): a fresh FlowWorldModel, a diffusers UNet2DModel of `--layers`
    residual blocks per level at widths (W, 2W, 2W) for --width W, on --size frames in pixel space, or with
    `--space latent` in the latent of --tokenizer's frame tokenizer (frozen, copied in)."""
    import torch

    from posttrain.models.flow import FlowConfig, FlowWorldModel

    if args.layers < 1 or args.width < 1:
        raise ValueError(f"--layers {args.layers} and --width {args.width} must be positive")
    groups = min(8, args.width)
    if args.width % groups:
        raise ValueError(f"--width {args.width} must be a multiple of 8 (the U-Net's GroupNorm groups)")
    torch.manual_seed(args.seed)
    config = FlowConfig(image_size=args.size, block_out_channels=(args.width, 2 * args.width, 2 * args.width),
                        layers_per_block=args.layers, norm_num_groups=groups)
    if args.space == "latent":
        from posttrain.models import TokenWorldModel, load_model
        from posttrain.models.registry import resolve_model_path
        from posttrain.runfolder import check_not_overlapping

        check_not_overlapping(out, {"tokenizer's model folder": resolve_model_path(args.tokenizer)})
        source = load_model(args.tokenizer)
        if not isinstance(source, TokenWorldModel):
            raise ValueError(f"--tokenizer {args.tokenizer}: --space latent takes a built-in token model's FSQ "
                             f"tokenizer, not {type(source).__name__}'s")
        model = FlowWorldModel.latent(source.tokenizer, config)
    else:
        model = FlowWorldModel(config)
    model.save_pretrained(out, metadata={"init": {"arch": args.arch, "layers": args.layers, "width": args.width,
                                                  "size": model.image_size, "space": args.space,
                                                  "seed": args.seed}})
    params = sum(p.numel() for p in model.denoiser.parameters())
    print(f"wrote an untrained flow world model ({params / 1e6:.2f} M denoiser parameters, "
          f"{model.image_size}x{model.image_size} frames denoised as {'x'.join(map(str, model.state_shape))} "
          f"{args.space} states, {model.config.sample_steps} sampling steps) to {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from posttrain.evaluate import run_eval_cli

    return run_eval_cli(args)


def add_eval_parser(sub) -> None:
    parser = sub.add_parser("eval", help="roll a model out on held-out envs3d episodes or footage clips and score it",
                            description="Roll a model out from true context frames and score the predicted frames "
                                        "against the true ones, beside the persistence and mean-image baselines.")
    parser.add_argument("--model", default="default",
                        help="'default' (the token model), 'flow' (the flow-matching model) or a save_pretrained folder")
    parser.add_argument("--adapter", default=None, help="a PEFT LoRA adapter folder to apply")
    parser.add_argument("--force-adapter", action="store_true",
                        help="apply an adapter that lacks posttrain_adapter.json (its base model cannot be checked)")
    parser.add_argument("--no-base", action="store_true", help="with --adapter, do not evaluate the base model too")
    parser.add_argument("--seeds", default=None, help="held-out envs3d episode seeds START:STOP (default 2000000:2000048)")
    parser.add_argument("--scene", action="append", metavar="KEY=VALUE", help="SceneConfig override")
    parser.add_argument("--data", default=None, metavar="FOOTAGE_DATASET",
                        help="evaluate on footage clips (a `posttrain footage ingest` folder) instead of envs3d seeds")
    parser.add_argument("--clips", default=None, metavar="START:STOP",
                        help="with --data: the held-out clips (row numbers, STOP excluded, or a,b,c); default all")
    parser.add_argument("--heldout-fraction", type=float, default=None, metavar="F",
                        help="with --data: hold out the last F of the clips, as SFT's heldout_fraction does")
    parser.add_argument("--horizon", type=int, default=12, help="frames to predict (default 12)")
    parser.add_argument("--context", type=int, default=2, help="true context frames (default 2)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    parser.add_argument("--sample-steps", type=int, default=None, metavar="K",
                        help="a flow model: Euler steps per frame (default: the model's own, 3 for `flow`)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="frame size (must match the model)")
    parser.add_argument("--cache-dir", default="data", help="where generated episodes are cached")
    parser.add_argument("--json", required=True, help="output JSON path (a filmstrip PNG is written beside it)")
    parser.set_defaults(func=_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    scenes = sub.add_parser("scenes", help="procedural PyBullet scenes (envs3d)")
    scenes_sub = scenes.add_subparsers(dest="scenes_command", metavar="SUBCOMMAND", required=True)
    gen = scenes_sub.add_parser("generate", help="write episodes as a `datasets` folder")
    gen.add_argument("--seeds", required=True, help="START:STOP (STOP excluded) or a,b,c")
    gen.add_argument("--frames", type=int, default=16, help="frames per episode (default 16)")
    gen.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    gen.add_argument("--workers", type=int, default=1, help="worker processes, one PyBullet client each")
    gen.add_argument("--out", required=True, help="output folder (written atomically)")
    gen.add_argument("--scene", action="append", metavar="KEY=VALUE", help="override a SceneConfig field")
    gen.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=_scenes_generate)

    models = sub.add_parser("models", help="world-model folders")
    models_sub = models.add_subparsers(dest="models_command", metavar="SUBCOMMAND", required=True)
    init = models_sub.add_parser("init", help="write a fresh (untrained) world model folder (transformers or flow)")
    init.add_argument("--arch", default="llama",
                      help="llama (a transformers causal LM over the tokenizer's codes) or flow / unet2d (a "
                           "flow-matching diffusers UNet2DModel, FlowWorldModel)")
    init.add_argument("--layers", type=int, required=True, help="transformer blocks")
    init.add_argument("--width", type=int, required=True, help="hidden size")
    init.add_argument("--heads", type=int, default=None, help="attention heads (default width // 64, at least 1)")
    init.add_argument("--tokenizer", default="default",
                      help="'default' (the embedded model's frame tokenizer) or a model folder to copy it from")
    init.add_argument("--max-frames", type=int, default=16,
                      help="frames (context + generated) the position range holds (default 16)")
    init.add_argument("--seed", type=int, default=0, help="initialisation seed")
    init.add_argument("--size", type=int, default=64, help="--arch flow: frame size in pixels (default 64)")
    init.add_argument("--space", choices=("pixels", "latent"), default="pixels",
                      help="--arch flow: denoise pixels, or the latent of --tokenizer's frame tokenizer")
    init.add_argument("--out", required=True, help="new or empty output folder")
    init.set_defaults(func=_models_init)

    from posttrain.runner import METHODS

    run = sub.add_parser("run", help=f"run a recipe ({', '.join(METHODS)})")
    run.add_argument("recipe", help="recipe YAML, e.g. recipes/grpo_tabletop.yaml")
    run.add_argument("overrides", nargs="*", default=[], metavar="KEY.SUB=VALUE", help="override recipe fields")
    run.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    run.add_argument("--overwrite", action="store_true",
                     help="replace a previous run in `out` (only a folder written by a posttrain run)")
    run.set_defaults(func=_run)

    from posttrain.footage import add_footage_parser
    from posttrain.play.server import add_play_parser
    from posttrain.publish import add_adapter_parser

    add_eval_parser(sub)
    add_footage_parser(sub)
    add_adapter_parser(sub)
    add_play_parser(sub)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """parser.parse_args, except that `run`'s KEY=VALUE overrides may also follow its flags
    (`posttrain run recipe.yaml --resume steps=5`). argparse's parse_intermixed_args cannot do this
    itself: it refuses parsers with subcommands."""
    args, extras = parser.parse_known_args(argv)
    if args.command == "run":
        is_override = ["=" in item and not item.startswith("-") for item in extras]
        args.overrides = [*args.overrides, *(item for item, ok in zip(extras, is_override) if ok)]
        extras = [item for item, ok in zip(extras, is_override) if not ok]
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileExistsError, PermissionError, FileNotFoundError, IsADirectoryError,
            ConnectionError) as exc:
        if os.environ.get("POSTTRAIN_DEBUG"):
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"posttrain: error: {message}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from posttrain.training import TrainingDiverged

        if not isinstance(exc, TrainingDiverged) or os.environ.get("POSTTRAIN_DEBUG"):
            raise
        print(f"posttrain: training stopped: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
