"""AudioMAE's local decoder block (AudioMAE §3.3): Swin-V2 attention within windows of the patch
grid, every other block shifted along time, as the authors' timm_patch/swin_transformer.py builds it
for their decoder (decoder_mode 1). model.Decoder stacks these blocks when local attention is on.

Shapes: x (B, N, D) tokens of an (Fp, Tp) grid, frequency-major; windows of (wf, wt) = A tokens, nW
of them.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Mlp
from tools.kernels import attention


def shifted_window_mask(grid, window, shift):
    """(nW, A, A) additive mask of the windows of a grid rolled by -shift along time: 0 within a
    window,
    -100 between tokens that the cyclic roll brought together from opposite ends of the grid (ref:
    Swin). Windows are numbered frequency-major, A = wf * wt tokens each, frequency-major within."""
    (Fp, Tp), (wf, wt) = grid, window
    # rolled time -> region: [0, Tp - wt), [Tp - wt, Tp - shift), [Tp - shift, Tp)
    t = torch.arange(Tp)
    region = (t >= Tp - wt).long() + (t >= Tp - shift).long()
    region = region.expand(Fp, Tp).reshape(Fp // wf, wf, Tp // wt, wt)
    region = region.permute(0, 2, 1, 3).reshape(-1, wf * wt)  # (nW, A)
    return (region[:, :, None] != region[:, None, :]).float() * -100.0  # (nW, A, A)


class WindowAttention(nn.Module):
    """Swin-V2 attention within windows (ref: AudioMAE's local decoder): scaled cosine attention
    cos(q, k) / tau, with Swin-V2's learnable temperature tau per head (>= 0.01), plus a continuous
    relative position bias: an MLP (2 -> 384, ReLU -> heads, dropout 0.1 as the reference) on the
    log-spaced (time, freq) offsets."""

    def __init__(self, dim, heads, window, hidden=384):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.meta_mlp = Mlp(2, hidden, heads, act=nn.ReLU, drop=0.1)
        self.tau = nn.Parameter(torch.ones(heads))  # the reference's name, kept for its weights
        f, t = torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]), indexing='ij')
        pos = torch.stack([t.flatten(), f.flatten()], 1)  # (A, 2): (time, freq), the reference's order
        rel = (pos[:, None] - pos[None]).float()  # (A, A, 2) offsets between the tokens of a window
        self.register_buffer('rel_log', rel.sign() * rel.abs().log1p(), persistent=False)

    def forward(self, x, mask=None):
        """x (B, nW, A, D) the tokens of each window, mask (nW, A, A) additive or None -> (B, nW, A,
        D)."""
        B, nW, A, D = x.shape
        qkv = self.qkv(x).view(B, nW, A, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5)  # 3 x (B, nW, h, A, d)
        q = F.normalize(q, dim=-1) / self.tau.clamp(min=0.01)[:, None, None]  # cos(q, k) / tau
        bias = self.meta_mlp(self.rel_log).permute(2, 0, 1)  # (h, A, A)
        bias = bias + mask[:, None] if mask is not None else bias  # (nW, h, A, A) or (h, A, A)
        x = attention(q, F.normalize(k, dim=-1), v, bias.to(q.dtype), scale=1.0)  # (B, nW, h, A, d)
        return self.proj(x.transpose(2, 3).reshape(B, nW, A, D))


class WindowBlock(nn.Module):
    """Swin-V2 block of AudioMAE's local decoder (ref): post-norm residuals x + norm1(attn(x)),
    x + norm2(mlp(x)), attention within (wf, wt) windows of the (Fp, Tp) grid, cyclically shifted by
    `shift` along time."""

    def __init__(self, dim, heads, grid, window=(4, 4), shift=0, mlp_ratio=4.0):
        super().__init__()
        # a grid smaller than a window is one window (ref)
        window = (min(window[0], grid[0]), min(window[1], grid[1]))
        shift = shift if grid[1] > window[1] else 0
        if grid[0] % window[0] or grid[1] % window[1]:
            raise ValueError(f"the local decoder needs a patch grid divisible by its {window} windows, "
                             f"not {grid} (frequency rows, time columns of patches): pass "
                             "--no-local_attn, or a front-end and --n_frames that give such a grid")
        self.window = window
        self.attn, self.norm1 = WindowAttention(dim, heads, window), nn.LayerNorm(dim, eps=1e-6)
        self.mlp, self.norm2 = Mlp(dim, int(dim * mlp_ratio)), nn.LayerNorm(dim, eps=1e-6)
        mask = shifted_window_mask(grid, window, shift) if shift else None
        self.register_buffer('attn_mask', mask, persistent=False)
        # The cyclic roll and the window partition as one gather: the token of each (window,
        # position).
        (Fp, Tp), (wf, wt) = grid, window
        f, t = torch.meshgrid(torch.arange(Fp), (torch.arange(Tp) + shift) % Tp, indexing='ij')
        order = (f * Tp + t).view(Fp // wf, wf, Tp // wt, wt).transpose(1, 2).flatten()  # (N,)
        self.register_buffer('order', order, persistent=False)
        self.register_buffer('inverse', order.argsort(), persistent=False)

    def forward(self, x):
        """x (B, N, D) grid tokens, frequency-major -> (B, N, D)."""
        B, N, D = x.shape
        # (B, nW, A, D)
        h = x.index_select(1, self.order).view(B, -1, self.window[0] * self.window[1], D)
        h = self.attn(h, self.attn_mask).view(B, N, D).index_select(1, self.inverse)  # grid order
        x = x + self.norm1(h)
        return x + self.norm2(self.mlp(x))


