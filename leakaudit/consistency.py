"""Checks of a report's numbers against its bounds: an attack that beats a bound is a sign.

A bound (``private_accuracy_bound`` of the Bayes-risk metric, ``mse_bound`` of the Fisher
leakage) says what no attacker of a kind can do. A measured attack that does better than a
bound, by more than both numbers' 95 % intervals allow, means one of them is wrong — or, for
the MSE bound, which holds for *unbiased* attackers only, that the attack is biased. The
report lists each such finding under ``checks``, and says which explanation applies: an
attack that declares the prior it reconstructs with (``prior`` in its result) is biased by
construction, and beating the unbiased bound is then expected, not a bug.

Only numbers measured on the same store are compared, and an accuracy only with a bound on
the same task. Nothing here names a plugin: the names compared are the glossary's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from leakaudit.intervals import interval_name

#: Accuracy numbers an attack reports that the private-task accuracy bound caps.
ACCURACIES = ("private_accuracy", "private_accuracy_continuation")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _end(numbers: Mapping[str, Any], name: str, side: int) -> float | None:
    """``name``'s interval end (0: lower, 1: upper), or its point value where it has no interval."""
    interval = numbers.get(interval_name(name))
    if isinstance(interval, (list, tuple)) and len(interval) == 2:
        return _number(interval[side])
    return _number(numbers.get(name))


def _bounds(results: Mapping[str, Any], name: str) -> list[tuple[str, Mapping[str, Any]]]:
    """The metric results that measured the bound ``name``: (key, its numbers with their details)."""
    found: list[tuple[str, Mapping[str, Any]]] = []
    for key, result in sorted(results.items()):
        if isinstance(result, Mapping) and "threat" not in result and _number(result.get(name)) is not None:
            details = result.get("details")
            found.append((key, {**(details if isinstance(details, Mapping) else {}), **result}))
    return found


def _task(result: Mapping[str, Any]) -> Any:
    config = result.get("config")
    return result.get("task", config.get("task") if isinstance(config, Mapping) else None)


def _shown(numbers: Mapping[str, Any], name: str) -> str:
    interval = numbers.get(interval_name(name))
    point = f"{float(numbers[name]):.4g}"
    if isinstance(interval, (list, tuple)) and len(interval) == 2:
        return f"{point} [{float(interval[0]):.4g}, {float(interval[1]):.4g}]"
    return point


def accuracy_checks(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Attacks whose private-task accuracy is above ``private_accuracy_bound`` beyond both intervals."""
    found = []
    for bound_key, bound in _bounds(results, "private_accuracy_bound"):
        ceiling = _end(bound, "private_accuracy_bound", 1)
        for key, result in sorted(results.items()):
            if not isinstance(result, Mapping) or "threat" not in result or _task(result) != _task(bound):
                continue
            numbers = {**result, **(result.get("report_metrics") or {})}
            for name in ACCURACIES:
                floor = _end(numbers, name, 0)
                if floor is None or ceiling is None or floor <= ceiling:
                    continue
                found.append({
                    "kind": "above-bound", "attack": key, "name": name, "value": float(numbers[name]),
                    "bound": "private_accuracy_bound", "bound_from": bound_key,
                    "bound_value": float(bound["private_accuracy_bound"]),
                    "message": (
                        f"{key}'s {name} {_shown(numbers, name)} is above {bound_key}'s private_accuracy_bound "
                        f"{_shown(bound, 'private_accuracy_bound')} beyond both intervals: no attacker can beat that "
                        "bound, so one of the two is wrong (test rows seen in training, labels shuffled between "
                        "them, or too few rows for the k-NN estimate: see its convergence over n)."
                    ),
                })  # fmt: skip
    return found


def mse_checks(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Reconstruction attacks whose MSE is below ``mse_bound`` (1/dFIL) beyond the attack's interval."""
    found = []
    for bound_key, bound in _bounds(results, "mse_bound"):
        floor = float(bound["mse_bound"])
        for key, result in sorted(results.items()):
            if not isinstance(result, Mapping) or "threat" not in result:
                continue
            numbers = {**result, **(result.get("report_metrics") or {})}
            upper = _end(numbers, "mse", 1)
            if upper is None or upper >= floor:
                continue
            prior = result.get("prior")
            if prior:
                explanation = (f"the bound holds for unbiased attackers, and this one is biased (it reconstructs "
                               f"with {prior}), so it does not contradict the bound")  # fmt: skip
            else:
                explanation = ("no unbiased attacker can do that and this attack declares no prior, so the bound "
                               "(or the noise scale it was computed for) or the attack is wrong: report it")  # fmt: skip
            found.append({
                "kind": "below-bound", "attack": key, "name": "mse", "value": float(numbers["mse"]),
                "bound": "mse_bound", "bound_from": bound_key, "bound_value": floor, "biased": bool(prior),
                "message": f"{key}'s mse {_shown(numbers, 'mse')} is below {bound_key}'s mse_bound (1/dFIL) "
                           f"{floor:.4g}: {explanation}.",
            })  # fmt: skip
    return found


def consistency_checks(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every finding of :func:`accuracy_checks` and :func:`mse_checks`, in a stable order."""
    return accuracy_checks(results) + mse_checks(results)
