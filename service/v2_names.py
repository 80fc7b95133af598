"""The model names the V2 front ends (HTTP and gRPC) answer to, in one place.

Every served model ``M`` is addressable under its own name and under ``M.encoded``
(``ENCODED_SUFFIX``): the same sessions, batcher, outputs and statistics, whose metadata and
Triton configuration declare the one input ``images`` as ``BYTES`` with dims ``[1]``
(metadata shape ``[-1, 1]``) and whose inference takes encoded image files only. It is
what Triton users deploy as an ensemble with an image-decoding step in front of the
network: a name under which tools that take each input's datatype from the metadata
(perf_analyzer, generic clients) send encoded images. ``M`` itself lists ``images`` as
``UINT8 [-1, H, W, 3]`` and takes both forms.

The alias is not a model of its own: /v1 and the repository index do not list it, and
its statistics are ``M``'s (its name on ``M``'s counts). A served model really named
``M.encoded`` is that model, never an alias.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass
from typing import TYPE_CHECKING

from resnet_serve.service.errors import ModelNotFoundError

if TYPE_CHECKING:
    from resnet_serve.contract.schema import ModelSpec
    from resnet_serve.service.engine import Engine
    from resnet_serve.service.runtime import ServedModel

ENCODED_SUFFIX = ".encoded"
VERSION = "1"  # a repository holds one version of each model


@dataclass(frozen=True)
class V2Model:
    """A served model as a V2 name addresses it: itself, or (``encoded``) its alias."""

    served: ServedModel
    encoded: bool = False

    @property
    def name(self) -> str:
        return self.served.name + ENCODED_SUFFIX if self.encoded else self.served.name

    @property
    def spec(self) -> ModelSpec:
        return self.served.spec


def base_name(name: str, served: Container[str]) -> str:
    """The served model a V2 ``name`` addresses (``M`` for ``M.encoded``), or ``name``."""
    if name not in served and name.endswith(ENCODED_SUFFIX):
        base = name[: -len(ENCODED_SUFFIX)]
        if base in served:
            return base
    return name


def resolve(engine: Engine, name: str, version: str | None = None) -> V2Model:
    """The model a V2 request names (empty: the default model), at ``version`` (empty or
    None: the one there is); 404 (``ModelNotFoundError``) otherwise."""
    base = base_name(name, engine.runtime.models)
    served = engine.model(base or None)
    if version and version != VERSION:
        raise ModelNotFoundError(f"{name} version {version}", [f"{name} version {VERSION}"])
    return V2Model(served, encoded=base != name)


def every_model(models: dict[str, ServedModel]) -> list[V2Model]:
    """The served models under their own names: what the unnamed statistics list."""
    return [V2Model(m) for m in models.values()]
