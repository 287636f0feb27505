"""Vision Transformer (pre-norm ViT, as BLIP's reference `vit.py`).

The module names follow the reference checkpoint layout (`patch_embed.proj`, `cls_token`,
`pos_embed`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`) so that
reference and DeiT/timm weights load without renaming.

Every block is a separate module in `VisionTransformer.blocks` (an `nn.ModuleList`), the unit a
recipe shards with `fully_shard`, compiles and checkpoints.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability `p`.

    The rate lives in a non-persistent 0-d float32 buffer `rate`, so it is graph data rather than
    a Python constant: `torch.compile` does not guard on it, and blocks with different rates
    share one compiled graph. Non-persistent keeps `state_dict()` free of it (checkpoints and
    weight converters are unaffected); `to_empty` and `load_state_dict` do not restore it, so
    call `init_buffers()` after materialising the module. The float rate stays available as `p`.
    The mask is computed in float32 (casting the module to bf16 also casts the buffer, rounding
    the rate slightly).

    Whether the mask is drawn at all is the Python flag `enabled`, which is guarded on by
    `torch.compile`; give it the same value for every block of a model (e.g. "the model has
    drop path"), so that a block whose own rate is 0 runs the same code (an all-ones mask).

    Args:
        p: drop probability, 0 <= p < 1.
        enabled: draw the mask in training; defaults to `p > 0`. False (only with p == 0) makes
            this the identity without any cost.
    """

    rate: torch.Tensor

    def __init__(self, p: float = 0.0, enabled: bool | None = None) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path rate must be in [0, 1), got {p}")
        enabled = p > 0.0 if enabled is None else enabled
        if p > 0.0 and not enabled:
            raise ValueError(f"drop-path rate {p} > 0 needs enabled=True")
        self.p = float(p)
        self.enabled = enabled
        self.register_buffer("rate", torch.tensor(self.p, dtype=torch.float32), persistent=False)

    def init_buffers(self) -> None:
        """Write `p` into the `rate` buffer (after `to_empty`; `load_state_dict` skips it)."""
        with torch.no_grad():
            self.rate.fill_(self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, ...) -> (B, ...); each sample zeroed with probability `rate`, the survivors
        scaled by 1 / (1 - rate). The identity in eval mode or when not `enabled`."""
        if not self.enabled or not self.training:
            return x
        keep = 1.0 - self.rate.float()
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = torch.rand(shape, device=x.device, dtype=torch.float32) < keep
        return x * (mask / keep).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}, enabled={self.enabled}"


class PatchEmbedding(nn.Module):
    """Non-overlapping patches -> tokens, through one strided convolution.

    Args:
        patch_size: side of a square patch in pixels.
        width: output token width D.
        in_channels: image channels.
    """

    def __init__(self, patch_size: int, width: int, in_channels: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, C, H, W) -> tokens (B, H/p * W/p, D)."""
        return self.proj(images).flatten(2).transpose(1, 2)


class VisionAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection ([q; k; v] along the output dim).

    Args:
        width: token width D.
        heads: number of heads (D % heads == 0).
        attention_dropout: dropout on attention probabilities (reference: 0).
    """

    def __init__(self, width: int, heads: int, attention_dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.attention_dropout = attention_dropout
        self.qkv = nn.Linear(width, 3 * width, bias=True)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) -> (B, N, D)."""
        batch, tokens, width = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        dropout = self.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, width))


class VisionMLP(nn.Module):
    """fc1 -> GELU -> fc2.

    Args:
        width: token width D.
        hidden: hidden width (mlp_ratio * D).
    """

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) -> (B, N, D)."""
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-norm transformer block: x + drop_path(attn(norm1(x))), then the same with the MLP.

    Args:
        attn: the attention module (receives (B, N, D)).
        mlp: the MLP module.
        norm1: LayerNorm before attention.
        norm2: LayerNorm before the MLP.
        drop_path: stochastic depth applied to both residual branches.
    """

    def __init__(
        self,
        attn: nn.Module,
        mlp: nn.Module,
        norm1: nn.Module,
        norm2: nn.Module,
        drop_path: nn.Module,
    ) -> None:
        super().__init__()
        self.norm1 = norm1
        self.attn = attn
        self.norm2 = norm2
        self.mlp = mlp
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) -> (B, N, D)."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Resize a learned position embedding to another patch grid (square grids).

    The cls position is kept; the patch positions are resized bicubically
    (align_corners=False), as the reference `interpolate_pos_embed`.

    Args:
        pos_embed: (1, 1 + N_old, D).
        num_patches: N_new, a perfect square.

    Returns:
        (1, 1 + N_new, D) in the input dtype; the input itself when N_new == N_old.
    """
    old_patches = pos_embed.shape[1] - 1
    if old_patches == num_patches:
        return pos_embed
    old_side, new_side = math.isqrt(old_patches), math.isqrt(num_patches)
    if old_side**2 != old_patches or new_side**2 != num_patches:
        raise ValueError(f"patch grids must be square, got {old_patches} -> {num_patches}")
    width = pos_embed.shape[-1]
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    grid = patch_pos.reshape(1, old_side, old_side, width).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    patch_pos = grid.permute(0, 2, 3, 1).reshape(1, num_patches, width).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


class VisionTransformer(nn.Module):
    """ViT encoder without a classification head; returns every token after the final norm.

    Args:
        patch_embed: patch embedding (images -> (B, N, D)).
        blocks: the transformer blocks, in order.
        norm: final LayerNorm.
        num_patches: N, patches per image at the training resolution.
        width: token width D.
    """

    def __init__(
        self,
        patch_embed: PatchEmbedding,
        blocks: list[nn.Module],
        norm: nn.Module,
        num_patches: int,
        width: int,
    ) -> None:
        super().__init__()
        self.width = width
        self.num_patches = num_patches
        self.patch_embed = patch_embed
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, width))
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W), normalised -> tokens (B, 1 + N, D), cls first.

        Another resolution than the training one interpolates the position embedding on the fly.
        """
        x = self.patch_embed(images.to(self.patch_embed.proj.weight.dtype))
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        pos = self.pos_embed
        if x.shape[1] != pos.shape[1]:
            pos = interpolate_pos_embed(pos, x.shape[1] - 1)
        x = x + pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Fill the non-persistent buffers (every `DropPath.rate`) from their Python values.

        Call it after `to_empty` (the buffers hold garbage then) and whenever the buffers are not
        known to be set: `load_state_dict` does not restore non-persistent buffers.
        """
        for module in self.modules():
            if isinstance(module, DropPath):
                module.init_buffers()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Reference init: trunc-normal(0.02) for linears, cls token and position embedding,
        zero biases, LayerNorm 1/0, PyTorch's default for the patch convolution; and
        `init_buffers()`."""
        self.init_buffers()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.patch_embed.proj.reset_parameters()
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
