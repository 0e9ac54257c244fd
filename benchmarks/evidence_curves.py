"""Learning curves of several pretraining runs in one picture: the object probe the monitor logs
(``monitor.objects=crop``: balanced accuracy of the logistic readout, online network; the EMA
target's dashed), the
effective rank of the probed features and the loss, one line per run, coloured by the run's box
source (the part of its folder name before ``-s<seed>``, as benchmarks/evidence.sh names them).

    python benchmarks/evidence_curves.py evidence/runs/* -o evidence/curves.png

Prints a table of the probe at each evaluated step, one row per run.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

COLOURS = {"soco": "tab:blue", "image": "tab:orange", "random": "tab:green"}


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash: the rest is still a curve
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = sorted({r["step"]: r[key] for r in records if isinstance(r.get(key), (int, float))}.items())
    return [p[0] for p in pairs], [float(p[1]) for p in pairs]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="soco pretrain run folders")
    parser.add_argument("-o", "--out", required=True, help="output PNG")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from soco_pretrain.files import atomic_write

    runs = [Path(r) for r in args.runs]
    data = {run: read_metrics(run) for run in runs}
    if not any(data.values()):
        print(f"no metrics.jsonl in {', '.join(map(str, runs))}: nothing to plot", file=sys.stderr)
        return 2
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = (
        ("probe_balanced", "object probe: logistic balanced accuracy (%)"),
        ("erank_online", "probed features: effective rank"),
        ("loss", "loss"),
    )
    print(f"{'run':<24} probe_balanced by step")
    for run, records in data.items():
        source = re.sub(r"-s\d+$", "", run.name)
        colour = COLOURS.get(source, "tab:gray")
        for ax, (key, title) in zip(axes, panels):
            steps, values = series(records, key)
            if steps:
                ax.plot(steps, values, color=colour, marker="." if key != "loss" else None, lw=1, label=run.name)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        steps, values = series(records, "probe_target_balanced")  # the EMA target, dashed
        if steps:
            axes[0].plot(steps, values, color=colour, ls="--", lw=1, label=f"{run.name} target")
        steps, values = series(records, "probe_balanced")
        print(f"{run.name:<24} " + "  ".join(f"{s}:{v:.1f}" for s, v in zip(steps, values)))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    atomic_write(Path(args.out), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
