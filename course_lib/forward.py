r"""The forward (noising) process: one step of the Markov chain, the whole chain, and its closed form.

Taught in notebooks/01_forward_diffusion.ipynb. Paper: Ho et al. 2020 (DDPM), eq. 2 and eq. 4.

Noise is always an argument (`eps`) or drawn from an explicit `torch.Generator`, so every result is reproducible.
"""

import torch

from course_lib.checks import check_same_shape
from course_lib.profiles import randn_like
from course_lib.schedules import Schedule, gather


def q_step(schedule: Schedule, x_prev: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
    r"""One step of the chain, x_{t-1} -> x_t (Ho et al. 2020, eq. 2):

    $$x_t = \sqrt{1 - \beta_t}\, x_{t-1} + \sqrt{\beta_t}\, \epsilon,\qquad \epsilon \sim \mathcal N(0, I)$$

    At t = 0, x_prev is the clean data x0.
    """
    check_same_shape(x_prev=x_prev, eps=eps)
    beta_t = gather(schedule.betas, t, x_prev)
    return (1 - beta_t).sqrt() * x_prev + beta_t.sqrt() * eps


def q_sample(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
    r"""Jump straight to step t with the closed form (Ho et al. 2020, eq. 4, reparameterised):

    $$x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \epsilon$$

    Same as diffusers' `scheduler.add_noise(x0, eps, t)`.
    """
    check_same_shape(x0=x0, eps=eps)
    alpha_bar_t = gather(schedule.alpha_bar, t, x0)
    return alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * eps


def run_chain(schedule: Schedule, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply `q_step` for t = 0..T-1 and return every state: shape (T, *x0.shape), entry t is x_t."""
    states = []
    x = x0
    for t in range(schedule.T):
        x = q_step(schedule, x, t, randn_like(x, generator))
        states.append(x)
    return torch.stack(states)
