"""int8 and fp16 exports: accuracy on real CIFAR-10 images, the serving contract, the
recorded calibration, and the CLI's handling of calibration input."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from resnet_serve.models import cli, quantize  # noqa: E402
from resnet_serve.models.catalog import get_variant  # noqa: E402
from resnet_serve.models.cli import main as cli_main  # noqa: E402
from resnet_serve.models.export import ExportError, export_variant  # noqa: E402
from resnet_serve.models.quantize import CalibrationError, load_calibration  # noqa: E402
from resnet_serve.models.weights import resolve  # noqa: E402
from resnet_serve.service.repository import load_model_spec  # noqa: E402
from tests.conftest import CIFAR_TRAIN  # noqa: E402
from tests.models.conftest import CIFAR_MODELS  # noqa: E402

# Most top-1 an int8 model may lose against its fp32 graph on the 846 test images.
MAX_INT8_DROP = 0.005
MIN_FP16_AGREEMENT = 0.995


def _run(model_dir: Path, images: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, emb = sess.run(["logits", "embedding"], {"images": images})
    assert logits.dtype == emb.dtype == np.float32
    return logits


def _meta(model_dir: Path) -> dict:
    return json.loads((model_dir / "model.json").read_text())


def _io(model_dir: Path) -> dict[str, tuple[int, list]]:
    graph = onnx.load(str(model_dir / "model.onnx")).graph
    return {
        v.name: (
            v.type.tensor_type.elem_type,
            [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
        )
        for v in (*graph.input, *graph.output)
    }


SERVING_IO = {
    "images": (onnx.TensorProto.UINT8, ["N", 32, 32, 3]),
    "logits": (onnx.TensorProto.FLOAT, ["N", 10]),
    "embedding": (onnx.TensorProto.FLOAT, ["N", 64]),
}


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_int8_keeps_top1_on_the_test_images(
    int8_repository: Path, cifar_repository: Path, cifar_test, name: str, record_property
) -> None:
    images, labels = cifar_test["images"], cifar_test["labels"]
    fp32 = _run(cifar_repository / name, images).argmax(1)
    int8 = _run(int8_repository / f"{name}_int8", images).argmax(1)
    acc32, acc8 = float(np.mean(fp32 == labels)), float(np.mean(int8 == labels))
    agreement = float(np.mean(fp32 == int8))
    record_property("fp32_top1", acc32)
    record_property("int8_top1", acc8)
    record_property("int8_fp32_top1_agreement", agreement)
    print(f"{name}: fp32 {acc32:.4f} int8 {acc8:.4f} agreement {agreement:.4f}")
    assert acc8 >= acc32 - MAX_INT8_DROP
    # Measured 0.990 (resnet20) and 0.996 (resnet56); well below means a worse calibration.
    assert agreement >= 0.98


def test_int8_model_json_records_the_calibration(int8_repository: Path) -> None:
    model_dir = int8_repository / "resnet20_cifar10_int8"
    meta = _meta(model_dir)
    assert meta["name"] == "resnet20_cifar10_int8" and meta["arch"] == "resnet20_cifar10"
    assert meta["precision"] == "int8"
    # At 32 px the runtime's resize and crop change nothing, so the preprocessed tensor is
    # the file's own array: its hash can be computed independently of the exporter.
    with np.load(CIFAR_TRAIN) as d:
        expected_sha = hashlib.sha256(d["images"].tobytes()).hexdigest()
    assert meta["calibration"] == {
        "source": CIFAR_TRAIN.name,  # the name alone: model.json is served
        "images": 932,
        "sha256": expected_sha,
        "method": "percentile",
    }
    assert meta["quantization"]["activations"] == "uint8"
    assert meta["quantization"]["weights"] == "int8"
    assert meta["quantization"]["per_channel"] is True
    # 7-bit weights: the one format measured exact on AVX2, VNNI and AMX (docs/precision.md).
    assert meta["quantization"]["weight_bits"] == 7 and meta["quantization"]["reduce_range"]
    # The reference set: the first 32 calibration images and the fp32 graph's logits.
    block = meta["self_check"]
    assert block["source"] == "calibration" and block["images"] == 32
    with np.load(model_dir / "reference.npz") as ref, np.load(CIFAR_TRAIN) as d:
        np.testing.assert_array_equal(ref["images"], d["images"][:32])
    assert 0.9 <= block["measured"]["top1_agreement"] <= 1.0
    assert 0 < block["measured"]["logits_rms_rel_err"] < block["max_logits_rms_rel_err"] < 0.2
    check = meta["precision_check"]
    assert check["images"] == "calibration" and check["count"] == 932
    assert 0.95 <= check["top1_agreement"] <= 1.0
    assert set(check["max_rel_err"]) == {"logits", "embedding"}
    # The parity check against PyTorch is the fp32 graph's, made before quantizing.
    assert max(meta["parity_max_rel_err"].values()) < 1e-4
    assert (
        meta["onnx_sha256"] == hashlib.sha256((model_dir / "model.onnx").read_bytes()).hexdigest()
    )
    assert "onnxruntime" in meta["exporter"]
    # The runtime reads it like any fp32 model.
    spec = load_model_spec(model_dir)
    assert spec.name == "resnet20_cifar10_int8" and spec.input_shape == (32, 32, 3)


def test_int8_graph_contract(int8_repository: Path) -> None:
    model_dir = int8_repository / "resnet56_cifar10_int8"
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "model.json", "model.onnx", "reference.npz"
    ]  # fmt: skip
    assert _io(model_dir) == SERVING_IO
    model = onnx.load(str(model_dir / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [
        i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and i.dims[1:]
    ]  # (the 1-d int8 initializers are per-channel zero points)
    # Every one of the 55 convolutions and the classifier carries int8 weights.
    assert sorted(len(w.dims) for w in int8_weights) == [2] + [4] * 55
    for n in (1, 5):
        logits = _run(model_dir, np.zeros((n, 32, 32, 3), np.uint8))
        assert logits.shape == (n, 10)
    assert not list(int8_repository.glob(".*")), "staging directory left behind"


def test_fp16_runs_on_cpu_and_agrees_with_fp32(
    tmp_path: Path, torch_home, cifar_repository: Path, cifar_test, record_property
) -> None:
    variant = get_variant("resnet20_cifar10")
    out = export_variant(variant, resolve(variant, "default"), tmp_path, precision="fp16")
    assert out.name == "resnet20_cifar10_fp16"
    assert _io(out) == SERVING_IO
    model = onnx.load(str(out / "model.onnx"))
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    weights = [i for i in model.graph.initializer if i.name in conv_weights]
    assert len(weights) == 19
    assert all(w.data_type == onnx.TensorProto.FLOAT16 for w in weights)
    images = cifar_test["images"]
    fp32 = _run(cifar_repository / "resnet20_cifar10", images).argmax(1)
    fp16 = _run(out, images).argmax(1)
    agreement = float(np.mean(fp32 == fp16))
    record_property("fp16_fp32_top1_agreement", agreement)
    assert agreement >= MIN_FP16_AGREEMENT
    meta = _meta(out)
    assert meta["precision"] == "fp16" and "calibration" not in meta
    assert max(meta["precision_check"]["max_rel_err"].values()) <= quantize.FP16_TOLERANCE


def test_cli_calibrates_on_a_directory_of_png_files(tmp_path: Path, torch_home, capsys) -> None:
    from PIL import Image

    with np.load(CIFAR_TRAIN) as d:
        # 13 images: one full calibration batch and a short one, for the histogram collector.
        images = d["images"][:13]
    calib = tmp_path / "calib"
    (calib / "sub").mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(calib / ("sub" if i % 2 else ".") / f"{i:02d}.png")
    (calib / "labels.txt").write_text("not an image, skipped\n")
    rc = cli_main(
        ["resnet20_cifar10", "--repository", str(tmp_path / "r"), "--precision", "int8",
         "--calibration", str(calib)]
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out
    meta = _meta(tmp_path / "r" / "resnet20_cifar10_int8")
    # Files are read in sorted path order: 00, 02, ... then sub/01, sub/03, ...
    order = [*range(0, 13, 2), *range(1, 13, 2)]
    assert meta["calibration"]["images"] == 13
    assert meta["calibration"]["sha256"] == hashlib.sha256(images[order].tobytes()).hexdigest()
    assert meta["calibration"]["source"] == calib.resolve().name


def test_cli_int8_without_calibration_is_a_usage_error(tmp_path: Path, capsys) -> None:
    repo = tmp_path / "r"
    assert cli_main(["resnet20_cifar10", "--repository", str(repo), "--precision", "int8"]) == 2
    err = capsys.readouterr().err
    assert "--precision int8 needs --calibration" in err and "Traceback" not in err
    assert not repo.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--calibration", "x.npz"], "--calibration: only used with --precision int8"),
        (["--precision", "fp16", "--calibration-limit", "3"], "only used with --precision int8"),
        (["--precision", "int8", "--calibration", "missing.npz"], "no such file or directory"),
    ],
)
def test_cli_calibration_usage_errors(tmp_path: Path, capsys, args, message) -> None:
    assert cli_main(["resnet20_cifar10", "--repository", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_reports_a_bad_calibration_image_without_a_traceback(tmp_path: Path, capsys) -> None:
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    rc = cli_main(
        ["resnet20_cifar10", "--repository", str(tmp_path / "r"), "--weights", "random",
         "--precision", "int8", "--calibration", str(calib)]
    )  # fmt: skip
    assert rc == 1
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "Traceback" not in err
    assert not (tmp_path / "r" / "resnet20_cifar10_int8").exists()


def test_calibration_sources_are_checked(tmp_path: Path) -> None:
    pre = get_variant("resnet20_cifar10").preprocess
    np.savez(tmp_path / "labels.npz", labels=np.zeros(3))
    with pytest.raises(CalibrationError, match="no 'images' array"):
        load_calibration(tmp_path / "labels.npz", pre)
    np.savez(tmp_path / "float.npz", images=np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(CalibrationError, match="uint8"):
        load_calibration(tmp_path / "float.npz", pre)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no image files"):
        load_calibration(tmp_path / "empty", pre)


def test_calibration_goes_through_the_runtime_resize_and_crop() -> None:
    from resnet_serve.contract.preprocess import preprocess_array
    from resnet_serve.contract.schema import PreprocessSpec

    pre = get_variant("resnet50").preprocess
    calib = load_calibration(CIFAR_TRAIN, pre, limit=3)
    assert calib.images.shape == (3, 224, 224, 3) and calib.images.dtype == np.uint8
    with np.load(CIFAR_TRAIN) as d:
        first = d["images"][0]
    spec = PreprocessSpec(resize=232, crop=224, mean=pre.mean, std=pre.std)
    np.testing.assert_array_equal(calib.images[0], preprocess_array(first, spec))


def test_int8_export_fails_below_the_minimum_agreement(tmp_path: Path) -> None:
    variant = get_variant("resnet20_cifar10")
    with pytest.raises(ExportError, match="below the minimum"):
        export_variant(
            variant, resolve(variant, "random"), tmp_path, precision="int8",
            calibration=CIFAR_TRAIN, calibration_limit=16, calibration_method="minmax",
            min_agreement=1.01,
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_export_variant_needs_calibration_for_int8(tmp_path: Path) -> None:
    variant = get_variant("resnet20_cifar10")
    with pytest.raises(CalibrationError, match="int8 needs calibration images"):
        export_variant(variant, resolve(variant, "random"), tmp_path, precision="int8")


def test_cli_choices_match_the_quantizer() -> None:
    assert cli.PRECISIONS == quantize.PRECISIONS
    assert cli.CALIBRATION_METHODS == quantize.CALIBRATION_METHODS
    assert cli.INT8_WEIGHT_BITS == quantize.INT8_WEIGHT_BITS
