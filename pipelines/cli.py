"""The `ogpsa` command.

    ogpsa train CONFIG.yaml [key=value ...]   a LLaMA-Factory YAML (ogpsa_sft/ogpsa_dpo or stock
                                              stages) or a pipeline recipe (with `stages:`)
    ogpsa data {saferlhf,refsets,tiny,smollm2} ...   data preparation (see `ogpsa data -h`)
    ogpsa eval MODEL [--out FILE] ...         safety / capability evaluation
    ogpsa report DIR [DIR ...]                markdown table and Pareto plot of runs
    ogpsa sweep RECIPE --grid KEY=V1,V2 ...   a recipe over a grid of settings, evaluated, one report
    ogpsa quickstart [--out DIR]              the README's first command

Each subcommand parses its own flags; errors print one line naming the file or key and exit 2.
"""

from __future__ import annotations

import sys

USAGE = __doc__


def _train(argv: list[str]) -> int:
    from .integration.entry import arm, run_llamafactory_train

    arm()
    return run_llamafactory_train(argv)


def _data(argv: list[str]) -> int:
    from ..data_prep.cli import main as data_main

    return data_main(argv)


def _eval(argv: list[str]) -> int:
    from .evaluate import main as eval_main

    return eval_main(argv)


def _report(argv: list[str]) -> int:
    from .report import main as report_main

    return report_main(argv)


def _sweep(argv: list[str]) -> int:
    from .sweep import main as sweep_main

    return sweep_main(argv)


def _quickstart(argv: list[str]) -> int:
    from .quickstart import main as quick_main

    return quick_main(argv)


COMMANDS = {"train": _train, "data": _data, "eval": _eval, "report": _report, "sweep": _sweep, "quickstart": _quickstart}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"ogpsa: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    return int(COMMANDS[command](rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
