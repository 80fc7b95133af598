"""The shape of the code that the design depends on, read from the source (ast): the two
halves share only contract/, the runtime never imports torch, no module imports another's
private names, and service/ modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_SERVICE_LINES = 320  # "about 300"


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import in ``path``, lazy ones included."""
    out: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, [alias.name for alias in node.names]))
    return out


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("models", ("service",)), ("contract", ("service", "models", "torch", "fastapi")),
     ("service", ("models", "torch"))],
)  # fmt: skip
def test_the_halves_share_only_contract(package: str, forbidden: tuple[str, ...]) -> None:
    for path in _modules(package):
        for module, _ in _imports(path):
            top = module.split(".")[0]
            assert top not in forbidden, f"{path.relative_to(ROOT)} imports {module}"


def test_no_module_imports_another_s_private_names() -> None:
    for package in ("service", "contract", "models", "bench"):
        for path in _modules(package):
            for module, names in _imports(path):
                if module.split(".")[0] not in ("service", "contract", "models", "bench"):
                    continue
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                assert not private, f"{path.relative_to(ROOT)}: {module} {private}"


def test_service_modules_stay_small() -> None:
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in _modules("service")}
    assert max(sizes.values()) <= MAX_SERVICE_LINES, sorted(sizes.items(), key=lambda x: -x[1])
