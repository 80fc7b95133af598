"""Extracts the openAPIV3Schema of KServe's CRDs into the file tests/deploy/test_kserve.py
validates deploy/kserve/ against (KServe is Apache-2.0; its CRDs are not on PyPI, and CI
reaches no other source).

    python tools/kserve_schemas.py --source "kserve/kserve@COMMIT" \\
        KSERVE/config/crd/full/serving.kserve.io_servingruntimes.yaml \\
        KSERVE/config/crd/full/serving.kserve.io_inferenceservices.yaml

writes tests/deploy/kserve/crd-schemas.json.gz: {"source": ..., "schemas": {"GROUP/VERSION
KIND": schema}} for every served version, minified and gzipped (reproducible: no mtime).
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parents[1] / "tests" / "deploy" / "kserve" / "crd-schemas.json.gz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", required=True, help="where the CRD files come from")
    ap.add_argument("crds", nargs="+", type=Path)
    args = ap.parse_args()
    schemas = {}
    for path in args.crds:
        crd = yaml.safe_load(path.read_text(encoding="utf-8"))
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                key = f"{group}/{version['name']} {kind}"
                schemas[key] = version["schema"]["openAPIV3Schema"]
    doc = {"source": args.source, "files": [p.name for p in args.crds], "schemas": schemas}
    data = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    OUT.write_bytes(gzip.compress(data, 9, mtime=0))
    print(f"{OUT}: {', '.join(schemas)}")


if __name__ == "__main__":
    main()
