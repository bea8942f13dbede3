r"""Reflow and straightness (chapter 10): the coupling a flow's ODE makes, the next flow trained on it, and how
straight a sampler's path is. Paper: Liu, Gong & Liu 2023, "Flow Straight and Fast" (rectified flow, reflow, the
straightness measure). The convention is `course_lib.flow`'s: t = 0 the data, t = 1 the noise; `flow.reflow_loss`
is the loss that trains on `reflow_pairs`.
"""

import torch

from course_lib.checks import check_choice
from course_lib.flow import SOLVERS, VelocityModel, euler_flow_sample, heun_flow_sample


@torch.no_grad()
def reflow_pairs(
    model: VelocityModel,
    noise: torch.Tensor,
    steps: int,
    cond: torch.Tensor | None = None,
    shift: float = 1.0,
    solver: str = "heun",
    batch_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, sample): each noise carried to t = 0 by the flow's ODE, the coupling that reflow trains the next flow
    on (Liu et al. 2023: "reflow", the rectify map (X_0, X_1) -> (Z_0, Z_1)); `reflow_loss` trains on it.

    solver is "heun" (`heun_flow_sample`, the default: the pairs should follow the ODE closely) or "euler"; batch_size
    splits a large noise tensor (and cond with it) into batches. The sample has noise's device and dtype.
    """
    check_choice("solver", solver, SOLVERS)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None; got batch_size={batch_size!r}")
    if cond is not None and len(cond) != len(noise):
        raise ValueError(f"cond has {len(cond)} entries for {len(noise)} noise samples")
    sample_fn = heun_flow_sample if solver == "heun" else euler_flow_sample
    size = batch_size or len(noise)
    samples = []
    for start in range(0, len(noise), size):
        batch_cond = cond[start : start + size] if cond is not None else None
        samples.append(sample_fn(model, noise[start : start + size], steps, batch_cond, shift)[0])
    return noise, torch.cat(samples)


def path_from_trajectory(
    trajectory: list[tuple[float, torch.Tensor, torch.Tensor]], x0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(times, path) for `straightness` from a sampler's (x0, trajectory): the recorded times and states, then t = 0
    and the sample. Record every step (record_every=1) to get the whole path the sampler took."""
    if not trajectory:
        raise ValueError("the trajectory is empty: sample with record_every=1")
    times = torch.tensor([t for t, _, _ in trajectory] + [0.0], dtype=torch.float64)
    path = torch.stack([xt for _, xt, _ in trajectory] + [x0.cpu()])
    return times, path


def straightness(times: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
    r"""Liu et al. 2023's straightness of a path, per example: 0 exactly for a straight line run at constant speed;
    the more the ODE bends, the larger, and the more steps a sampler needs.

    $$S = \frac{1}{t_0 - t_N}\int_{t_N}^{t_0} \Big\lVert \frac{x_{t_0} - x_{t_N}}{t_0 - t_N} - \frac{dx_t}{dt}
      \Big\rVert^2 dt,\quad\text{i.e.}\quad S = \int_0^1 \lVert (x_1 - x_0) - \dot x_t \rVert^2 dt\ \text{on}\ [0, 1]$$

    taken exactly for the polyline through the given states: on each segment $dx/dt$ is
    $(x_{i+1} - x_i) / (t_{i+1} - t_i)$, for an Euler path the velocity the sampler used. The squared norm is the
    mean over coordinates, as in the loss (the paper's sum over the dimension d, divided by d).
    times: (N + 1,), strictly monotonic; path: (N + 1, B, ...). Returns (B,), float64.
    """
    times = times.double().cpu()
    if times.ndim != 1 or len(times) < 2 or len(times) != len(path):
        shapes = f"{tuple(times.shape)} and {tuple(path.shape)}"
        raise ValueError(f"need times (N + 1,) with N >= 1 and path (N + 1, B, ...); got {shapes}")
    dt = times[1:] - times[:-1]  # (N,)
    if not ((dt > 0).all() or (dt < 0).all()):
        raise ValueError(f"times must be strictly monotonic; got {times.tolist()}")
    path = path.double().cpu().flatten(2)  # (N + 1, B, D)
    chord = (path[-1] - path[0]) / (times[-1] - times[0])  # (B, D) the constant velocity of the straight line
    segment = (path[1:] - path[:-1]) / dt[:, None, None]  # (N, B, D)
    deviation = (segment - chord).pow(2).mean(2)  # (N, B)
    return (dt.abs()[:, None] * deviation).sum(0) / (times[-1] - times[0]).abs()
