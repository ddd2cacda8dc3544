"""``--step auto`` through the trainer, on a CPU with an injected clock (a CPU has none: it keeps the fixed default):
the form the clock favours is chosen, the run then trains bit for bit as the run fixed to that form, and the choice
is recorded (run log, summary, checkpoint) and kept by a resume."""

import json

import pytest
import torch

from ffsd_fast.cli.train import main
from ffsd_fast.step import tuning
from ffsd_fast.trainer import step_forms
from ffsd_fast.trainer.config import Config, resolve

# A budget no CPU step overruns: the forms are dropped by the clock's verdict alone (the budget has a test of its own).
RUN = ["--method", "dml", "--epochs", "1", "--no-progress", "--workers", "0", "--batch-size", "64"]
RUN += ["--step-tuning-seconds", "3600"]


@pytest.fixture(autouse=True)
def traced_compile(monkeypatch):
    """Compiled forms trace with Dynamo (graph breaks found as on a GPU) and run its graphs eagerly: no Inductor."""
    monkeypatch.setattr(step_forms, "COMPILE_OPTIONS", {"backend": "eager"})


FORMS = ["per-network", "stacked", "per-network compiled", "stacked compiled"]
FIXED = {"per-network": ["--step", "per-network"], "stacked": ["--step", "stacked"]}
FIXED["stacked compiled"] = [*FIXED["stacked"], "--compile"]


def favouring(favoured: str, seen: list | None = None):
    """A clock that runs the timed steps and says ``favoured`` takes 1 ms a step, every other form 2 ms."""

    def clock_for(device, steps):
        def clock(name, run):
            run()
            if seen is not None:
                seen.append(name)
            return 1e-3 if name == favoured else 2e-3

        return clock

    return clock_for


def weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)["networks"]


@pytest.mark.slow
@pytest.mark.parametrize("favoured", ["stacked", "per-network", "stacked compiled"])
def test_auto_trains_exactly_as_the_form_the_clock_favours_fixed(tmp_path, monkeypatch, capsys, favoured):
    seen = []
    monkeypatch.setattr(tuning, "clock_for", favouring(favoured, seen))
    assert main([*RUN, "--output-dir", str(tmp_path), "--run-name", "auto", "--step", "auto"]) == 0
    assert seen == FORMS  # every form timed, per-network first, the compiled ones last
    assert "<- chosen" in capsys.readouterr().out
    assert main([*RUN, "--output-dir", str(tmp_path), "--run-name", "fixed", *FIXED[favoured]]) == 0
    auto, fixed = weights(tmp_path / "auto"), weights(tmp_path / "fixed")
    assert auto.keys() == fixed.keys()
    for name, value in fixed.items():
        assert torch.equal(auto[name], value), name

    summary = json.loads((tmp_path / "auto" / "summary.json").read_text())
    assert summary["step"]["form"] == summary["step"]["choice"] == favoured
    assert set(summary["step"]["ms_per_step"]) == set(FORMS)
    records = [json.loads(line) for line in (tmp_path / "auto" / "metrics.jsonl").read_text().splitlines()]
    assert [r["form"] for r in records if r["kind"] == "step_form"] == [favoured]
    saved = torch.load(tmp_path / "auto" / "checkpoint.pt", weights_only=False)["step_form"]
    assert saved == {"stacked": favoured != "per-network", "settings": {}, "compiled": favoured.endswith("compiled")}


