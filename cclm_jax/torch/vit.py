"""ViT image encoder of CCLM-X2VLM (eval mode: no dropout, no drop-path): BEiT-v2 as in X2-VLM's
``models/beit2.py`` and the DINOv2 variant of ``cclm_jax.models.vit``, selected by the config fields.

Submodule and buffer names follow the official ``vision_encoder.*`` state_dict keys (timm/BEiT). Images are
NCHW float tensors, already normalised; with G = image_res / patch_size the output is (B, 1 + G², width):

- pool 'mean' (BEiT-v2): the CLS output is dropped, ``fc_norm`` normalises every patch token and token 0 is
  their mean (or, with ``patch_weights``, their weighted mean: X2-VLM's region token);
- pool 'cls' (DINOv2): ``norm`` over all tokens, token 0 is the CLS output.

Per-variant fields: ``qkv_bias`` 'qv' (separate ``q_bias``/``v_bias``, no key bias), 'qkv' or 'none';
``rel_pos_bias`` (one ((2G-1)² + 3, heads) table per block, BEiT's CLS rows); ``pos_grid`` (an absolute
position embedding stored at pos_grid² patches, bicubically resized to G² when they differ);
``layer_scale_init`` > 0 (per-channel ``gamma_1``/``gamma_2``).
"""
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from cclm_jax.torch.swin import Mlp
from cclm_jax.torch.swin import relative_position_index as window_relative_index


def relative_table_rows(grid: int) -> int:
    """Rows of a BEiT relative position bias table for a G x G patch grid: offsets plus three CLS rows."""
    return (2 * grid - 1) ** 2 + 3


def relative_position_index(grid: int) -> torch.Tensor:
    """(G²+1, G²+1) int64 index into BEiT's table, token 0 = CLS: patch pairs by offset
    ((dy+G-1)*(2G-1) + dx+G-1), row 0 (CLS -> any) = T-3, column 0 (any -> CLS) = T-2, [0, 0] = T-1."""
    rows = relative_table_rows(grid)
    index = torch.zeros((grid * grid + 1,) * 2, dtype=torch.long)
    index[1:, 1:] = window_relative_index(grid)
    index[0, :] = rows - 3
    index[:, 0] = rows - 2
    index[0, 0] = rows - 1
    return index


class Attention(nn.Module):
    """Multi-head self-attention over all tokens with a fused ``qkv`` projection and an optional relative bias."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: str, grid: int, rel_pos_bias: bool):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.separate_bias = qkv_bias == "qv"
        if self.separate_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        if rel_pos_bias:
            self.relative_position_bias_table = nn.Parameter(torch.zeros(relative_table_rows(grid), num_heads))
            self.register_buffer("relative_position_index", relative_position_index(grid))
        else:
            self.relative_position_bias_table = None
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias == "qkv")
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, C) -> (B, N, C)."""
        b, n, _ = x.shape
        bias = self.qkv.bias
        if self.separate_bias:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.relative_position_bias_table is not None:
            rel = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
            attn = attn + rel.permute(2, 0, 1).contiguous().unsqueeze(0)
        return self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    """Pre-LN block: x + gamma_1 * attn(norm1(x)), then x + gamma_2 * mlp(norm2(x)) (no gammas without layer
    scale)."""

    def __init__(self, vision: Mapping):
        super().__init__()
        dim, eps, scale = vision["embed_dim"], vision["layer_norm_eps"], vision["layer_scale_init"]
        grid = vision["image_res"] // vision["patch_size"]
        if scale:
            self.gamma_1 = nn.Parameter(torch.full((dim,), scale))
            self.gamma_2 = nn.Parameter(torch.full((dim,), scale))
        else:
            self.gamma_1 = self.gamma_2 = None
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, vision["num_heads"], vision["qkv_bias"], grid, vision["rel_pos_bias"])
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * vision["mlp_ratio"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gamma_1 is None:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = x + self.gamma_1 * self.attn(self.norm1(x))
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Conv2d(3 -> C, kernel = stride = patch, with bias) -> flatten row-major; no norm."""

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, 3, H, W) -> (B, (H/patch)*(W/patch), C)."""
        return self.proj(image).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """The CCLM-X2VLM image encoder; ``vision`` is the validated ``config['vision']`` section."""

    def __init__(self, vision: Mapping):
        super().__init__()
        self.image_res, self.pool = vision["image_res"], vision["pool"]
        self.grid, self.pos_grid = vision["image_res"] // vision["patch_size"], vision["pos_grid"]
        self.width = dim = vision["embed_dim"]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_grid ** 2 + 1, dim)) if self.pos_grid else None
        self.patch_embed = PatchEmbed(vision["patch_size"], dim)
        self.blocks = nn.ModuleList(Block(vision) for _ in range(vision["depth"]))
        final = nn.LayerNorm(dim, eps=vision["layer_norm_eps"])
        if self.pool == "mean":
            self.fc_norm = final
        else:
            self.norm = final

    def position_embedding(self) -> torch.Tensor:
        """(1, G²+1, C): the stored embedding, its patch rows bicubically resized (align_corners=False) from the
        stored grid to this one; the CLS row is kept."""
        if self.pos_grid == self.grid:
            return self.pos_embed
        patches = self.pos_embed[:, 1:].reshape(1, self.pos_grid, self.pos_grid, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=(self.grid, self.grid), mode="bicubic", align_corners=False)
        return torch.cat([self.pos_embed[:, :1], patches.permute(0, 2, 3, 1).reshape(1, self.grid ** 2, -1)], dim=1)

    def forward(self, image: torch.Tensor, patch_weights: torch.Tensor | None = None) -> torch.Tensor:
        """image (B, 3, image_res, image_res) normalised float -> (B, 1 + G², width) (module docstring);
        ``patch_weights`` (B, G²) (pool 'mean' only): token 0 = sum_i(w_i x_i) / sum_i(w_i)."""
        if image.ndim != 4 or tuple(image.shape[1:]) != (3, self.image_res, self.image_res):
            raise ValueError(f"image: expected shape (B, 3, {self.image_res}, {self.image_res}) (NCHW), "
                             f"got {tuple(image.shape)}")
        if patch_weights is not None:
            if self.pool != "mean":
                raise ValueError("patch_weights: region pooling needs a mean-pooled ViT (vision.pool 'mean')")
            if tuple(patch_weights.shape) != (image.shape[0], self.grid ** 2):
                raise ValueError(f"patch_weights: expected shape ({image.shape[0]}, {self.grid ** 2}), "
                                 f"got {tuple(patch_weights.shape)}")
        x = self.patch_embed(image)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.position_embedding()
        for block in self.blocks:
            x = block(x)
        if self.pool == "cls":
            return self.norm(x)
        x = self.fc_norm(x[:, 1:])
        if patch_weights is None:
            token = F.adaptive_avg_pool1d(x.transpose(1, 2), 1)  # (B, C, 1), as the official avgpool
        else:
            w = patch_weights.to(x.dtype).unsqueeze(2)
            token = (w * x).transpose(1, 2).sum(dim=-1, keepdim=True) / w.transpose(1, 2).sum(dim=-1, keepdim=True)
        return torch.cat([token.transpose(1, 2), x], dim=1)
