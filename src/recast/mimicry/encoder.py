"""Encoder fits (REFERENCE 3): a small network maps each target weight to its coefficients.

Per (group, role) bank, ``Linear(out*in -> 8) -> LeakyReLU -> Linear(8 -> 8) -> LeakyReLU ->
Linear(8 -> n*K)`` reads each flattened target weight and outputs that layer's ``(K, n)``
coefficients; it is trained jointly with the bank's templates on the weighted SmoothL1 weight loss
with RMSprop and a cosine schedule, and the state with the best mean weight cosine is kept.

- ``encoder``: that deterministic encoder (what the reference release calls "VAE").
- ``vae``: a true VAE: the encoder outputs a mean and a log-variance, coefficients are sampled with
  the reparameterisation trick while fitting, a KL term to N(0, 1) weighted by ``beta`` is added,
  and the final coefficients are the means.

The reference trained 2500 epochs (one epoch = one full-batch step over the bank's layers); the
default here is 300 so that a ViT-S-sized fit stays within minutes on a 2-core CPU. Pass
``epochs=2500`` for the reference's budget.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recast.bank import compose
from recast.errors import ConfigError
from recast.mimicry.iterative import IterativeSettings
from recast.mimicry.optimise import optimise, random_init, role_weight, weight_loss
from recast.mimicry.problem import FitProblem, FitResult
from recast.mimicry.registry import register_mimicry


class CoefficientEncoder(nn.Module):
    """Flattened weights ``(L, D)`` -> coefficient means (and log-variances) ``(L, K, n)``."""

    def __init__(self, in_features: int, templates: int, coef_sets: int, hidden: int = 8, variational: bool = False):
        super().__init__()
        self.templates, self.coef_sets = templates, coef_sets
        self.body = nn.Sequential(
            nn.Linear(in_features, hidden), nn.LeakyReLU(), nn.Linear(hidden, hidden), nn.LeakyReLU()
        )
        self.mean = nn.Linear(hidden, templates * coef_sets)
        self.log_var = nn.Linear(hidden, templates * coef_sets) if variational else None

    def forward(self, weights: Tensor) -> tuple[Tensor, Tensor | None]:  # (L, D) -> (L, K, n), (L, K, n) | None
        hidden = self.body(weights)  # (L, hidden)
        shape = (weights.shape[0], self.coef_sets, self.templates)
        mean = self.mean(hidden).reshape(shape)
        log_var = None if self.log_var is None else self.log_var(hidden).reshape(shape).clamp(-30.0, 10.0)
        return mean, log_var


def encoder_input(targets: Tensor) -> Tensor:
    """Flattened targets ``(L, D)``, each row scaled to unit L1 norm.

    RMSprop moves every parameter by about ``lr`` per step whatever its gradient, so on raw weights
    a first layer 590k wide changes its outputs by hundreds per step and the fit diverges; with unit
    L1 rows each step changes them by about ``lr``. (A deviation from the reference, which fed raw
    weights.)
    """
    flat = targets.flatten(1)  # (L, D)
    return flat / flat.abs().sum(dim=1, keepdim=True).clamp_min(1e-12)


def kl_to_standard_normal(mean: Tensor, log_var: Tensor) -> Tensor:
    """KL(N(mean, exp(log_var)) || N(0, 1)), averaged over coefficients."""
    return (-0.5 * (1 + log_var - mean.pow(2) - log_var.exp())).mean()


def _mean_cosine(generated: list[Tensor], targets: list[Tensor]) -> float:
    """Mean over all layers of the cosine between generated and target weights."""
    cosines = [F.cosine_similarity(g.flatten(1), t.flatten(1), dim=1) for g, t in zip(generated, targets, strict=True)]
    return torch.cat(cosines).mean().item()


def _fit_encoders(
    problems: list[FitProblem],
    *,
    variational: bool,
    epochs: int,
    lr: float,
    hidden: int,
    beta: float,
    role_weights: Mapping[str, float] | None,
    clip: float | None,
    seed: int,
    progress: bool,
) -> list[FitResult]:
    """Train one encoder and one bank per problem, all jointly; keep the best mean-cosine state."""
    if epochs < 0 or lr <= 0 or hidden < 1 or beta < 0:
        raise ConfigError(f"encoder mimicry needs epochs >= 0, lr > 0, hidden >= 1, beta >= 0; got {epochs}, {lr}, {hidden}, {beta}")
    torch.manual_seed(seed)  # the encoders' own init
    generator = torch.Generator().manual_seed(seed + 1)
    weights = role_weights if role_weights is not None else IterativeSettings.paper(problems).role_weights
    loss_weights = [role_weight(p.role, weights) for p in problems]
    targets = [p.targets.detach().float() for p in problems]  # (L, *shape) each
    inputs = [encoder_input(t) for t in targets]  # (L, D) each
    templates = [r.templates.float().requires_grad_(True) for r in random_init(problems, seed)]
    encoders = nn.ModuleList(
        CoefficientEncoder(x.shape[1], p.templates, p.coef_sets, hidden, variational) for x, p in zip(inputs, problems, strict=True)
    )

    def objective() -> tuple[Tensor, float]:
        loss, generated = torch.zeros(()), []
        for t, enc, x, w, weight in zip(templates, encoders, inputs, targets, loss_weights, strict=True):
            mean, log_var = enc(x)  # (L, K, n)
            coefficients = mean
            if log_var is not None:
                noise = torch.randn(mean.shape, generator=generator).to(mean.device)
                coefficients = mean + noise * (0.5 * log_var).exp() if torch.is_grad_enabled() else mean
                loss = loss + beta * kl_to_standard_normal(mean, log_var)
            w_hat = compose(t, coefficients)  # (L, *shape)
            loss = loss + weight_loss(w_hat, w, weight)
            generated.append(w_hat if log_var is None else compose(t, mean).detach())
        return loss, -_mean_cosine([g.detach() for g in generated], targets)

    params = templates + list(encoders.parameters())
    optimiser = torch.optim.RMSprop(params, lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(epochs, 1))
    name = "vae" if variational else "encoder"
    losses = optimise(
        params, objective, optimiser, scheduler, steps=epochs, clip=clip, progress=progress, desc=f"mimicry ({name})"
    )
    results = []
    with torch.no_grad():
        for t, enc, x, p in zip(templates, encoders, inputs, problems, strict=True):
            mean, _ = enc(x)  # (L, K, n): the encoder's (mean) coefficients
            results.append(FitResult(t.detach().to(p.targets.dtype), mean.to(p.targets.dtype), losses))
    return results


@register_mimicry("encoder")
def fit_encoder(
    problems: list[FitProblem],
    *,
    epochs: int = 300,
    lr: float = 2e-3,
    hidden: int = 8,
    role_weights: Mapping[str, float] | None = None,
    clip: float | None = None,
    seed: int = 42,
    progress: bool = False,
) -> list[FitResult]:
    """The reference's deterministic weight-to-coefficient encoder, trained jointly with the bank.

    ``epochs`` defaults to 300 (the reference: 2500); ``role_weights`` default to the paper's
    iterative ones for these targets.
    """
    return _fit_encoders(
        problems, variational=False, epochs=epochs, lr=lr, hidden=hidden, beta=0.0, role_weights=role_weights,
        clip=clip, seed=seed, progress=progress,
    )


@register_mimicry("vae")
def fit_vae(
    problems: list[FitProblem],
    *,
    epochs: int = 300,
    lr: float = 2e-3,
    hidden: int = 8,
    beta: float = 1e-6,
    role_weights: Mapping[str, float] | None = None,
    clip: float | None = None,
    seed: int = 42,
    progress: bool = False,
) -> list[FitResult]:
    """A true VAE over coefficients: sampled while fitting, KL to N(0, 1), final coefficients = means.

    ``beta`` weighs the KL (mean per coefficient) against the SmoothL1 weight loss (mean per weight
    element, about 1e-5..1e-4 for pretrained weights), hence its small default.
    """
    return _fit_encoders(
        problems, variational=True, epochs=epochs, lr=lr, hidden=hidden, beta=beta, role_weights=role_weights,
        clip=clip, seed=seed, progress=progress,
    )
