r"""course_lib: the tested library behind "Diffusion models from scratch".

Every notebook derives an idea, checks it against the function here, and then uses the function.
One concept per module, in the order the course teaches them:

    profiles    COURSE_PROFILE budgets (smoke / cpu / gpu), the device, seeded noise        all chapters
    checks      argument checks every module shares: names, shapes, integers, steps,       all chapters
                finite values, what a model predicts
    claims      a measured claim checked against its numbers; a gap only beyond spreads    all chapters
    data        the shipped MNIST digits (28 x 28, values in [-1, 1])                       chapter 2 on
    toy         Gaussian mixtures with exact densities and denoisers; moons, swiss roll    chapters 1, 3
    schedules   beta, alpha, alpha_bar, SNR tables; the timestep convention; `gather`      chapter 2
    forward     q(x_t | x_{t-1}), q(x_t | x_0), the whole chain                            chapter 1
    ddpm        posterior, eps / x0 / v, the simple loss, the ancestral sampler;           chapter 3
                the conversion table of every output kind (split_output, prediction_targets)
    samplers    DDIM: the step with eta, timestep spacings, inversion, slerp               chapter 5
    solvers     DPM-Solver++(2M), Euler with Karras sigmas (euler_karras_*)                chapter 5
    sampling    the sampler family by name (SAMPLERS, run_sampler), batched and timed      chapters 5-10
                drawing from seeded noise (draw_samples, draw_flow_samples)
    nets/       the networks (they know nothing of schedules): mlp, unet, classifier and     chapter 3 on
                noisy classifier, vae (latent autoencoder), text (text encoder, text-conditioned
                UNet), dit (a diffusion transformer, adaLN-Zero; dit_gflops, chapter 12)
    recipes     each shipped model's network, schedule and training settings               chapter 4 on
    train       the training loop: AdamW, warm-up, clipping, EMA, resumable checkpoints    chapter 3 on
    weights     shipped weights: safetensors + JSON card + sha256 manifest                 chapter 4 on
    metrics     distances between samples and data, always beside their floor             chapter 3 on
    benchmark   the diffusers baseline, FLOPs, throughput, ms per call, saved results      chapters 4-10
    guidance    classifier-free guidance: label dropout, one batched guided forward,       chapter 7
                guided samples in batches
    captions    captions from measured slant and stroke thickness; the tokenizer           chapter 7
    lora        low-rank adapters for Linear / Conv2d: inject, scale, merge, save          chapter 8
    styles      measurable styles (bold, slanted digits) for LoRA                          chapter 8
    interop     to diffusers: our schedules as schedulers, our UNet as a diffusers model,  chapter 9
                the pipelines' loop, a tiny Stable Diffusion built offline
    flow        flow matching on straight paths, t in [0, 1]: loss, Euler / Heun           chapter 10
                (euler_flow_*, heun_flow_sample)
    reflow      reflow's (noise, sample) pairs and the straightness of a path              chapter 10
    edm         EDM preconditioning: c_skip, c_out, c_in, c_noise; the EDM loss            chapter 11
    frame       one frame: any model as D(x; sigma), Tweedie's score, the ODE samplers     chapter 11
                (Euler, Heun, DPM-Solver++(2M)) once for all, annealed Langevin
    control     ControlNet: edge maps of digits and their F1 (edge_agreement), the hint    chapter 13
                encoder, a trainable copy of the UNet's way down with zero convs, the frozen
                base steered through its decoder (ControlledUNet)
    editing     img2img / SDEdit (diffusers' img2img timesteps), RePaint inpainting,       chapter 13
                classifier guidance with a noise-aware classifier
    personalize a new concept (barred digits) from a few examples: textual inversion, chapter 14
                DreamBooth with prior preservation, DreamBooth-LoRA; their files
    symptoms    what a set-up shows when measured: data range, the timestep and target a    chapter 15
                model fits, latent spread, class shares, the classifier's mode (Finding)
    diagnose    the pipeline's settings checked (sampler steps, schedule, posterior         chapter 15
                variance, EMA), and `diagnose`: every check whose inputs are given; report
    plotting    image grids, strips, loss curves

Notation, shared by every notebook and module (ASCII in code, Greek in the maths):

    T           number of diffusion steps; t is an integer in 0..T-1 (diffusers' convention)
    beta        beta_t, the variance added at step t;  alpha = 1 - beta
    alpha_bar   alpha_bar_t = prod_{s<=t} alpha_s  (never written alpha)
    snr         alpha_bar / (1 - alpha_bar);  log_snr its logarithm
    x0, xt      clean data and its noised version x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps
    eps         standard normal noise; v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0
    x0_hat, eps_hat   a model's estimates of x0 and eps
"""

__version__ = "0.1.0"
