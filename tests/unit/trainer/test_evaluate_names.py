"""A method's evaluated networks may not take the names of the evaluation's own entries (the peers' mean
``ensemble``, ``oracle_ensemble``, ``average``): its accuracy would be overwritten without a word."""

import pytest
import torch

from ffsd_fast.trainer.evaluate import RESERVED, evaluate


class _Named(torch.nn.Module):
    peers = ("student0",)

    def __init__(self, extra: str) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(3, 2))
        self.extra = extra

    def eval_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = images @ self.weight.T
        return {"student0": logits, self.extra: logits + 1}


def _loader():
    return [(torch.randn(4, 2), torch.tensor([0, 1, 2, 0]))]


@pytest.mark.parametrize("name", sorted(RESERVED))
def test_a_network_named_like_an_evaluation_entry_is_refused(name):
    with pytest.raises(ValueError, match="reserved"):
        evaluate(_Named(name), _loader())


def test_other_names_are_evaluated_beside_the_ensemble():
    result = evaluate(_Named("gated_ensemble"), _loader())
    assert {"student0_top1", "gated_ensemble_top1", "ensemble_top1", "average_top1"} <= result.keys()
