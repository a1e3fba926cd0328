"""Stage 1a: cut the image into patches and embed them (BLIP-2 Fig. 2, the input of the frozen image encoder).

The ViT sees an image as a sequence: a 14x14-pixel convolution with stride 14 turns each non-overlapping patch
into one Dv-wide vector, a learned class token is put in front, and a learned position embedding is added to
every token (Dosovitskiy et al., 2021). At 224 px that is 16 x 16 = 256 patches + 1 class token = 257 tokens.

What is unusual here: the COCO-finetuned caption checkpoints were trained at 364 px (26 x 26 + 1 = 677 tokens)
while the position table of other checkpoints is for 224 px. To run an image at a size the table was not made
for, the patch part of the table is treated as a small (Dv-channel) image and resized with bicubic
interpolation; the class token's position is kept as is.

Notation: B batch, C=3 colour channels, H/W pixels, p patch size, g = H/p grid side, P = g*g + 1 tokens, Dv width.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import VisionConfig


class PatchEmbedding(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.image_size = config.image_size
        D = config.hidden_size
        self.patch_embedding = nn.Conv2d(3, D, kernel_size=config.patch_size, stride=config.patch_size)
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, D))
        num_positions = (config.image_size // config.patch_size) ** 2 + 1
        self.position_embedding = nn.Parameter(torch.zeros(1, num_positions, D))

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or not pixel_values.is_floating_point():
            raise ValueError(f"patch embedding: expected float pixel_values of shape (B, 3, H, W), "
                             f"got {tuple(pixel_values.shape)} {pixel_values.dtype}")
        B, _, H, W = pixel_values.shape
        if not interpolate_pos_encoding and (H, W) != (self.image_size, self.image_size):
            raise ValueError(f"patch embedding: this checkpoint expects {self.image_size}x{self.image_size} images, "
                             f"got {H}x{W}; resize them or pass interpolate_pos_encoding=True")
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype))  # (B, 3, H, W) -> (B, Dv, g, g)
        patches = patches.flatten(2).transpose(1, 2)  # (B, Dv, g, g) -> (B, g*g, Dv), row-major over the grid
        cls = self.class_embedding.to(dtype).expand(B, -1, -1)  # (B, 1, Dv)
        x = torch.cat([cls, patches], dim=1)  # (B, P, Dv)
        pos = self.position_embedding
        if interpolate_pos_encoding:
            pos = self.interpolate_positions(H // self.patch_size, W // self.patch_size)
        return x + pos.to(dtype)  # (B, P, Dv) + (1, P, Dv)

    def interpolate_positions(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """The position table resized to a grid_h x grid_w patch grid -> (1, grid_h*grid_w + 1, Dv)."""
        cls_pos, patch_pos = self.position_embedding[:, :1], self.position_embedding[:, 1:]
        g = int(round(patch_pos.shape[1] ** 0.5))  # the grid side the table was trained for (16 at 224 px)
        if (grid_h, grid_w) == (g, g):
            return self.position_embedding
        D = patch_pos.shape[-1]
        # Treat the table as a D-channel g x g image: (1, g*g, D) -> (1, D, g, g).
        grid = patch_pos.reshape(1, g, g, D).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)  # (1, D, gh, gw)
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, D)  # back to (1, gh*gw, D)
        return torch.cat([cls_pos, patch_pos], dim=1)  # (1, gh*gw + 1, D)
