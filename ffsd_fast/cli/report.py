"""``python -m ffsd_fast.report RUNS_DIR``: every run's ``summary.json`` gathered into one table beside the paper.

A row is a group of runs that differ only in their seed: the same dataset, model, method and m, and the same value
of every other field of the run's resolved configuration (``summary.json``'s ``"config"``) except the fields in
``ffsd_fast.trainer.config.RESULT_NEUTRAL`` (paths, logging, workers, CUDA-graph capture), plus the number of
processes (``world_size``: the global batch is ``batch_size`` × ``world_size``). A configuration field recorded by
one run and not another (a newer or older version of the code) splits the group too; its value shows as ``?``.
Each row gives n (the runs) and their seeds, and mean ± std over them of the number the paper reports, each
network's *best* top-1 over epochs (the leader's for FFSD, the students' mean for the baselines), and of the
final-epoch one, next to the paper's top-1 (the method's ``published``: FFSD's leader) and the difference from the
middle of its range, unless the runs trained fewer epochs than the recipe or on fewer classes than the dataset has:
then the row says "not comparable" and why. The *settings* column names only the fields on which the rows of one
(dataset, model, method, m) differ, so a lone row shows ``–``.

Two runs with the same seed in a row are not independent samples (a rerun, or the same run under two output
folders): they stay in the mean, since the report cannot tell which one to drop, but the seeds cell says
``repeated`` and the std then understates the spread over seeds. A summary written before ``"config"`` was
recorded is grouped by what it holds (dataset, model, method, m, epochs, world size); its settings and seed show as
unknown and it never joins a group of runs that record their configuration.

A second table, by method, gives each row's deployed network (the one ``ffsd-export`` keeps): mean ± std over the
runs of its last-epoch and of its best-epoch top-1 (best on the test split, as several papers report), the training
images/s, and its parameters and multiply-adds on one image (``summary.json``'s ``deployed_params`` and
``deployed_macs``; counted from the model, classes and image size for a run that predates them).

Writes ``report.md`` and ``report.png`` (a bar chart) into ``--out`` (default: RUNS_DIR) and prints the table.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

from ffsd_fast.cli.comparable import not_comparable, num_classes
from ffsd_fast.errors import UserError
from ffsd_fast.method import registry
from ffsd_fast.models.cost import cost
from ffsd_fast.trainer.config import FIELDS, RESULT_NEUTRAL
from ffsd_fast.trainer.help_text import HelpFormatter


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


def method_name(summary: dict) -> str:
    # A summary written before --method existed is of a run of the default method.
    return summary.get("method", FIELDS["method"].default)


def _reported(summary: dict) -> str:
    """What the run's method reports: its deployed network, or ``students`` (their mean); ``students`` for a method
    this process does not know."""
    name = method_name(summary)
    return registry.get(name).reported if name in registry.names() else "students"


def published(dataset: str, model: str, method: str) -> tuple[float, float] | None:
    """The paper's top-1 range of the method's reported network, where its declaration gives one."""
    return registry.get(method).published.get((dataset, model)) if method in registry.names() else None


def headline(summary: dict, best: bool) -> float:
    """The run's reported top-1 (FFSD: the leader's; the baselines: the students' mean), best over epochs or final."""
    prefix = "best_" if best else ""
    reported = _reported(summary)
    if reported != "students":
        return summary[f"{prefix}{reported}_top1"]
    students = summary[f"{prefix}students_top1"]
    return sum(students) / len(students)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def deployed_top1(summary: dict, best: bool) -> float | None:
    """The top-1 of the run's deployed network (the one ``ffsd-export`` keeps), at its best or its final epoch; None
    for a method this process does not know."""
    name = method_name(summary)
    if name not in registry.names():
        return None
    prefix, deployed = "best_" if best else "", registry.get(name).deployed
    if f"{prefix}{deployed}_top1" in summary:
        return summary[f"{prefix}{deployed}_top1"]
    # A summary from before the deployed network had a field of its own: a peer's is in the students' list.
    peer = deployed.removeprefix("student")
    return summary[f"{prefix}students_top1"][int(peer)] if peer.isdigit() else None


