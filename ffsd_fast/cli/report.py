"""``python -m ffsd_fast.report RUNS_DIR``: every run's ``summary.json`` gathered into one table beside the paper.

Runs are grouped by (dataset, model, method, m); each group gives mean ± std over its runs (seeds) of the number the
paper reports, each network's *best* top-1 over epochs (the leader's for FFSD, the students' mean for the
baselines), and of the final-epoch one, next to the published leader top-1 (``ffsd-spec.md``) and the difference
from the middle of its range. Writes ``report.md`` and ``report.png`` (a bar chart) into ``--out`` (default:
RUNS_DIR) and prints the table.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

from ffsd_fast.errors import UserError

# Published leader top-1 (%), the paper's three runs as a range; ffsd-spec.md, "Published leader top-1".
PUBLISHED: dict[tuple[str, str], tuple[float, float]] = {
    ("cifar100", "resnet20"): (72.58, 72.88),
    ("cifar100", "resnet32"): (74.82, 74.92),
    ("cifar100", "resnet56"): (75.66, 75.91),
    ("cifar100", "wrn16_2"): (75.69, 75.87),
    ("cifar100", "wrn40_2"): (79.11, 79.19),
    ("cifar100", "densenet40"): (77.17, 77.70),
    ("cifar100", "googlenet"): (81.34, 81.93),
    ("imagenet", "resnet18"): (70.87, 70.87),
    ("imagenet", "resnet34"): (74.69, 74.69),
}


def load_summaries(runs_dir: Path) -> list[dict]:
    if not runs_dir.is_dir():
        raise UserError(f"runs folder does not exist: {runs_dir}")
    summaries = []
    for path in sorted(runs_dir.rglob("summary.json")):
        try:
            summaries.append(json.loads(path.read_text()))
        except json.JSONDecodeError as error:
            raise UserError(f"{path} is not valid JSON ({error}); remove or repair it") from error
    if not summaries:
        raise UserError(f"no summary.json under {runs_dir}: point at a folder of finished runs")
    return summaries


def headline(summary: dict, best: bool) -> float:
    """The run's reported top-1: the leader's (FFSD) or the students' mean (baselines), best over epochs or final."""
    prefix = "best_" if best else ""
    if summary.get("method", "ffsd") == "ffsd":
        return summary[f"{prefix}leader_top1"]
    students = summary[f"{prefix}students_top1"]
    return sum(students) / len(students)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def rows(summaries: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for s in summaries:
        key = (s["dataset"], s["model"], s.get("method", "ffsd"), s["num_students"])
        groups.setdefault(key, []).append(s)
    table = []
    for (dataset, model, method, m), runs in sorted(groups.items()):
        best, best_std = _mean_std([headline(s, best=True) for s in runs])
        final, final_std = _mean_std([headline(s, best=False) for s in runs])
        published = PUBLISHED.get((dataset, model)) if method == "ffsd" else None
        middle = sum(published) / 2 if published else None
        table.append(
            {
                "dataset": dataset,
                "model": model,
                "method": method,
                "m": m,
                "runs": len(runs),
                "epochs": sorted({s["epochs"] for s in runs}),
                "best": best,
                "best_std": best_std,
                "final": final,
                "final_std": final_std,
                "published": published,
                "difference": best - middle if middle is not None else None,
            }
        )
    return table


def markdown(table: list[dict]) -> str:
    lines = [
        "| dataset | model | method | m | runs | epochs | best top-1 (mean ± std) | final top-1 | published "
        "| best − published |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        published = (
            "–"
            if r["published"] is None
            else (
                f"{r['published'][0]:.2f}"
                if r["published"][0] == r["published"][1]
                else f"{r['published'][0]:.2f}–{r['published'][1]:.2f}"
            )
        )
        difference = "–" if r["difference"] is None else f"{r['difference']:+.2f}"
        epochs = ",".join(map(str, r["epochs"]))
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r['method']} | {r['m']} | {r['runs']} | {epochs} | "
            f"{r['best']:.2f} ± {r['best_std']:.2f} | {r['final']:.2f} ± {r['final_std']:.2f} | "
            f"{published} | {difference} |"
        )
    note = (
        "\nTop-1 in %: the leader's for FFSD, the students' mean for the baselines; *best* is each run's best "
        "over epochs (what the paper reports), *final* its last epoch. Published: the paper's leader, three "
        "runs (`ffsd-spec.md`); the difference is from the middle of that range.\n"
    )
    return "\n".join(lines) + "\n" + note


def bar_chart(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['dataset']}\n{r['model']} {r['method']} m{r['m']}" for r in table]
    xs = range(len(table))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(table)), 4.5))
    ax.bar(
        [x - 0.2 for x in xs],
        [r["best"] for r in table],
        0.4,
        yerr=[r["best_std"] for r in table],
        label="this project (best, mean ± std)",
        capsize=3,
    )
    published = [(x, sum(r["published"]) / 2) for x, r in zip(xs, table, strict=True) if r["published"]]
    if published:
        ax.bar([x + 0.2 for x, _ in published], [v for _, v in published], 0.4, label="paper (leader)")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("top-1 (%)")
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ffsd_fast.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", help="a folder searched recursively for summary.json")
    parser.add_argument("--out", help="where report.md and report.png go (default: the runs folder)")
    args = parser.parse_args(argv)
    try:
        table = rows(load_summaries(Path(args.runs)))
        out = Path(args.out or args.runs)
        if not out.is_dir():
            raise UserError(f"output folder does not exist: {out}")
    except UserError as error:
        print(f"report: error: {error}", file=sys.stderr)
        return 2
    text = markdown(table)
    (out / "report.md").write_text(text)
    bar_chart(table, out / "report.png")
    print(text)
    print(f"written: {out / 'report.md'}, {out / 'report.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
