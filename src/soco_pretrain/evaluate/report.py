"""The report of ``soco compare``: mean ± sd over seeds, paired differences with a t interval.

For each init and fraction: the mean and sample standard deviation (n - 1) over the finished
seeds of every metric (finetune: bbox and segm AP, AP50, AP75, APs, APm, APl in %, where
pycocotools' -1 "no ground truth in this size range" counts as no value; knn: logistic_balanced, top1, top5,
mean_class_top1, person_auroc in %, erank). Against the baseline (the first init): the difference on each
(fraction, seed) pair both finished (same labelled subset), its mean, and a 95% confidence
interval mean ± t(0.975, n - 1) x sd / sqrt(n) from Student's t; "n/a" for a single pair.

Files (atomic): ``report.json`` (everything, every arm's numbers), ``report.md`` (tables to
paste into a README), ``report.png`` (the main metric against the label fraction).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from ..files import atomic_write_bytes, atomic_write_json

CONFIDENCE = 0.95
COCO_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # = transfer.coco_eval.METRIC_NAMES
# knn.json's flat figures (evaluate/knn.py): the logistic readout's balanced accuracy is the main
# one (one class can dominate top-1); results written before it fall back to top1, as before.
KNN_NAMES = ("logistic_balanced", "top1", "top5", "mean_class_top1", "person_auroc", "erank")
MAIN_METRIC = {"finetune": "bbox AP", "knn": "logistic_balanced"}
DESCRIPTION = {
    "finetune": "COCO AP (%) of Mask R-CNN (torchvision R50-FPN v2) fine-tuned from each init",
    "knn": "object probe on frozen features (%): logistic_balanced = balanced accuracy of the logistic readout, "
    "mean_class_top1 = the kNN's; top1/top5 of the kNN; person_auroc = person vs rest; erank: effective rank",
}


# ---------------------------------------------------------------- numbers


def arm_metrics(metric: str, result: dict) -> dict[str, float | None]:
    """The numbers of one finished arm, flat: ``{"bbox AP": 12.3, ...}`` or ``{"top1": ...}``.

    COCO's -1 (no ground truth in that size range) becomes None.
    """
    values: dict[str, float | None] = {}
    if metric == "finetune":
        for iou in ("bbox", "segm"):
            table = result.get(iou)
            if not isinstance(table, dict):
                continue
            for name in COCO_NAMES:
                if name in table:
                    v = table[name]
                    values[f"{iou} {name}"] = None if v is None or float(v) < 0 else float(v)
    else:
        for name in KNN_NAMES:
            if name in result and result[name] is not None:
                values[name] = float(result[name])
    return values


def mean_sd(values) -> dict:
    """``{"mean", "sd", "n"}`` of the non-None ``values``; sd with n - 1 (None for n < 2)."""
    xs = [float(v) for v in values if v is not None]
    n = len(xs)
    if n == 0:
        return {"mean": None, "sd": None, "n": 0}
    mean = sum(xs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return {"mean": mean, "sd": sd, "n": n}


def t_quantile(p: float, df: int) -> float:
    from scipy.stats import t  # local: `t` is too short a name for module level

    return float(t.ppf(p, df))


def paired_ci(diffs, confidence: float = CONFIDENCE) -> dict:
    """Mean of the paired differences and its Student-t interval.

    ``{"mean", "sd", "n", "half_width", "low", "high"}``; half_width = t((1 + c) / 2, n - 1) x sd /
    sqrt(n); None (shown "n/a") for n < 2.
    """
    stats = mean_sd(diffs)
    n, mean, sd = stats["n"], stats["mean"], stats["sd"]
    half = None
    if n >= 2:
        half = t_quantile((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)
    return {
        "mean": mean,
        "sd": sd,
        "n": n,
        "half_width": half,
        "low": None if half is None else mean - half,
        "high": None if half is None else mean + half,
    }


# ---------------------------------------------------------------- the summary


def summarize(spec, done, missing, out=None) -> dict:
    """The content of report.json from a :class:`~.compare.CompareSpec`, its finished arms
    ``[(arm, result), ...]`` and its unfinished ones."""
    metric = spec.metric
    per_arm = {(arm.init.name, arm.fraction, arm.seed): arm_metrics(metric, result) for arm, result in done}
    names: list[str] = []
    for values in per_arm.values():
        names += [k for k in values if k not in names]
    order = COCO_NAMES if metric == "finetune" else KNN_NAMES
    rank = {f"{iou} {n}": i + 10 * j for j, iou in enumerate(("bbox", "segm")) for i, n in enumerate(order)}
    rank.update({n: i for i, n in enumerate(KNN_NAMES)})
    names.sort(key=lambda k: rank.get(k, 100))
    main = MAIN_METRIC[metric]
    baseline = spec.baseline.name

    rows = []
    for fraction in spec.fractions:
        for init in spec.inits:
            seeds = [s for s in range(spec.seeds) if (init.name, fraction, s) in per_arm]
            row = {
                "init": init.name,
                "fraction": fraction,
                "n": len(seeds),
                "seeds": seeds,
                "members": len(init.paths),
                "metrics": {},
                "vs_baseline": None,
            }
            for name in names:
                row["metrics"][name] = mean_sd(per_arm[(init.name, fraction, s)].get(name) for s in seeds)
            if init.name != baseline:
                row["vs_baseline"] = {}
                for name in names:
                    diffs = []
                    for s in seeds:
                        base = per_arm.get((baseline, fraction, s))
                        if base is None:
                            continue
                        a, b = per_arm[(init.name, fraction, s)].get(name), base.get(name)
                        if a is not None and b is not None:
                            diffs.append(a - b)
                    row["vs_baseline"][name] = {**paired_ci(diffs), "diffs": diffs}
            rows.append(row)

    def arm_entry(arm, values=None):
        entry = {
            "index": arm.index,
            "init": arm.init.name,
            "fraction": arm.fraction,
            "seed": arm.seed,
            "weights": arm.weights,
        }
        if out is not None:
            entry["folder"] = str(arm.folder(out))
        if values is not None:
            entry["metrics"] = values
        return entry

    return {
        "metric": metric,
        "description": DESCRIPTION[metric],
        "main_metric": main if main in names or not names else names[0],
        "metrics": names,
        "baseline": baseline,
        "inits": [init.to_json() for init in spec.inits],
        "fractions": list(spec.fractions),
        "seeds": spec.seeds,
        "confidence": CONFIDENCE,
        "interval": "paired differences vs the baseline per (fraction, seed); mean ± t(0.975, n-1) x sd / sqrt(n)",
        "options": dict(spec.options),
        "arms_total": len(done) + len(missing),
        "arms_done": len(done),
        "missing": [arm_entry(arm) for arm in missing],
        "rows": rows,
        "arms": [arm_entry(arm, per_arm[(arm.init.name, arm.fraction, arm.seed)]) for arm, _ in done],
    }


# ---------------------------------------------------------------- markdown


def _num(value, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def format_mean_sd(stats: dict) -> str:
    if stats["n"] == 0:
        return "–"
    return f"{_num(stats['mean'])} ± {_num(stats['sd'])}"


def format_diff(diff: dict | None, n_row: int | None = None) -> str:
    if diff is None:
        return "(baseline)"
    if diff["n"] == 0:
        return "–"
    ci = "n/a" if diff["half_width"] is None else f"{_num(diff['low'], True)}, {_num(diff['high'], True)}"
    text = f"{_num(diff['mean'], True)} [{ci}]"
    if n_row is not None and diff["n"] != n_row:
        text += f" ({diff['n']} pair{'s' if diff['n'] != 1 else ''})"
    return text


def _table(header: list[str], rows: list[list[str]], right_from: int = 1) -> list[str]:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def format_markdown(report: dict) -> str:
    main, baseline, seeds = report["main_metric"], report["baseline"], report["seeds"]
    lines = [f"# soco compare: {report['metric']}", ""]
    lines.append(
        f"{report['description']}. {len(report['inits'])} inits x {len(report['fractions'])} label "
        f"fraction(s) x {seeds} seed(s); {report['arms_done']} of {report['arms_total']} arms finished. "
        f"mean ± sd over seeds (sd with n-1); diff = paired difference against **{baseline}** on the same "
        "(fraction, seed) labelled subset, with a 95% confidence interval from Student's t over the "
        "pairs (n/a for one pair)."
    )
    lines.append("")
    rows = report["rows"]
    if not report["metrics"]:
        lines += ["No arm has finished yet.", ""]
    else:
        lines += _table(
            ["init", "fraction", "n", f"{main} mean ± sd", f"diff vs {baseline} [95% CI]"],
            [
                [
                    r["init"],
                    f"{r['fraction']:g}",
                    str(r["n"]),
                    format_mean_sd(r["metrics"][main]),
                    format_diff(r["vs_baseline"] and r["vs_baseline"][main], r["n"]),
                ]
                for r in rows
            ],
            2,
        )
        lines.append("")
        others = [m for m in report["metrics"] if m != main]
        if others:
            lines += ["## All metrics (mean ± sd over seeds)", ""]
            lines += _table(
                ["init", "fraction", "n", *report["metrics"]],
                [
                    [
                        r["init"],
                        f"{r['fraction']:g}",
                        str(r["n"]),
                        *(format_mean_sd(r["metrics"][m]) for m in report["metrics"]),
                    ]
                    for r in rows
                ],
                2,
            )
            lines.append("")
            if len(report["inits"]) > 1:
                lines += [f"## Paired differences vs {baseline} [95% CI]", ""]
                lines += _table(
                    ["init", "fraction", "pairs", *report["metrics"]],
                    [
                        [
                            r["init"],
                            f"{r['fraction']:g}",
                            str(r["vs_baseline"][main]["n"]),
                            *(format_diff(r["vs_baseline"][m]) for m in report["metrics"]),
                        ]
                        for r in rows
                        if r["vs_baseline"] is not None
                    ],
                    2,
                )
                lines.append("")
    notes = []
    if report["missing"]:
        names = ", ".join(f"{a['init']} f{a['fraction']:g} s{a['seed']}" for a in report["missing"][:12])
        more = f" and {len(report['missing']) - 12} more" if len(report["missing"]) > 12 else ""
        notes.append(f"Not finished ({len(report['missing'])} arm(s), left out above): {names}{more}.")
    single = [i["name"] for i in report["inits"] if len(i["paths"]) == 1 and i["paths"][0] is not None]
    if single and seeds > 1:
        notes.append(
            f"{', '.join(single)}: one pretraining run for every seed, so the spread covers the labelled "
            "subset and the seed of the evaluation, not the pretraining (give NAME=RUN1,RUN2,... for that)."
        )
    if report["metric"] == "finetune":
        notes.append("AP values of -1 (no ground truth of that size in the val set) count as no value.")
    notes.append(
        "An interval that contains 0 is no evidence of a difference; with few seeds t is large "
        "(t(0.975, 1) = 12.71, t(0.975, 2) = 4.30, t(0.975, 4) = 2.78)."
    )
    lines += ["Notes:", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------- the figure


def plot_report(report: dict) -> bytes:
    """PNG bytes: the main metric against the label fraction, one line per init with sd error
    bars (log x when the fractions span more than 10x); a bar chart for a single fraction."""
    # here, not at the top: pyplot must come after use("Agg"), which importing this module must not do
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    main = report["main_metric"]
    fractions = sorted(report["fractions"])
    inits = [i["name"] for i in report["inits"]]
    by_key = {
        (r["init"], r["fraction"]): r["metrics"].get(main, {"mean": None, "sd": None, "n": 0}) for r in report["rows"]
    }
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    try:
        if len(fractions) == 1:
            f = fractions[0]
            stats = [by_key.get((name, f), {"mean": None, "sd": None}) for name in inits]
            means = [s["mean"] if s["mean"] is not None else 0.0 for s in stats]
            errs = [s["sd"] or 0.0 for s in stats]
            ax.bar(range(len(inits)), means, yerr=errs, capsize=4, color=[f"C{j}" for j in range(len(inits))])
            ax.set_xticks(range(len(inits)))
            ax.set_xticklabels(inits, rotation=20 if len(inits) > 3 else 0, ha="right" if len(inits) > 3 else "center")
            ax.set_xlabel(f"init (label fraction {f:g})")
        else:
            log_x = fractions[-1] / fractions[0] > 10
            span = fractions[-1] - fractions[0]
            centre = (len(inits) - 1) / 2
            for j, name in enumerate(inits):
                xs, ys, es = [], [], []
                for f in fractions:
                    s = by_key.get((name, f))
                    if s is None or s["mean"] is None:
                        continue
                    # a small sideways offset per init keeps the error bars apart
                    xs.append(f * 10 ** (0.012 * (j - centre)) if log_x else f + 0.006 * span * (j - centre))
                    ys.append(s["mean"])
                    es.append(s["sd"] or 0.0)
                if xs:
                    ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=name, color=f"C{j}")
            if log_x:
                ax.set_xscale("log")
            ax.set_xticks(fractions)
            ax.set_xticklabels([f"{f:g}" for f in fractions])
            ax.minorticks_off()
            ax.set_xlabel("label fraction")
            ax.legend(fontsize=8)
        ax.set_ylabel(main)
        ax.set_title(f"{main}: mean ± sd over seeds ({report['arms_done']}/{report['arms_total']} arms)", fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        return buf.getvalue()
    finally:
        plt.close(fig)


def write_report(spec, out, done, missing) -> list[Path]:
    """Write OUT/report.json, report.md and report.png; returns their paths."""
    out = Path(out)
    report = summarize(spec, done, missing, out)
    paths = [out / "report.json", out / "report.md", out / "report.png"]
    atomic_write_json(paths[0], report)
    atomic_write_bytes(paths[1], format_markdown(report).encode("utf-8"))
    atomic_write_bytes(paths[2], plot_report(report))
    return paths
