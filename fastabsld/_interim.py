"""TEMPORARY stand-ins for APIs that other branches deliver (attack, ABSLDLoss, evaluate).

Used by ``fastabsld.train`` only while ``fastabsld.attack`` / ``fastabsld.loss.ABSLDLoss`` /
``fastabsld.evaluation`` are missing. Delete this module once those branches are merged.
"""

import torch
import torch.nn.functional as F

from fastabsld import reference


def kl_loss(teacher_probs):
    def fn(logits):
        logq = F.log_softmax(logits.float(), dim=1)
        return (teacher_probs * (torch.log(teacher_probs.clamp_min(1e-30)) - logq)).sum()
    return fn


def ce_loss(labels):
    return lambda logits: F.cross_entropy(logits.float(), labels, reduction="sum")


def pgd(model, x, loss_fn, *, eps, alpha, steps, norm="linf", random_start="uniform", clamp=(0.0, 1.0),
        generator=None):
    x = x.detach()
    if random_start == "normal":
        x_adv = x + 0.001 * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    elif random_start == "uniform":
        x_adv = (x + (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * eps)
        x_adv = x_adv.clamp(*clamp)
    else:
        x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            grad, = torch.autograd.grad(loss_fn(model(x_adv)), x_adv)
        x_adv = reference.pgd_step(x_adv.detach(), x, grad, alpha, eps, norm, clamp)
    return x_adv.detach()


class ABSLDLoss(torch.nn.Module):
    def __init__(self, num_classes, *, adv_weight=5 / 6, nat_weight=1 / 6, tau_init=1.0, tau_min=0.5, tau_max=5.0,
                 beta=0.1, temperature_mode="paper"):
        super().__init__()
        self.adv_weight, self.nat_weight = adv_weight, nat_weight
        self.tau_min, self.tau_max, self.beta = tau_min, tau_max, beta
        self.register_buffer("tau_adv", torch.full((num_classes,), float(tau_init)))
        self.register_buffer("tau_nat", torch.full((num_classes,), float(tau_init)))
        self.register_buffer("risk_adv", torch.zeros(num_classes))
        self.register_buffer("risk_nat", torch.zeros(num_classes))

    def teacher_probs(self, teacher_logits, labels, branch="adv"):
        tau = (self.tau_adv if branch == "adv" else self.tau_nat)[labels].unsqueeze(1)
        return F.softmax(teacher_logits.float() / tau, dim=1)

    def forward(self, adv_logits, nat_logits, teacher_logits, labels):
        p_adv = self.teacher_probs(teacher_logits, labels, "adv")
        p_nat = self.teacher_probs(teacher_logits, labels, "nat")
        if self.training:
            with torch.no_grad():
                self.risk_adv.index_add_(0, labels, F.cross_entropy(adv_logits.float(), labels, reduction="none"))
                self.risk_nat.index_add_(0, labels, F.cross_entropy(nat_logits.float(), labels, reduction="none"))
        return (self.adv_weight * reference.released_absld_kl_mean(adv_logits, p_adv)
                + self.nat_weight * reference.released_absld_kl_mean(nat_logits, p_nat))

    @torch.no_grad()
    def update_temperatures(self):
        for tau, risk in ((self.tau_adv, self.risk_adv), (self.tau_nat, self.risk_nat)):
            g = risk - risk.mean()
            m = g.abs().max()
            if m > 0:
                tau.copy_((tau - self.beta * g / m).clamp(self.tau_min, self.tau_max))
            risk.zero_()


@torch.no_grad()
def evaluate(model, loader, attacks=("clean", "pgd20"), *, eps, alpha, num_classes, device="cpu", progress=False):
    model.eval()
    out = {}
    for attack in attacks:
        correct = torch.zeros(num_classes)
        total = torch.zeros(num_classes)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            if attack == "clean":
                xa = x
            elif attack == "fgsm":
                xa = pgd(model, x, ce_loss(y), eps=eps, alpha=eps, steps=1, random_start="none")
            elif attack == "cw":
                def cw(logits, y=y):
                    true = logits.gather(1, y[:, None]).squeeze(1)
                    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), -1e4).amax(1)
                    return (other - true).clamp_min(-50).sum()
                xa = pgd(model, x, cw, eps=eps, alpha=alpha, steps=20)
            elif attack.startswith("pgd"):
                xa = pgd(model, x, ce_loss(y), eps=eps, alpha=alpha, steps=int(attack[3:] or 20))
            else:
                raise ValueError(attack)
            pred = model(xa).argmax(1)
            total.index_add_(0, y.cpu(), torch.ones(len(y)))
            correct.index_add_(0, y.cpu(), (pred == y).float().cpu())
        acc = correct / total.clamp_min(1)
        out[attack] = {"average": float(correct.sum() / total.sum()), "worst": float(acc.min()),
                       "nsd": float(acc.std(unbiased=False) / acc.mean().clamp_min(1e-12)),
                       "per_class": acc.tolist()}
    return out