def deployed_cost(summary: dict) -> tuple[int, int] | None:
    """(parameters, multiply-adds on one image) of the deployed network, the stock backbone: as the run recorded
    them, else counted from its model, classes (summary or checkpoint) and image size; None when those are unknown."""
    if "deployed_macs" in summary:
        return summary["deployed_params"], summary["deployed_macs"]
    classes, size = num_classes(summary), (summary.get("config") or {}).get("image_size")
    return cost(summary["model"], classes, size) if classes and size else None


def _deployed(runs: list[dict]) -> dict:
    """A row's deployed-network columns: mean ± std over its runs (None where a run lacks the number)."""
    name = method_name(runs[0])
    final = [deployed_top1(s, best=False) for s in runs]
    best = [deployed_top1(s, best=True) for s in runs]
    costs = {deployed_cost(s) for s in runs}
    speeds = [s["images_per_s"] for s in runs if "images_per_s" in s]
    return {
        "deployed": deployed_label(name),
        "deployed_final": None if None in final else _mean_std(final),
        "deployed_best": None if None in best else _mean_std(best),
        "images_per_s": statistics.fmean(speeds) if len(speeds) == len(runs) else None,
        # One value when every run agrees (they share model and image size), else unknown.
        "cost": costs.pop() if len(costs) == 1 else None,
    }


# Fields with a column of their own, so never repeated in the settings column.
_OWN_COLUMNS = frozenset({"dataset", "model", "method", "num_students", "epochs"})
# A field one run's configuration records and another's lacks (shown as ``?``).
_MISSING = object()


def _frozen(value):
    """JSON lists as tuples, so that a configuration value can be part of a dictionary key."""
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


def _show(value) -> str:
    return "[" + ",".join(map(_show, value)) + "]" if isinstance(value, tuple) else str(value)


def _sortable(value) -> tuple:
    """Numbers in their order (batch 64 before 128); anything else (None, strings, lists) by its repr, since one
    field may hold values of different types in different groups."""
    return (0, value, "") if isinstance(value, int | float) else (1, 0, repr(value))


def settings(summary: dict) -> tuple[dict, bool]:
    """What must match, beside dataset, model, method and m, for two runs to share a row; and whether the summary
    recorded its configuration (older ones did not: then only what they hold, their settings otherwise unknown)."""
    config = summary.get("config")
    # world_size is recorded beside the config and changes the result: the global batch is batch_size × world_size.
    recorded = {name: summary[name] for name in ("epochs", "world_size") if name in summary}
    if config is None:
        return recorded, False
    foreign = _other_methods_options(config.get("method", FIELDS["method"].default))
    fields = {
        name: _frozen(v)
        for name, v in config.items()
        if name not in RESULT_NEUTRAL and name != "seed" and name not in foreign
    }
    return {**recorded, **fields}, True


def _other_methods_options(method: str) -> set[str]:
    """The options of every registered method but ``method``: a run records them all, and they change nothing of
    its result, so a version that adds one to another method must not split a method's runs into two rows."""
    own = set(registry.get(method).options) if method in registry.names() else set()
    return {name for other in registry.names() for name in registry.get(other).options} - own


def _differing(groups: list[tuple[dict, bool]]) -> list[str]:
    """The fields on which the groups of one (dataset, model, method, m) differ. A summary without a configuration
    takes part only through the fields it has, so that it does not make every configuration field look different."""
    names = sorted({name for fields, _ in groups for name in fields} - _OWN_COLUMNS)
    return [
        name
        for name in names
        if len({fields.get(name, _MISSING) for fields, known in groups if known or name in fields}) > 1
    ]


