"""A deliberately plain, sequential transcription of FFSD as docs/method.md states it, to hold the fast step to.

It follows the reference implementation's structure: forward everything, then for each network its own loss, its
own backward and its own optimiser step (students, fusion module, leader), then each decoder's training pass with its
own backward and Adam step. It shares no loss code with ``ffsd_fast`` or ``ffsd_kernels``.
"""

import torch
import torch.nn.functional as F


def att(x):
    return x.pow(2).mean(1, keepdim=True)


def dist(x, y):
    x = F.normalize(x.reshape(x.size(0), -1))
    y = F.normalize(y.reshape(y.size(0), -1))
    return (x - y).pow(2).mean()


def kl(student, teacher, t):
    return t * t * F.kl_div(F.log_softmax(student / t, dim=1), F.softmax(teacher / t, dim=1), reduction="batchmean")


def lower_third(v):
    return v.topk(max(v.size(1) // 3, 1), dim=1, largest=False)[0][:, -1:]


def div(x, y):
    norm_y = y.reshape(y.size(0), -1).norm(dim=1, keepdim=True)
    x = F.normalize(x.reshape(x.size(0), -1))
    y = F.normalize(y.reshape(y.size(0), -1))
    y = (norm_y / 2 - y) * torch.sign(y - lower_third(y)) + norm_y / 2
    return (x - y).pow(2).mean()


def shift(y):
    a = att(y)
    norm = a.reshape(a.size(0), -1).norm(dim=1, keepdim=True)
    unit = F.normalize(a.reshape(a.size(0), -1))
    target = (norm / 2 - unit) * torch.sign(unit - lower_third(unit)) + norm / 2
    return y + ((target - unit) * norm / y.size(1)).reshape(a.shape)


def make_reference_optimizers(nets, lr, decoder_lr):
    sgd = dict(lr=lr, momentum=0.9, nesterov=True, foreach=False)
    students = [torch.optim.SGD(s.parameters(), weight_decay=1e-4, **sgd) for s in nets.students]
    fusion = torch.optim.SGD(nets.fusion.parameters(), weight_decay=1e-5, **sgd)
    leader = torch.optim.SGD(nets.leader.parameters(), weight_decay=1e-4, **sgd)
    decoders = [
        torch.optim.Adam(d.parameters(), lr=decoder_lr, weight_decay=1e-4, foreach=False)
        for d in [*nets.decoders, nets.leader_decoder]
    ]
    return students, fusion, leader, decoders


def reference_step(nets, optimizers, x, y, lambda_div, lambda_sd, lambda_f, t=2.0, student_sd_lambda=None):
    student_opts, fusion_opt, leader_opt, decoder_opts = optimizers
    losses = []  # every network's loss, detached: the reference reads each back (.item()) every step
    student_sd_lambda = lambda_div if student_sd_lambda is None else student_sd_lambda
    m = len(nets.students)

    leader_out, leader_maps, tau = nets.leader(x)
    outs, maps = [], []
    for s in nets.students:
        o, f = s(x)
        outs.append(o)
        maps.append(f)
    fusion_in = [f[-1].detach() for f in maps]
    fusion_out, fused = nets.fusion(fusion_in)
    fusion_in = torch.cat(fusion_in, dim=1)
    ensemble = sum(outs) / m

    for i in range(m):
        loss = F.cross_entropy(outs[i], y)
        mutual = 0.0
        for j in range(m):
            if j != i:
                mutual = mutual + kl(outs[i], outs[j].detach(), t)
        loss = loss + mutual / (m - 1)
        if i != 0:
            loss = loss + lambda_div * div(att(maps[i][-1]), att(maps[i - 1][-1].detach()))
            decoder = nets.decoders[i - 1]
            decoder.eval()
            targets = decoder(shift(maps[i - 1][-1].detach()))
            decoder.train()
            sd = 0.0
            for k, g in enumerate(targets):
                sd = sd + dist(att(maps[i][k]), att(g.detach()))
            loss = loss + student_sd_lambda * sd
        student_opts[i].zero_grad()
        losses.append(loss.detach())
        loss.backward()
        student_opts[i].step()

    loss = F.cross_entropy(fusion_out, y) + kl(fusion_out, ensemble.detach(), t)
    fusion_opt.zero_grad()
    losses.append(loss.detach())
    loss.backward()
    fusion_opt.step()

    loss = F.cross_entropy(leader_out, y) + kl(leader_out, fusion_out.detach(), t)
    loss = loss + lambda_f * dist(att(leader_maps[-1]), att(fused.detach()))
    loss = loss + lambda_f * dist(att(tau), att(fusion_in))
    nets.leader_decoder.eval()
    targets = nets.leader_decoder(fused.detach())
    nets.leader_decoder.train()
    for k, g in enumerate(targets):
        loss = loss + lambda_f * dist(att(leader_maps[k]), att(g.detach()))
    leader_opt.zero_grad()
    losses.append(loss.detach())
    loss.backward()
    leader_opt.step()

    owners = [*maps[1:], leader_maps]
    for decoder, opt, own in zip([*nets.decoders, nets.leader_decoder], decoder_opts, owners, strict=True):
        outputs = decoder(own[-1].detach())
        loss = 0.0
        for k, g in enumerate(outputs):
            loss = loss + lambda_sd * dist(g, own[k].detach()) + lambda_sd * dist(att(g), att(own[k].detach()))
        opt.zero_grad()
        losses.append(loss.detach())
        loss.backward()
        opt.step()
    return losses
