"""What a finished run reports: each network's final and best accuracy, as ``summary.json`` and a table."""


def summarize(history: list[dict], num_students: int, topk: tuple[int, ...]) -> dict:
    """Final-epoch accuracies, and each network's best over epochs (at its own epoch, as the paper reports)."""
    final, summary = history[-1], {}
    for k in topk:
        for key in ("leader", "fusion", "ensemble", "average", "oracle_ensemble"):
            if f"{key}_top{k}" not in final:  # the baselines have no leader or fusion module
                continue
            summary[f"{key}_top{k}"] = final[f"{key}_top{k}"]
            summary[f"best_{key}_top{k}"] = max(h[f"{key}_top{k}"] for h in history)
        students = [f"student{i}_top{k}" for i in range(num_students)]
        summary[f"students_top{k}"] = [final[s] for s in students]
        summary[f"best_students_top{k}"] = [max(h[s] for h in history) for s in students]
    if "leader_top1" in final:
        summary["best_leader_epoch"] = max(history, key=lambda h: h["leader_top1"])["epoch"]
    return summary


def print_table(summary: dict, num_students: int) -> None:
    rows = [
        (f"student {i + 1}", summary["students_top1"][i], summary["best_students_top1"][i]) for i in range(num_students)
    ]
    rows += [
        (label, summary[f"{key}_top1"], summary[f"best_{key}_top1"])
        for label, key in [
            ("fusion module", "fusion"),
            ("leader", "leader"),
            ("students' average", "average"),
            ("ensemble (mean logits)", "ensemble"),
            ("oracle ensemble (any)", "oracle_ensemble"),
        ]
        if f"{key}_top1" in summary
    ]
    print(f"\n{'network':<24}{'final top-1':>12}{'best top-1':>12}")
    for label, final, best in rows:
        print(f"{label:<24}{final:>11.2f}%{best:>11.2f}%")
