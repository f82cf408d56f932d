"""How the built-in attacks' results look in a terminal (``result.render()``).

Each result's ``render()`` returns rich renderables; ``leakaudit attack`` prints them, and
prints a plain table of the numbers for a plugin whose results do not render themselves.
A score's 95 % interval (bootstrap over test rows) is shown beside it: under the value in a
classifier's table, in a table of its own for the decoders (six scores each would not fit
a terminal's width), and after every headline number.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Narrow terminals shrink columns; numbers must not be cut to "0.6…" (nor intervals to "91.2–9…").
_MIN_WIDTH = {"head": 12, "decoder": 10, "test acc": 9, "refit acc": 9, "balanced": 9, "val acc": 6, "epochs": 8, "s/epoch": 6,
              "SSIM": 5, "p5": 5, "p50": 5, "p95": 5, "PSNR": 5, "MSE": 6, "val": 5, "s/ep": 5, "score": 9}  # fmt: skip


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _ci(interval: Any, digits: int = 3) -> str:
    """`` [0.912, 0.948]`` after a headline number; nothing when there is no interval."""
    from leakaudit.intervals import format_interval, interval_problem

    return "" if interval_problem(interval) is not None else " " + format_interval(interval, f".{digits}f")


def _pct_ci(value: float | None, interval: Any) -> Any:
    """A percentage with its interval on the line below, dimmed: ``93.1%`` / ``91.2–94.8``."""
    from rich.text import Text

    from leakaudit.intervals import interval_problem

    cell = Text(_pct(value))
    if value is not None and interval_problem(interval) is None:
        cell.append(f"\n{100 * interval[0]:.1f}–{100 * interval[1]:.1f}", style="dim")
    return cell


def _time(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _no_reference(result: Any) -> str:
    """Why a classifier result has no raw-X reference."""
    return "not run: raw_reference=false" if not (result.config or {}).get("raw_reference", True) else "no /inputs"


def classifier_renderables(result: Any) -> list[Any]:
    """The terminal view of a classifier result: its table, skipped heads, and the headline numbers."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    rows = result.rows
    table = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        title=f"classifier attack, task {result.task!r} ({len(result.class_names)} classes), Z "
        f"{'×'.join(map(str, result.layer_shape))}, {rows['attacker-train']:,}/{rows['attacker-validation']:,}/"
        f"{rows['test']:,} rows"
    )
    for column in ("head", "input", "test acc", "refit acc", "balanced", "val acc", "epochs", "s/epoch", "note"):
        table.add_column(
            column, justify="left" if column in ("head", "input", "note") else "right", min_width=_MIN_WIDTH.get(column)
        )
    skipped: list[str] = []
    for head in [*result.heads, *result.raw_heads]:
        mark = " *" if head.name in (result.best_head, result.raw_best_head) else ""
        if head.ok:
            table.add_row(
                head.name + mark,
                head.input,
                _pct_ci(head.accuracy, head.accuracy_ci95),
                "—" if head.refit_accuracy is None else _pct_ci(head.refit_accuracy, head.refit_accuracy_ci95),
                _pct_ci(head.balanced_accuracy, head.balanced_accuracy_ci95),
                _pct(head.val_accuracy),
                "—" if head.epochs is None else f"{head.epochs} ({head.best_epoch})",  # the SVM has no epochs
                _time(head.seconds_per_epoch),
                "",
            )
        else:
            # The reason is a sentence: below the table, where it is not folded into a narrow column.
            table.add_row(head.name, head.input, "—", "—", "—", "—", "—", "—", f"skipped ({len(skipped) + 1})")
            skipped.append(f"({len(skipped) + 1}) {head.name}: {head.reason}")
    table.add_row("chance", "", _pct(result.chance), "", _pct(result.chance_balanced), "", "", "", "majority class")
    table.caption = ("* strongest on attacker-validation · test acc: fitted on attacker-train · refit acc: refitted on "
                     "attacker-train + attacker-validation · epochs: run (best) · under each accuracy its 95 % interval (test rows)")  # fmt: skip
    return [
        table,
        *(Text(f"skipped {line}") for line in skipped),
        Text(
        f"private_accuracy {_num(result.accuracy)}{_ci(result.accuracy_ci95)} ({result.best_head}, {result.protocol}) · private_accuracy_raw "
        f"{_num(result.private_accuracy_raw)}{_ci(result.private_accuracy_raw_ci95)} ({result.raw_best_head or _no_reference(result)}"
        f"{', ' + result.raw_protocol if result.raw_protocol else ''}) · "
        f"private_accuracy_drop {_num(result.private_accuracy_drop)}{_ci(result.private_accuracy_drop_ci95)} · "
        f"private_chance {_num(result.chance)}"
        ),
        *([Text(f"raw-X heads: not trained again; the reference trained earlier on the same rows, labels and settings"
                f"{' (' + result.raw_reference_entry + ')' if result.raw_reference_entry else ' in this process'}")]
          if result.raw_reference_shared else []),
    ]


