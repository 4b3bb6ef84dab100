"""Train, check and chart the shipped learned yardstick (experts/learned.py); docs/LEARNED.md has the numbers.

Run from the repository root (scikit-learn is needed here only, never at run time)::

    OMP_NUM_THREADS=1 python -m bench.train_learned train      # train, write the weights and images
    OMP_NUM_THREADS=1 python -m bench.train_learned check      # classifier agreement + samples grid
    OMP_NUM_THREADS=1 python -m bench.train_learned experts    # every registered expert vs the reference

``train`` is deterministic given ``--seed`` (and the thread count): scikit-learn's digits (8x8, 0-16)
scaled to [-1, 1] and upsampled bilinearly to 16x16; DDPM epsilon loss on SD1.5's scaled_linear
betas with uniform timesteps; the label is replaced by the null class with probability ``--p-uncond``
for classifier-free guidance; AdamW with linear warmup, then constant (outputs are written every ``--save-every`` steps and
equal those of a run with ``--steps`` set there); the EMA of the weights is saved
(float16) to experts/data/learned_digits.safetensors, with 20 real digits per class to
experts/data/digits16_images.safetensors, and the loss curve to docs/learned_loss.png.

``check`` trains a logistic regression on the real digits (16x16 average-pooled back to 8x8; 75/25
split, its held-out accuracy printed), samples ``--per-class`` digits per class with DPM-Solver++(2M),
50 Karras steps at cfg 3, and prints the fraction whose predicted class is the conditioning class;
it writes docs/learned_samples.png (10 per class, one row per class).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent

sys.path.insert(0, str(ROOT / "tests"))
from helpers import ensure_moe_sampler  # noqa: E402  (this checkout as ``moe_sampler``, as the tests load it)

ensure_moe_sampler()

from moe_sampler.experts import registered_experts  # noqa: E402
from moe_sampler.experts.dpm_solver import sample_dpmpp_2m  # noqa: E402
from moe_sampler.experts.learned import (  # noqa: E402
    CLASS_TOKENS, EMBED_DIM, IMAGES_FILE, NULL_CLASS, NUM_CLASSES, WEIGHTS_FILE, LearnedModel, build_unet,
    load_learned_model, save_images, save_weights, sd_alphas_cumprod,
)
from moe_sampler.experts.schedules import karras_sigmas  # noqa: E402

IMAGES_PER_CLASS = 20
LOSS_PNG = ROOT / "docs" / "learned_loss.png"
SAMPLES_PNG = ROOT / "docs" / "learned_samples.png"


def digits16() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as [1797, 1, 16, 16] float32 in [-1, 1] and labels [1797]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    return x, torch.tensor(digits.target, dtype=torch.long)


def shipped_subset(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``IMAGES_PER_CLASS`` digits of each class in data-set order."""
    idx = torch.cat([torch.nonzero(y == c).flatten()[:IMAGES_PER_CLASS] for c in range(NUM_CLASSES)])
    return x[idx], y[idx]


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    g = torch.Generator().manual_seed(args.seed)
    data, labels = digits16()
    unet = build_unet()
    class_embeddings = torch.nn.Parameter(torch.randn(NUM_CLASSES + 1, CLASS_TOKENS, EMBED_DIM, generator=g))
    params = [*unet.parameters(), class_embeddings]
    print(f"parameters: {sum(p.numel() for p in params)}; data {tuple(data.shape)}; "
          f"threads {torch.get_num_threads()}", flush=True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ema_unet, ema_emb = copy.deepcopy(unet).requires_grad_(False), class_embeddings.detach().clone()
    alphas = sd_alphas_cumprod().float()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(args.steps):
        # Constant after warmup, so the weights after k steps are those of a run with --steps k.
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(data), (args.batch,), generator=g)
        x0, y = data[idx], labels[idx].clone()
        y[torch.rand(args.batch, generator=g) < args.p_uncond] = NULL_CLASS
        t = torch.randint(len(alphas), (args.batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = unet(xt, t, encoder_hidden_states=class_embeddings[y]).sample
        loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema_unet.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1 - decay)
            ema_emb.lerp_(class_embeddings.detach(), 1 - decay)
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            recent = sum(losses[-100:]) / 100
            print(f"step {step + 1:5d}  loss {recent:.4f}  lr {lr:.2e}  {time.perf_counter() - start:7.1f}s", flush=True)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            write_outputs(args, step + 1, losses, time.perf_counter() - start, ema_unet, ema_emb, data, labels)


def write_outputs(args, steps, losses, seconds, ema_unet, ema_emb, data, labels) -> None:
    """Weights, img2img digits and loss chart after ``steps`` steps (identical to a ``--steps`` run's)."""
    final = sum(losses[-500:]) / min(500, len(losses))
    print(f"trained {steps} steps in {seconds:.0f}s; mean loss of the last 500 steps {final:.4f}", flush=True)
    meta = {"steps": steps, "batch": args.batch, "lr": args.lr, "seed": args.seed, "p_uncond": args.p_uncond,
            "ema": args.ema, "seconds": round(seconds), "final_loss": round(final, 5),
            "trained": "bench/train_learned.py on scikit-learn digits, 16x16, DDPM eps, SD scaled_linear"}
    weights, images, loss_png = WEIGHTS_FILE, IMAGES_FILE, LOSS_PNG
    if args.out is not None:
        weights, images, loss_png = (args.out / path.name for path in (weights, images, loss_png))
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_weights(weights, ema_unet, ema_emb, meta)
    save_images(images, *shipped_subset(data, labels))
    loss_chart(losses, steps, seconds, loss_png)
    print(f"wrote {weights} ({weights.stat().st_size / 1e6:.2f} MB), {images}, {loss_png}", flush=True)


def loss_chart(losses: list[float], steps: int, seconds: float, path: Path = LOSS_PNG) -> None:
    from moe_sampler.stats.charts import line_chart

    window = 50
    xs = list(range(window, len(losses) + 1, 10))
    ys = [sum(losses[i - window:i]) / window for i in xs]
    image = line_chart({"epsilon MSE (mean of 50 steps)": (xs, ys)},
                       title=f"Learned digits model: training loss ({steps} steps, {seconds / 60:.0f} min on 2 CPU cores)",
                       xlabel="step", ylabel="loss", width=720, height=400)
    image.save(path, optimize=True)


def sample(model, labels: torch.Tensor, seed: int, cfg: float, steps: int = 50) -> torch.Tensor:
    schedule = model.schedule()
    sigmas = karras_sigmas(steps, schedule.sigma_min, schedule.sigma_max)
    x = model.initial_noise(len(labels), seed)
    out = []
    for chunk_x, chunk_y in zip(x.split(250), labels.split(250)):
        out.append(sample_dpmpp_2m(model, chunk_x, sigmas, extra_args={"cond": chunk_y, "cfg": cfg}, disable=True))
    return torch.cat(out)


def check(args: argparse.Namespace) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    data, labels = digits16()
    flat = F.avg_pool2d(data, 2).flatten(1).numpy()
    x_train, x_test, y_train, y_test = train_test_split(flat, labels.numpy(), test_size=0.25, random_state=0,
                                                        stratify=labels.numpy())
    classifier = LogisticRegression(max_iter=5000, C=1.0).fit(x_train, y_train)
    print(f"classifier held-out accuracy on real digits: {classifier.score(x_test, y_test):.3f}", flush=True)
    model = load_learned_model(weights=args.weights) if args.weights else load_learned_model()
    wanted = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class)
    start = time.perf_counter()
    samples = sample(model, wanted, seed=args.seed, cfg=args.cfg)
    predicted = torch.tensor(classifier.predict(F.avg_pool2d(samples.clamp(-1, 1), 2).flatten(1).numpy()))
    agree = (predicted == wanted).float()
    print(f"{len(wanted)} samples (DPM++2M, 50 Karras steps, cfg {args.cfg}) in {time.perf_counter() - start:.0f}s; "
          f"classifier agrees with the class for {agree.mean():.3f}", flush=True)
    print("per class: " + " ".join(f"{c}:{agree[wanted == c].mean():.2f}" for c in range(NUM_CLASSES)), flush=True)
    print(f"sample range [{samples.min():.2f}, {samples.max():.2f}]", flush=True)
    if not args.weights:
        grid = samples.view(NUM_CLASSES, args.per_class, 16, 16)[:, :10]
        samples_grid(grid, args.cfg)


