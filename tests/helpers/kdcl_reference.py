"""KDCL's step written out plainly, as the public code's loop runs it (shaoeric/Online-Knowledge-Distillation-via-
Collaborative-Learning, train.py lines 58-93): every student on its own view, the ensemble of their detached
logits, then student by student its loss ``(1 − α)·CE + α·T²·KL(teacher ‖ student)``, its backward and its own
optimiser's step. The ensembles other than the code's mean are the specification's (docs/methods/kdcl.md), written
image by image and class by class; the fitted ones (linear, general) weigh the students' logits by weights that
``fit`` computes after each epoch from every student, one at a time in eval mode, on the held-out images."""

import torch
import torch.nn.functional as F


def make_sgds(nets, lr=0.1, weight_decay=1e-4):
    # One plain momentum SGD per student (train.py lines 166-167).
    return [
        torch.optim.SGD(s.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, foreach=False)
        for s in nets.students
    ]


def teacher(outputs, y, kind, weights=None):
    z = [o.detach() for o in outputs]
    if kind in ("linear", "general"):
        return sum(w * zi for w, zi in zip(weights, z, strict=True))
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


def kdcl_step(nets, optimizers, x, y, kind, alpha=0.5, t=4.0, weights=None):
    views = x.chunk(len(nets.students))
    outputs = [student(views[i])[0] for i, student in enumerate(nets.students)]
    target = teacher(outputs, y, kind, weights)
    for i, out in enumerate(outputs):
        ce = F.cross_entropy(out, y)
        kl = F.kl_div(F.log_softmax(out / t, dim=1), F.softmax(target / t, dim=1), reduction="batchmean") * t * t
        loss = (1 - alpha) * ce + alpha * kl
        optimizers[i].zero_grad()
        loss.backward()
        optimizers[i].step()


def heldout_logits(nets, batches):
    """Student by student, in eval mode and without gradients: its logits on every held-out image, ``[N, K]``."""
    found = []
    for student in nets.students:
        student.eval()
        with torch.no_grad():
            found.append(torch.cat([student(x)[0] for x, _ in batches]))
        student.train()
    return found, torch.cat([y for _, y in batches])


def linear_weights(z, y):
    """The weights on the simplex of least mean CE of ``Σ_i w_i z_i``: L-BFGS (strong Wolfe line search) on
    ``β``, ``w = softmax(β)``, from ``β = 0``, to a gradient of 1e-10 or 100 iterations."""
    beta = torch.zeros(len(z), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [beta], lr=1, max_iter=100, tolerance_grad=1e-10, tolerance_change=1e-14, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        w = torch.softmax(beta, dim=0)
        mixed = sum(w[i] * z[i] for i in range(len(z)))
        loss = -F.log_softmax(mixed, dim=1)[torch.arange(len(y)), y].mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    return torch.softmax(beta.detach(), dim=0)


def general_weights(z, y):
    """Perrone and Cooper's generalised ensemble: ``C_ij`` the mean over the images of the dot product of students
    ``i`` and ``j``'s errors ``softmax(z) − onehot(y)``; ``w_k = Σ_j (C⁻¹)_kj / Σ_ij (C⁻¹)_ij``."""
    errors = [F.softmax(zi, dim=1) - F.one_hot(y, zi.shape[1]).to(zi.dtype) for zi in z]
    m = len(z)
    c = torch.zeros(m, m, dtype=torch.float64)
    for i in range(m):
        for j in range(m):
            c[i, j] = (errors[i] * errors[j]).sum(1).mean()
    inverse = torch.linalg.inv(c)
    return inverse.sum(1) / inverse.sum()


def fit(nets, batches, kind):
    """The fitted ensemble's weights after an epoch, from the held-out ``(images, labels)`` batches."""
    z, y = heldout_logits(nets, batches)
    return linear_weights(z, y) if kind == "linear" else general_weights(z, y)
