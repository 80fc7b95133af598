"""The Dockerfile, without a Docker engine: hadolint, the structure the deployment relies
on, pins that must agree with each other, and .dockerignore."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import CACHE, ROOT
from tests.deploy.conftest import RUNTIME_STAGES, run, tool
from tests.deploy.dockerfile import Dockerfile, healthcheck_command, parse

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


def _hadolint(path: Path) -> tuple[int, str]:
    proc = run([tool("hadolint"), "--no-color", "--failure-threshold", "error", str(path)])
    return proc.returncode, proc.stdout + proc.stderr


def test_hadolint_passes_at_error_level() -> None:
    rc, out = _hadolint(ROOT / "Dockerfile")
    assert rc == 0, out


def test_hadolint_fails_on_an_error(tmp_path: Path) -> None:
    # The control: the same call does fail on an error-level finding (DL3012: two
    # HEALTHCHECKs in one stage), so the test above can fail.
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    bad = tmp_path / "Dockerfile"
    bad.write_text(text + "\nHEALTHCHECK NONE\n", encoding="utf-8")
    rc, out = _hadolint(bad)
    assert rc != 0 and "DL3012" in out, out


def test_stages(dockerfile: Dockerfile) -> None:
    for name in ("weights", "wheels", "export", *RUNTIME_STAGES):
        assert name in dockerfile.stage_names
    # The build contexts that replace them (--build-context NAME=DIR) are empty by default.
    assert dockerfile.stage("weights").base == dockerfile.stage("wheels").base == "scratch"
    assert dockerfile.stage("wheels").instructions == []
    # The default target (the last stage) runs anywhere.
    assert dockerfile.stages[-1].name == "runtime-cpu"


def test_base_images_are_pinned(dockerfile: Dockerfile) -> None:
    for stage in dockerfile.stages:
        if stage.base in dockerfile.stage_names or stage.base == "scratch":
            continue
        _, _, tag = stage.base.partition(":")
        assert tag and re.match(r"\d+\.\d+\.\d+", tag), f"FROM {stage.base}: pin a version tag"


@pytest.mark.parametrize("stage", RUNTIME_STAGES)
def test_runtime_stage_contract(dockerfile: Dockerfile, stage: str) -> None:
    s = dockerfile.stage(stage)
    entrypoint, cmd = s.last("ENTRYPOINT"), s.last("CMD")
    assert entrypoint is not None and entrypoint.exec_form() == ["resnet-serve"]
    assert cmd is not None and cmd.exec_form() is not None
    _, env = dockerfile.environment(stage)
    assert env["RESNET_SERVE_HOST"] == "0.0.0.0"
    assert env["PATH"].split(":")[0].startswith("/opt/resnet-serve")
    # The repository the server reads is the one copied out of the export stage.
    copies = {i.rest.split()[-1]: i for i in s.all("COPY") if i.flag("from") == "export"}
    assert env["RESNET_SERVE_REPOSITORY"] in copies, "the model repository comes from export"
    assert float(env["RESNET_SERVE_DRAIN_TIMEOUT_S"]) > 0
    # Nothing of the build step: the venv comes from the stage that installs the runtime
    # extra, and only the repository comes from export.
    for ins in s.all("COPY"):
        assert ins.flag("from") in (None, "export", f"venv-{stage.split('-')[1]}"), ins
    user = s.last("USER")
    assert user is not None
    uid = user.rest.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root uid"
    stop = s.last("STOPSIGNAL")
    assert stop is not None and stop.rest == "SIGTERM"
    health = s.last("HEALTHCHECK")
    assert health is not None
    argv = healthcheck_command(health)
    assert argv[0] == "python" and "/healthz" in argv[-1], "exec form, python urllib, /healthz"


def test_runtime_stages_agree(dockerfile: Dockerfile) -> None:
    cpu, gpu = (dockerfile.stage(s) for s in RUNTIME_STAGES)
    for keyword in ("USER", "EXPOSE", "HEALTHCHECK", "STOPSIGNAL", "ENTRYPOINT", "CMD"):
        assert [i.rest for i in cpu.all(keyword)] == [i.rest for i in gpu.all(keyword)], keyword
    cpu_env = dockerfile.environment("runtime-cpu")[1]
    gpu_env = dockerfile.environment("runtime-gpu")[1]
    differ = {k for k in cpu_env.keys() | gpu_env.keys() if cpu_env.get(k) != gpu_env.get(k)}
    assert differ == {"RESNET_SERVE_DEVICE"}, differ
    assert cpu_env["RESNET_SERVE_DEVICE"] == "cpu" and gpu_env["RESNET_SERVE_DEVICE"] == "cuda"


# `pip install`, `"$VENV/bin/pip" install`, `pip --python "$VENV/bin/python" install`.
PIP_INSTALL = re.compile(r"\bpip\"?\s+(?:--python\s+\S+\s+)?install\b")


def _pip_installs(dockerfile: Dockerfile, stage: str) -> list[str]:
    return [i.rest for i in dockerfile.stage(stage).all("RUN") if PIP_INSTALL.search(i.rest)]


def test_every_pip_install_can_run_offline(dockerfile: Dockerfile) -> None:
    """Air-gapped builds, the GPU stages too (CI cannot build them): each pip install sees
    the `wheels` context at /wheels and reads its pip.conf, which tools/wheelhouse.sh
    writes for that path."""
    wheelhouse = (ROOT / "tools" / "wheelhouse.sh").read_text(encoding="utf-8")
    assert "no-index = true" in wheelhouse and "find-links = /wheels" in wheelhouse
    found = 0
    for stage in dockerfile.stages:
        for ins in stage.all("RUN"):
            if PIP_INSTALL.search(ins.rest):
                found += 1
                assert "type=bind,from=wheels,target=/wheels" in ins.flag_values("mount"), ins
                env = dockerfile.environment(stage.name or "")[1]
                assert env.get("PIP_CONFIG_FILE") == "/wheels/pip.conf", stage.name
    assert found >= 4


def test_no_torch_outside_the_export_stage(dockerfile: Dockerfile) -> None:
    for stage in dockerfile.stages:
        if stage.name in ("export", "weights"):
            continue
        for ins in stage.instructions:
            assert "torch" not in ins.rest.lower(), f"line {ins.line}: torch in {stage.name}"


def _pyproject() -> dict:  # type: ignore[type-arg]
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def _extra_requirement(extra: str, project: str) -> Requirement:
    reqs = [Requirement(r) for r in _pyproject()["project"]["optional-dependencies"][extra]]
    return next(r for r in reqs if r.name == project)


def test_export_stage_uses_the_cpu_torch_of_ci(dockerfile: Dockerfile) -> None:
    args, _ = dockerfile.environment("export")
    installs = _pip_installs(dockerfile, "export")
    # torch from the CPU wheel index, before the `export` extra (else PyPI's CUDA torch).
    assert "--index-url" in installs[0] and '"torch==${TORCH_VERSION}"' in installs[0]
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    # The export extra and the runtime (the exporter runs its graphs on onnxruntime).
    assert "[export,cpu]" in installs[1]
    ci_pin = re.search(r"torch==([\w.+]+)", (ROOT / ".ci" / "run").read_text(encoding="utf-8"))
    assert ci_pin and args["TORCH_VERSION"] == ci_pin.group(1), "same torch as CI"
    assert Version(args["TORCH_VERSION"]) in _extra_requirement("export", "torch").specifier


@pytest.mark.parametrize(
    ("stage", "arg", "extra", "project"),
    [("venv-cpu", "ORT_VERSION", "cpu", "onnxruntime"),
     ("venv-gpu", "ORT_GPU_VERSION", "gpu", "onnxruntime-gpu")],
)  # fmt: skip
def test_onnxruntime_pins_satisfy_the_extras(
    dockerfile: Dockerfile, stage: str, arg: str, extra: str, project: str
) -> None:
    args, _ = dockerfile.environment(stage)
    (install,) = _pip_installs(dockerfile, stage)
    assert f"/src[{extra}]" in install and f'"{project}==${{{arg}}}"' in install
    assert Version(args[arg]) in _extra_requirement(extra, project).specifier


def test_cuda_base_matches_onnxruntime_gpu(dockerfile: Dockerfile) -> None:
    """onnxruntime-gpu's wheel says which CUDA and cuDNN majors it is built for (its `cuda`
    and `cudnn` extras); the CUDA base image must carry the same. Reads the metadata of the
    pinned wheel for the image's Python (Ubuntu 24.04: 3.12) from PyPI with range requests,
    once: .cache/tests keeps it for later runs (tests/deploy/wheelmeta.py)."""
    from tests.deploy.wheelmeta import pinned_wheel_metadata

    version = dockerfile.environment("venv-gpu")[0]["ORT_GPU_VERSION"]
    base = dockerfile.stage("python-gpu").base
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-ubuntu24\.04", base)
    assert m, f"{base}: expected an nvidia/cuda X.Y.Z-cudnn-runtime-ubuntu24.04 tag"
    pattern = re.compile(
        rf"onnxruntime_gpu-{re.escape(version)}-cp312-cp312-manylinux_.*_x86_64\.whl"
    )
    try:
        cache_file = CACHE / "wheel-metadata" / f"onnxruntime_gpu-{version}-cp312-x86_64.METADATA"
        meta = pinned_wheel_metadata("onnxruntime-gpu", pattern, cache_file)
    except LookupError:
        pytest.fail(f"onnxruntime-gpu {version} has no cp312 x86_64 wheel (the image's Python)")
    except OSError as exc:
        pytest.fail(f"PyPI is needed to check the CUDA base against onnxruntime-gpu: {exc}")
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    runtime = next(r for r in reqs if r.name == "nvidia-cuda-runtime")
    cudnn = next(r for r in reqs if r.name.startswith("nvidia-cudnn-cu"))
    cuda_major = Version(next(iter(runtime.specifier)).version).major
    assert int(m.group(1)) == cuda_major, f"{base} vs onnxruntime-gpu {version}: CUDA {cuda_major}"
    assert cudnn.name == f"nvidia-cudnn-cu{cuda_major}"
    # The cudnn-runtime images of CUDA 12 and 13 carry cuDNN 9.
    assert Version(next(iter(cudnn.specifier)).version).major == 9


# --- .dockerignore --------------------------------------------------------------------


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; ``!`` re-includes. A pattern that
    names a directory covers everything below it."""
    ignored = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        pat = pat.removeprefix("**/")
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hit = any(fnmatch.fnmatchcase(p, pat) for p in prefixes) or any(
            fnmatch.fnmatchcase(part, pat) for part in parts if "/" not in pat
        )
        if hit:
            ignored = not negate
    return ignored


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def context_sources(dockerfile: Dockerfile) -> list[str]:
    """Every path a COPY takes from the main build context."""
    return [
        src
        for stage in dockerfile.stages
        for ins in stage.all("COPY")
        if ins.flag("from") is None
        for src in ins.rest.split()[:-1]
    ]


def test_dockerignore_keeps_what_the_dockerfile_copies(dockerfile: Dockerfile) -> None:
    patterns = _dockerignore()
    for src in context_sources(dockerfile):
        path = ROOT / src
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        assert files, f"COPY {src}: nothing there"
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            if "__pycache__" in rel or rel.endswith(".pyc"):
                assert _ignored(rel, patterns), rel
            else:
                assert not _ignored(rel, patterns), f"{rel} is copied but .dockerignore drops it"


@pytest.mark.parametrize(
    "rel", [".git/config", ".venv/bin/python", "tests/conftest.py", ".cache/x", "weights/a.pth",
            "model_repository/resnet50/model.onnx", "deploy/k8s/base/deployment.yaml"],
)  # fmt: skip
def test_dockerignore_leaves_the_rest_out(rel: str) -> None:
    assert _ignored(rel, _dockerignore())


def test_dockerfile_reader_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("RUN true\nFROM scratch\n", encoding="utf-8")
    with pytest.raises(ValueError, match="precede the first FROM"):
        parse(bad)