def samples_grid(grid: torch.Tensor, cfg: float, scale: int = 3, pad: int = 2) -> None:
    from PIL import Image

    rows, cols = grid.shape[:2]
    cell = 16 * scale + pad
    canvas = torch.ones(rows * cell + pad, cols * cell + pad)
    for r in range(rows):
        for c in range(cols):
            tile = ((grid[r, c].clamp(-1, 1) + 1) / 2).repeat_interleave(scale, 0).repeat_interleave(scale, 1)
            canvas[pad + r * cell: pad + r * cell + 16 * scale, pad + c * cell: pad + c * cell + 16 * scale] = 1 - tile
    Image.fromarray((canvas * 255).round().byte().numpy(), mode="L").save(SAMPLES_PNG, optimize=True)
    print(f"wrote {SAMPLES_PNG.relative_to(ROOT)} (row = class 0-9, cfg {cfg})", flush=True)


def experts(args: argparse.Namespace) -> None:
    from moe_sampler.experts.base import CountingDenoiser

    model = load_learned_model()
    labels = torch.arange(NUM_CLASSES)
    x = model.initial_noise(NUM_CLASSES, args.seed)
    sigma_max = model.schedule().sigma_max
    refs = {}
    for name, kwargs in (("dopri5 rtol 1e-5", dict(rtol=1e-5)), ("dopri5 rtol 1e-7", dict(rtol=1e-7)),
                         ("rk4 200 steps", dict(method="rk4", steps=200))):
        counted, start = CountingDenoiser(model), time.perf_counter()
        # reference() run on the counting wrapper (it forwards attributes), so its own calls are counted.
        refs[name] = LearnedModel.reference(counted, x, sigma_max, cond=labels, cfg=args.cfg, **kwargs)
        print(f"reference {name}: {counted.calls} model calls, {time.perf_counter() - start:.0f}s", flush=True)
    tight = refs.pop("dopri5 rtol 1e-7")
    for name, ref in refs.items():
        print(f"{name} vs dopri5 rtol 1e-7: mean relative error {model.relative_error(ref, tight).mean():.2e}")
    ref = refs["dopri5 rtol 1e-5"]
    print("| expert | model calls | mean relative error vs reference |\n|---|---:|---:|")
    for expert in registered_experts():
        sigmas = expert.sigmas(model.schedule())
        out, run = expert.run(model, x, sigmas, extra_args={"cond": labels, "cfg": args.cfg, "seed": args.seed})
        err = model.relative_error(out, ref).mean().item()
        print(f"| {expert.name} | {run.nfe} | {err:.4f} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("train", "check", "experts"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--p-uncond", type=float, default=0.15)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--out", type=Path, default=None,
                        help="train: write the weights, digits and loss chart into this folder, not the shipped places")
    parser.add_argument("--save-every", type=int, default=500, help="train: write the outputs every this many steps")
    parser.add_argument("--weights", type=Path, default=None, help="check: evaluate these weights, draw no grid")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--cfg", type=float, default=3.0)
    args = parser.parse_args(argv)
    {"train": train, "check": check, "experts": experts}[args.mode](args)


if __name__ == "__main__":
    main()