@pytest.mark.slow
def test_a_resume_keeps_the_saved_form_unless_the_command_names_one(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "clock_for", favouring("stacked"))
    assert main([*RUN, "--output-dir", str(tmp_path), "--run-name", "run", "--step", "auto"]) == 0
    # The clock now favours the other form: a resume does not time again, it keeps the run's own.
    seen = []
    monkeypatch.setattr(tuning, "clock_for", favouring("per-network", seen))
    run = tmp_path / "run"
    assert main(["--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    assert seen == [] and json.loads((run / "summary.json").read_text())["step"] == {"form": "stacked"}
    assert main(["--resume", str(run), "--epochs", "3", "--no-progress", "--step", "per-network"]) == 0
    assert json.loads((run / "summary.json").read_text())["step"] == {"form": "per-network"}


def test_on_a_cpu_auto_is_the_fixed_per_network_default_and_stack_networks_is_step_stacked():
    assert resolve(Config(device="cpu")).step == "per-network"
    stacked = resolve(Config(device="cpu", stack_networks=True))
    assert stacked.step == "stacked" and stacked.stack_networks
    with pytest.raises(Exception, match="--stack-networks is --step stacked"):
        resolve(Config(device="cpu", stack_networks=True, step="per-network"))


def test_the_forms_are_every_allowed_combination_of_stacking_and_the_methods_levers(monkeypatch):
    from ffsd_fast.step.distributed import SINGLE_PROCESS
    from ffsd_fast.trainer import step_forms
    from ffsd_fast.trainer.step_forms import candidates

    cfg = resolve(Config(device="cpu"))
    forms, left_out = candidates(cfg, SINGLE_PROCESS, given=set())
    eager = [
        "per-network fusion_kernel=torch",
        "per-network fusion_kernel=triton",
        "stacked fusion_kernel=torch",
        "stacked fusion_kernel=triton",
    ]
    assert [f.name for f in forms] == [*eager, *(f"{name} compiled" for name in eager)]  # compiled: last
    assert left_out == {}
    # A lever the command sets is not varied (--compile and --no-compile included); an architecture that does not
    # stack leaves the stacked forms out.
    monkeypatch.setattr(step_forms, "stack_blocker", lambda model: "it concatenates channels")
    forms, left_out = candidates(cfg, SINGLE_PROCESS, {"fusion_kernel", "compile"})
    assert [f.name for f in forms] == ["per-network fusion_kernel=torch"]
    assert left_out == {"every stacked form": "resnet20: it concatenates channels"}
    forms, _ = candidates(resolve(Config(device="cpu", compile=True)), SINGLE_PROCESS, {"fusion_kernel", "compile"})
    assert [f.name for f in forms] == ["per-network fusion_kernel=torch compiled"]
    monkeypatch.undo()
    # A baseline without levers: per-network and stacked, then compiled.
    forms, _ = candidates(resolve(Config(device="cpu", method="dml")), SINGLE_PROCESS, set())
    assert [f.name for f in forms] == FORMS


def test_sync_bn_stacks_so_its_stacked_forms_are_candidates():
    """``--sync-bn`` no longer blocks stacking: its stacked forms are timed (the Triton fusion block, which
    normalises with its own batch statistics, stays out), and ``--step stacked`` resolves."""
    from ffsd_fast.step.distributed import SINGLE_PROCESS
    from ffsd_fast.trainer.step_forms import candidates

    cfg = resolve(Config(device="cpu", sync_bn=True))
    forms, left_out = candidates(cfg, SINGLE_PROCESS, given={"compile"})
    assert [f.name for f in forms] == ["per-network fusion_kernel=torch", "stacked fusion_kernel=torch"]
    assert set(left_out) == {"per-network fusion_kernel=triton", "stacked fusion_kernel=triton"}
    assert resolve(Config(device="cpu", sync_bn=True, step="stacked")).stack_networks


class Batches:
    """A loader of one batch (what ``--step auto`` reads of the training loader)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.batch = images, labels

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        return iter([self.batch])


def test_a_compiled_form_that_breaks_its_graph_is_dropped_with_the_reason(monkeypatch):
    from ffsd_fast.models.cifar_resnet import CifarResNet
    from ffsd_fast.step.distributed import SINGLE_PROCESS
    from ffsd_fast.trainer.run import build_method

    forward = CifarResNet.forward

    def breaking(self, x):
        torch._dynamo.graph_break()
        return forward(self, x)

    monkeypatch.setattr(CifarResNet, "forward", breaking)
    monkeypatch.setattr(tuning, "clock_for", favouring("stacked compiled"))
    cfg = resolve(Config(device="cpu", method="dml", image_size=8, batch_size=4))
    method = build_method(cfg, 10, torch.device("cpu"), SINGLE_PROCESS)
    loader = Batches(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)))
    form, result = step_forms.tune(
        cfg, method, loader, torch.zeros(len(method.lambdas)), (None, None), SINGLE_PROCESS, set()
    )
    assert form.name == "per-network" and set(result.seconds_per_step) == {"per-network", "stacked"}
    assert set(result.dropped) == {"per-network compiled", "stacked compiled"}
    assert all(why.startswith("Unsupported: ") for why in result.dropped.values()), result.dropped


def test_a_resume_keeps_a_compiled_form_and_compile_flags_override_it():
    choose = step_forms.choose
    saved = {"step_form": {"stacked": True, "settings": {}, "compiled": True}}
    cfg = resolve(Config(device="cpu", method="dml"))
    unused = (None, None, None, None)  # loader, lambdas, amp, world: a resume times nothing
    form, tuned = choose(cfg, None, saved, *unused, given=set())
    assert (form.name, tuned) == ("stacked compiled", None)
    form, _ = choose(cfg, None, saved, *unused, given={"compile"})  # --no-compile
    assert form.name == "stacked"
    # A checkpoint from before the forms compiled: as the run's --compile says.
    older = {"step_form": {"stacked": False, "settings": {}}}
    assert choose(resolve(Config(device="cpu", method="dml", compile=True)), None, older, *unused, set())[0].compiled
    assert not choose(cfg, None, older, *unused, given=set())[0].compiled
