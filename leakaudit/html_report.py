"""``leakaudit report``: one self-contained HTML page a reviewer can read in a minute.

Everything is inline: styles, charts drawn as SVG, images embedded as base64 PNG. The page
loads nothing from the network. Sections appear when the report has their data: the gate
verdict, the metrics table with baseline and drops, the attacks, the reconstruction grid,
a t-SNE of Z coloured by public and by private labels (Scrunch Fig. 6), the comparison
table of hardening recipes, and privacy–utility curves for sweeps (Scrunch Figs. 4–5).
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from leakaudit import __version__, data_paths, glossary
from leakaudit.intervals import format_interval, interval_name, interval_problem, is_interval_name

PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1080px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde1e7;padding-bottom:4px}
.sub{color:#5b6475} .card{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:14px 16px;margin:10px 0}
table{border-collapse:collapse;width:100%;background:#fff} th,td{padding:5px 8px;border-bottom:1px solid #eceff3;text-align:left}
th{background:#f0f2f5;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#17803d;font-weight:600} .fail{color:#b42318;font-weight:600} .muted{color:#8a93a3}
.verdict{font-size:18px;font-weight:700;padding:10px 14px;border-radius:8px;display:inline-block}
.verdict.pass{background:#e7f6ec} .verdict.fail{background:#fdecea} .verdict.none{background:#eef0f3;color:#5b6475}
.grid{display:flex;flex-wrap:wrap;gap:16px} .grid>div{flex:1 1 420px}
img.recon{image-rendering:pixelated;max-width:100%;border:1px solid #dde1e7}
code{background:#eef0f3;padding:1px 4px;border-radius:3px}
.warnings{background:#fff8e6;border:1px solid #f0d58c;border-radius:8px;padding:8px 16px 8px 32px;margin:10px 0}
"""


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}"
    if interval_problem(value) is None:  # a [lo, hi] interval, as a sweep's row may hold
        return format_interval(value, f".{digits - 1}g")
    return html.escape(str(value))


