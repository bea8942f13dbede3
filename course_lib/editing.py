r"""Editing with a trained diffusion model, without retraining it: img2img / SDEdit, inpainting, classifier guidance.

Taught in notebooks/13_control_and_editing.ipynb (chapter 13, whose other half, ControlNet, is in
`course_lib.control`). Papers: Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic
Differential Equations"; Lugmayr et al. 2022, "RePaint: Inpainting using Denoising Diffusion Probabilistic Models";
Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis" (classifier guidance).

All three start from one fact: a trained eps-model denoises any x_t, whatever produced it. SDEdit hands it a real
image noised part of the way; inpainting overwrites, at every step, the pixels that are known with the real image
noised to that step's level; classifier guidance adds the gradient of a noisy-image classifier to its noise
estimate.

Code name -> paper symbol:
    strength      t_0 of SDEdit, as a fraction of the timesteps (diffusers' `strength`)
    mask          m of RePaint: 1 on the known pixels (kept), 0 on those to fill in
    resample      U of RePaint (Algorithm 1): each step is taken U times, with U - 1 jumps back in between
    classifier    p_phi(y | x_t, t), a classifier of noisy images (`nets.classifier.NoisyDigitClassifier`)
    scale         s of classifier guidance (Dhariwal & Nichol 2021, Algorithm 2: "gradient scale")
"""

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.checks import as_integer, check_finite, check_model_output, check_model_predicts, check_steps
from course_lib.ddpm import Denoiser
from course_lib.forward import q_sample
from course_lib.profiles import randn_like
from course_lib.samplers import ddim_step, spaced_timesteps
from course_lib.schedules import Schedule, check_timesteps, gather

# --- noise levels between two timesteps -----------------------------------------------------------------------


