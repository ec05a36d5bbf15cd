"""Reading objects whatever their shape.

Valid YAML can hold what the API server would refuse: a string where it wants
an object, ``[null]`` where it wants a list of containers. A control reads
fields through :func:`mapping`, :func:`sequence` and :func:`text`, which take
null for absent (as the API does) and raise :class:`ShapeError` naming the
field for anything else; :func:`judge_each` turns that error into a failing
outcome of the object, so an odd object is a finding, never a crash.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ops_platform.compliance.evidence import Obj, ref
from ops_platform.compliance.model import Outcome


class ShapeError(Exception):
    """A field does not have the shape the API gives it; the message names the field."""


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def mapping(value: object, where: str) -> dict[str, Any]:
    """``value`` as an object; null is an empty one."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    raise ShapeError(f"{where} is {_shown(value)}, not an object")


def sequence(value: object, where: str) -> list[Any]:
    """``value`` as a list; null is an empty one."""
    if value is None:
        return []
    if isinstance(value, list):
        return value
    raise ShapeError(f"{where} is {_shown(value)}, not a list")


def mappings(value: object, where: str) -> list[dict[str, Any]]:
    """A list of objects (rules, volumes, ports): every item must be one."""
    items = sequence(value, where)
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise ShapeError(f"{where}[{index}] is {'null' if item is None else _shown(item)}, not an object")
    return items


def strings(value: object, where: str) -> list[str]:
    """A list of names (verbs, capabilities): each item as a string."""
    return [str(item) for item in sequence(value, where)]


def text(value: object, where: str) -> str | None:
    """A string field; numbers are taken as written, null is None."""
    if value is None:
        return None
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ShapeError(f"{where} is {_shown(value)}, not a string")


def labels(obj: Obj, where: str = "metadata.labels") -> dict[str, str]:
    metadata = mapping(obj.get("metadata"), "metadata")
    return {str(key): str(value) for key, value in mapping(metadata.get("labels"), where).items()}


def judge_each(objects: Iterable[Obj], judge: Callable[[Obj], Outcome | None]) -> Iterator[Outcome]:
    """``judge(obj)`` for each object (None: out of scope); a ShapeError fails that object."""
    for obj in objects:
        try:
            outcome = judge(obj)
        except ShapeError as exc:
            outcome = Outcome(ref(obj), False, f"not judged: {exc}")
        if outcome is not None:
            yield outcome
