"""Small pieces every pre-training step shares: image normalisation, text batching, seeding, progress lines.

Notation: N images in a split, B batch, S image side in pixels, T text tokens.
"""

import random
import time

import numpy as np
import torch

# The CLIP normalisation constants the published BLIP-2 processors use (preprocessor_config.json); the shipped
# toy model writes the same ones, so `python -m blip2_mini caption` prepares its images exactly as training did.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def pixel_values(images_uint8: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) uint8 -> normalised float (N, 3, S, S): what the image processor computes after resizing."""
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (images_uint8.float() / 255.0 - mean) / std


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pad_batch(sequences: list[list[int]], pad_id: int, value_for_labels: int | None = None) -> torch.Tensor:
    """Right-pad lists of ids to (B, T) with `pad_id`."""
    T = max(len(s) for s in sequences)
    out = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


class Progress:
    """Prints `step/total  name=value ...  elapsed` every `every` steps (and on the last one)."""

    def __init__(self, title: str, total: int, every: int = 50, quiet: bool = False):
        self.title, self.total, self.every, self.quiet = title, total, every, quiet
        self.start = time.time()
        self.history: list[dict] = []
        if not quiet:
            print(f"== {title}: {total} steps", flush=True)

    def log(self, step: int, **values: float):
        self.history.append({"step": step, **values})
        if self.quiet or not (step % self.every == 0 or step == self.total):
            return
        numbers = "  ".join(f"{k}={v:.4f}" for k, v in values.items())
        print(f"  [{self.title}] {step:5d}/{self.total}  {numbers}  {time.time() - self.start:6.1f}s", flush=True)

    @property
    def elapsed(self) -> float:
        return time.time() - self.start


def adamw(named_params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only: LayerNorm gains, biases and other vectors are not decayed
    (decay would pull a gain towards 0, not towards its neutral 1), as in the BLIP-2 code. Parameters that do
    not require grad are left out."""
    trained = [(name, p) for name, p in named_params if p.requires_grad]
    groups = [{"params": [p for _, p in trained if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for _, p in trained if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def cosine_lr(optimizer, step: int, total: int, peak: float, warmup: int):
    """Linear warm-up to `peak`, then cosine decay to a tenth of it (the schedule the BLIP-2 code uses)."""
    if step < warmup:
        lr = peak * (step + 1) / warmup
    else:
        progress = (step - warmup) / max(1, total - warmup)
        lr = peak * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress)))
    for group in optimizer.param_groups:
        group["lr"] = lr