def with_interval(value: Any, interval: Any, digits: int = 4) -> str:
    """A table cell: the value, and its 95 % interval beside it in grey when there is one."""
    shown = fmt(value, digits)
    if value is None or interval_problem(interval) is not None:
        return f"<span>{shown}</span>"
    return f"<span>{shown} <span class='muted'>{format_interval(interval, f'.{digits - 1}g')}</span></span>"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            cls = ' class="num"' if i in numeric else ""
            cells.append(f"<td{cls}>{cell if isinstance(cell, str) and cell.startswith('<') else fmt(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def png_data_uri(path: str | Path) -> str | None:
    path = Path(path)
    if not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


# --------------------------------------------------------------------------- SVG charts


def svg_scatter(points: np.ndarray, labels: np.ndarray, names: Sequence[str], title: str, size: int = 420) -> str:
    """A scatter plot of 2-D points coloured by label, with a legend."""
    pad = 28
    lo, hi = points.min(0), points.max(0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    xy = (points - lo) / span * (size - 2 * pad) + pad
    dots = "".join(
        f'<circle cx="{x:.1f}" cy="{size - y:.1f}" r="2.6" fill="{PALETTE[int(c) % len(PALETTE)]}" fill-opacity="0.75"/>'
        for (x, y), c in zip(xy, labels)
    )
    legend = "".join(
        f'<g transform="translate({size + 8},{20 + 16 * i})"><rect width="10" height="10" fill="{PALETTE[i % len(PALETTE)]}"/>'
        f'<text x="14" y="9" font-size="11">{html.escape(str(name))}</text></g>'
        for i, name in enumerate(names)
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{html.escape(title)}" '
        f'width="{size + 110}" height="{size}" viewBox="0 0 {size + 110} {size}">'
        f'<rect width="{size}" height="{size}" fill="#fff" stroke="#dde1e7"/>'
        f'<text x="8" y="16" font-size="12" font-weight="600">{html.escape(title)}</text>{dots}{legend}</svg>'
    )


def svg_lines(x: Sequence[float], series: Mapping[str, Sequence[float | None]], title: str, xlabel: str, width: int = 460, height: int = 300) -> str:
    """A line chart of several series over the same x values (a privacy–utility curve)."""
    left, right, top, bottom = 46, 130, 24, 36
    xs = np.asarray(x, dtype=float)
    values = [v for s in series.values() for v in s if v is not None and math.isfinite(v)]
    if not values or len(xs) == 0:
        return ""
    y_lo, y_hi = min(0.0, min(values)), max(1.0, max(values))
    x_lo, x_hi = float(xs.min()), float(xs.max())
    x_span = x_hi - x_lo or 1.0

    def px(value: float) -> float:
        return left + (value - x_lo) / x_span * (width - left - right)

    def py(value: float) -> float:
        return height - bottom - (value - y_lo) / (y_hi - y_lo or 1.0) * (height - top - bottom)

    parts = [f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" fill="#fff" stroke="#dde1e7"/>']
    for tick in np.linspace(y_lo, y_hi, 5):
        parts.append(f'<text x="{left - 6}" y="{py(tick) + 4:.1f}" font-size="10" text-anchor="end">{tick:.2g}</text>')
    for value in xs:
        parts.append(f'<text x="{px(value):.1f}" y="{height - bottom + 14}" font-size="10" text-anchor="middle">{value:g}</text>')
    for i, (name, ys) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        pts = [(px(a), py(b)) for a, b in zip(xs, ys) if b is not None and math.isfinite(b)]
        if pts:
            path = " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
            parts.extend(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{color}"/>' for a, b in pts)
        parts.append(
            f'<g transform="translate({width - right + 8},{top + 16 * i})"><rect width="10" height="10" fill="{color}"/>'
            f'<text x="14" y="9" font-size="11">{html.escape(name)}</text></g>'
        )
    parts.append(f'<text x="{(left + width - right) / 2:.0f}" y="{height - 4}" font-size="11" text-anchor="middle">{html.escape(xlabel)}</text>')
    parts.append(f'<text x="{left}" y="14" font-size="12" font-weight="600">{html.escape(title)}</text>')
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{html.escape(title)}" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}">{"".join(parts)}</svg>'
    )


# --------------------------------------------------------------------------- t-SNE


TSNE_MIN_ROWS = 5  # fewer points than this make no picture worth drawing
TSNE_PCA_COMPONENTS = 50


def tsne_embedding(store_path: str | Path, *, max_points: int = 800, seed: int = 0) -> dict[str, Any] | None:
    """2-D t-SNE of the test rows' Z, with the labels of every task; ``None`` without a store.

    The embedding adapts to small test splits (t-SNE's perplexity must stay below the number
    of points, and PCA cannot keep more components than rows or features). With fewer than
    ``TSNE_MIN_ROWS`` test rows it returns ``{"points": None, "labels": {}, "note": why}``
    instead, so that a report or an audit still completes without the picture.
    """
    from leakaudit.store import open_store

    path = Path(store_path)
    if not path.exists():
        return None
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    with open_store(path) as store:
        rows = store.rows("test")
        if len(rows) < TSNE_MIN_ROWS:
            return {
                "points": None,
                "labels": {},
                "note": f"t-SNE skipped: the store has {len(rows)} test rows, fewer than {TSNE_MIN_ROWS}.",
            }
        rng = np.random.default_rng(seed)
        if len(rows) > max_points:
            rows = np.sort(rng.choice(rows, size=max_points, replace=False))
        z = store.activations(rows).reshape(len(rows), -1).astype(np.float64)
        labels = {task: (store.labels(task)[rows], store.class_names(task)) for task in store.tasks}
    z = (z - z.mean(0)) / np.where(z.std(0) > 0, z.std(0), 1.0)
    n, d = z.shape
    components = min(TSNE_PCA_COMPONENTS, n, d)
    if d > components:
        z = PCA(n_components=components, random_state=seed).fit_transform(z)
    perplexity = float(min(30, max(5, (n - 1) // 4), n - 1))
    points = TSNE(n_components=2, init="pca" if z.shape[1] >= 2 else "random", perplexity=perplexity, random_state=seed).fit_transform(z)
    return {"points": points, "labels": labels}


# --------------------------------------------------------------------------- page


def _compared(check: Mapping[str, Any]) -> str:
    """What a gate check compared: ``point``, or ``lower95 = 0.1211``."""
    use, compared = check.get("use", "point"), check.get("compared")
    return str(use) if use == "point" or not isinstance(compared, (int, float)) else f"{use} = {compared:.4g}"


def _plugin_section(key: str, result: Any) -> str | None:
    """The HTML section the plugin behind ``key`` (``attack:NAME``) renders for its result, if it declares one."""
    from leakaudit.registry import FAMILIES

    family, _, name = key.partition(":")
    registry = FAMILIES.get(family + "s")
    if registry is None or not isinstance(result, Mapping) or name not in registry:
        return None
    plugin = registry.get(name)
    return plugin.html(result) if plugin.html is not None else None


def _seeds_section(key: str, result: Any) -> str | None:
    """The numbers of a result retrained with ``--seeds N``: mean, interval and each seed's value."""
    per_seed = result.get("per_seed") if isinstance(result, Mapping) else None
    if not isinstance(per_seed, list) or len(per_seed) < 2:
        return None
    seeds = [row.get("seed") for row in per_seed]
    values = [row.get("metrics") or {} for row in per_seed]
    rows = []
    for name, mean in result.items():
        if is_interval_name(name) or not all(isinstance(v.get(name), (int, float)) for v in values):
            continue
        if not isinstance(mean, (int, float)) or isinstance(mean, bool):
            continue
        rows.append((f"<code>{html.escape(name)}</code>", with_interval(mean, result.get(interval_name(name))),
                     *[v[name] for v in values]))
    if not rows:
        return None
    choices = ["; ".join(f"{k} {v}" for k, v in (row.get("choices") or {}).items()) for row in per_seed]
    note = ""
    if any(choices):
        note = "<p class='sub'>" + " · ".join(
            f"seed {html.escape(str(s))}: {html.escape(c)}" for s, c in zip(seeds, choices) if c) + "</p>"
    header = ["metric", "mean [95 % over seeds and test rows]", *(f"seed {s}" for s in seeds)]
    return (f"<h2>Training seeds of <code>{html.escape(key)}</code></h2>"
            + table(header, rows, numeric=range(1, len(seeds) + 2)) + note)


def _attacker(pick: Mapping[str, Any] | None) -> str:
    """The attack a headline number came from, and its attacker, for the metrics table."""
    if not pick:
        return ""
    threat = pick.get("threat") or {}
    name = str(pick.get("attack", "")).partition(":")[2]
    return html.escape(f"{name} (knows {threat.get('knows')} · holds {threat.get('holds')})")


def render(
    report: Mapping[str, Any],
    *,
    verdict: Mapping[str, Any] | None = None,
    embedding: Mapping[str, Any] | None = None,
) -> str:
    """The HTML page for ``report`` (a loaded report.json)."""
    subject = report.get("subject", {})
    metrics = report.get("metrics", {})
    baseline = (report.get("baseline") or {}).get("metrics", {})
    results = report.get("results", {})
    sections: list[str] = []

    title = f"leakaudit — {subject.get('model_spec', '?')} split at {subject.get('layer', '?')}"
    sha = str(subject.get("checkpoint_sha256") or "")
    sections.append(
        f"<h1>{html.escape(title)}</h1><div class='sub'>data <code>{html.escape(str(subject.get('data_spec')))}</code>, "
        f"{fmt(subject.get('rows'))} rows, checkpoint <code>{html.escape(sha[:12] or 'none (random init)')}</code>, "
        f"store <code>{html.escape(str(subject.get('store')))}</code> · report updated {html.escape(str(report.get('updated')))}"
        f" · leakaudit {html.escape(__version__)}</div>"
    )

    if verdict is None:
        verdict = report.get("gate")
    if verdict is not None:
        passed = bool(verdict.get("passed"))
        rows = [
            (c["metric"], c.get("value"), c.get("interval"), _compared(c), c["threshold"],
             f"<span class='{'pass' if c['passed'] else 'fail'}'>"
             f"{'pass' if c['passed'] else 'fail ' + html.escape(c.get('reason', ''))}</span>")
            for c in verdict.get("checks", [])
        ]  # fmt: skip
        sections.append(
            f"<h2>Verdict</h2><div class='verdict {'pass' if passed else 'fail'}'>{'Gate passed' if passed else 'Gate failed'}</div>"
            + table(["metric", "value", "95 % interval", "compared", "threshold", "verdict"], rows, numeric=(1, 2))
        )
    else:
        sections.append("<h2>Verdict</h2><div class='verdict none'>No policy was applied</div>")

    warnings = [
        (key, str(message))
        for key, result in results.items()
        if isinstance(result, Mapping)
        for message in (result.get("warnings") or [])
    ]
    if warnings:
        items = "".join(f"<li><code>{html.escape(str(key))}</code>: {html.escape(message)}</li>" for key, message in warnings)
        sections.append(f"<h2>Warnings</h2><ul class='warnings'>{items}</ul>")

    checks = report.get("checks") or []
    if checks:
        items = "".join(f"<li>{html.escape(str(c.get('message', '')))}</li>" for c in checks if isinstance(c, Mapping))
        sections.append(f"<h2>Attacks against the bounds</h2><ul class='warnings'>{items}</ul>")

    metric_rows = []
    meanings = glossary.names()
    headline = report.get("headline", {})
    # An interval is shown beside its number, not as a row of its own.
    for name in [n for n in meanings if n in metrics] + sorted(set(metrics) - set(meanings)):
        if name not in metrics or is_interval_name(name):
            continue
        value, base = metrics[name], baseline.get(name)
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (value, base))
        delta = value - base if numbers else None
        interval = metrics.get(interval_name(name))
        metric_rows.append((f"<code>{html.escape(name)}</code>", value, interval, base, delta, _attacker(headline.get(name)), meanings.get(name, "")))
    header = ["metric", "value", "95 % interval", "baseline", "change", "attack (attacker)", "meaning"]
    block = "<h2>Metrics</h2>" + table(header, metric_rows, numeric=(1, 2, 3, 4))
    scope = report.get("threat_scope")
    if scope:
        block += f"<p class='sub'>threat scope: attackers that know at most {html.escape(str(scope.get('knows')))} and hold at most {html.escape(str(scope.get('holds')))}</p>"
    for name, reason in (report.get("out_of_scope") or {}).items():
        block += f"<p class='sub'>left out: attack <code>{html.escape(name)}</code> — {html.escape(reason)}</p>"
    sections.append(block)
    paths = data_paths.records(results)
    if paths:
        path_rows = [tuple(f"<span>{html.escape(text)}</span>" for text in (r.result, r.part or "all rows", r.path, r.reason))
                     for r in paths]  # fmt: skip
        sections.append("<h2>How the rows were read</h2>" + table(["result", "rows", "path", "why"], path_rows))

    comparison = report.get("comparison")
    if comparison:
        columns = comparison["columns"]
        labels = comparison.get("labels", {})
        sections.append(
            "<h2>Hardening recipes compared (Scrunch Table 1 style)</h2>"
            + table(
                ["model", *[labels.get(c, c) for c in columns]],
                [[row["name"], *[row.get(c) for c in columns]] for row in comparison["rows"]],
                numeric=range(1, len(columns) + 1),
            )
        )

    for key, result in results.items():
        section = _plugin_section(key, result)
        if section:
            sections.append(section)
    for key, result in results.items():
        section = _seeds_section(key, result)
        if section:
            sections.append(section)

    if embedding is not None and embedding.get("points") is None:
        note = embedding.get("note") or "t-SNE skipped."
        sections.append(f"<h2>t-SNE of the activations (test rows)</h2><div class='sub'>{html.escape(note)}</div>")
    elif embedding is not None:
        plots = []
        for task in ("public", "private", *[t for t in embedding["labels"] if t not in ("public", "private")]):
            if task in embedding["labels"]:
                labels, names = embedding["labels"][task]
                plots.append(f"<div>{svg_scatter(np.asarray(embedding['points']), np.asarray(labels), names, f't-SNE of Z — {task} labels')}</div>")
        sections.append("<h2>t-SNE of the activations (test rows)</h2><div class='grid'>" + "".join(plots[:3]) + "</div>")

    sweep = report.get("sweep")
    if sweep and sweep.get("rows"):
        parameter = sweep.get("parameter", "λ")
        xs = [row[parameter] for row in sweep["rows"]]
        columns = [c for c in sweep.get("columns", []) if c != parameter]
        curves = {c: [row.get(c) for row in sweep["rows"]] for c in columns if all(isinstance(row.get(c), (int, float, type(None))) for row in sweep["rows"])}
        utility = {k: v for k, v in curves.items() if k != "intra_class_distance"}
        block = f"<h2>Privacy–utility sweep over {html.escape(parameter)}</h2><div class='grid'><div>{svg_lines(xs, utility, 'accuracy and leakage', parameter)}</div>"
        if "intra_class_distance" in curves:
            block += f"<div>{svg_lines(xs, {'intra-class distance': curves['intra_class_distance']}, 'intra-class distance (Scrunch Fig. 4)', parameter)}</div>"
        block += "</div>" + table([parameter, *columns], [[row.get(parameter), *[row.get(c) for c in columns]] for row in sweep["rows"]], numeric=range(0, len(columns) + 1))
        sections.append(block)

    body = "\n".join(f"<section>{s}</section>" for s in sections)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body><main>{body}</main>"
        f"<script>{IMAGE_CHECK}</script></body></html>\n"
    )


# Records on <body> whether every embedded image decoded, for headless-browser checks.
IMAGE_CHECK = (
    "window.addEventListener('load',function(){var i=Array.prototype.slice.call(document.images);"
    "document.body.setAttribute('data-images',String(i.length));"
    "document.body.setAttribute('data-images-ok',String(i.every(function(m){return m.complete&&m.naturalWidth>0;})));});"
)


# --------------------------------------------------------------------------- split-point scan


#: The leakage numbers a scan page plots against cost, where the scan computed them (all in [0, 1]).
SCAN_LEAKAGE = ("private_accuracy", "dcor_u2", "ssim_p95", "private_accuracy_bound")


def svg_tradeoff(
    costs: Sequence[float], series: Mapping[str, Sequence[float | None]], labels: Sequence[str], marked: int | None,
    title: str, xlabel: str, width: int = 500, height: int = 320,
) -> str:  # fmt: skip
    """Leakage (y) against a cost (x, log scale), one point per layer and series; layer ``marked`` ringed."""
    left, right, top, bottom = 46, 150, 24, 40
    xs = np.log10(np.maximum(np.asarray(costs, dtype=float), 1.0))
    x_lo, x_hi = float(xs.min()), float(xs.max())
    x_lo, x_hi = (x_lo - 0.5, x_hi + 0.5) if x_hi - x_lo < 1e-9 else (x_lo - 0.05 * (x_hi - x_lo), x_hi + 0.05 * (x_hi - x_lo))

    def px(value: float) -> float:
        return left + (value - x_lo) / (x_hi - x_lo) * (width - left - right)

    def py(value: float) -> float:
        return height - bottom - value * (height - top - bottom)

    parts = [f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" fill="#fff" stroke="#dde1e7"/>']
    parts += [f'<text x="{left - 6}" y="{py(t) + 4:.1f}" font-size="10" text-anchor="end">{t:.2g}</text>' for t in np.linspace(0, 1, 5)]
    for decade in range(math.ceil(x_lo), math.floor(x_hi) + 1):
        parts.append(f'<text x="{px(decade):.1f}" y="{height - bottom + 14}" font-size="10" text-anchor="middle">1e{decade}</text>')
    for i, x in enumerate(xs):
        parts.append(f'<text x="{px(x):.1f}" y="{top + 10 + 10 * (i % 2)}" font-size="9" text-anchor="middle" fill="#5b6475">{html.escape(labels[i])}</text>')
    for i, (name, ys) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        for j, (x, y) in enumerate(zip(xs, ys)):
            if y is None or not math.isfinite(y):
                continue
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(min(max(y, 0.0), 1.0)):.1f}" r="3.5" fill="{color}"><title>{html.escape(labels[j])}: {name} {y:.4g}</title></circle>')
            if j == marked:
                parts.append(f'<circle cx="{px(x):.1f}" cy="{py(min(max(y, 0.0), 1.0)):.1f}" r="7" fill="none" stroke="#17803d" stroke-width="2"/>')
        parts.append(f'<g transform="translate({width - right + 8},{top + 16 * i})"><rect width="10" height="10" fill="{color}"/><text x="14" y="9" font-size="11">{html.escape(name)}</text></g>')
    if marked is not None:
        parts.append(f'<g transform="translate({width - right + 8},{top + 16 * len(series)})"><circle cx="5" cy="5" r="5" fill="none" stroke="#17803d" stroke-width="2"/><text x="14" y="9" font-size="11">recommended: {html.escape(labels[marked])}</text></g>')
    parts.append(f'<text x="{(left + width - right) / 2:.0f}" y="{height - 6}" font-size="11" text-anchor="middle">{html.escape(xlabel)} (log scale)</text>')
    parts.append(f'<text x="{left}" y="14" font-size="12" font-weight="600">{html.escape(title)}</text>')
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{html.escape(title)}" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}">{"".join(parts)}</svg>'
    )


def render_scan(report: Mapping[str, Any]) -> str:
    """The HTML page of a split-point scan (a report with a ``scan`` section): table, trade-off plots, recommendation."""
    scan = report["scan"]
    subject = report.get("subject", {})
    rows = scan["layers"]
    names = [r["layer"] for r in rows]
    marked = names.index(scan["recommended"]) if scan.get("recommended") in names else None
    columns = [c for c in scan.get("columns", ()) if any(c in r["metrics"] for r in rows)]
    title = f"leakaudit scan — {subject.get('model_spec', '?')} on {subject.get('data_spec', '?')}"
    if scan.get("policy") is None:
        verdict = "<div class='verdict none'>No policy: choose from the trade-off below</div>"
    elif marked is None:
        verdict = "<div class='verdict fail'>No candidate layer passes the policy</div>"
    else:
        verdict = f"<div class='verdict pass'>Split at <code>{html.escape(names[marked])}</code>: the shallowest layer that passes</div>"
    why = "".join(f"<li>{html.escape(w)}</li>" for w in scan.get("why_not_shallower", []))
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in scan.get("notes", []))
    body_rows = [
        [f"<code>{html.escape(r['layer'])}</code>", "×".join(map(str, r["shape"])), r["bytes_per_sample"], r["client_params"],
         r["client_macs"], *[r["metrics"].get(c) for c in columns],
         *([("<span class='pass'>pass</span>" if r["gate"]["passed"] else "<span class='fail'>fail</span>")] if "gate" in r else [])]
        for r in rows
    ]  # fmt: skip
    header = ["layer", "Z shape", "bytes / sample", "client params", "client MACs", *columns, *(["policy"] if scan.get("policy") else [])]
    series = {c: [r["metrics"].get(c) for r in rows] for c in SCAN_LEAKAGE if any(c in r["metrics"] for r in rows)}
    plots = (
        f"<div>{svg_tradeoff([r['client_macs'] for r in rows], series, names, marked, 'leakage against client compute', 'client MACs per sample')}</div>"
        f"<div>{svg_tradeoff([r['bytes_per_sample'] for r in rows], series, names, marked, 'leakage against what is sent', 'bytes per sample (' + str(scan.get('dtype')) + ')')}</div>"
    )
    sections = [
        f"<h1>{html.escape(title)}</h1><div class='sub'>{fmt(scan.get('rows'))} rows, candidates {html.escape(str(scan.get('candidates')))}"
        f" · {html.escape(str(scan.get('cost_counting')))} · leakaudit {html.escape(__version__)}</div>",
        "<h2>Recommendation</h2>" + verdict + (f"<ul>{why}</ul>" if why else ""),
        "<h2>Layers, shallowest first</h2>" + table(header, body_rows, numeric=range(1, len(header))),
        f"<h2>Trade-off</h2><div class='grid'>{plots}</div>",
    ]
    if notes:
        sections.append(f"<h2>Notes</h2><ul class='warnings'>{notes}</ul>")
    body = "\n".join(f"<section>{s}</section>" for s in sections)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body><main>{body}</main></body></html>\n"
    )
