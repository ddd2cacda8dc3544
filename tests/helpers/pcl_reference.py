"""PCL's step written out plainly, as the unofficial public code runs it (shaoeric/Peer-Collaborative-Learning-for-
Online-Knowledge-Distillation: ``src/controller.py`` lines 37-45, ``src/losses/loss_wrapper.py`` lines 18-61,
``src/losses/kd_loss.py``, ``src/trainer.py`` line 111, ``src/utils/ema.py``), in the words of
``docs/methods/pcl.md``: the trunk on each peer's view apart, each branch on its own, the ensemble classifier on the
concatenated pooled features, the temporal mean's forward in train mode, every loss summed, one backward, one
Nesterov SGD step, then the temporal mean's update. It shares no code with ``ffsd_fast`` or ``ffsd_kernels``.
"""

import math

import torch
import torch.nn.functional as F


def make_sgd(nets, weight_decay=1e-4):
    # One SGD over the whole online network, ensemble classifier included (src/trainer.py line 67), Nesterov
    # (src/optimizer/optimizer_config.yml).
    params = [*nets.trunk.parameters(), *nets.students.parameters(), *nets.ensemble.parameters()]
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=weight_decay, nesterov=True, foreach=False)


def rampup(epoch, length, code_divisor=True):
    """``LossWrapper.compute_rampup_weight(epoch, lambd=1.0, alpha=length)`` (loss_wrapper.py lines 18-22): the code
    divides the epoch by ``lambd``; the clean ramp divides it by ``length``."""
    if epoch > length:
        return 1.0
    divisor = 1.0 if code_divisor else length
    if divisor == 0:
        return 1.0
    return math.exp(-5 * (1 - epoch / divisor) ** 2)


def trunk(t, x):
    """The stock CIFAR ResNet's or WRN's forward up to its last stage, from its own layers."""
    if hasattr(t, "bn1"):  # CIFAR ResNet
        return t.layer2(t.layer1(F.relu(t.bn1(t.conv1(x)))))
    return t.layer2(t.layer1(t.conv1(x)))  # WRN


def branch(b, h):
    """``(logits, pooled feature)`` of the last stage and classifier on ``h`` (the code's ``Branch``)."""
    if hasattr(b, "fc"):  # CIFAR ResNet
        f = b.layer3(h).mean((2, 3))
        return b.fc(f), f
    f = F.relu(b.bn1(b.layer3(h))).mean((2, 3))  # WRN
    return b.linear(f), f


def kd(pred, target, t):
    """``KDLoss``: T² · KLDivLoss(batchmean)(log_softmax(pred / T), softmax(target / T))."""
    return F.kl_div(F.log_softmax(pred / t, dim=1), F.softmax(target / t, dim=1), reduction="batchmean") * t * t


def update_mean(nets, decay):
    """``update_ema_variables`` with the step count the trainer keeps (here the network's own counter)."""
    step = int(nets.mean_steps)
    alpha = min(1 - 1 / (step + 1), decay)
    online = [*nets.trunk.parameters(), *nets.students.parameters()]
    means = [*nets.mean_trunk.parameters(), *nets.mean_students.parameters()]
    with torch.no_grad():
        for mean, param in zip(means, online, strict=True):
            mean.mul_(alpha).add_(param, alpha=1 - alpha)
    nets.mean_steps += 1


def pcl_step(nets, optimizer, x, y, pe_weight, pm_weight, t=3.0, decay=0.999):
    m = len(nets.students)
    views = x.chunk(m)
    outputs, features = [], []
    for i, b in enumerate(nets.students):
        logits, f = branch(b, trunk(nets.trunk, views[i]))
        outputs.append(logits)
        features.append(f)
    ensemble = nets.ensemble(torch.cat(features, dim=1))
    with torch.no_grad():
        means = [branch(b, trunk(nets.mean_trunk, views[i]))[0] for i, b in enumerate(nets.mean_students)]
    loss = F.cross_entropy(ensemble, y)
    for i, out in enumerate(outputs):
        pm = 0.0
        for j in range(m):
            if j != i:
                pm = pm + kd(out, means[j].detach(), t)
        pm = pm / (m - 1)
        loss = loss + F.cross_entropy(out, y) + pe_weight * kd(out, ensemble.detach(), t) + pm_weight * pm
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    update_mean(nets, decay)
    return loss.detach()
