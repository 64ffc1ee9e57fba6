"""Classify scikit-learn's 8x8 digits with a Hyena ClassificationResNet on CPU.

    python examples/hyena_digits.py            # a few CPU minutes on 2 cores; prints test accuracy and time

Images are channels-last (B, 8, 8, 1) scaled to [-1, 1]; 20% of the 1797 images are held out with a
stratified split. The network is unconditioned (one learned constant condition for every sample).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from adaln.networks import ClassificationResNet


def load_split(seed: int) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test); x (N, 8, 8, 1) in [-1, 1], y (N,) class indices."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(-1) / 8.0 - 1.0  # pixel values 0..16
    y = torch.tensor(digits.target)
    idx_train, idx_test = train_test_split(
        range(len(y)), test_size=0.2, stratify=digits.target, random_state=seed
    )
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to one pixel per axis (padding with -1, the background value)."""
    padded = F.pad(x.movedim(-1, 1), (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2, x.shape[0]), generator=generator)
    crops = [padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8] for i in range(x.shape[0])]
    return torch.stack(crops).movedim(1, -1)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(-1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--patch-size", type=int, default=2)
    parser.add_argument("--mixer", choices=("hyena", "attention"), default="hyena")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    x_train, y_train, x_test, y_test = load_split(args.seed)
    model = ClassificationResNet(
        1, 10, args.hidden, args.depth, spatial_dims=2, patch_size=args.patch_size, mixer=args.mixer
    )
    steps = args.epochs * -(-len(y_train) // args.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.1)

    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=generator)
        for i in range(0, len(order), args.batch_size):
            batch = order[i : i + args.batch_size]
            logits = model(random_shift(x_train[batch], generator))
            loss = F.cross_entropy(logits, y_train[batch], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0 or epoch + 1 == args.epochs:
            acc = accuracy(model, x_test, y_test)
            print(f"epoch {epoch + 1:3d}  loss {loss.item():.3f}  test accuracy {acc:.4f}")
    wall = time.perf_counter() - start
    print(f"test accuracy {accuracy(model, x_test, y_test):.4f} ({len(y_test)} images), "
          f"train wall time {wall:.1f} s on {args.threads} threads")


if __name__ == "__main__":
    main()
