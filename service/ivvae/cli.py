"""The ``ivvae`` command line. Each subcommand imports what it needs when it runs."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]


def _verify_golden(args: argparse.Namespace) -> int:
    from .model.golden import verify_golden

    ok = True
    for path in args.files:
        try:
            result = verify_golden(path)
        except (OSError, ValueError) as exc:
            print(json.dumps({"file": path, "error": str(exc), "passed": False}))
            ok = False
            continue
        print(json.dumps(result.as_dict()))
        ok = ok and result.passed
    return 0 if ok else 1


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from .train.config import TrainConfig
    from .train.trainer import Trainer

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if "data" in values:
        values["data"] = tuple(values["data"])
    cfg = TrainConfig(**values)
    if args.threads:
        torch.set_num_threads(args.threads)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        trainer = Trainer(cfg)
        resumed = trainer.resume()
        if trainer.rank == 0:
            where = f"resumed at step {trainer.step}" if resumed else "from scratch"
            print(f"training {where}; {cfg.total_steps} steps in all; out={cfg.out}",
                  file=sys.stderr)
        if not args.export_only:
            trainer.fit(progress=not args.no_progress, max_steps=args.max_steps)
        if args.export and trainer.rank == 0:
            model_cfg = trainer.export_model(args.export)
            print(f"wrote {args.export} (scale {model_cfg.scale_factor}, "
                  f"shift {model_cfg.shift_factor})", file=sys.stderr)
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def _add_dataclass_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --option per dataclass field (defaults stay in the dataclass)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        default = f.default
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"(default {default})")
        elif typing.get_origin(hint) is tuple:
            parser.add_argument(flag, nargs="+", default=None, help="(default: built-in)")
        elif typing.get_origin(hint) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(hint), default=None,
                                help=f"(default {default})")
        else:
            required = default is dataclasses.MISSING
            parser.add_argument(flag, type=hint, default=None, required=required,
                                help=None if required else f"(default {default})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ivvae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("verify-golden", help="check the model against golden vector files")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(handler=_verify_golden)

    from .train.config import TrainConfig

    p = sub.add_parser(
        "train",
        help="train an IV-VAE (stage 1 image VAE, stage 2 video VAE); torchrun for DDP",
        description="Two-stage IV-VAE training. Resumes from OUT/checkpoint when present. "
        "Multi-GPU / multi-node: torchrun --nproc-per-node N -m ivvae.cli train ...",
    )
    _add_dataclass_options(p, TrainConfig)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--export", default="", help="write inference weights here at the end")
    p.add_argument("--export-only", action="store_true", help="only --export the checkpoint")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
