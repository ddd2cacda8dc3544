"""A method is one module: a toy method, defined and registered in this file alone, trains end to end through the
CLI (one by one and stacked), exports its deployed network, evaluates and reports, without any other file knowing it.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ffsd_fast.cli.eval import main as eval_main
from ffsd_fast.cli.export import main as export_main
from ffsd_fast.cli.report import main as report_main
from ffsd_fast.cli.train import main as train_main
from ffsd_fast.method import registry
from ffsd_fast.method.base import Method, NetworkSpec, ParamGroup, TermTable, create_students
from ffsd_fast.method.dml import DML
from ffsd_fast.method.forms import Group
from ffsd_fast.models import create


@registry.register
class HeadTaught(Method):
    """Students taught by the labels and, weighted by λ_f, by a linear head over their mean detached logits; the head
    learns by CE with its own optimiser. The second student is kept: nothing assumes the first."""

    name = "toy-head-taught"
    summary = "a test's toy: students taught by a linear head over their ensemble"
    lambdas = ("lambda_f",)
    labels = {"head": "ensemble head"}
    deployed, deployed_prefix, reported = "student1", "students.1.", "student1"
    recipe = {"digits": {"epochs": 1}}
    defaults = {**Method.defaults, "quirk_probe_forward": False}

    def __init__(self, spec: NetworkSpec) -> None:
        super().__init__(spec)
        self.students = nn.ModuleList(create_students(spec, self.settings["quirk_probe_forward"]))
        self.head = nn.Linear(spec.num_classes, spec.num_classes)

    def stack_groups(self) -> dict[str, list[nn.Module]]:
        return {"students": list(self.students)}

    def parameter_groups(self) -> list[ParamGroup]:
        return [
            ParamGroup("sgd", list(self.students.parameters()), "weight_decay"),
            ParamGroup("adam", list(self.head.parameters()), "decoder_weight_decay"),
        ]

    def eval_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = {f"student{i}": s(images)[0] for i, s in enumerate(self.students)}
        logits["head"] = self.head(torch.stack(list(logits.values())).mean(0))
        return logits

    def forward(self, images, labels, lambdas):  # noqa: ANN001, ANN201
        logits, _ = self.form("students", images)
        head = self.head(torch.stack([z.detach() for z in logits.parts]).mean(0))
        terms = TermTable(self.form.distances())
        for i in range(len(logits)):
            terms.add(f"student{i}.ce", F.cross_entropy(logits[i], labels))
            kl = self.ops.kl_div_loss(logits[i], head.detach(), self.settings["temperature"])
            terms.add(f"student{i}.head_kl", kl, lambdas[0])
        terms.add("head.ce", F.cross_entropy(head, labels))
        return terms.total(lambdas)


@pytest.mark.slow
@pytest.mark.parametrize("stacked", [False, True], ids=["separate", "stacked"])
def test_a_method_defined_in_one_file_trains_exports_evaluates_and_reports(tmp_path, capsys, stacked):
    # No --epochs: the method's recipe for digits gives 1.
    args = [
        "--no-progress",
        "--workers",
        "0",
        "--method",
        HeadTaught.name,
        "--output-dir",
        str(tmp_path),
        "--run-name",
        "toy",
        "--seed",
        "1",
    ]
    assert train_main([*args, *(["--stack-networks"] if stacked else [])]) == 0
    run = tmp_path / "toy"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == HeadTaught.name and summary["epochs"] == 1
    assert {
        "head_top1",
        "best_head_top1",
        "student1_top1",
        "best_student1_top1",
        "best_student1_epoch",
    } <= summary.keys()
    assert len(summary["students_top1"]) == 2
    table = capsys.readouterr().out
    assert "ensemble head" in table and "student 2" in table
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = next(r for r in records if r["kind"] == "train")
    assert {"student0.head_kl", "weighted/student1.head_kl", "head.ce"} <= train.keys()
    evaluated = next(r for r in records if r["kind"] == "eval")
    assert evaluated["lambda_f"] == pytest.approx(10.0 * torch.tensor(-5.0 * (1 - 1 / 5) ** 2).exp().item())

    out = tmp_path / "student.pt"
    assert export_main([str(run), "--out", str(out)]) == 0
    sidecar = json.loads((tmp_path / "student.pt.json").read_text())
    assert (sidecar["method"], sidecar["network"]) == (HeadTaught.name, "student1")
    weights = torch.load(out)
    stock = create("resnet20", 10)
    stock.load_state_dict(weights, strict=True)  # the stock backbone: the deployed student alone
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=False)
    assert torch.equal(weights["fc.weight"], checkpoint["networks"]["students.1.fc.weight"])

    capsys.readouterr()
    assert eval_main([str(run), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out
    assert f"{summary['head_top1']:.2f}%" in lines.split("head_top1")[1].splitlines()[0]
    assert eval_main([str(out), "--device", "cpu"]) == 0
    assert f"{summary['students_top1'][1]:.2f}%" in capsys.readouterr().out

    assert report_main([str(tmp_path)]) == 0
    report = capsys.readouterr().out
    row = next(line for line in report.splitlines() if HeadTaught.name in line)
    assert f"{summary['best_student1_top1']:.2f}" in row  # the method's reported network


def test_the_registry_lists_a_registered_method_and_its_help():
    assert HeadTaught.name in registry.names()
    assert registry.get(HeadTaught.name) is HeadTaught
    from ffsd_fast.trainer.config import build_parser

    assert HeadTaught.summary in " ".join(build_parser().format_help().split())


@registry.register
class OwnViews(DML):
    """DML with each student fed its own augmentation of the batch: the trainer asks the loader for one view per
    student (``view_count``), and the forward hands view ``i`` to student ``i``."""

    name = "toy-own-views"
    summary = "a test's toy: DML, each student fed its own augmentation"
    recipe = {"digits": {"epochs": 1}}
    seen: list[tuple[int, int]] = []

    @classmethod
    def view_count(cls, config):  # noqa: ANN001, ANN206
        return config["num_students"]

    def forward(self, images, labels, lambdas):  # noqa: ANN001, ANN201
        type(self).seen.append((images.shape[0], labels.shape[0]))
        views = list(images.unflatten(0, (len(self.students), -1)))
        logits, _ = self.form("students", Group(views))
        terms = TermTable(self.form.distances())
        for i in range(len(logits)):
            terms.add(f"student{i}.ce", F.cross_entropy(logits[i], labels))
        return terms.total(lambdas)


@pytest.mark.slow
@pytest.mark.parametrize("step", ["per-network", "stacked"])
def test_a_method_gets_one_view_per_network_when_it_asks(tmp_path, step):
    OwnViews.seen.clear()
    args = ["--no-progress", "--workers", "0", "--method", OwnViews.name, "--num-students", "3"]
    args += ["--batch-size", "32", "--output-dir", str(tmp_path), "--run-name", step, "--step", step]
    assert train_main(args) == 0
    assert OwnViews.seen and all(images == 3 * labels for images, labels in OwnViews.seen)
    assert (96, 32) in OwnViews.seen
    summary = json.loads((tmp_path / step / "summary.json").read_text())
    assert len(summary["students_top1"]) == 3
