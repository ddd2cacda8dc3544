"""KDCL's step written out plainly, as the public code's loop runs it (shaoeric/Online-Knowledge-Distillation-via-
Collaborative-Learning, train.py lines 58-93): every student on its own view, the ensemble of their detached
logits, then student by student its loss ``(1 − α)·CE + α·T²·KL(teacher ‖ student)``, its backward and its own
optimiser's step. The ensembles other than the code's mean are the specification's (docs/methods/kdcl.md), written
image by image and class by class."""

import torch
import torch.nn.functional as F


def make_sgds(nets, lr=0.1, weight_decay=1e-4):
    # One plain momentum SGD per student (train.py lines 166-167).
    return [
        torch.optim.SGD(s.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, foreach=False)
        for s in nets.students
    ]


def teacher(outputs, y, kind):
    z = [o.detach() for o in outputs]
    if kind == "mean":
        return sum(z) / len(z)
    if kind == "minlogit":
        onehot = F.one_hot(y, z[0].shape[1]).to(z[0].dtype)
        shifted = [zi - (zi * onehot).sum(1, keepdim=True) for zi in z]
        least = shifted[0]
        for s in shifted[1:]:
            least = torch.minimum(least, s)
        return least
    assert kind == "naive"
    rows = []
    for b in range(y.shape[0]):
        losses = [-F.log_softmax(zi[b], dim=0)[y[b]] for zi in z]
        best = min(range(len(z)), key=lambda i: losses[i].item())  # the first of equals, as argmin
        rows.append(z[best][b])
    return torch.stack(rows)


def kdcl_step(nets, optimizers, x, y, kind, alpha=0.5, t=4.0):
    views = x.chunk(len(nets.students))
    outputs = [student(views[i])[0] for i, student in enumerate(nets.students)]
    target = teacher(outputs, y, kind)
    for i, out in enumerate(outputs):
        ce = F.cross_entropy(out, y)
        kl = F.kl_div(F.log_softmax(out / t, dim=1), F.softmax(target / t, dim=1), reduction="batchmean") * t * t
        loss = (1 - alpha) * ce + alpha * kl
        optimizers[i].zero_grad()
        loss.backward()
        optimizers[i].step()
