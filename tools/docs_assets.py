"""The swagger-ui and Redoc files that ``/docs`` and ``/redoc`` serve, vendored into
``service/static/`` from their npm releases (pinned, integrity-checked), with their licences.

Vendored rather than fetched when the wheel is built: a fresh clone, ``pip install .`` and
the Docker build then need neither npm nor a network, and what ships is in the repository
for review. One change is made to them (``Pin.patches``, Redoc's logo from a CDN). This
script is how they got there, and the suite re-runs its download and
compares (tests/service/test_docs_assets.py), so the files are exactly these releases.

    python tools/docs_assets.py --write     # after changing a pin
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "service" / "static"


@dataclass(frozen=True)
class Pin:
    package: str
    version: str
    integrity: str  # the registry's dist.integrity of the tarball
    # file in the package -> name under service/static/ (one flat folder: one URL segment)
    files: dict[str, str]
    # name -> (text, replacement), each found exactly once: what is changed, and why, below
    patches: dict[str, tuple[tuple[bytes, bytes], ...]] = field(default_factory=dict)


PINS = (
    Pin(
        "swagger-ui-dist",
        "5.35.0",
        "sha512-U06rpMtW9V3XPGOBeamTUSr0Z09jMX4IJuANpE/EZbAhw0G8CgwrzU4YmXkn/h0wCDNsXdGarTNNHC3sU8yVUQ==",
        {
            "swagger-ui-bundle.js": "swagger-ui-bundle.js",
            "swagger-ui-bundle.js.LICENSE.txt": "swagger-ui-bundle.js.LICENSE.txt",
            "swagger-ui.css": "swagger-ui.css",
            "oauth2-redirect.js": "oauth2-redirect.js",
            "favicon-32x32.png": "favicon-32x32.png",
            "LICENSE": "swagger-ui-dist.LICENSE",
            "NOTICE": "swagger-ui-dist.NOTICE",
        },
    ),
    Pin(
        "redoc",
        "2.5.4",
        "sha512-M6jWhG1qoBnH6TFmzJnstyCZ87HmOY/UzDm78mHiYihEdlV/YcS9ogOo1NlElnJMeLsyxHFe2yFc4sNjHTrABQ==",
        {
            "bundles/redoc.standalone.js": "redoc.standalone.js",
            "bundles/redoc.standalone.js.LICENSE.txt": "redoc.standalone.js.LICENSE.txt",
            "LICENSE": "redoc.LICENSE",
        },
        # Redoc's sidebar shows Redocly's logo from their CDN, unconditionally (no option):
        # offline, a failed request on every page view. An empty inline image instead.
        {
            "redoc.standalone.js": (
                (
                    b'"https://cdn.redoc.ly/redoc/logo-mini.svg"',
                    b'"data:image/svg+xml,%3Csvg'
                    b' xmlns=%22http://www.w3.org/2000/svg%22 width=%221%22 height=%221%22/%3E"',
                ),
            )
        },
    ),
)


class FetchError(RuntimeError):
    pass


def fetch(pin: Pin, into: Path) -> dict[str, bytes]:
    """The pinned tarball from the npm registry (``npm pack``), checked against its
    integrity: the vendored names and their bytes."""
    npm = shutil.which("npm")
    if npm is None:
        raise FetchError("npm is not on PATH")
    spec = f"{pin.package}@{pin.version}"
    proc = subprocess.run(
        [npm, "pack", "--silent", "--pack-destination", str(into), spec],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise FetchError(f"npm pack {spec} exited {proc.returncode}: {proc.stderr.strip()}")
    tarball = into / proc.stdout.strip().splitlines()[-1]
    algorithm, _, expected = pin.integrity.partition("-")
    digest = base64.b64encode(hashlib.new(algorithm, tarball.read_bytes()).digest()).decode()
    if digest != expected:
        raise FetchError(f"{spec}: integrity {algorithm}-{digest}, pinned {pin.integrity}")
    out = {}
    with tarfile.open(tarball) as tar:
        for inner, name in pin.files.items():
            member = tar.extractfile(f"package/{inner}")
            if member is None:
                raise FetchError(f"{spec} has no file {inner}")
            out[name] = member.read()
    for name, changes in pin.patches.items():
        for old, new in changes:
            if out[name].count(old) != 1:
                raise FetchError(f"{spec}: {name} holds {old!r} {out[name].count(old)} times")
            out[name] = out[name].replace(old, new)
    return out


def fetch_all(into: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for pin in PINS:
        files |= fetch(pin, into)
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help="write them into service/static/")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            files = fetch_all(Path(tmp))
        except FetchError as exc:
            print(f"docs_assets: {exc}", file=sys.stderr)
            return 1
    stale = (
        [n for n, data in files.items() if (STATIC / n).read_bytes() != data]
        if all((STATIC / n).is_file() for n in files)
        else sorted(files)
    )
    if args.write:
        for name, data in files.items():
            (STATIC / name).write_bytes(data)
        print(f"wrote {len(files)} files into {STATIC.relative_to(ROOT)}")
        return 0
    print("stale: " + ", ".join(stale) if stale else "up to date")
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
