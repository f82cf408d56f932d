"""HTML report sections of the metric plugins that declare one (rendered from a result's JSON form)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def convergence_note(curve: Sequence[Mapping[str, Any]]) -> str:
    """One sentence on whether the k-NN estimate still falls as the number of fit rows n doubles.

    k-NN converges to the Bayes risk from above, typically: while the error still falls at the
    largest n, the Bayes risk is probably lower than estimated, and the leakage higher.
    """
    errors = [float(p["knn_error"]) for p in curve if isinstance(p.get("knn_error"), (int, float))]
    if len(errors) < 3:
        return "Too few points to see whether the estimate converged."
    drops = [errors[i - 1] - errors[i] for i in (-2, -1)]
    if all(d > 0 for d in drops):
        return (f"The k-NN error still falls at each of the last two doublings of n ({100 * drops[0]:.1f} and "
                f"{100 * drops[1]:.1f} points): it has probably not converged, so the Bayes risk is likely lower "
                "and the leakage higher than estimated, and the accuracy bound may be beaten.")  # fmt: skip
    return ("The k-NN error did not fall at both of the last two doublings of n: no sign that more rows "
            "would lower it much (not a proof of convergence).")


def bayes_risk_html(result: Mapping[str, Any]) -> str:
    """The section of a ``bayes-risk`` result: the estimate, its bound, and its convergence over n."""
    import html

    from leakaudit.html_report import table, with_interval

    details = result.get("details") or {}
    curve = [p for p in details.get("convergence") or [] if isinstance(p, Mapping)]
    rows = [(p.get("n"), p.get("k"), p.get("knn_error"), p.get("nn_error"), p.get("lower_bound"),
             None if not isinstance(p.get("lower_bound"), (int, float)) else 1.0 - p["lower_bound"]) for p in curve]  # fmt: skip
    pca = details.get("pca")
    features = (f"a {pca.get('components')}-component PCA of standardised Z ({details.get('features')} features)"
                if isinstance(pca, Mapping) else f"standardised Z ({details.get('features')} features)")  # fmt: skip
    summary = (
        f"<div class='sub'>task <code>{html.escape(str(details.get('task')))}</code>, k-NN on {html.escape(features)}, "
        f"fitted on {details.get('fit_rows')} rows, scored on {details.get('test_rows')} test rows; "
        f"<code>bayes_risk_knn</code> {with_interval(result.get('bayes_risk_knn'), details.get('bayes_risk_knn_ci95'))}, "
        f"<code>private_accuracy_bound</code> "
        f"{with_interval(result.get('private_accuracy_bound'), details.get('private_accuracy_bound_ci95'))}, "
        f"chance error {details.get('chance_error', float('nan')):.4g}</div>"
    )
    return (
        "<h2>Bayes-risk estimate and its convergence over n</h2>" + summary
        + table(["fit rows n", "k", "k-NN error", "1-NN error", "Cover–Hart lower bound", "accuracy bound"], rows,
                numeric=range(6))
        + f"<p class='sub'>{html.escape(convergence_note(curve))}</p>"
    )  # fmt: skip