def _seeds_cell(seeds: list[int | None], repeated: list[int]) -> str:
    ordered = sorted(seeds, key=lambda seed: (seed is None, seed or 0))
    cell = ",".join("?" if seed is None else str(seed) for seed in ordered)
    return f"{cell} (repeated)" if repeated else cell


def _groups(summaries: list[dict]) -> dict[tuple, list[dict]]:
    """Runs by (dataset, model, method, m, whether the configuration is known, its settings)."""
    groups: dict[tuple, list[dict]] = {}
    for s in summaries:
        fields, known = settings(s)
        key = (s["dataset"], s["model"], method_name(s), s["num_students"], known, tuple(sorted(fields.items())))
        groups.setdefault(key, []).append(s)
    return groups


def rows(summaries: list[dict]) -> list[dict]:
    groups = _groups(summaries)
    # The groups of one (dataset, model, method, m), to find the fields their settings column shows.
    members: dict[tuple, list[tuple[dict, bool]]] = {}
    for dataset, model, method, m, known, items in groups:
        members.setdefault((dataset, model, method, m), []).append((dict(items), known))
    differing = {base: _differing(groups_of_base) for base, groups_of_base in members.items()}

    def order(item: tuple[tuple, list[dict]]) -> tuple:
        dataset, model, method, m, known, items = item[0]
        settings_order = tuple((name, _sortable(value)) for name, value in items)
        return dataset, model, method, m, _sortable(dict(items).get("epochs")), not known, settings_order

    table = []
    for (dataset, model, method, m, known, items), runs in sorted(groups.items(), key=order):
        fields = dict(items)
        shown = [
            f"{name}={_show(fields[name]) if name in fields else '?'}"
            for name in differing[(dataset, model, method, m)]
            if known or name in fields
        ]
        if not known:
            shown.insert(0, "unknown (no config)")
        seeds = [s["config"].get("seed") if known else None for s in runs]
        repeated = sorted({seed for seed in seeds if seed is not None and seeds.count(seed) > 1})
        best, best_std = _mean_std([headline(s, best=True) for s in runs])
        final, final_std = _mean_std([headline(s, best=False) for s in runs])
        paper = published(dataset, model, method)
        caveat = not_comparable(runs) if paper else ""
        middle = sum(paper) / 2 if paper and not caveat else None
        table.append(
            {
                "dataset": dataset,
                "model": model,
                "method": method,
                "m": m,
                "n": len(runs),
                "seeds": _seeds_cell(seeds, repeated),
                "repeated_seeds": repeated,
                "epochs": fields["epochs"],
                "settings": ", ".join(shown) or "–",
                "settings_known": known,
                "best": best,
                "best_std": best_std,
                "final": final,
                "final_std": final_std,
                "published": paper,
                "difference": best - middle if middle is not None else None,
                "not_comparable": caveat,
                **_deployed(runs),
            }
        )
    return table


def markdown(table: list[dict]) -> str:
    lines = [
        "| dataset | model | method | m | n | seeds | epochs | settings | best top-1 (mean ± std) | final top-1 "
        "| published | best − published |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
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
        if r.get("not_comparable"):
            difference = f"not comparable: {r['not_comparable']}"
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r['method']} | {r['m']} | {r['n']} | {r['seeds']} | {r['epochs']} | "
            f"{r['settings']} | "
            f"{r['best']:.2f} ± {r['best_std']:.2f} | {r['final']:.2f} ± {r['final_std']:.2f} | "
            f"{published} | {difference} |"
        )
    note = (
        "\nTop-1 in %: each method's reported network's (its kept network, or the students' mean); *best* is "
        "each run's best over epochs (what the paper reports), *final* its last epoch. Published: the method's "
        "paper's number for that network (FFSD: the leader's three runs, docs/models-and-recipes.md; the "
        "baselines: docs/methods/); the difference is from the middle of that range, for runs of the recipe's "
        "epochs on every class only.\n\n"
        "A row is the n runs that differ only in their seed. *settings* names the fields on which the rows of "
        "one dataset, model, method and m differ (`?`: that run's code did not record the field). *repeated*: "
        "two runs share a seed, so they are not independent samples and the std understates the spread over "
        "seeds. *unknown (no config)*: the summaries predate the recorded configuration; they are grouped by "
        "epochs and world size alone.\n"
    )
    return "\n".join(lines) + "\n" + note


