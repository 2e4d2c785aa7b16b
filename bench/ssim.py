"""SSIM loss cost: the project's SSIM against a naive one, and its share of a UNet-224 step.

Both SSIMs compute the same quantity (11x11 Gaussian window, sigma 1.5, 'valid' filtering, the
loss 1 - mean SSIM of sigmoid(logits) against the target), forward + backward, at the shape the
source's recipe trains with (batch 64, 1 x 224 x 224: the depth map). The naive one is the
textbook implementation: the Gaussian window rebuilt on every call, one 2D window x window
convolution per moment map (five of them). The project's (`workers.losses`, the "ssim" loss):
the 1D window cached per (size, device, dtype), two depthwise 1D passes, all five moment maps in
one batched convolution.

The share of a step is the project's SSIM time over one training step of the recipe's model
(`recipes/unet224.yaml`: unet224 at width 1, 224 px, batch 64, forward + backward + AdamW step
with the recipe's losses, of which this SSIM is one term). The 1-minute load average is recorded
with each figure: other work may share the cores. Usage: python -m bench.ssim --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import machine

REPO = Path(__file__).resolve().parents[1]
SIGMA = 1.5
C1, C2 = 0.01**2, 0.03**2


def _load1() -> float:
    return round(os.getloadavg()[0], 2)


def naive_ssim(p: torch.Tensor, t: torch.Tensor, window: int = 11) -> torch.Tensor:
    """The textbook SSIM (as in the pytorch-ssim package, with 'valid' filtering): the 2D window
    is built on every call and each of the five moment maps gets its own 2D convolution."""
    c = p.shape[1]
    x = torch.arange(window, dtype=torch.float32) - (window - 1) / 2
    g = torch.exp(-(x**2) / (2 * SIGMA**2))
    g = g / g.sum()
    w2d = (g[:, None] @ g[None, :]).to(device=p.device, dtype=p.dtype).expand(c, 1, window, window).contiguous()
    mu_p = F.conv2d(p, w2d, groups=c)
    mu_t = F.conv2d(t, w2d, groups=c)
    var_p = F.conv2d(p * p, w2d, groups=c) - mu_p**2
    var_t = F.conv2d(t * t, w2d, groups=c) - mu_t**2
    cov = F.conv2d(p * t, w2d, groups=c) - mu_p * mu_t
    num = (2 * mu_p * mu_t + C1) * (2 * cov + C2)
    den = (mu_p**2 + mu_t**2 + C1) * (var_p + var_t + C2)
    return (num / den).mean()


def naive_ssim_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 1 - naive_ssim(torch.sigmoid(logits.float()), target.float())


def _timed(fn: Callable[[], None], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _fwd_bwd(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
             t: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        x.grad = None
        loss_fn(x, t).backward()
    return run


def _unet_step(batch: int, size: int) -> tuple[Callable[[], None], int]:
    """One training step of recipes/unet224.yaml's model, losses and optimizer (its last stage)."""
    from common.recipe import load_recipe
    from workers.models.registry import build_from_recipe
    from workers.tasks import Batch, get_task
    from workers.train.optim import make_optimizer

    recipe = load_recipe(str(REPO / "recipes" / "unet224.yaml"))
    st = recipe.stages[-1]
    task = get_task(recipe.task)(recipe, {"baseline_depth": 0.5})
    torch.manual_seed(0)
    model = build_from_recipe(recipe.model, **task.model_kwargs())
    model.set_trainable(st.trainable)
    model.train()
    opt = make_optimizer(recipe, [p for p in model.parameters() if p.requires_grad], st.lr)
    x = torch.randn(batch, 6, size, size)
    mask = (torch.rand(batch, 1, size, size) > 0.5).float()
    depth = torch.rand(batch, 1, size, size)
    b = Batch(x, (mask, depth))

    def step() -> None:
        out = task.forward(model, b.x, st.forward)
        loss = task.losses(out, b)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=7,
                    help="rounds of one naive and one project SSIM forward+backward (medians taken)")
    ap.add_argument("--step-repeats", type=int, default=2,
                    help="timed UNet-224 steps (the fastest taken); 0 skips the step")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from workers.losses import LOSSES

    torch.set_num_threads(args.threads)
    project = LOSSES.get("ssim")
    torch.manual_seed(0)
    shape = (args.batch, 1, args.size, args.size)
    x = torch.randn(shape, requires_grad=True)
    t = torch.rand(shape)

    # The same quantity, both ways (a benchmark of two different things would prove nothing).
    with torch.no_grad():
        a, b = float(project(x, t)), float(naive_ssim_loss(x, t))
    if abs(a - b) > 1e-5:
        raise SystemExit(f"the naive and the project's SSIM disagree: {a} vs {b}")

    # Naive and project alternate, one pass each per round, so that other work on the machine
    # weighs on both alike; the speedup is the median of the rounds' ratios.
    naive_run, project_run = _fwd_bwd(naive_ssim_loss, x, t), _fwd_bwd(project, x, t)
    naive_run(), project_run()  # warm-up: allocations, oneDNN primitives
    load_before = _load1()
    naive_t, project_t = [], []
    for _ in range(args.repeats):
        naive_t += _timed(naive_run, 1, warmup=0)
        project_t += _timed(project_run, 1, warmup=0)
    naive_s, project_s = statistics.median(naive_t), statistics.median(project_t)
    result = {
        "bench": "ssim",
        "machine": f"{machine()}, torch {torch.__version__}",
        "torch_threads": args.threads,
        "shape": list(shape),
        "repeats": args.repeats,
        "naive_ms": round(naive_s * 1e3, 2),
        "project_ms": round(project_s * 1e3, 2),
        "naive_ms_each": [round(v * 1e3, 1) for v in naive_t],
        "project_ms_each": [round(v * 1e3, 1) for v in project_t],
        "speedup_vs_naive": round(statistics.median(n / p for n, p in zip(naive_t, project_t, strict=True)), 2),
        "load1_at_start": load_before,
        "load1_after_ssim": _load1(),
    }
    if args.step_repeats > 0:
        del x, t
        step, n_params = _unet_step(args.batch, args.size)
        # No warm-up step at these sizes (a minute or more each on a small CPU); the fastest step
        # counts, which makes the share an upper bound rather than flatter it.
        times = _timed(step, args.step_repeats, warmup=0)
        step_s = min(times)
        result |= {
            "unet224_params": n_params,
            "step_repeats": args.step_repeats,
            "step_s": round(step_s, 3),
            "step_times_s": [round(s, 3) for s in times],
            "load1_after_step": _load1(),
            "share_of_step": round(project_s / step_s, 5),
            "naive_share_of_step": round(naive_s / step_s, 5),
        }
    else:
        result |= {"share_of_step": None}
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
