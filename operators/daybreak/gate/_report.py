"""The gate's decision as one self-contained HTML page: no scripts, no external files.

Plots are matplotlib PNGs inlined as data URIs: ROC and precision-recall curves and calibration
(classification) or predicted-vs-actual and residuals (regression), the bootstrap distribution of
the gain, and the slice comparison; tables hold every rule, every metric and the drift of every
feature.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

import numpy as np

from daybreak.infra.metrics import DIRECTION
from daybreak.spec import Spec

_COLORS = {"PROMOTE": "#1a7f37", "REJECT": "#cf222e", "BLOCKED_BY_DATA": "#9a6700"}
_VERDICT = {"pass": "#1a7f37", "fail": "#cf222e", "warn": "#9a6700", "skip": "#6e7781"}


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _figure(title: str, fig: Any) -> str:
    return (f'<figure><img alt="{html.escape(title)}" title="{html.escape(title)}" '
            f'src="data:image/png;base64,{_png(fig)}"><figcaption>{html.escape(title)}</figcaption></figure>')


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, list):
        return " .. ".join(_fmt(x) for x in v)
    return html.escape(str(v))


def _table(rows: list[dict[str, Any]], columns: list[str], cls: str) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            style = f' style="color:{_VERDICT[v]};font-weight:600"' if c == "verdict" and v in _VERDICT else ""
            cells.append(f"<td{style}>{_fmt(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _curves(y: np.ndarray, preds: dict[str, np.ndarray]) -> list[str]:
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import precision_recall_curve, roc_curve

    out: list[str] = []
    if len(np.unique(y)) < 2:
        return out
    fig, ax = plt.subplots(figsize=(4.5, 4))
    for name, p in preds.items():
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax.legend()
    out.append(_figure("ROC curve", fig))
    fig, ax = plt.subplots(figsize=(4.5, 4))
    for name, p in preds.items():
        prec, rec, _ = precision_recall_curve(y, p)
        ax.plot(rec, prec, label=name)
    ax.axhline(float(np.mean(y)), linestyle=":", color="grey")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall")
    ax.legend()
    out.append(_figure("Precision-recall curve", fig))
    fig, ax = plt.subplots(figsize=(4.5, 4))
    for name, p in preds.items():
        frac, mean = calibration_curve(y, np.clip(p, 0, 1), n_bins=10, strategy="quantile")
        ax.plot(mean, frac, "o-", label=name)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="mean predicted probability", ylabel="observed rate", title="Calibration")
    ax.legend()
    out.append(_figure("Calibration", fig))
    return out


def _residuals(y: np.ndarray, preds: dict[str, np.ndarray], seed: int = 0) -> list[str]:
    import matplotlib.pyplot as plt

    rows = np.random.default_rng(seed).choice(len(y), min(len(y), 5000), replace=False)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    for name, p in preds.items():
        ax.scatter(y[rows], p[rows], s=4, alpha=0.4, label=name)
    lo, hi = float(np.min(y)), float(np.max(y))
    ax.plot([lo, hi], [lo, hi], ":", color="grey")
    ax.set(xlabel="actual", ylabel="predicted", title="Predicted vs actual")
    ax.legend()
    out = [_figure("Predicted vs actual", fig)]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    for name, p in preds.items():
        ax.hist(p - y, bins=50, alpha=0.5, label=name)
    ax.set(xlabel="prediction - actual", ylabel="rows", title="Residuals")
    ax.legend()
    out.append(_figure("Residuals", fig))
    return out


def _gain_plot(gains: np.ndarray | None, boot: dict[str, Any], need: float, metric: str) -> str:
    """The gain's distribution: the bootstrap draws, or the normal the analytic interval assumes."""
    import matplotlib.pyplot as plt
    from scipy.stats import norm

    fig, ax = plt.subplots(figsize=(6, 3.2))
    unit = boot.get("unit") or "row"
    if gains is not None:
        ax.hist(gains[np.isfinite(gains)], bins=50, color="#8cb4e0")
        title, ylabel = f"Paired bootstrap by {unit}, {boot['resamples']} resamples", "resamples"
    else:
        z = norm.ppf(0.5 + boot["level"] / 2)
        sd = max((boot["high"] - boot["low"]) / (2 * z), 1e-12)
        x = np.linspace(boot["gain"] - 4 * sd, boot["gain"] + 4 * sd, 200)
        ax.fill_between(x, norm.pdf(x, boot["gain"], sd), color="#8cb4e0")
        title, ylabel = f"Analytic (normal) interval by {unit}", "density"
    for x, style, label in [(boot["low"], "--", "interval"), (boot["high"], "--", None),
                            (need, "-", "required gain"), (boot["gain"], ":", "observed gain")]:
        ax.axvline(x, linestyle=style, color="black" if style != "-" else "#cf222e", label=label)
    ax.set(xlabel=f"gain in {metric} (positive: candidate better)", ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return _figure("Distribution of the gain", fig)


def _slice_plot(slices: list[dict[str, Any]], column: str, metric: str) -> str:
    import matplotlib.pyplot as plt

    rows = sorted((r for r in slices if r["column"] == column), key=lambda r: -r["rows"])[:20]
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(rows) + 2), 3.4))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["champion"] for r in rows], 0.4, label="champion", color="#8c959f")
    ax.bar(x + 0.2, [r["candidate"] for r in rows], 0.4, label="candidate",
           color=["#cf222e" if r["verdict"] == "fail" else "#0969da" for r in rows])
    ax.set_xticks(x, [f"{r['value']}\n({r['rows']})" for r in rows], fontsize=7, rotation=45 if len(rows) > 8 else 0)
    finite = [v for r in rows for v in (r["candidate"], r["champion"]) if v is not None and math.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) - 0.05 * (abs(min(finite)) or 1), max(finite) + 0.05 * (abs(max(finite)) or 1))
    ax.set(ylabel=metric, title=f"{metric} by {column} (largest {len(rows)} slices)")
    ax.legend(fontsize=8)
    return _figure(f"Slices by {column}", fig)