def decoder_renderables(result: Any) -> list[Any]:
    """The terminal view of a decoder result: its table and the headline numbers."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    rows = result.rows
    table = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        title=f"decoder attack, Z {'×'.join(map(str, result.layer_shape))} → X {'×'.join(map(str, result.input_shape))}, "
        f"{rows['attacker-train']:,}/{rows['attacker-validation']:,}/{rows['test']:,} rows"
    )
    for column in ("decoder", "SSIM", "p5", "p50", "p95", "PSNR", "MSE", "val", "epochs", "s/ep"):
        table.add_column(column, justify="left" if column == "decoder" else "right", min_width=_MIN_WIDTH[column])
    for run in result.runs:
        s = run.test
        table.add_row(
            run.arch + (" *" if run.arch == result.best else ""),
            _num(s.ssim_mean), _num(s.ssim_p5), _num(s.ssim_p50), _num(s.ssim_p95), _num(s.psnr, 2), _num(s.mse, 4),
            _num(run.val_ssim), f"{run.epochs} ({run.best_epoch})" + (" †" if run.halted_after else ""), _time(run.seconds_per_epoch),
        )  # fmt: skip
    m = result.mean_image
    table.add_row(
        "mean-image", _num(m.ssim_mean), _num(m.ssim_p5), _num(m.ssim_p50), _num(m.ssim_p95), _num(m.psnr, 2),
        _num(m.mse, 4), "", "", "",
    )  # fmt: skip
    table.caption = "* strongest on attacker-validation (val: mean SSIM there) · epochs: run (best) · PSNR in dB"
    if any(run.halted_after for run in result.runs):
        table.caption += " · † stopped by successive halving (budget: halving; budget: full trains every decoder to its own early stop)"
    s, m = result.scores, result.mean_image
    curve = [leaked_renderable(result.leaked)] if result.leaked else []
    return [
        table,
        decoder_interval_table(result),
        *curve,
        Text(
        f"ssim_mean {_num(s.ssim_mean)}{_ci(s.ssim_mean_ci95)} · ssim_p95 {_num(s.ssim_p95)}{_ci(s.ssim_p95_ci95)} · psnr "
        f"{_num(s.psnr, 2)}{_ci(s.psnr_ci95, 2)} ({result.best}) · ssim_p95_mean_image {_num(m.ssim_p95)}{_ci(m.ssim_p95_ci95)}"
        ),
    ]


def decoder_interval_table(result: Any) -> Any:
    """The 95 % intervals of every decoder's scores: one row per score, one column per decoder."""
    from rich import box
    from rich.table import Table

    from leakaudit.intervals import format_interval

    scored = [(run.arch + (" *" if run.arch == result.best else ""), run.test) for run in result.runs if run.test]
    scored.append(("mean-image", result.mean_image))
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title=f"95 % intervals, bootstrap over the {result.rows['test']:,} test images")
    table.add_column("score", min_width=_MIN_WIDTH["score"])
    for name, _ in scored:
        table.add_column(name, justify="right", no_wrap=True)
    for score, digits in (("ssim_mean", 3), ("ssim_p5", 3), ("ssim_p50", 3), ("ssim_p95", 3), ("psnr", 2), ("mse", 4)):
        table.add_row(score, *(format_interval(scores.interval(score), f".{digits}f") for _, scores in scored))
    return table


