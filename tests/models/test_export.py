import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from resnet_serve.models.catalog import get_variant  # noqa: E402
from resnet_serve.models.cli import main as cli_main  # noqa: E402
from resnet_serve.models.export import ExportError, export_variant  # noqa: E402
from resnet_serve.models.weights import Weights, resolve  # noqa: E402
from tests.models.helpers import manifest, random_state_dict  # noqa: E402
from tests.models.test_catalog import CIFAR, IMAGENET  # noqa: E402

REQUIRED_KEYS = {
    "name", "arch", "num_classes", "labels", "embedding_dim", "preprocess", "weights", "opset",
    "parity_max_abs_err",
}  # fmt: skip


def _tv_weights(name: str) -> Weights:
    return Weights(
        random_state_dict(manifest()[name]), "test:random-torchvision-layout", None, False
    )


def _run(model_dir: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, emb = sess.run(["logits", "embedding"], {"images": images})
    return logits, emb


def _reference(model_dir: Path, name: str, weights: Weights, images: np.ndarray):
    """PyTorch eager on the same uint8 images, preprocessing written out by hand."""
    from resnet_serve.models.weights import build_model

    meta = json.loads((model_dir / "model.json").read_text())
    model = build_model(get_variant(name), weights)
    mean = torch.tensor(meta["preprocess"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["preprocess"]["std"]).view(1, 3, 1, 1)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        feats = model.forward_features(x)
        return model.forward_head(feats).numpy(), feats.numpy()


def _assert_parity(name: str, weights: Weights, repo: Path, batch: int = 2) -> dict:
    variant = get_variant(name)
    out = export_variant(variant, weights, repo)
    crop = variant.preprocess.crop
    images = np.random.default_rng(5).integers(0, 256, (batch, crop, crop, 3), dtype=np.uint8)
    logits, emb = _run(out, images)
    ref_logits, ref_emb = _reference(out, name, weights, images)
    for got, ref in ((logits, ref_logits), (emb, ref_emb)):
        assert got.dtype == np.float32 and got.shape == ref.shape
        rel = np.abs(got - ref).max() / np.abs(ref).max()
        assert rel < 1e-4
    meta = json.loads((out / "model.json").read_text())
    assert max(meta["parity_max_rel_err"].values()) < 1e-4
    return meta


@pytest.mark.parametrize(
    "name", ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"],
    ids=["basic", "bottleneck", "grouped", "wide"],
)  # fmt: skip
def test_parity_per_family(tmp_path: Path, name: str) -> None:
    meta = _assert_parity(name, _tv_weights(name), tmp_path)
    assert meta["embedding_dim"] == (512 if name == "resnet18" else 2048)
    assert meta["num_classes"] == 1000 and len(meta["labels"]) == 1000


def test_parity_cifar_and_model_json(tmp_path: Path, torch_home) -> None:
    variant = get_variant("resnet20_cifar10")
    weights = resolve(variant, "default")
    meta = _assert_parity("resnet20_cifar10", weights, tmp_path, batch=5)
    assert set(meta) >= REQUIRED_KEYS
    assert meta["name"] == meta["arch"] == "resnet20_cifar10"
    assert meta["embedding_dim"] == 64 and meta["num_classes"] == 10
    assert meta["preprocess"] == {
        "resize": 32, "crop": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "interpolation": "bilinear",
    }  # fmt: skip
    assert meta["weights"]["pretrained"] is True
    assert meta["weights"]["sha256"].startswith("12fca82f")
    assert meta["weights"]["source"] == variant.weights.url


def test_graph_contract(tmp_path: Path) -> None:
    out = export_variant(
        get_variant("resnet20_cifar10"),
        resolve(get_variant("resnet20_cifar10"), "random"),
        tmp_path,
    )
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    (inp,) = model.graph.input
    assert inp.name == "images"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["N", 32, 32, 3]
    outs = {
        o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
        for o in model.graph.output
    }
    assert outs == {"logits": ["N", 10], "embedding": ["N", 64]}
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in model.graph.output)
    meta = json.loads((out / "model.json").read_text())
    assert meta["weights"]["pretrained"] is False
    # The batch dimension is dynamic: any N runs.
    for n in (1, 7):
        logits, emb = _run(out, np.zeros((n, 32, 32, 3), np.uint8))
        assert logits.shape == (n, 10) and emb.shape == (n, 64)
    assert not list(tmp_path.glob(".resnet20_cifar10.*")), "staging directory left behind"


def test_parity_failure_stops_the_export(tmp_path: Path) -> None:
    variant = get_variant("resnet20_cifar10")
    with pytest.raises(ExportError, match="relative error"):
        export_variant(variant, resolve(variant, "random"), tmp_path, tolerance=1e-12)
    assert not (tmp_path / "resnet20_cifar10").exists()


@pytest.mark.parametrize(
    ("name", "floor"), [("resnet20_cifar10", 0.91), ("resnet56_cifar10", 0.925)]
)
def test_reference_accuracy_through_onnxruntime(
    cifar_repository: Path, cifar_test, name, floor
) -> None:
    logits, emb = _run(cifar_repository / name, cifar_test["images"])
    acc = float((logits.argmax(1) == cifar_test["labels"]).mean())
    assert acc >= floor
    assert emb.shape == (846, 64)


def test_cli_exports_with_custom_name_and_labels(tmp_path: Path, torch_home, capsys) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"class{i}" for i in range(10)) + "\n")
    rc = cli_main(
        [
            "resnet20_cifar10",
            "--repository",
            str(tmp_path / "r"),
            "--name",
            "mine",
            "--labels",
            str(labels),
        ]
    )
    assert rc == 0
    meta = json.loads((tmp_path / "r" / "mine" / "model.json").read_text())
    assert meta["name"] == "mine" and meta["arch"] == "resnet20_cifar10"
    assert meta["labels"][3] == "class3"


