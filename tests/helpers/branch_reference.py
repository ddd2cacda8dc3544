"""Plain, sequential transcriptions of the branch methods' specifications (``docs/methods/*.md``), to hold the fast
step to. They share no loss code with ``ffsd_fast`` or ``ffsd_kernels``: each network's forward is written out from
the stock backbone's layers, each loss as the public code computes it, one backward, one plain SGD step.
"""

import torch
import torch.nn.functional as F


def trunk(nets, x):
    """The stock backbone's forward up to the last stage, from its own layers (CIFAR or ImageNet ResNet, or WRN)."""
    t = nets.trunk
    if hasattr(t, "maxpool"):  # ImageNet ResNet: the stem, then layer1-3
        return t.layer3(t.layer2(t.layer1(t.maxpool(F.relu(t.bn1(t.conv1(x)))))))
    if hasattr(t, "bn1"):  # CIFAR ResNet
        return t.layer2(t.layer1(F.relu(t.bn1(t.conv1(x)))))
    return t.layer2(t.layer1(t.conv1(x)))  # WRN


def branch(b, h):
    """The stock backbone's last stage and classifier on the trunk's output ``h``."""
    if hasattr(b, "layer4"):  # ImageNet ResNet
        return b.fc(b.layer4(h).mean((2, 3)))
    if hasattr(b, "fc"):  # CIFAR ResNet
        return b.fc(b.layer3(h).mean((2, 3)))
    return b.linear(F.relu(b.bn1(b.layer3(h))).mean((2, 3)))  # WRN


def make_sgd(nets, nesterov):
    return torch.optim.SGD(nets.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=nesterov, foreach=False)


def one_kl(pred, ensemble, t, epsilon):
    """ONE's KLLoss (loss/kl_loss.py): T² · Σ target (log target − log_softmax(pred/T)) / B, target the ensemble's
    detached softmax plus ε."""
    target = F.softmax(ensemble.detach() / t, dim=1) + epsilon
    return t * t * (target * (target.log() - F.log_softmax(pred / t, dim=1))).sum(1).sum() / target.size(0)


def one_step(nets, optimizer, x, y, weight, t=3.0, epsilon=1e-7, gate_relu=True):
    h = trunk(nets, x)
    outputs = [branch(b, h) for b in nets.students]
    g = nets.gate.bn(nets.gate.fc(h.mean((2, 3))))
    g = F.softmax(F.relu(g) if gate_relu else g, dim=1)
    ensemble = outputs[0] * g[:, 0:1]
    for i in range(1, len(outputs)):
        ensemble = ensemble + outputs[i] * g[:, i : i + 1]
    loss = F.cross_entropy(ensemble, y)
    for out in outputs:
        loss = loss + F.cross_entropy(out, y) + weight * one_kl(out, ensemble, t, epsilon)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def clilr_kl(pred, teacher, t, epsilon):
    """OKDDip-AAAI2020's ``utils.KL_Loss``: T² · KLDivLoss(batchmean) of log_softmax(pred/T) against
    softmax(teacher/T) + ε; the teacher as given (not detached)."""
    target = F.softmax(teacher / t, dim=1) + epsilon
    return t * t * F.kl_div(F.log_softmax(pred / t, dim=1), target, reduction="batchmean")


def clilr_step(nets, optimizer, x, y, weight, t=3.0, epsilon=1e-7, teacher_gradient=True):
    m = len(nets.students)
    h = trunk(nets, x)
    h.register_hook(lambda grad: grad / m)  # backpropagation rescaling of the shared trunk
    outputs = [branch(b, h) for b in nets.students]
    loss = 0.0
    for i, out in enumerate(outputs):
        teacher = 0.0
        for j in range(m):
            if j != i:
                teacher = teacher + outputs[j] / (m - 1)
        if not teacher_gradient:
            teacher = teacher.detach()
        loss = loss + F.cross_entropy(out, y) + weight * clilr_kl(out, teacher, t, epsilon)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def branch_features(b, h):
    """The stock backbone's last stage on ``h``, average-pooled, and its classifier's logits."""
    if hasattr(b, "layer4"):  # ImageNet ResNet
        pooled = b.layer4(h).mean((2, 3))
        return pooled, b.fc(pooled)
    if hasattr(b, "fc"):  # CIFAR ResNet
        pooled = b.layer3(h).mean((2, 3))
        return pooled, b.fc(pooled)
    pooled = F.relu(b.bn1(b.layer3(h))).mean((2, 3))  # WRN
    return pooled, b.linear(pooled)


def okddip_step(nets, optimizer, x, y, weight, t=3.0, epsilon=1e-7, target_gradient=True, self_attention=True):
    """DefangChen/OKDDip-AAAI2020 ``train_GL.py``'s step on ``models/model_cifar/resnet_GL.py``'s forward: the peers'
    logits ``pro`` [B, K, P], their attention-mixed targets ``x_m``, the leader's output and its target, the peers'
    mean."""
    h = trunk(nets, x)
    outputs, queries, keys = [], [], []
    for b in nets.students:
        pooled, logits = branch_features(b, h)
        outputs.append(logits)
        queries.append(nets.query(pooled)[:, None, :])
        keys.append(nets.key(pooled)[:, None, :])
    pro = torch.stack(outputs, dim=-1)  # B x K x P
    energy = torch.bmm(torch.cat(queries, 1), torch.cat(keys, 1).permute(0, 2, 1))
    if not self_attention:
        energy = energy - torch.diag(torch.full((energy.size(1),), float("inf")))
    attention = F.softmax(energy, dim=-1)
    source = pro if target_gradient else pro.detach()
    x_m = torch.bmm(source, attention.permute(0, 2, 1))
    _, leader = branch_features(nets.leader, h)
    loss_true, loss_group = 0.0, 0.0
    for i in range(pro.size(2)):
        loss_true = loss_true + F.cross_entropy(pro[:, :, i], y)
        loss_group = loss_group + clilr_kl(pro[:, :, i], x_m[:, :, i], t, epsilon)
    loss = loss_true + F.cross_entropy(leader, y) + weight * (loss_group + clilr_kl(leader, source.mean(2), t, epsilon))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()
