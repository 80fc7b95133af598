"""Print the README's table of `resnet-serve` options, or (--write) put it in README.md.
The table comes from service.settings.options_table(), as --help does from options().

python tools/options_table.py [--write]
"""

from __future__ import annotations

import sys
from pathlib import Path

from resnet_serve.service.settings import options_table

START, END = "<!-- options-table -->\n", "<!-- /options-table -->"


def replace_in(text: str) -> str:
    a = text.index(START) + len(START)
    return text[:a] + options_table() + "\n" + text[text.index(END) :]


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        readme = Path(__file__).resolve().parents[1] / "README.md"
        readme.write_text(replace_in(readme.read_text()))
    else:
        print(options_table())