def alpha_bar_or_one(schedule: Schedule, t: int, like: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t as a scalar in like's dtype, and 1 for t = -1 (the clean data, as in `samplers.ddim_step`)."""
    if t == -1:
        return torch.ones((), dtype=like.dtype, device=like.device)
    return gather(schedule.alpha_bar, t, like)


def renoise(schedule: Schedule, x: torch.Tensor, t_from: int, t_to: int, noise: torch.Tensor) -> torch.Tensor:
    r"""A draw of $x_{t_{to}}$ from $x_{t_{from}}$ by the forward process, $t_{from} < t_{to}$ (Ho et al. 2020, eq. 2
    composed from $t_{from} + 1$ to $t_{to}$):

    $$x_{t_{to}} = \sqrt{\bar\alpha_{t_{to}} / \bar\alpha_{t_{from}}}\;x_{t_{from}}
        + \sqrt{1 - \bar\alpha_{t_{to}} / \bar\alpha_{t_{from}}}\;z$$

    t_from = -1 is the clean data, where this is `forward.q_sample`. RePaint's jump back (Algorithm 1, line 10).
    """
    if not -1 <= t_from < t_to <= schedule.T - 1:
        raise ValueError(f"need -1 <= t_from < t_to <= T - 1 = {schedule.T - 1}; got t_from={t_from}, t_to={t_to}")
    ratio = alpha_bar_or_one(schedule, t_to, x) / alpha_bar_or_one(schedule, t_from, x)
    return ratio.sqrt() * x + (1 - ratio).sqrt() * noise


# --- img2img / SDEdit -------------------------------------------------------------------------------------------


def check_strength(strength) -> float:
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0 <= strength <= 1:
        raise ValueError(f"strength must be a number in [0, 1] (0: the input back, 1: from noise); got {strength!r}")
    return float(strength)


def img2img_timesteps(T: int, steps: int, strength: float, spacing: str = "trailing") -> list[int]:
    r"""The timesteps an img2img run visits, noisiest first: the last $\lfloor n \cdot \mathrm{strength} \rfloor$ of
    `samplers.spaced_timesteps(T, n, spacing)`, as diffusers' img2img pipelines choose them
    (`StableDiffusionImg2ImgPipeline.get_timesteps`). The images are noised to the first of them, $t_0$, about
    strength * T. Empty when strength * steps < 1."""
    strength = check_strength(strength)
    timesteps = spaced_timesteps(T, steps, spacing)
    kept = min(int(steps * strength), steps)  # diffusers' init_timestep
    return timesteps[steps - kept :]


@torch.no_grad()
def sdedit(
    model: Denoiser,
    schedule: Schedule,
    images: torch.Tensor,
    strength: float,
    steps: int,
    generator: torch.Generator | None = None,
    clip_x0: bool | float = True,
    eta: float = 0.0,
    spacing: str = "trailing",
    prediction_type: str = "eps",
) -> torch.Tensor:
    r"""img2img / SDEdit (Meng et al. 2022, Algorithm 1, on the course's variance-preserving path): noise the images
    to $t_0$, then denoise from there,

    $$x_{t_0} = \sqrt{\bar\alpha_{t_0}}\,x + \sqrt{1 - \bar\alpha_{t_0}}\,\epsilon,$$

    with DDIM steps (`samplers.ddim_step`, with eta; SDEdit's own sampler is the reverse SDE, eta = 1) through the
    remaining timesteps of a `steps`-step schedule to the clean data. $t_0$ and the steps taken are diffusers'
    img2img choice (`img2img_timesteps`): int(strength * steps) steps from $t_0 \approx$ strength * T. A small
    strength keeps the input's layout (faithful), a large one gives the model a freer hand (realistic); strength 1
    keeps every step: DDIM from the images noised to the first timestep (T - 1 with "trailing" spacing), where they
    leave a trace of weight $\sqrt{\bar\alpha_{T-1}}$. strength 0 returns the input (a copy); a strength that
    keeps no step (0 < strength * steps < 1) raises.

    eps is the generator's first draw, then each step's noise (eta > 0) after the model call, as `ddim_sample`
    draws. images: (B, ...) pixels or latents. Returns the edited images, shaped like images.
    """
    check_model_predicts(model, prediction_type)
    check_finite("images", images)
    steps = check_steps(steps, schedule.T)
    timesteps = img2img_timesteps(schedule.T, steps, strength, spacing)
    if strength == 0:
        return images.clone()
    if not timesteps:
        raise ValueError(
            f"strength={strength} with steps={steps} keeps int(strength * steps) = 0 steps: raise steps or strength "
            "(strength=0 returns the input)"
        )
    xt = q_sample(schedule, images, timesteps[0], randn_like(images, generator))  # x_{t_0}
    for i, (t, t_next) in enumerate(pairwise([*timesteps, -1])):
        # 1. the network's output at this step, for the whole batch
        t_batch = torch.full((xt.shape[0],), t, device=xt.device, dtype=torch.long)
        model_output = model(xt, t_batch)
        check_model_output(model_output, xt, f"t={t} (SDEdit step {i + 1} of {len(timesteps)})")
        # 2. one DDIM step, with fresh noise when eta > 0
        noise = randn_like(xt, generator) if eta > 0 else None
        xt = ddim_step(schedule, model_output, t, t_next, xt, noise, eta, prediction_type, clip_x0)[0]
    return xt


# --- inpainting -------------------------------------------------------------------------------------------------


def check_mask(mask: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """mask in images' dtype and device; raise unless it broadcasts to images' shape and holds only 0 and 1."""
    shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
    try:
        broadcasts = isinstance(mask, torch.Tensor) and torch.broadcast_shapes(mask.shape, images.shape) == images.shape
    except RuntimeError:  # shapes that do not broadcast at all
        broadcasts = False
    if not broadcasts:
        raise ValueError(f"the mask must broadcast to the images' shape {tuple(images.shape)}; got {shape}")
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("the mask must hold only 1 (known: kept) and 0 (to fill in); got other values")
    return mask.to(images.dtype).to(images.device)


@torch.no_grad()
def inpaint(
    model: Denoiser,
    schedule: Schedule,
    images: torch.Tensor,
    mask: torch.Tensor,
    steps: int,
    generator: torch.Generator | None = None,
    resample: int = 1,
    eta: float = 1.0,
    clip_x0: bool | float = True,
    spacing: str = "trailing",
    prediction_type: str = "eps",
) -> torch.Tensor:
    r"""Fill in the pixels where mask is 0 and keep those where it is 1, with an unconditional model: RePaint
    (Lugmayr et al. 2022, Algorithm 1) on DDIM steps.

    From pure noise at the first of `samplers.spaced_timesteps(T, steps, spacing)`, each step t -> t_next:

    1. the model's DDIM step on the whole image (`samplers.ddim_step`, with eta): $x^{unknown}_{t_{next}}$;
    2. the known image noised to t_next's level with fresh noise (`renoise`; the image itself at the clean data):
       $x^{known}_{t_{next}} = \sqrt{\bar\alpha_{t_{next}}}\,x + \sqrt{1 - \bar\alpha_{t_{next}}}\,\epsilon$;
    3. $x_{t_{next}} = m \odot x^{known}_{t_{next}} + (1 - m) \odot x^{unknown}_{t_{next}}$ (RePaint eq. 8c);
    4. with resample = U > 1: jump back to t with fresh noise (`renoise`, RePaint's line 10) and take steps 1-3
       again, U times in all. RePaint's Algorithm 1 skips the jump at its last step (t = 1); here the last step,
       to the clean data, is repeated too. resample = 1 is the plain "replacement" method: the unknown pixels never
       see what the known ones became at a step; each jump back lets the model harmonise the two.

    eta = 1 (the default) adds DDPM's amount of noise: with steps = T the step is DDPM's ancestral step and this is
    RePaint with jump length 1; eta = 0 takes deterministic DDIM steps between fresh known parts.
    mask: (B or 1, C or 1, H, W), broadcasting against images, 1 = known (kept), as RePaint and diffusers'
    RePaintPipeline (diffusers' Stable Diffusion inpainting pipelines take the opposite: white = repaint).
    The known pixels of the result equal the input's exactly: the last step's known part is the image itself.
    The generator draws x_T first, then in each pass: the step's noise (eta > 0), the known part's noise (unless
    t_next is the clean data), the jump's noise. Cost: steps * resample model calls. Returns (B, ...) like images.
    """
    check_model_predicts(model, prediction_type)
    check_finite("images", images)
    mask = check_mask(mask, images)
    timesteps = spaced_timesteps(schedule.T, steps, spacing)
    resample_integer = as_integer(resample)
    if resample_integer is None or resample_integer < 1:
        raise ValueError(f"resample must be an integer >= 1 (1: no jumps back); got resample={resample!r}")
    xt = randn_like(images, generator)  # x_T
    for i, (t, t_next) in enumerate(pairwise([*timesteps, -1])):
        t_batch = torch.full((xt.shape[0],), t, device=xt.device, dtype=torch.long)
        for u in range(resample_integer):
            # 1. the model's step on the whole image
            model_output = model(xt, t_batch)
            check_model_output(model_output, xt, f"t={t} (inpainting step {i + 1} of {len(timesteps)}, pass {u + 1})")
            noise = randn_like(xt, generator) if eta > 0 else None
            x_unknown = ddim_step(schedule, model_output, t, t_next, xt, noise, eta, prediction_type, clip_x0)[0]
            # 2. the known pixels at t_next's noise level
            x_known = images if t_next == -1 else renoise(schedule, images, -1, t_next, randn_like(images, generator))
            # 3. the two joined by the mask
            x_next = mask * x_known + (1 - mask) * x_unknown
            # 4. RePaint: back to t with fresh noise, and the step again
            if u < resample_integer - 1:
                xt = renoise(schedule, x_next, t_next, t, randn_like(xt, generator))
        xt = x_next
    return xt


# --- classifier guidance ----------------------------------------------------------------------------------------


def classifier_gradient(classifier, xt: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    r"""$\nabla_{x_t} \log p_\phi(y \mid x_t, t)$ for each example's label y, shaped like xt.

    The gradient is taken with respect to x_t only (`torch.autograd.grad` on a detached copy): the classifier's
    parameters get no `.grad`, and it works inside `torch.no_grad()` (the samplers'). The log-probabilities of
    the batch are summed before differentiating, which gives each example its own gradient as long as the
    classifier treats examples independently: a module in training mode (BatchNorm's batch statistics) is refused.
    """
    if isinstance(classifier, nn.Module) and classifier.training:
        raise ValueError("the classifier is in training mode (batch statistics couple examples): call .eval()")
    if labels.dtype != torch.long or labels.shape != (xt.shape[0],):
        raise ValueError(
            f"need labels (B,) long for a batch of {xt.shape[0]}; got {labels.dtype} {tuple(labels.shape)}"
        )
    with torch.enable_grad():
        x = xt.detach().requires_grad_(True)
        log_probs = F.log_softmax(classifier(x, t), dim=-1)  # (B, K)
        chosen = log_probs.gather(1, labels[:, None]).sum()  # sum over the batch of log p(y_i | x_i)
        (gradient,) = torch.autograd.grad(chosen, x)
    return gradient


def classifier_guided_eps(
    model: Denoiser,
    classifier,
    xt: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    scale: float,
    schedule: Schedule,
) -> torch.Tensor:
    r"""The noise estimate steered towards class y by a noisy-image classifier (Dhariwal & Nichol 2021, section 4.2
    and Algorithm 2):

    $$\hat\epsilon_{guided} = \hat\epsilon(x_t, t)
        - s\,\sqrt{1 - \bar\alpha_t}\;\nabla_{x_t}\log p_\phi(y \mid x_t, t)$$

    Because $\hat\epsilon = -\sqrt{1 - \bar\alpha_t}\,\nabla\log p(x_t)$ (Tweedie; chapter 11), this is the noise of
    $p(x_t)\,p_\phi(y \mid x_t)^s$: at s = 1, with exact model and classifier, the class-conditional
    $p(x_t \mid y)$'s own noise. model(xt, t) predicts eps; classifier(xt, t) returns logits (B, K); t (B,) long,
    labels (B,) long. Neither network's parameters get a gradient; the result carries none.
    """
    if not scale >= 0:  # NaN fails this too
        raise ValueError(f"the guidance scale must be a number >= 0 (0: no guidance); got {scale}")
    check_timesteps(t, schedule.T)
    with torch.no_grad():
        eps_hat = model(xt, t)
    if scale == 0:
        return eps_hat
    alpha_bar_t = gather(schedule.alpha_bar, t, xt)
    return eps_hat - scale * (1 - alpha_bar_t).sqrt() * classifier_gradient(classifier, xt, t, labels)


class ClassifierGuided:
    """An eps-model guided by a classifier towards `labels` at `scale`, as a plain model(xt, t) for any eps sampler
    (`samplers.ddim_sample`, ...). labels: (B,), or (1,) for every sample."""

    def __init__(self, model: Denoiser, classifier, labels: torch.Tensor, scale: float, schedule: Schedule):
        check_model_predicts(model, "eps")
        if not scale >= 0:
            raise ValueError(f"the guidance scale must be a number >= 0 (0: no guidance); got {scale}")
        self.model, self.classifier, self.labels, self.scale, self.schedule = model, classifier, labels, scale, schedule
        self.prediction_type = "eps"

    def __call__(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        labels = self.labels.to(xt.device)
        if len(labels) == 1:
            labels = labels.expand(len(xt))
        return classifier_guided_eps(self.model, self.classifier, xt, t, labels, self.scale, self.schedule)


def noisy_classifier_loss(
    classifier: nn.Module,
    schedule: Schedule,
    x0: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""The training loss of a noisy-image classifier: cross-entropy of its logits at $x_t = q(x_t \mid x_0)$, t
    uniform in 0..T-1 (Dhariwal & Nichol 2021, section 4.1: trained on the same noise distribution as the model).
    The draws (t, then eps) are those of `ddpm.simple_loss`."""
    t = torch.randint(0, schedule.T, (x0.shape[0],), generator=generator).to(x0.device)  # (B,)
    xt = q_sample(schedule, x0, t, randn_like(x0, generator))
    return F.cross_entropy(classifier(xt, t), labels)


@torch.no_grad()
def noisy_class_accuracy(
    classifier: nn.Module,
    schedule: Schedule,
    images: torch.Tensor,
    labels: torch.Tensor,
    timesteps: tuple[int, ...],
    generator: torch.Generator | None = None,
    batch_size: int = 500,
) -> dict[int, float]:
    r"""How often a noisy-image classifier names the right digit at each noise level: {t: accuracy} for each t in
    `timesteps`, the share of `images` whose argmax over classifier(x_t, t) is their label, with
    $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1 - \bar\alpha_t}\,\epsilon$ (`forward.q_sample`, one fresh eps per image).

    At t = 0 the digits are nearly clean; towards T - 1 nothing of them is left and the accuracy falls to chance
    (1 / K): how fast it falls says up to which noise level classifier guidance has a useful gradient. The
    generator draws each t's noise for all images, in the order of `timesteps`. images (N, 1, H, W), labels (N,).
    """
    if isinstance(classifier, nn.Module) and classifier.training:
        raise ValueError("the classifier is in training mode (dropout, batch statistics): call .eval() first")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"need one label per image: images {tuple(images.shape)}, labels {tuple(labels.shape)}")
    accuracies = {}
    for t in timesteps:
        check_timesteps(t, schedule.T)
        t_batch = torch.full((len(images),), int(t), dtype=torch.long, device=images.device)  # (N,)
        xt = q_sample(schedule, images, t_batch, randn_like(images, generator))  # (N, 1, H, W)
        batches = range(0, len(xt), batch_size)
        predicted = torch.cat(
            [classifier(xt[i : i + batch_size], t_batch[i : i + batch_size]).argmax(-1) for i in batches]
        )
        accuracies[int(t)] = (predicted == labels.to(predicted.device)).float().mean().item()
    return accuracies
