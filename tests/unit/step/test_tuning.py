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


def test_the_fastest_form_on_the_clock_is_chosen_and_every_form_ran_its_steps():
    calls = []
    seconds = {"per-network": 3e-3, "stacked": 1e-3, "stacked other": 2e-3}
    builders = {name: counting_builder(calls, name) for name in seconds}
    clock = lambda name, run: (run(), seconds[name])[1]  # noqa: E731
    result = tuning.choose(builders, torch.zeros(2, 3), torch.zeros(2), clock, budget_s=60, warmup=2, steps=4)
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
    result = tuning.choose(builders, torch.zeros(1), torch.zeros(1), lambda name, run: (run(), 1.0)[1])
    assert result.choice == "a" and set(result.seconds_per_step) == {"a", "c"}
    assert result.dropped == {"b": "RuntimeError: CUDA out of memory. Tried to allocate 2 GiB"}


def test_a_form_over_its_share_of_the_budget_is_dropped_and_the_first_stays_the_choice():
    builders = {name: counting_builder([], name) for name in ("a", "b")}
    result = tuning.choose(builders, torch.zeros(1), torch.zeros(1), lambda name, run: 1.0, budget_s=0.0)
    assert result.choice == "a" and result.seconds_per_step == {}
    assert all("longer than its share of the budget" in why for why in result.dropped.values())
    assert "dropped" in result.table()


def test_tuning_leaves_the_random_generator_as_it_found_it():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    builders = {name: counting_builder([], name) for name in ("a", "b")}
    tuning.choose(builders, torch.zeros(1), torch.zeros(1), lambda name, run: (run(), 1.0)[1])
    assert torch.equal(torch.rand(3), expected)


def test_no_clock_on_a_cpu():
    assert tuning.clock_for(torch.device("cpu"), steps=10) is None