def classifier_html(classifier: Mapping[str, Any]) -> str:
    """The HTML report's section for a classifier result (its JSON form)."""
    import html

    from leakaudit.html_report import fmt, table, with_interval

    heads = [
        (h["name"], h["input"], with_interval(h.get("accuracy"), h.get("accuracy_ci95")),
         with_interval(h.get("refit_accuracy"), h.get("refit_accuracy_ci95")),
         with_interval(h.get("balanced_accuracy"), h.get("balanced_accuracy_ci95")), h.get("epochs"), h.get("reason") or "")
        for h in [*classifier.get("heads", []), *classifier.get("raw_heads", [])]
    ]  # fmt: skip
    return (
        f"<h2>Classifier attack on task <code>{html.escape(str(classifier.get('task')))}</code></h2>"
        f"<div class='sub'>strongest head: <b>{html.escape(str(classifier.get('best_head')))}</b> (headline from its "
        f"{html.escape(str(classifier.get('protocol', 'selection')))} protocol), chance {fmt(classifier.get('chance'))}</div>"
        + table(["head", "input", "test accuracy [95 % interval]", "refitted on train + validation", "balanced [95 % interval]",
                 "epochs", "note"], heads, numeric=(2, 3, 4, 5))  # fmt: skip
    )


def decoder_html(decoder: Mapping[str, Any]) -> str:
    """The HTML report's section for a decoder result (its JSON form), with the reconstruction grid."""
    from leakaudit.html_report import png_data_uri, table, with_interval

    def scores(test: Mapping[str, Any]) -> tuple[str, ...]:
        return tuple(with_interval(test.get(name), test.get(name + "_ci95")) for name in ("ssim_mean", "ssim_p95", "psnr"))

    runs = [(r.get("arch"), *scores(r.get("test") or {}), r.get("epochs"), r.get("reason") or "") for r in decoder.get("runs", [])]
    runs.append(("mean image (no information)", *scores(decoder.get("mean_image") or {}), None, ""))
    header = ["decoder", "SSIM mean [95 % interval]", "SSIM p95 [95 % interval]", "PSNR dB [95 % interval]", "epochs", "note"]
    block = "<h2>Reconstruction attack</h2>" + table(header, runs, numeric=(1, 2, 3, 4))
    uri = png_data_uri(decoder["grid"]) if decoder.get("grid") else None
    if uri:
        block += f"<div class='card'><div class='sub'>originals (top) and reconstructions (bottom), test rows</div><img class='recon' alt='reconstruction grid' src='{uri}'/></div>"
    return block + leaked_html(decoder.get("leaked") or [])


def leaked_renderable(curve: list[Mapping[str, Any]]) -> Any:
    """The terminal table of the decoder's leaked-pairs curve (its ``leaked`` points)."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title="decoder against the number of leaked pairs")
    for column in ("share", "pairs (train/val)", "decoder", "SSIM", "p95", "PSNR"):
        table.add_column(column, justify="left" if column == "decoder" else "right")
    for point in curve:
        held = point["pairs"]
        table.add_row(
            f"{point['share']:g}", f"{held['attacker-train']:,}/{held['attacker-validation']:,}", str(point["best"]),
            _num(point["ssim_mean"]), _num(point["ssim_p95"]), _num(point["psnr"], 2),
        )  # fmt: skip
    return table


def leaked_html(curve: list[Mapping[str, Any]]) -> str:
    """The HTML report's plot and table of the decoder's leaked-pairs curve."""
    import math

    from leakaudit.html_report import svg_lines, table

    if not curve:
        return ""
    pairs = [int(p["pairs"]["attacker-train"]) for p in curve]
    plot = svg_lines(
        [math.log10(n) for n in pairs],
        {"SSIM mean": [p["ssim_mean"] for p in curve], "SSIM p95": [p["ssim_p95"] for p in curve]},
        "reconstruction against leaked pairs", "log10 leaked attacker-train pairs",
    )  # fmt: skip
    rows = [(f"{p['share']:g}", n, p["best"], p["ssim_mean"], p["ssim_p95"], p["psnr"]) for p, n in zip(curve, pairs)]
    return (
        "<h3>Against the number of leaked pairs</h3>"
        + f"<div class='card'>{plot}</div>"
        + table(["share", "attacker-train pairs", "decoder", "SSIM mean", "SSIM p95", "PSNR dB"], rows, numeric=(1, 3, 4, 5))
    )
