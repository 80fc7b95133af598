"""A tiny model with the repository contract of a real export, built with ``onnx.helper``:
``images`` uint8 ``[N, 8, 8, 3]`` in; ``logits`` ``[N, 10]``, ``embedding`` ``[N, 6]`` and
one stage map ``layer1`` ``[N, 3, 8, 8]`` out; model.json written with ``contract.schema``
and a self-check reference set with ``contract.selfcheck``, as ``resnet-export`` does.

Service tests about protocols, limits and lifecycle need neither torch nor ../shared with
it. The graph is plain arithmetic, so each answer is known in numpy (``expected``):
    layer1    = NCHW(images / 255 - 0.5)
    embedding = [mean_rgb, 1 - mean_rgb]             (each of R, G, B over the image)
    logits    = embedding @ W                        (W below: class c favours one colour)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from resnet_serve.contract import schema, selfcheck

NAME = "tiny"
CROP = 8
LABELS = ["red", "green", "blue", "cyan", "magenta", "yellow", "dark", "light", "grey", "noise"]
DIM = 6
# Rows: the embedding's 6 values; columns: the 10 classes.
W = np.array(
    [
        # r  g  b  c  m  y  dk lt gr no
        [4, -2, -2, -4, 2, 2, -1, 1, 0, 0],
        [-2, 4, -2, 2, -4, 2, -1, 1, 0, 0],
        [-2, -2, 4, 2, 2, -4, -1, 1, 0, 0],
        [-1, 1, 1, 3, -1, -1, 1, -1, 0, 0],
        [1, -1, 1, -1, 3, -1, 1, -1, 0, 0],
        [1, 1, -1, -1, -1, 3, 1, -1, 0, 0],
    ],
    dtype=np.float32,
)


def graph_bytes() -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["x", "c255"], ["x01"]),
        helper.make_node("Sub", ["x01", "half"], ["centred"]),
        helper.make_node("Transpose", ["centred"], ["layer1"], perm=[0, 3, 1, 2]),
        helper.make_node("ReduceMean", ["x01", "hw"], ["mean"], keepdims=0),
        helper.make_node("Sub", ["one", "mean"], ["inverse"]),
        helper.make_node("Concat", ["mean", "inverse"], ["embedding"], axis=1),
        helper.make_node("MatMul", ["embedding", "w"], ["logits"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(255.0, np.float32), "c255"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "hw"),
        numpy_helper.from_array(W, "w"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", CROP, CROP, 3])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(LABELS)]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", DIM]),
            helper.make_tensor_value_info("layer1", TensorProto.FLOAT, ["N", 3, CROP, CROP]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8  # what every onnxruntime since 1.14 reads
    onnx.checker.check_model(model)
    return model.SerializeToString()


def expected(images: np.ndarray) -> dict[str, np.ndarray]:
    """What the graph computes for uint8 ``[N, 8, 8, 3]`` images."""
    x01 = images.astype(np.float32) / 255.0
    mean = x01.mean(axis=(1, 2))
    embedding = np.concatenate([mean, 1.0 - mean], axis=1)
    return {
        "logits": embedding @ W,
        "embedding": embedding,
        "layer1": (x01 - 0.5).transpose(0, 3, 1, 2),
    }


def export(repository: Path, name: str = NAME, resize: int = CROP) -> Path:
    """Write ``<repository>/<name>/`` as resnet-export would: model.onnx, model.json and
    the self-check's reference set."""
    import onnxruntime as ort

    directory = repository / name
    directory.mkdir(parents=True)
    (directory / schema.MODEL_FILE).write_bytes(graph_bytes())
    session = ort.InferenceSession(
        str(directory / schema.MODEL_FILE), providers=["CPUExecutionProvider"]
    )
    images = selfcheck.synthetic_images(selfcheck.REFERENCE_IMAGES, CROP)
    (logits,) = session.run(["logits"], {"images": images})
    check = selfcheck.record(
        directory, images, logits, logits, precision="fp32", source="synthetic"
    )
    preprocess = schema.PreprocessSpec(resize=resize, crop=CROP, mean=(0.5,) * 3, std=(0.5,) * 3)
    features = [schema.FeatureSpec("layer1", 3, 1, (-1, 3, CROP, CROP))]
    meta = schema.document(
        name=name,
        labels=LABELS,
        embedding_dim=DIM,
        preprocess=preprocess,
        features=features,
        arch="tiny",
        family="test",
        dataset="synthetic",
        precision="fp32",
        weights={"source": "onnx.helper", "sha256": None},
        self_check=check,
        onnx_sha256=hashlib.sha256((directory / schema.MODEL_FILE).read_bytes()).hexdigest(),
    )
    import json

    (directory / schema.METADATA_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return directory
