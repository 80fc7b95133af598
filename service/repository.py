"""Finding the models of a repository: ``<repository>/<name>/model.onnx`` + ``model.json``
(read with ``contract.schema``, the format both halves share)."""

from __future__ import annotations

from pathlib import Path

# The model.json format itself is the contract's (shared with the build step).
from resnet_serve.contract.schema import ModelSpec, RepositoryError, load_model_spec

__all__ = ["ModelSpec", "RepositoryError", "discover", "load_model_spec"]


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
