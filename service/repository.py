"""Finding the models of a repository: ``<repository>/<name>/model.onnx`` + ``model.json``
(read with ``contract.schema``, the format both halves share)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The model.json format itself is the contract's (shared with the build step).
from resnet_serve.contract.schema import ModelSpec, RepositoryError, load_model_spec

__all__ = ["ModelSpec", "RepositoryError", "check_graph", "discover", "load_model_spec"]


def discover(repository: Path, names: list[str] | None = None) -> list[ModelSpec]:
    """The models of ``repository`` (sorted by name), or exactly ``names`` in that order."""
    if not repository.is_dir():
        raise RepositoryError(
            f"model repository {repository} does not exist (create it and its models with "
            f"resnet-export, e.g. resnet-export resnet50 --repository {repository})"
        )
    if names:
        missing = [n for n in names if not (repository / n).is_dir()]
        if missing:
            available = sorted(p.name for p in repository.iterdir() if (p / "model.json").exists())
            raise RepositoryError(
                f"models not in {repository}: {', '.join(missing)} "
                f"(available: {', '.join(available) or 'none'})"
            )
        dirs = [repository / n for n in names]
    else:
        dirs = sorted(p for p in repository.iterdir() if (p / "model.json").is_file())
        if not dirs:
            raise RepositoryError(
                f"no models in {repository} (expected <name>/model.onnx + model.json; "
                "create them with resnet-export)"
            )
    return [load_model_spec(d) for d in dirs]


def check_graph(spec: ModelSpec, session: Any) -> None:
    """``model.json`` against the graph it describes (an onnxruntime session of it): a
    document edited by hand or copied beside another model fails the start with one line,
    not with a warm-up that never ends (the input's size) or with 500s and wrong labels
    (the outputs'). Dimensions the graph leaves open (the batch) are not compared."""

    def differs(dims: list[Any], want: tuple[int, ...]) -> bool:
        return len(dims) != len(want) or any(
            isinstance(d, int) and d != w for d, w in zip(dims, want, strict=True)
        )

    problems = []
    inputs = session.get_inputs()
    if len(inputs) != 1 or differs(inputs[0].shape[1:], spec.input_shape):
        shapes, want = ", ".join(str(i.shape) for i in inputs), list(spec.input_shape)
        problems.append(f"input {shapes}, the document's [N, {str(want)[1:-1]}]")
    outputs = {o.name: o.shape[1:] for o in session.get_outputs()}
    for name in spec.output_names:
        if name not in outputs:
            problems.append(f"no output {name!r}")
        elif differs(outputs[name], spec.output_shape(name)):
            problems.append(f"output {name!r} {outputs[name]} per image, the document's "
                            f"{list(spec.output_shape(name))}")  # fmt: skip
    if problems:
        raise RepositoryError(
            f"{spec.path / 'model.json'} does not describe its model.onnx: {'; '.join(problems)}"
        )
