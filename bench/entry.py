"""``resnet-bench``'s entry point. The benchmark needs the ``bench`` extra (aiohttp,
matplotlib, rich, scikit-image), which a plain install lacks: this checks for it before
importing the benchmark, so that a missing package is one line saying what to install,
not an ImportError traceback (or, for the plot, a failure after a whole run)."""

from __future__ import annotations

import importlib.util
import sys

EXIT_USAGE = 2
INSTALL = 'pip install -e ".[bench]"'
# Import name -> distribution, as pyproject's bench extra lists them (a test keeps the two
# equal).
BENCH_EXTRA = {
    "aiohttp": "aiohttp",
    "matplotlib": "matplotlib",
    "rich": "rich",
    "skimage": "scikit-image",
}


def missing() -> list[str]:
    """The distributions of the bench extra that cannot be imported."""
    return [
        dist for module, dist in BENCH_EXTRA.items() if importlib.util.find_spec(module) is None
    ]


def main(argv: list[str] | None = None) -> int:
    absent = missing()
    if absent:
        print(
            f"resnet-bench: needs the bench extra ({', '.join(absent)} missing): {INSTALL}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    from resnet_serve.bench.cli import main as bench_main

    return bench_main(argv)
