"""DiT throughput: our ``adaln.models.dit.DiT`` against diffusers' ``DiTTransformer2DModel`` of the same size.

Both models run in this process on the same device, with the same weights (converted), inputs and
optimizer, eager and under ``torch.compile``. Reported: training steps (forward, MSE loss, backward,
AdamW step) and no-grad forwards, in images per second, and the ratios ours / diffusers.

Defaults: on CUDA, DiT-XL/2 at 256x256 (a 32x32x4 latent, as fb's VAE setup), batch 64, bf16 autocast,
fused AdamW; on CPU, DiT-S/2 at 128x128 (16x16x4 latent), batch 8, float32, so it ends in minutes.

    python benchmarks/dit_throughput.py [--model DiT-S/2] [--image-size 256] [--batch-size 64] \
        [--steps 20] [--no-compile]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaln.models.dit import DiT, DiT_models

VAE_DOWNSAMPLE, LATENT_CHANNELS = 8, 4  # fb DiT trains on SD-VAE latents: image / 8, 4 channels


class DiffusersDiT(nn.Module):
    """diffusers' DiTTransformer2DModel behind our call signature ``(x, t, y) -> tensor``."""

    def __init__(self, ours: DiT) -> None:
        super().__init__()
        from diffusers import DiTTransformer2DModel

        self.model = DiTTransformer2DModel(**ours.diffusers_config())
        self.model.load_state_dict(ours.to_diffusers_state_dict())

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.model(x, timestep=t, class_labels=y).sample


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(fn: Callable[[], None], batch: int, steps: int, device: torch.device) -> float:
    """Time ``steps`` calls of an already warmed-up ``fn``."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return batch * steps / (time.perf_counter() - start)


def step_functions(model: nn.Module, compiled: bool, inputs: tuple[Tensor, ...], args) -> dict[str, Callable]:
    """A training step (forward, MSE, backward, AdamW) and a no-grad forward of one model."""
    x, t, y, target = inputs
    net = torch.compile(model) if compiled else model
    amp = dict(device_type=x.device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=args.fused)

    def train() -> None:
        model.train()
        with torch.autocast(**amp):
            out = net(x, t, y)
        F.mse_loss(out.float(), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def forward() -> None:
        model.eval()
        with torch.autocast(**amp):
            net(x, t, y)

    return {"train": train, "forward": forward}


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="DiT-XL/2" if cuda else "DiT-S/2", choices=sorted(DiT_models))
    parser.add_argument("--image-size", type=int, default=256 if cuda else 128, help="pixels; latent = size / 8")
    parser.add_argument("--batch-size", type=int, default=64 if cuda else 8)
    parser.add_argument("--steps", type=int, default=20 if cuda else 5, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds of every step before timing")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16" if cuda else "fp32")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.fused = device.type in ("cuda", "cpu")  # fused AdamW exists for both in torch >= 2.4
    if args.image_size % VAE_DOWNSAMPLE:
        parser.error(f"--image-size must be divisible by {VAE_DOWNSAMPLE}")
    latent = args.image_size // VAE_DOWNSAMPLE
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(0)
    ours = DiT_models[args.model](input_size=latent, in_channels=LATENT_CHANNELS, num_classes=1000)
    theirs = DiffusersDiT(ours)
    models = {"ours": ours.to(device), "diffusers": theirs.to(device)}
    b = args.batch_size
    inputs = (
        torch.randn(b, LATENT_CHANNELS, latent, latent, device=device),
        torch.randint(0, 1000, (b,), device=device).float(),
        torch.randint(0, 1000, (b,), device=device),
        torch.randn(b, ours.out_channels, latent, latent, device=device),
    )

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    tokens = (latent // ours.patch_size) ** 2
    print(f"device: {name} | torch {torch.__version__}")
    print(
        f"{args.model} | image {args.image_size}^2 -> latent {latent}x{latent}x{LATENT_CHANNELS} ({tokens} tokens) | "
        f"batch {b} | {args.dtype}{' autocast' if args.dtype == 'bf16' else ''} | AdamW fused={args.fused} | "
        f"{args.steps} timed steps after {args.warmup} warm-up"
    )
    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    results: dict[tuple[str, str], tuple[float, float]] = {}
    print(f"{'mode':<9} {'model':<10} {'train img/s':>12} {'forward img/s':>14}")
    for mode in modes:
        fns = {label: step_functions(m, mode == "compiled", inputs, args) for label, m in models.items()}
        # Warm up everything first (compilation, allocator, kernel caches) so neither model pays for it.
        for _ in range(args.warmup):
            for f in fns.values():
                f["train"](), f["forward"]()
        for label, f in fns.items():
            results[mode, label] = tuple(images_per_second(f[k], b, args.steps, device) for k in ("train", "forward"))
            train, fwd = results[mode, label]
            print(f"{mode:<9} {label:<10} {train:>12.2f} {fwd:>14.2f}", flush=True)
    print("ratio ours / diffusers (> 1: ours faster)")
    for mode in modes:
        (ot, of), (dt, df) = results[mode, "ours"], results[mode, "diffusers"]
        print(f"{mode:<9} train {ot / dt:.3f}   forward {of / df:.3f}")


if __name__ == "__main__":
    main()
