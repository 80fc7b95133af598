"""`resnet-serve` as users run it, as a process: signals, startup errors and --help."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT
from tests.service import tiny
from tests.service.servers import ProcessServer, wait_until


def _send(srv: ProcessServer, signals: tuple[int, ...]) -> tuple[int, float]:
    """Send ``signals`` (a second one 50 ms after the first, while uvicorn shuts down);
    the exit code and the seconds from the first signal to the exit."""
    assert srv.proc is not None
    start = time.monotonic()
    for i, sig in enumerate(signals):
        if i:
            time.sleep(0.05)
        srv.proc.send_signal(sig)
    try:
        code = srv.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
        srv.proc.wait()
        pytest.fail(f"still running 30 s after {signals}")
    return code, time.monotonic() - start


SIGNALS = [(signal.SIGINT,), (signal.SIGTERM,), (signal.SIGINT, signal.SIGINT)]
SIGNAL_IDS = ["ctrl-c", "sigterm", "ctrl-c-twice"]


@pytest.mark.parametrize("signals", SIGNALS, ids=SIGNAL_IDS)
def test_signal_during_warmup_exits_0_at_once(tiny_repository, signals) -> None:
    # The first warmup run lasts HOLD_TIMEOUT_S (120 s), as a batch of a large model may
    # on a small CPU, and is in progress when the signal arrives. (No self-check: its runs,
    # before the server listens, would be held too.)
    srv = ProcessServer(tiny_repository, holdable=True, self_check="off")
    srv.hold()
    try:
        srv.start(wait_ready=False)
        wait_until(srv.entered, timeout=60)
        assert httpx.get(srv.url + "/readyz").status_code == 503  # still warming up
        code, seconds = _send(srv, signals)  # fails past 30 s, far less than the run lasts
    finally:
        srv.release()
    assert code == 0, srv.output()
    assert seconds < 30, f"exited {seconds:.1f} s after the signal"
    assert "Traceback" not in srv.output()


@pytest.mark.parametrize("signals", [SIGNALS[0], SIGNALS[2]], ids=[SIGNAL_IDS[0], SIGNAL_IDS[2]])
def test_ctrl_c_when_ready_exits_0_without_traceback(tiny_repository, signals) -> None:
    srv = ProcessServer(tiny_repository).start()
    code, _ = _send(srv, signals)
    assert code == 0, srv.output()
    assert "Traceback" not in srv.output()


def _help_options(text: str) -> dict[str, tuple[str, str, str]]:
    """flag -> (environment variable, default, meaning), from argparse's --help."""
    entries: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("  -"):
            entries.append([line])
        elif line.startswith("   ") and entries:
            entries[-1].append(line)
    out = {}
    for lines in entries:
        entry = " ".join(" ".join(lines).split())  # argparse wraps lines anywhere
        flag = entry.split()[0].rstrip(",")
        if flag == "-h":
            continue
        # "--flag, --no-flag meaning" or "--flag FLAG meaning"
        for head in (f"{flag}, --no-{flag[2:]} ", f"{flag} {flag[2:].upper().replace('-', '_')} "):
            if entry.startswith(head):
                entry = entry[len(head) :]
                break
        m = re.fullmatch(r"(.*) \[env (\S+); default: (.*)\]", entry)
        assert m, entry
        out[flag] = (m.group(2), m.group(3), m.group(1))
    return out


def _readme_options() -> dict[str, tuple[str, str, str]]:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- options-table -->")[1].split("<!-- /options-table -->")[0]
    rows = re.findall(r"^\| `(--\S+)` \| `(\S+)` \| `([^`]*)` \| (.*) \|$", table, re.M)
    return {flag: (env, default, meaning) for flag, env, default, meaning in rows}


def _resnet_serve(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed script, as users run it."""
    script = Path(sys.executable).with_name("resnet-serve")
    assert script.exists(), f"{script} missing: pip install -e . first"
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=120)


def test_help_and_the_readme_table_list_the_same_options_and_defaults() -> None:
    proc = _resnet_serve("--help")
    assert proc.returncode == 0, proc.stderr
    in_help, in_readme = _help_options(proc.stdout), _readme_options()
    assert len(in_help) > 20
    assert in_help == in_readme


def test_missing_repository_names_resnet_export(tmp_path: Path) -> None:
    proc = _resnet_serve("--repository", str(tmp_path / "nowhere"))
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "does not exist" in line and "resnet-export" in line


def test_port_in_use_is_one_line_and_exit_code_3(tiny_repository) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        proc = _resnet_serve("--repository", str(tiny_repository), "--port", str(port))
        seconds = time.monotonic() - start
    assert proc.returncode == 3
    # Only this line: the port is bound before the models load, so nothing else happened.
    (line,) = proc.stderr.strip().splitlines()
    assert f"cannot listen on 127.0.0.1:{port}" in line and "--port" in line, line
    assert "in use" in line
    assert seconds < 30


@pytest.mark.parametrize("text", ["[1, 2]", '{"labels": 5}', '"model"'])
def test_a_model_json_of_the_wrong_shape_is_one_line_and_exit_code_2(
    tmp_path: Path, text: str
) -> None:
    # Was: a JSON array at the top was a traceback (the document was read as an object
    # outside every check).
    tiny.export(tmp_path)
    (tmp_path / tiny.NAME / "model.json").write_text(text)
    proc = _resnet_serve("--repository", str(tmp_path), "--port", "0", "--grpc-port", "0")
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "invalid model.json" in line and str(tmp_path) in line, line


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        ({"crop": 16, "resize": 16}, "input"),  # was: a warm-up that never ended, silently
        ({"labels": [*tiny.LABELS, "extra"], "num_classes": 11}, "output 'logits'"),  # 500s
        ({"embedding_dim": 128}, "output 'embedding'"),
    ],
    ids=["input-size", "labels", "embedding"],
)
def test_a_model_json_that_does_not_describe_its_graph_is_one_line_and_exit_code_2(
    tmp_path: Path, edit: dict, words: str
) -> None:
    import json

    tiny.export(tmp_path)
    path = tmp_path / tiny.NAME / "model.json"
    doc = json.loads(path.read_text())
    for key, value in edit.items():
        if key in ("crop", "resize"):
            doc["preprocess"][key] = value
        else:
            doc[key] = value
    path.write_text(json.dumps(doc))
    proc = _resnet_serve(
        "--repository", str(tmp_path), "--port", "0", "--grpc-port", "0", "--log-level", "warning"
    )
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "does not describe its model.onnx" in line and words in line, line


@pytest.mark.parametrize(
    "args",
    [["--default-model", "resnet18"], ["--models", tiny.NAME, "--default-model", "tiny2"]],
    ids=["not-in-repository", "not-in-models"],
)
def test_unknown_default_model_is_one_line_and_exit_code_2(tiny_pair_repository, args) -> None:
    proc = _resnet_serve("--repository", str(tiny_pair_repository), "--port", "0", *args)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert f"--default-model {args[-1]} is not a served model" in line, line
    assert f"served: {tiny.NAME}" in line