def gate_report(spec: Spec, record: dict[str, Any], y: np.ndarray, candidate: np.ndarray,
                champion: np.ndarray | None, gains: np.ndarray | None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    decision = record["decision"]
    preds = {f"candidate v{record['candidate_version']}": candidate}
    if champion is not None:
        preds[f"champion v{record['champion_version']}"] = champion
    figures = (_curves(y, preds) if spec.model.task == "classification" else _residuals(y, preds))
    if record.get("bootstrap"):
        figures.append(_gain_plot(gains, record["bootstrap"], spec.gate.required_margin(), spec.gate.metric))
    metric = spec.gate.slices.metric or spec.gate.metric
    for col in spec.gate.slices.columns:
        if any(r["column"] == col for r in record["slices"]):
            figures.append(_slice_plot(record["slices"], col, metric))
    m = record["metrics"]
    metric_rows = [{"metric": k, "candidate": v, "champion": None if m["champion"] is None else m["champion"][k],
                    "higher is better": "yes" if DIRECTION[k] else "no"} for k, v in m["candidate"].items()]
    boot = record.get("bootstrap") or {}
    unit = record.get("interval_unit") or "row"
    intervals = (f"Intervals: {boot.get('method') or spec.gate.bootstrap.method if spec.gate.bootstrap else 'off'}"
                 f", resampling unit {unit}"
                 + (f" ({record['clusters']} clusters)" if record.get("clusters") else "")
                 + ("" if spec.gate.bootstrap else " (gate.bootstrap is off: point estimates only)") + ".")
    excluded = record.get("champion_excluded_days") or []
    override = record.get("override")
    against = (f"champion v{record['champion_version']}" if record["champion_version"]
               else "no champion (absolute rules only)")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>daybreak gate {html.escape(spec.model.name)} {record['date']}: {decision}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;color:#1f2328}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #d0d7de;padding:4px 8px;"
        "font-size:13px;text-align:left}th{background:#f6f8fa}figure{display:inline-block;margin:0 1em 1em 0}"
        "figcaption{font-size:12px;color:#57606a}.decision{font-size:1.6em;font-weight:700}</style></head><body>",
        f"<h1>Gate: {html.escape(spec.model.name)}, {record['date']}</h1>",
        f'<p class="decision" style="color:{_COLORS.get(decision, "#1f2328")}">{decision}</p>',
        f"<p>candidate v{record['candidate_version']} vs {against}"
        f", both scored on the same {record['holdout_rows']} holdout rows (partitions {record['holdout_hash'][:12]})."
        f" Computed decision: {record['computed_decision']}. {html.escape(intervals)}</p>",
    ]
    if excluded:
        parts.append(f"<p>The champion is compared only on holdout days it was neither trained nor gated on; "
                     f"excluded: {html.escape(', '.join(excluded))}.</p>")
    if override:
        parts.append(f"<p><b>Manual override</b> to {html.escape(override['decision'])} by "
                     f"{html.escape(override['by'])}: {html.escape(str(override['reason']))}</p>")
    parts += [
        "<h2>Rules</h2>",
        _table(record["rules"],
               ["rule", "kind", "metric", "value", "threshold", "severity", "verdict", "detail"], "rules"),
        "<h2>Metrics on the holdout</h2>",
        _table(metric_rows, ["metric", "candidate", "champion", "higher is better"], "metrics"),
        "<h2>Baselines (naive predictors on the same rows)</h2>",
        _table(record.get("baselines") or [], ["name", "metric", "gain"], "baselines") if record.get("baselines")
        else "<p>none</p>",
        "<h2>Day-to-day spread added to the intervals</h2>",
        _table([{"quantity": k, **v} for k, v in (record.get("between_days") or {}).items()],
               ["quantity", "source", "sd", "days", "df", "holdout_days"], "spread")
        if record.get("between_days") else "<p>none (gate.bootstrap.between_days: off, or no interval)</p>",
        "<p>source history: estimated from the gains the gates of the last days recorded (sd, from how many "
        "gates, and the degrees of freedom of the widened interval); assumed: fewer than 10 recorded, the "
        "spread's variance taken as twice the holdout's own.</p>",
        "<h2>Plots</h2>", "".join(figures),
    ]
    if record["slices"]:
        parts += ["<h2>Slices</h2>", _table(record["slices"], ["column", "value", "rows", "candidate", "champion",
                                                                 "gain", "verdict"], "slices")]
    parts += ["<h2>Feature drift (PSI, candidate window vs the champion's)</h2>",
              _table(record["drift"], ["feature", "psi", "verdict"], "drift") if record["drift"]
              else "<p>not computed (no champion, or drift check off)</p>",
              "</body></html>"]
    return "\n".join(parts)


