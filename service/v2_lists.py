"""The ``data`` of a V2 JSON tensor: numbers (or base64 strings) as a flat list or as
lists nested to the tensor's shape, both valid in the protocol, walked without recursion
and without copying more than the shape holds."""

from __future__ import annotations

from typing import Any


def leaves(data: Any, limit: int) -> list[Any]:
    """The elements of ``data``, flat or nested lists alike (both are valid V2 ``data``),
    in row-major order; at most ``limit + 1``. Iterative: nesting depth costs no stack."""
    out: list[Any] = []
    stack = [iter([data])]
    while stack and len(out) <= limit:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
            if len(out) > limit:
                break
        else:
            stack.pop()
    return out


def nested_as(data: list[Any], shape: list[int]) -> bool:
    """Whether lists nested as deep as ``shape`` have its sizes along their first elements;
    checked before numpy copies them: tens of millions of numbers for a small shape were
    seconds on the loop (lists ragged further in, numpy refuses without copying them)."""
    node: Any = data
    for size in shape:
        if not isinstance(node, list) or len(node) != size:
            return False
        node = node[0] if node else None
    return not isinstance(node, list)
