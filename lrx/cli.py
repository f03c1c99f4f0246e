"""Command line of ``launch/train.py``: parse, resolve the config, run, report.

User errors (``LrxError``) are printed as one line and exit with status 2; nothing already
saved is touched.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from lrx.errors import LrxError

USAGE_EPILOG = """\
Overrides are SECTION.KEY=VALUE pairs applied after the YAML file, e.g.
  python launch/train.py --config configs/smollm2/lora.yaml train.lr=2e-4 method.r=16

Config keys (type, default, help):
"""


def build_parser() -> argparse.ArgumentParser:
    from lrx.config import describe_options
    from lrx.methods import available_methods

    parser = argparse.ArgumentParser(
        prog="launch/train.py",
        description="Fine-tune a model with a LoRA-family method (" + ", ".join(available_methods()) + ").",
        epilog=USAGE_EPILOG + describe_options(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML run config (see configs/); defaults are used without it")
    parser.add_argument("--method", help="method to train; overrides method.name of the config")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in logging.output_dir")
    parser.add_argument("--resume", metavar="auto|CHECKPOINT",
                        help="continue from the newest complete checkpoint of the run (auto) or a checkpoint folder")
    parser.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides")
    parser.add_argument("--dry-run", action="store_true",
                        help="resolve the config, build the model on the meta device, print the plan, exit")
    parser.add_argument("--world-size", type=int, default=None,
                        help="processes to plan for with --dry-run (default: WORLD_SIZE, else 1)")
    # Passed by the deepspeed launcher; the process reads LOCAL_RANK from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # peft imports bitsandbytes, whose CPU backend warns about an optional kernel package.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    args = build_parser().parse_intermixed_args(argv)  # overrides may come before or after flags
    try:
        from lrx.config import load_config
        from lrx.runner import run

        overrides = list(args.overrides) + (["logging.overwrite=true"] if args.overwrite else [])
        overrides += [f"train.resume={args.resume}"] if args.resume else []
        config = load_config(args.config, overrides, method=args.method)
        if args.dry_run:
            from lrx.plan import plan

            print(plan(config, args.world_size))
            return 0
        summary = run(config)
    except LrxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary.get("is_main", True):
        print_summary(summary)
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
