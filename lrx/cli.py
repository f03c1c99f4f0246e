"""The ``lrx`` command: ``lrx train|plan|export|eigenbasis ...``.

``lrx train`` (also ``python launch/train.py``, ``python -m lrx train`` and ``lrx-train``)
trains an adapter; ``lrx plan`` is ``lrx train --dry-run``; ``lrx export`` writes a merged
model or a peft adapter (also ``tools/export_merged.py``); ``lrx eigenbasis`` builds an
EigenLoRAx basis (also ``tools/build_eigenbasis.py``). Without a subcommand the arguments go
to ``train``. User errors (``LrxError``) are printed as one line and exit with status 2;
nothing already saved is touched. A run stopped on request (a signal, ``lrx.stop``) exits with
status 75 after a complete checkpoint: ``--resume auto`` continues it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from pathlib import Path

from lrx.errors import LrxError
from lrx.stop import EXIT_STOPPED, Stopped

USAGE_EPILOG = """\
Overrides are SECTION.KEY=VALUE pairs applied after the YAML file, e.g.
  python launch/train.py --config configs/smollm2/lora.yaml train.lr=2e-4 method.r=16

Config keys (type, default, help):
"""


COMMANDS = {
    "train": "train an adapter (the default when no command is given)",
    "plan": "resolve the config and print the plan of a run without training (train --dry-run)",
    "export": "write an adapter merged into its base, or as a peft adapter",
    "eigenbasis": "build an EigenLoRAx basis from peft LoRA adapters",
}


def build_parser(prog: str = "launch/train.py") -> argparse.ArgumentParser:
    from lrx.methods import available_methods

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune a model with a LoRA-family method (" + ", ".join(available_methods()) + ").",
        epilog=USAGE_EPILOG + describe_options(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML run config (see configs/); defaults are used without it")
    parser.add_argument("--method", help="method to train; overrides method.name of the config")
    parser.add_argument("--overwrite", action="store_true", help="replace a run lrx wrote in logging.output_dir (only lrx's own entries are deleted, "
                             "once every check has passed)")
    parser.add_argument("--resume", metavar="auto|CHECKPOINT",
                        help="continue from the newest complete checkpoint of the run (auto) or a checkpoint folder "
                             "(into its own run folder or a new one)")
    parser.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides")
    parser.add_argument("--dry-run", action="store_true",
                        help="resolve the config, build the model on the meta device, print the plan, exit")
    parser.add_argument("--world-size", type=int, default=None,
                        help="processes to plan for with --dry-run (default: WORLD_SIZE, else 1)")
    # Passed by the deepspeed launcher; the process reads LOCAL_RANK from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``lrx COMMAND ...``; returns the process exit status. Arguments without a command are
    ``train``'s (``lrx.cli.main(["--config", ...])`` trains)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        command, rest = argv[0], argv[1:]
        if command == "train":
            return train_main(rest, prog="lrx train")
        if command == "plan":
            return train_main([*rest, "--dry-run"], prog="lrx plan")
        if command == "export":
            return export_main(rest, prog="lrx export")
        return eigenbasis_main(rest, prog="lrx eigenbasis")
    if argv and argv[0] in ("-h", "--help"):
        print("usage: lrx {" + ",".join(COMMANDS) + "} ...\n\nLoRA-family fine-tuning.\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:<11} {text}")
        print("\n'lrx COMMAND --help' shows a command's options.")
        return 0
    return train_main(argv)


def _setup_logging(fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
    logging.basicConfig(level=logging.INFO, format=fmt, datefmt="%H:%M:%S")
    # peft imports bitsandbytes, whose CPU backend warns about an optional kernel package.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def train_main(argv: list[str] | None = None, prog: str = "launch/train.py", callbacks=()) -> int:
    """``lrx train`` / ``python launch/train.py``; returns the process exit status.
    ``callbacks`` are called with the trainer after every optimizer step (``runner.run``)."""
    _setup_logging()
    args = build_parser(prog).parse_intermixed_args(argv)  # overrides may come before or after flags
    try:
        from lrx.config import load_config
        from lrx.distributed.torch_compat import check_torch
        from lrx.runner import run

        check_torch()
        overrides = list(args.overrides) + (["logging.overwrite=true"] if args.overwrite else [])
        overrides += [f"train.resume={args.resume}"] if args.resume else []
        config = load_config(args.config, overrides, method=args.method)
        if args.dry_run:
            from lrx.plan import plan

            print(plan(config, args.world_size))
            return 0
        summary = run(config, callbacks)
    except Stopped as stopped:
        if stopped.main:
            print(stopped, file=sys.stderr)
        return EXIT_STOPPED
    except LrxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary.get("is_main", True):
        print_summary(summary)
    return 0


def export_main(argv: list[str] | None = None, prog: str = "tools/export_merged.py") -> int:
    """``lrx export`` / ``python tools/export_merged.py``; returns the process exit status."""
    from lrx import export

    parser = argparse.ArgumentParser(prog=prog, description=export.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", help="lrx adapter folder (runs/NAME/adapter) or checkpoint (runs/NAME/checkpoints/step-N)")
    parser.add_argument("out", help="output folder for the merged transformers checkpoint (new or empty)")
    parser.add_argument("--peft", action="store_true",
                        help="write the total change as a standard peft LoRA adapter (exact rank) instead; no base "
                             "needed (OUT: new, empty, or an earlier --peft export, which is replaced)")
    parser.add_argument("--base", help="base model (default: the one recorded in the adapter)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-shard-size", default="2GB")
    args = parser.parse_args(argv)
    _setup_logging("%(levelname)s %(message)s")
    try:
        if args.peft:
            path = export.export_peft_adapter(args.adapter, args.out)
            print(f"wrote {path} (open with peft's PeftModel.from_pretrained)")
            return 0
        path = export.export_merged(args.adapter, args.out, base=args.base, dtype=args.dtype,
                                    max_shard_size=args.max_shard_size)
    except LrxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} (open with transformers' from_pretrained)")
    return 0


def eigenbasis_main(argv: list[str] | None = None, prog: str = "tools/build_eigenbasis.py") -> int:
    """``lrx eigenbasis OUT ADAPTER [ADAPTER ...] --k K [--augment P]``; returns the exit status."""
    from lrx.eigenbasis import BASIS_META, BASIS_WEIGHTS, build_basis, format_summary

    parser = argparse.ArgumentParser(
        prog=prog, description="Build an EigenLoRAx basis from peft LoRA adapters (safetensors only).",
    )
    parser.add_argument("out", help="output folder for eigenbasis.safetensors + eigenbasis.json")
    parser.add_argument("adapters", nargs="+", help="peft LoRA adapter folders (e.g. runs/*/adapter_peft), each once")
    parser.add_argument("--k", type=int, default=32, help="principal components per module and matrix type "
                        "(fewer are kept, and recorded, when the sources have fewer columns)")
    parser.add_argument("--augment", type=int, default=0, help="P random orthonormal vectors to append")
    parser.add_argument("--seed", type=int, default=0, help="augmentation seed")
    args = parser.parse_args(argv)
    _setup_logging("%(levelname)s %(message)s")
    try:
        meta = build_basis(args.adapters, args.out, k=args.k, augment=args.augment, seed=args.seed)
    except LrxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(meta))
    print(f"wrote {Path(args.out) / BASIS_WEIGHTS} and {BASIS_META}")
    return 0


def print_summary(summary: dict) -> None:
    ev = summary.get("eval") or {}
    shown = {k: round(v, 4) for k, v in ev.items() if k != "step"}
    print(f"\n== {summary['method']} on {summary['model']}: {summary['steps']} steps in {summary['wall_time_s']} s")
    print(f"   trainable parameters: {summary['trainable_parameters']:,} of {summary['total_parameters']:,}")
    if summary.get("final_train_loss") is not None:
        print(f"   final train loss: {summary['final_train_loss']:.4f}")
    history = summary.get("eval_history") or []
    if len(history) > 1 and history[0]["step"] == 0:
        start = {k: round(v, 4) for k, v in history[0].items() if k != "step"}
        print(f"   eval before training: {json.dumps(start)}")
    if shown:
        print(f"   eval after training:  {json.dumps(shown)}")
    if "sample_completion" in summary:
        print(f"   sample prompt: {summary['sample_prompt']}")
        print("   sample completion: " + summary["sample_completion"].replace("\n", "\n                      "))
    d = summary["run_dir"]
    print(f"   outputs: {d}/ (config.yaml, metrics.jsonl, tb/, summary.json, adapter/, adapter_peft/)")


def describe_options() -> str:
    """Every config key with type, default and help, for ``--help``."""
    from lrx.config import SECTIONS, field_help, type_name
    from lrx.methods import MethodConfig, available_methods, get_method_class

    lines = []

    def add(section: str, cls: type, skip: frozenset[str] = frozenset()) -> None:
        hints = typing.get_type_hints(cls)
        helps = field_help(cls)
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            lines.append(f"  {section}.{f.name} ({type_name(hints[f.name])}, default {default!r})")
            lines.append(f"      {helps.get(f.name, '')}")

    for section, cls in SECTIONS.items():
        if section != "method":
            lines.append(f"[{section}]")
            add(section, cls)
    lines.append("[method] common to all methods")
    add("method", MethodConfig)
    base = {f.name for f in dataclasses.fields(MethodConfig)}
    for name in available_methods():
        cls = get_method_class(name).config_cls
        extra = {f.name for f in dataclasses.fields(cls)} - base
        if extra:
            lines.append(f"[method] only for --method {name}")
            add("method", cls, skip=base)
    return "\n".join(lines)
