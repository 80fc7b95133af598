"""The measurement tools of docs/benchmarks.md still run (figures are never checked:
they depend on the machine)."""

from __future__ import annotations

import re

import pytest

from tools import ab_serve, request_cost


def test_a_variant_is_a_name_an_environment_and_options() -> None:
    v = ab_serve.Variant.parse("before|PYTHONPATH=/tmp/old X=1|--workers 2 --no-cpu-spinning")
    assert (v.name, v.env, v.args) == (
        "before", {"PYTHONPATH": "/tmp/old", "X": "1"}, ["--workers", "2", "--no-cpu-spinning"]
    )  # fmt: skip
    after = ab_serve.Variant.parse("after")
    assert (after.env, after.args, after.model) == ({}, [], None)
    assert ab_serve.Variant.parse("int8|||resnet50_int8").model == "resnet50_int8"


def test_request_cost_measures_two_variants(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--variant", "a", "--variant", "b||--no-cpu-spinning"]
    assert request_cost.main([*args, "--rounds", "1", "--seconds", "0.5", "--clients", "2"]) == 0
    out = capsys.readouterr().out
    for body in ("png 8x8, raw", "KB, raw", "KB, multipart"):
        for name in ("a", "b"):
            row = rf"\| [^|]*{re.escape(body)} \| {name} \| \d+; \d+ \| \d+\.\d+ \| \d+\.\d+ \|"
            assert re.search(row, out), out