def _fine_tuned(tmp_path: Path, name: str, classes: int) -> Path:
    """A state dict as fine-tuning leaves it: the variant with another classifier."""
    from resnet_serve.models.weights import build_model

    variant = get_variant(name)
    model = build_model(variant, resolve(variant, "random"), num_classes=classes)
    path = tmp_path / f"{name}-ft.pth"
    torch.save({"state_dict": model.state_dict(), "epoch": 9}, path)
    return path


@pytest.mark.parametrize("name", ["resnet20_cifar10", "resnet18"], ids=["cifar", "imagenet"])
def test_cli_fine_tuned_checkpoint_with_other_classes(tmp_path: Path, capsys, name: str) -> None:
    ckpt = _fine_tuned(tmp_path, name, 37)
    rc = cli_main([name, "--repository", str(tmp_path / "r"), "--weights", str(ckpt)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "Traceback" not in err
    (note,) = [line for line in out.splitlines() if "numbered" in line]
    assert "37 classes" in note and "--labels FILE" in note
    meta = json.loads((tmp_path / "r" / name / "model.json").read_text())
    assert meta["num_classes"] == 37 and meta["labels"] == [str(i) for i in range(37)]
    assert meta["outputs"]["logits"]["shape"] == [-1, 37]
    crop = meta["preprocess"]["crop"]
    logits, _ = _run(tmp_path / "r" / name, np.zeros((2, crop, crop, 3), np.uint8))
    assert logits.shape == (2, 37)


def test_cli_labels_file_of_the_wrong_length(tmp_path: Path, capsys) -> None:
    ckpt = _fine_tuned(tmp_path, "resnet20_cifar10", 37)

    def export(count: int) -> int:
        # A file per count: labels files are cached by path.
        labels = tmp_path / f"labels{count}.txt"
        labels.write_text("".join(f"kind{i}\n" for i in range(count)))
        return cli_main(
            ["resnet20_cifar10", "--repository", str(tmp_path / "r"), "--weights", str(ckpt),
             "--labels", str(labels)]
        )  # fmt: skip

    assert export(5) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--labels has 5 names" in line and "37 classes" in line, line
    assert not (tmp_path / "r" / "resnet20_cifar10").exists()
    assert export(37) == 0  # the right number of names: exported with them
    meta = json.loads((tmp_path / "r" / "resnet20_cifar10" / "model.json").read_text())
    assert meta["labels"][36] == "kind36"


def test_cli_usage_errors(tmp_path: Path, capsys) -> None:
    assert cli_main(["resnet19", "--repository", str(tmp_path)]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert cli_main(["resnet18"]) == 2
    assert cli_main(["--list"]) == 0
    assert "wide_resnet101_2" in capsys.readouterr().out


def test_cli_refuses_what_would_replace_other_folders_or_mislabel_the_graph(
    tmp_path: Path, capsys
) -> None:
    # Was: --name .. replaced the repository's parent (and everything in it), --name . the
    # repository; a labels file with no names gave a model.json of 0 classes for a graph of
    # 10, served with 500s; bad paths and numbers were tracebacks or silently changed.
    repo = tmp_path / "box" / "repo"
    keep = tmp_path / "box" / "keep"
    keep.mkdir(parents=True)
    (keep / "file").write_text("mine")
    (tmp_path / "empty.txt").write_text("\n \n")
    base = ["resnet20_cifar10", "--weights", "random", "--repository", str(repo)]
    for extra, words in (
        (["--name", ".."], "--name '..'"), (["--name", "."], "--name '.'"),
        (["--name", "a/b"], "--name 'a/b'"),
        (["--labels", str(tmp_path / "empty.txt")], "no class names"),
        (["--labels", str(tmp_path / "none.txt")], "cannot read it"),
        (["--labels", str(tmp_path)], "cannot read it"),
        (["--tolerance", "0"], "--tolerance"), (["--tolerance", "nan"], "--tolerance"),
        (["--precision", "int8", "--calibration", str(tmp_path), "--min-agreement", "1.5"],
         "--min-agreement"),
    ):  # fmt: skip
        assert cli_main([*base, *extra]) == 2, extra
        assert words in capsys.readouterr().err, extra
    assert (keep / "file").read_text() == "mine" and not repo.exists()
    weights = resolve(get_variant("resnet20_cifar10"), "random")
    with pytest.raises(ExportError, match="not a folder name"):
        export_variant(get_variant("resnet20_cifar10"), weights, repo, name="..")


def test_the_opset_recorded_is_the_graphs(tmp_path: Path, capsys) -> None:
    # Was: --opset 17 wrote an opset-18 graph (torch's exporter converts only where it can)
    # and a model.json saying 17.
    import onnx

    repo = tmp_path / "r"
    rc = cli_main(["resnet20_cifar10", "--weights", "random", "--repository", str(repo),
                   "--opset", "17"])  # fmt: skip
    err = capsys.readouterr().err
    model_dir = repo / "resnet20_cifar10"
    if rc == 0:  # a torch that converts it: then the graph is opset 17
        graph = onnx.load(str(model_dir / "model.onnx"))
        assert {o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")} == {17}
        assert json.loads((model_dir / "model.json").read_text())["opset"] == 17
    else:
        assert rc == 1 and "opset 17 was asked for" in err and not model_dir.exists(), err


@pytest.mark.slow
@pytest.mark.parametrize("name", IMAGENET + CIFAR)
def test_full_family_parity(tmp_path: Path, name: str) -> None:
    if name in IMAGENET:
        weights = _tv_weights(name)
    else:
        # Random BN statistics, and each residual branch's last BN scaled down: with the
        # default initialisation 600 blocks (resnet1202) overflow float32 to inf/nan in
        # PyTorch itself, and there would be nothing finite to compare.
        from resnet_serve.models.weights import build_model

        shapes = {
            k: list(v.shape)
            for k, v in build_model(get_variant(name), resolve(get_variant(name), "random"))
            .state_dict()
            .items()
        }
        state = random_state_dict(shapes)
        for key in state:
            if key.endswith("bn2.weight"):
                state[key] = state[key] * 0.1
        weights = Weights(state, "test:random-bn-scaled", None, False)
    _assert_parity(name, weights, tmp_path, batch=1)
