"""Print the README's table of `resnet-serve` options, generated from the Settings class.

python tools/options_table.py
"""

from __future__ import annotations

import sys
from pathlib import Path

from service.settings import Settings


def options_table() -> str:
    rows = ["| option | environment | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = {"models": "(all)", "batch_buckets": "(powers of two)"}.get(name, "(none)")
        rows.append(
            f"| `--{name.replace('_', '-')}` | `RESNET_SERVE_{name.upper()}` | `{default}` "
            f"| {field.description} |"
        )
    return "\n".join(rows)


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
