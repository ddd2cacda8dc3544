"""What a finished run reports: each network's final and best accuracy, as ``summary.json`` and a table; and the
per-epoch line and accuracy curves. Which networks there are, and what tables call them, is the method's."""

from ffsd_fast.method.base import Method

# Over the peers: their mean accuracy, the accuracy of their mean logits, and of "any peer right" (what the
# reference calls its ensemble).
ENSEMBLES = {
    "average": "students' average",
    "ensemble": "ensemble (mean logits)",
    "oracle_ensemble": "oracle ensemble (any)",
}


def _others(method: Method) -> list[str]:
    """The evaluated networks that are not peers (FFSD's fusion module and leader), in the method's order."""
    return list(method.labels)


def _reported(method: Method) -> list[str]:
    """The networks whose own final and best accuracy the summary holds: the others, and the deployed one."""
    others = _others(method)
    return [*reversed(others), *([method.deployed] if method.deployed not in others else [])]


def summarize(history: list[dict], method: Method, topk: tuple[int, ...]) -> dict:
    """Final-epoch accuracies, and each network's best over epochs (at its own epoch, as the paper reports)."""
    final, summary = history[-1], {}
    for k in topk:
        for key in (*_reported(method), *ENSEMBLES):
            summary[f"{key}_top{k}"] = final[f"{key}_top{k}"]
            summary[f"best_{key}_top{k}"] = max(h[f"{key}_top{k}"] for h in history)
        peers = [f"{name}_top{k}" for name in method.peers]
        summary[f"students_top{k}"] = [final[p] for p in peers]
        summary[f"best_students_top{k}"] = [max(h[p] for h in history) for p in peers]
    key = f"{method.deployed}_top1"
    summary[f"best_{method.deployed}_epoch"] = max(history, key=lambda h: h[key])["epoch"]
    return summary


def print_table(summary: dict, method: Method) -> None:
    rows = [
        (method.table_label(name), summary["students_top1"][i], summary["best_students_top1"][i])
        for i, name in enumerate(method.peers)
    ]
    rows += [(method.table_label(key), summary[f"{key}_top1"], summary[f"best_{key}_top1"]) for key in _others(method)]
    rows += [(label, summary[f"{key}_top1"], summary[f"best_{key}_top1"]) for key, label in ENSEMBLES.items()]
    print(f"\n{'network':<24}{'final top-1':>12}{'best top-1':>12}")
    for label, final, best in rows:
        print(f"{label:<24}{final:>11.2f}%{best:>11.2f}%")


def epoch_line(accuracies: dict[str, float], method: Method) -> str:
    """``leader 71.2  fusion module 72.0  students 69.1 69.5  ensemble 71.0``: an epoch's top-1, deployed first."""
    others = sorted(_others(method), key=lambda name: name != method.deployed)
    parts = [f"{method.labels[name].split()[0]} {accuracies[f'{name}_top1']:.2f}" for name in others]
    students = " ".join(f"{accuracies[f'{name}_top1']:.2f}" for name in method.peers)
    return "  ".join([*parts, f"students {students}", f"ensemble {accuracies['ensemble_top1']:.2f}"])


def curves(method: Method) -> dict[str, str]:
    """The accuracy plot's curves: label → history key."""
    lines = {method.table_label(name): f"{name}_top1" for name in [*method.peers, *_others(method)]}
    return {**lines, ENSEMBLES["ensemble"]: "ensemble_top1"}
