"""Print the README's table of `resnet-serve` options, generated from the Settings class.

python tools/options_table.py
"""

from __future__ import annotations

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


if __name__ == "__main__":
    print(options_table())