def live_chart(rows: list[dict[str, Any]], metric: str, floor: float | None = None) -> str:
    """Live quality over time (``monitor.live_history`` rows) as an inlined PNG figure: one line per
    version and source, the floor dashed, and a cross where monitoring rolled the champion back."""
    import matplotlib

    matplotlib.use("Agg")
    from datetime import date

    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault((r["version"], r["source"]), []).append(r)
    for (version, source), pts in sorted(series.items(), key=lambda kv: (int(kv[0][0]) if kv[0][0].isdigit() else 0,
                                                                          kv[0][1])):
        xs = [date.fromisoformat(p["date"]) for p in pts]
        # matplotlib's unit registry converts dates; its stubs accept only numbers
        ax.plot(xs, [p["value"] for p in pts], marker="o", markersize=3.5,  # type: ignore[arg-type]
                linestyle="-" if source == "online" else ":", label=f"v{version} {source}")
        for p, x in zip(pts, xs, strict=False):
            if p.get("action") == "rollback" and p.get("champion") == version:
                ax.plot([x], [p["value"]], marker="x", markersize=10, color="#cf222e")  # type: ignore[arg-type]
    if floor is not None:
        ax.axhline(floor, color="#cf222e", linestyle="--", linewidth=1, label=f"floor {floor:g}")
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d"))
    fig.autofmt_xdate()
    ax.set(ylabel=f"live {metric}", title=f"Live {metric} by version (labelled predictions per day)")
    ax.legend(fontsize=7, ncol=2)
    return _figure(f"Live {metric} over time", fig)