def mean_std_cell(value: tuple[float, float] | None) -> str:
    return "?" if value is None else f"{value[0]:.2f} ± {value[1]:.2f}"


def short_count(value: int) -> str:
    """``0.27 M``, ``1.81 G``."""
    return f"{value / 1e9:.2f} G" if value >= 1e9 else f"{value / 1e6:.2f} M"


def deployed_label(method: str) -> str:
    """What tables call the method's deployed network (``leader``, ``student 1``); ``?`` for a method this process
    does not know."""
    if method not in registry.names():
        return "?"
    cls = registry.get(method)
    peer = cls.deployed.removeprefix("student")
    return cls.labels.get(cls.deployed) or (f"student {int(peer) + 1}" if peer.isdigit() else cls.deployed)


def by_method(table: list[dict]) -> list[dict]:
    """The rows in the order the methods are registered (FFSD, then its baselines), each dataset and model apart."""
    order = {name: i for i, name in enumerate(registry.names())}
    return sorted(table, key=lambda r: (r["dataset"], r["model"], order.get(r["method"], len(order)), r["method"]))


def deployed_markdown(table: list[dict]) -> str:
    """The deployed network of each row, by method: what a user of each method keeps and what it costs."""
    lines = [
        "## The deployed network, by method\n",
        "| dataset | model | method | m | n | seeds | epochs | settings | deployed | last-epoch top-1 (mean ± std) "
        "| best-epoch top-1 (mean ± std) | train images/s | parameters | multiply-adds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in by_method(table):
        speed = "?" if r["images_per_s"] is None else f"{r['images_per_s']:.0f}"
        params, macs = ("?", "?") if r["cost"] is None else map(short_count, r["cost"])
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r['method']} | {r['m']} | {r['n']} | {r['seeds']} | {r['epochs']} | "
            f"{r['settings']} | {r['deployed']} | {mean_std_cell(r['deployed_final'])} | "
            f"{mean_std_cell(r['deployed_best'])} | {speed} | {params} | {macs} |"
        )
    note = (
        "\nThe network each method keeps (its declaration's `deployed`, the one `ffsd-export` writes), top-1 in %. "
        "*Last epoch*: its top-1 after the final epoch, the network exported. "
        "*Best epoch*: its best top-1 over epochs on the test split, as several papers report (a choice made on the "
        "test set, so it reads high). Train images/s: training images a second, every network's step included (the "
        "mean over the runs). Parameters and multiply-adds: the stock backbone, one image at the run's size, "
        "convolutions and matrix products (BatchNorm, activations and pooling left out). Rows as in the table "
        "above; `?`: a method this process does not know, or a run that did not record the number.\n"
    )
    return "\n".join(lines) + "\n" + note


def bar_chart(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The settings line tells apart the bars of one dataset, model, method and m.
    labels = [
        f"{r['dataset']}\n{r['model']} {r['method']} m{r['m']}\n{r['epochs']} ep, n={r['n']}"
        + ("" if r["settings"] == "–" else "\n" + r["settings"].replace(", ", "\n"))
        for r in table
    ]
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
        ax.bar([x + 0.2 for x, _ in published], [v for _, v in published], 0.4, label="paper")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("top-1 (%)")
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ffsd_fast.report", description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
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
    text = markdown(table) + "\n" + deployed_markdown(table)
    (out / "report.md").write_text(text)
    bar_chart(table, out / "report.png")
    print(text)
    print(f"written: {out / 'report.md'}, {out / 'report.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
