"""``--step auto``'s tuner with an injected clock: it keeps the form the clock favours, drops what fails or overruns,
and leaves the random generators as it found them."""

import torch

from ffsd_fast.step import tuning


def counting_builder(calls: list, name: str, fail: bool = False):
    def build():
        if fail:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB\nmore text")

        def step(images, labels):
            calls.append(name)
            torch.rand(1)  # a step that draws random numbers, as augmentation or dropout would

        return step

    return build


def batch(shape: tuple = (1,)):
    """A batch drawn as a loader would: random numbers the tuner must put back too."""
    return lambda: (torch.rand(shape), torch.zeros(shape[0]))


def test_the_fastest_form_on_the_clock_is_chosen_and_every_form_ran_its_steps():
    calls = []
    seconds = {"per-network": 3e-3, "stacked": 1e-3, "stacked other": 2e-3}
    builders = {name: counting_builder(calls, name) for name in seconds}
    clock = lambda name, run: (run(), seconds[name])[1]  # noqa: E731
    result = tuning.choose(builders, batch((2, 3)), clock, budget_s=60, warmup=2, steps=4)
    assert result.choice == "stacked"
    assert result.seconds_per_step == seconds and not result.dropped
    assert [calls.count(name) for name in seconds] == [6, 6, 6]  # warm-up and timed steps, each
    assert "stacked" in result.table() and "<- chosen" in result.table()
    assert result.record()["ms_per_step"]["stacked"] == 1.0


def test_a_form_that_fails_is_dropped_with_its_reason_and_a_tie_keeps_the_first():
    builders = {
        "a": counting_builder([], "a"),
        "b": counting_builder([], "b", fail=True),
        "c": counting_builder([], "c"),
    }
    result = tuning.choose(builders, batch(), lambda name, run: (run(), 1.0)[1])
    assert result.choice == "a" and set(result.seconds_per_step) == {"a", "c"}
    assert result.dropped == {"b": "RuntimeError: CUDA out of memory. Tried to allocate 2 GiB"}


class HostClock:
    """The host's seconds, advanced by the builds alone: ``build(name)`` takes ``costs[name]`` seconds."""

    def __init__(self, costs: dict[str, float]) -> None:
        self.costs, self.seconds = costs, 0.0

    def __call__(self) -> float:
        return self.seconds

    def builder(self, name: str):
        def build():
            self.seconds += self.costs[name]
            return lambda images, labels: None

        return build


def test_a_form_over_its_share_of_the_budget_is_dropped_and_the_last_ones_go_first_when_it_runs_out():
    # 10 s for 3 forms: "a" fits its 3.3 s, "b" overruns its (10 − 2) / 2 = 4 s, and nothing is left for "c
    # compiled", put last as the compiled forms are.
    host = HostClock({"a": 2.0, "b": 8.0, "c compiled": 1.0})
    builders = {name: host.builder(name) for name in host.costs}
    result = tuning.choose(builders, batch(), lambda name, run: 1.0, budget_s=10.0, now=host)
    assert result.choice == "a" and result.seconds_per_step == {"a": 1.0}
    assert result.dropped == {
        "b": "its build and 3 warm-up steps took longer than its share of the budget (4.0 s)",
        "c compiled": "the budget (10.0 s) was spent before its turn",
    }
    assert result.phases["a"] == {"build_s": 2.0, "warmup_s": 0.0, "timed_s": 0.0}
    assert result.seconds == 10.0 and "dropped" in result.table()


def test_forms_that_finish_early_leave_their_time_to_the_later_ones():
    # Equal shares (3.3 s each) would drop "c compiled"; what "a" and "b" leave gives it (10 − 2) / 1 = 8 s.
    host = HostClock({"a": 1.0, "b": 1.0, "c compiled": 7.0})
    builders = {name: host.builder(name) for name in host.costs}
    seconds = {"a": 3.0, "b": 2.0, "c compiled": 1.0}
    result = tuning.choose(builders, batch(), lambda name, run: seconds[name], budget_s=10.0, now=host)
    assert result.choice == "c compiled" and result.seconds_per_step == seconds and not result.dropped
    assert result.record()["phase_seconds"]["c compiled"]["build_s"] == 7.0


def test_tuning_leaves_the_random_generator_as_it_found_it():
    """The batch drawn for it included: ``choose`` is the one place that puts the generators back."""
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    builders = {name: counting_builder([], name) for name in ("a", "b")}
    tuning.choose(builders, batch(), lambda name, run: (run(), 1.0)[1])
    assert torch.equal(torch.rand(3), expected)


def test_no_clock_on_a_cpu():
    assert tuning.clock_for(torch.device("cpu"), steps=10) is None
