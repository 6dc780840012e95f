"""Stage `check_params`: the strict check of the whole params.yaml, on every edit of it.

    python -m stages.check_params [--params params.yaml]

Every other stage checks the whole file when it runs, but DVC runs a stage only when one of
the params it lists changed: a misspelled section (`gradient:`) or a key no stage lists
would otherwise leave `dvc repro` "up to date" and the typo unnoticed. This stage depends on
the whole file, imports no torch (about a second), and fails with the one-line error that
names the key. It writes nothing.
"""

from __future__ import annotations

from typing import Optional, Sequence

from pipeline.core import config, stage


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = stage.parser("the strict check of every params.yaml section").parse_args(argv)
    params = config.load_params(args.params)
    print(f"params: {args.params} checked, {len(params)} sections, every key known")


if __name__ == "__main__":
    stage.run(main)
