r"""Argument checks shared by several modules: names from a fixed set, matching shapes, integers, step counts,
the recording of trajectories, finite values, and what a model predicts.

Not a chapter of its own: every chapter's code checks its inputs with these, so that a bad value is refused with
one kind of message (the bad value and what would be valid, STYLE habit 10) wherever it is passed. This module sits
on the ground floor of course_lib beside `profiles` and `data` (it imports only torch and data's IMAGE_SIZE);
`schedules` and every module above import it, and chapter 10's flow code, whose time is continuous, uses these
checks without importing the DDPM modules.

Integers: T, steps and a single timestep t may be a Python int, a numpy integer or a 0-d integer tensor (what
`operator.index` takes, as numpy and torch indexing do); bools are refused, although Python counts them as ints.
"""

import operator

import torch

from course_lib.data import IMAGE_SIZE

# --- names, shapes, integers ------------------------------------------------------------------------------------


def check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    """Raise, listing the valid names, unless value is one of them."""
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


def check_same_shape(**tensors: torch.Tensor) -> None:
    """Raise, naming every shape, unless all the given tensors have the same shape."""
    shapes = {name: tuple(x.shape) for name, x in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shapes must match; got {shapes}")


def as_integer(value) -> int | None:
    """value as a Python int if it is an integer (an int, a numpy integer or a 0-d integer tensor), else None, so
    that each caller raises with its own message. Bools, floats (even 2.0) and tensors with a shape give None."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and (value.ndim != 0 or value.dtype == torch.bool)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_steps(steps, T: int | None = None) -> int:
    """steps as a Python int; raise unless it is an integer >= 1, and <= T when T is given.

    A sampler on the T integer timesteps of a schedule (DDIM, DPM-Solver++, Euler) visits at most T of them and
    passes T; a sampler on continuous time (`course_lib.flow`) takes any number of steps and passes none.
    """
    integer = as_integer(steps)
    shown = steps if integer is None else integer  # np.int64(0) shows as 0
    if T is None:
        if integer is None or integer < 1:
            raise ValueError(f"steps must be an integer >= 1; got steps={shown!r}")
    elif integer is None or not 1 <= integer <= T:
        raise ValueError(f"steps must be an integer in 1..T (T={T}); got steps={shown!r}")
    return integer


def check_single_timestep(name: str, t, T: int, clean_data: bool = False) -> int:
    """One timestep of a sampler's step as a Python int: an integer in 0..T-1, or -1 (the clean data, as in DDIM's
    steps) when clean_data is True. A float (2.5, even 2.0) or a bool raises TypeError naming it: a step on a
    fractional time belongs to another sampler (`solvers.euler_karras_step` takes noise levels)."""
    integer = as_integer(t)
    if integer is None:
        raise TypeError(f"{name} must be one integer timestep in 0..{T - 1} (T={T}); got {name}={t!r}")
    if not (-1 if clean_data else 0) <= integer <= T - 1:
        clean = " or -1 (the clean data)" if clean_data else ""
        raise ValueError(f"timestep {name}={integer} is out of range; valid: 0..{T - 1}{clean} (T={T})")
    return integer


# --- recording a sampler's trajectory -----------------------------------------------------------------------------


def check_record_every(record_every) -> int:
    """record_every as a Python int; raise unless it is an integer >= 0 (0: record nothing)."""
    integer = as_integer(record_every)
    if integer is None or integer < 0:
        shown = record_every if integer is None else integer
        raise ValueError(
            f"record_every must be >= 0; got {shown!r} (an integer: record every that many steps, 0: none)"
        )
    return integer


def should_record(i: int, steps: int, record_every: int) -> bool:
    """Record every `record_every` steps counted back from the last one, so the last step is always recorded."""
    return record_every > 0 and (steps - 1 - i) % record_every == 0


# --- finite values ------------------------------------------------------------------------------------------------


def check_finite(name: str, x: torch.Tensor) -> None:
    """Raise ValueError, with the count, if the tensor `name` holds NaN or infinite values."""
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"{name} holds {bad} NaN or infinite values (of {x.numel()})")


def check_model_output(model_output: torch.Tensor, x: torch.Tensor, where: str) -> None:
    """A sampler's one check per step: raise FloatingPointError, saying where, if the model's output there is not
    finite. `x` is the state the model was given; it is looked at only then, to tell whether the NaN came in with
    the state (made by an earlier step's arithmetic) or out of the model (or its guidance)."""
    if torch.isfinite(model_output).all():
        return
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise FloatingPointError(
            f"the state given to the model at {where} holds {bad} NaN or infinite values (of {x.numel()}): the step "
            "before made them from finite values (a schedule with a zero noise level, or an overflow?)"
        )
    bad = (~torch.isfinite(model_output)).sum().item()
    raise FloatingPointError(
        f"the model output at {where} holds {bad} NaN or infinite values (of {model_output.numel()}) for a finite "
        "input: the model (its weights, or a guidance scale) made them"
    )


# --- what a model predicts ----------------------------------------------------------------------------------------


def check_model_predicts(model, prediction_type: str) -> None:
    """Raise unless the model predicts what a sampler is asked to read its output as.

    A model loaded by `weights.load_model` carries its card's `prediction_type` ("eps", "x0", "v", "velocity",
    "edm"); a sampler refuses to read, say, a flow model's velocity as eps, which samples garbage without an error.
    A model without the attribute (a plain function, a fresh network) is taken at its caller's word.
    """
    declared = getattr(model, "prediction_type", None)
    if declared is None or declared == prediction_type:
        return
    if declared == "velocity":
        advice = "sample it with course_lib.flow (euler_flow_sample, heun_flow_sample) or sampling.draw_flow_samples"
    elif declared == "edm":
        advice = "it outputs EDM's raw network: turn it into x0_hat with course_lib.edm.denoise"
    else:
        advice = f"sample it with a diffusion sampler and prediction_type={declared!r}"
    raise ValueError(
        f"the model predicts {declared!r} (its prediction_type), but the sampler was asked to read its output as "
        f"{prediction_type!r}: {advice}"
    )


# --- images -------------------------------------------------------------------------------------------------------


def check_images(images: torch.Tensor, name: str = "images") -> None:
    """Raise unless `images` is a batch of digits (N, 1, 28, 28) with N >= 1 and finite values."""
    shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1:] != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{name} must be digit images (N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}); got {shape}")
    if len(images) == 0:
        raise ValueError(f"{name} is empty: shape {shape}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} hold {(~torch.isfinite(images)).sum().item()} NaN or infinite values")


def check_labels(cond, num_classes: int, batch_size: int, owner: str) -> None:
    """Class labels for a class-conditional network (`owner`, e.g. "this UNet"): a (batch_size,) long tensor in
    0..num_classes, num_classes meaning "no label" (classifier-free guidance). Raises naming what was given."""
    if cond is None or cond.dtype != torch.long or cond.shape != (batch_size,):
        got = None if cond is None else f"{cond.dtype} of shape {tuple(cond.shape)}"
        raise ValueError(
            f"{owner} is class-conditional: pass labels, a ({batch_size},) long tensor in 0..{num_classes} "
            f"({num_classes} for no label); got {got}"
        )
    bad = cond[(cond < 0) | (cond > num_classes)]
    if len(bad):
        raise ValueError(f"labels must lie in 0..{num_classes} ({num_classes}: no label); got {bad[0].item()}")
