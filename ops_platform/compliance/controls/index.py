"""Objects found by the labels they select, so that matching selectors to pods stays linear.

A :class:`SelectorIndex` holds objects with a LabelSelector (PodDisruptionBudgets,
NetworkPolicies) by namespace and by one ``key=value`` of their matchLabels:
the candidates for a pod's labels are the objects indexed under one of those
labels, plus the few whose selector has no matchLabels (empty selectors select
every pod; matchExpressions-only selectors are tried one by one). Each
candidate is then matched in full with :func:`selects`. Testing every budget
against every Deployment of a namespace made a 168k-object file take minutes.

Objects meet only within one scope (:func:`scopes_of`): a namespace, and the
environment a Helm chart was rendered for, so the dev rendering of a chart
never matches the prod one, while both see the plain manifests of their
namespace.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

from ops_platform.compliance.controls.shapes import ShapeError, mapping, mappings, strings, text
from ops_platform.compliance.evidence import Obj, namespace_of

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
Scope = tuple[str, str | None]


def scope_of(obj: Obj) -> Scope:
    """The namespace of an object and the environment its chart was rendered for (None: a plain manifest)."""
    environment = getattr(obj, "environment", None)
    return namespace_of(obj), environment if isinstance(environment, str) else None


def scopes_of(obj: Obj) -> list[Scope]:
    """The scopes whose objects ``obj`` meets: its own and, for a rendered object, its namespace's plain one."""
    namespace, environment = scope_of(obj)
    return [(namespace, environment), (namespace, None)] if environment is not None else [(namespace, None)]


class ScopedNames:
    """Objects by scope and by a key (a name, a scale target): what a workload refers to."""

    def __init__(self, objects: Iterable[Obj], key_of: Callable[[Obj], object]) -> None:
        self._by_key: dict[tuple[Scope, object], list[Obj]] = defaultdict(list)
        for obj in objects:
            try:
                key = key_of(obj)
            except ShapeError:
                continue
            if key is not None:
                self._by_key[(scope_of(obj), key)].append(obj)

    def get(self, obj: Obj, key: object) -> list[Obj]:
        """The objects under ``key`` in the scopes ``obj`` meets."""
        return [found for scope in scopes_of(obj) for found in self._by_key.get((scope, key), [])]


def selector_problem(selector: object) -> str | None:
    """Why a LabelSelector is invalid (the API server would refuse it), None when it is valid."""
    try:
        _parse(selector)
    except ShapeError as exc:
        return str(exc)
    return None


def _parse(selector: object) -> tuple[dict[str, str], list[tuple[str, str, list[str]]]]:
    body = mapping(selector, "selector")
    match_labels = {
        str(key): str(value) for key, value in mapping(body.get("matchLabels"), "selector.matchLabels").items()
    }
    expressions = []
    for index, expression in enumerate(mappings(body.get("matchExpressions"), "selector.matchExpressions")):
        where = f"selector.matchExpressions[{index}]"
        key = text(expression.get("key"), f"{where}.key") or ""
        operator = text(expression.get("operator"), f"{where}.operator") or ""
        values = strings(expression.get("values"), f"{where}.values")
        if operator not in OPERATORS:
            raise ShapeError(f"{where}.operator {operator!r} is not one of {', '.join(OPERATORS)}")
        if (operator in ("In", "NotIn")) != bool(values):
            need = "needs values" if operator in ("In", "NotIn") else "takes no values"
            raise ShapeError(f"{where}: operator {operator} {need}")
        expressions.append((key, operator, values))
    return match_labels, expressions


def selects(selector: object, labels: dict[str, str]) -> bool:
    """Whether a LabelSelector selects ``labels``: an empty selector selects everything, null or an
    invalid selector nothing."""
    if selector is None:
        return False
    try:
        match_labels, expressions = _parse(selector)
    except ShapeError:
        return False
    if any(labels.get(key) != value for key, value in match_labels.items()):
        return False
    for key, operator, values in expressions:
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


class SelectorIndex:
    """Objects of one kind by namespace and by one label of their selector; see the module docstring."""

    def __init__(self, objects: Iterable[Obj], selector_of: Callable[[Obj], object]) -> None:
        self._selector_of = selector_of
        self._by_label: dict[tuple[Scope, str, str], list[Obj]] = defaultdict(list)
        self._unlabelled: dict[Scope, list[Obj]] = defaultdict(list)
        for obj in objects:
            try:
                selector = selector_of(obj)
            except ShapeError:
                continue
            if selector is None or selector_problem(selector) is not None:
                continue  # selects nothing
            match_labels, _ = _parse(selector)
            scope = scope_of(obj)
            if match_labels:
                key, value = min(match_labels.items())
                self._by_label[(scope, key, value)].append(obj)
            else:
                self._unlabelled[scope].append(obj)

    def candidates(self, obj: Obj, labels: dict[str, str]) -> list[Obj]:
        """The objects that may select ``labels`` (of the pods of ``obj``): every one that does, and few
        that do not."""
        found = []
        for scope in scopes_of(obj):
            found.extend(self._unlabelled.get(scope, []))
            for key, value in labels.items():
                found.extend(self._by_label.get((scope, key, value), []))
        return found

    def selecting(self, obj: Obj, labels: dict[str, str]) -> list[Obj]:
        """The objects, in the scopes of ``obj``, whose selector selects ``labels``."""
        return [found for found in self.candidates(obj, labels) if selects(self._selector_of(found), labels)]
