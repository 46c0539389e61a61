"""Audio ViT encoder, MAE decoder, masking, and the pre-training models.

Papers: AudioMAE (Huang+ 2022, "Masked Autoencoders that Listen"), MAE (He+ 2022).
Shapes: spectrograms (B, 1, F, T); patch grid (F/p, T/p) = (Fp, Tp); N = Fp*Tp tokens flattened
frequency-major (index = f * Tp + t); K visible and M masked tokens; D encoder width,
Dd decoder width. Mask convention: mask (B, N), 1 = masked (hidden from the encoder).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import losses


@dataclass
class ViTConfig:
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    patch: int = 16
    n_mels: int = 128
    n_frames: int = 1024

    @property
    def grid(self):
        assert self.n_mels % self.patch == 0 and self.n_frames % self.patch == 0, \
            f"spectrogram {self.n_mels}x{self.n_frames} is not divisible by patch size {self.patch}"
        return self.n_mels // self.patch, self.n_frames // self.patch  # (Fp, Tp)


VIT_PRESETS = {
    'vit_tiny': dict(width=192, depth=12, heads=3),
    'vit_small': dict(width=384, depth=12, heads=6),
    'vit_base': dict(width=768, depth=12, heads=12),  # the papers' encoder
}


def sincos_pos_embed(dim, grid):
    """Fixed 2-D sin-cos embeddings (N, dim) on the (Fp, Tp) grid, frequency-major.

    Same layout as MAE/M2D's get_2d_sincos_pos_embed(_flexible): the first dim/2 channels
    encode the time index, the last dim/2 the frequency index; each half is [sin, cos].
    """
    assert dim % 4 == 0, "position embedding width must be divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)

    def embed_1d(pos):
        out = pos.double()[:, None] * omega[None]  # (N, dim/4)
        return torch.cat([out.sin(), out.cos()], 1)  # (N, dim/2)

    f, t = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing='ij')  # (Fp, Tp) each
    return torch.cat([embed_1d(t.flatten()), embed_1d(f.flatten())], 1).float()  # (N, dim)


def patchify(spec, p):
    """(B, 1, F, T) -> (B, N, p*p), frequency-major tokens, pixels in (freq, time) order within a patch."""
    B, _, Fd, Td = spec.shape
    assert Fd % p == 0 and Td % p == 0, f"spectrogram {Fd}x{Td} is not divisible by patch size {p}"
    x = spec.reshape(B, Fd // p, p, Td // p, p).permute(0, 1, 3, 2, 4)  # (B, Fp, Tp, p, p)
    return x.reshape(B, (Fd // p) * (Td // p), p * p)


def unpatchify(x, p, grid):
    """(B, N, p*p) -> (B, 1, F, T); inverse of patchify."""
    B, (Fp, Tp) = x.shape[0], grid
    x = x.reshape(B, Fp, Tp, p, p).permute(0, 1, 3, 2, 4)  # (B, Fp, p, Tp, p)
    return x.reshape(B, 1, Fp * p, Tp * p)


def _split_ids(ids_shuffle, K):
    """Keep the first K of each row's order. Returns ids_keep (B, K), ids_masked (B, M), ids_restore (B, N), mask (B, N)."""
    ids_restore = ids_shuffle.argsort(1)  # position of each token in the shuffled order
    mask = (ids_restore >= K).float()  # 1 = masked
    return ids_shuffle[:, :K], ids_shuffle[:, K:], ids_restore, mask


def random_masking(B, N, ratio, device):
    """Unstructured per-sample masking (MAE): argsort of uniform noise, exactly K = int(N(1-ratio)) kept."""
    K = int(N * (1 - ratio))
    return _split_ids(torch.rand(B, N, device=device).argsort(1), K)


def structured_masking(B, grid, t_ratio, f_ratio, device):
    """Mask whole time columns and frequency rows (fine-tuning patch-out); same K for every sample."""
    Fp, Tp = grid
    nf, nt = int(Fp * f_ratio), int(Tp * t_ratio)
    rows = torch.rand(B, Fp, device=device).argsort(1) < nf  # (B, Fp) nf random rows masked
    cols = torch.rand(B, Tp, device=device).argsort(1) < nt  # (B, Tp) nt random columns masked
    mask = (rows[:, :, None] | cols[:, None, :]).flatten(1)  # (B, N)
    ids_shuffle = mask.int().argsort(dim=1, stable=True)  # visible tokens first, in grid order
    return _split_ids(ids_shuffle, (Fp - nf) * (Tp - nt))


def local_attention_mask(grid, window, shift):
    """(1+N, 1+N) bool, True = may attend: Swin-style windows over the grid, shifted along time.

    A window shift of s with Swin's cyclic roll + mask is the same as windows starting at
    t = s - w, s, s + w, ...: window index floor((t - s) / w). CLS is a window of its own,
    so patch tokens do not see it (AudioMAE drops CLS in its local decoder).
    """
    (Fp, Tp), (wf, wt) = grid, window
    f, t = torch.meshgrid(torch.arange(Fp), torch.arange(Tp), indexing='ij')
    win = (f // wf) * (Tp // wt + 2) + torch.div(t - shift, wt, rounding_mode='floor') + 1  # (Fp, Tp)
    win = torch.cat([torch.tensor([-1]), win.flatten()])  # (1+N,)
    return win[:, None] == win[None, :]


def load_state(module, state, source):
    """Strict load_state_dict whose error lists missing/unexpected keys and shape mismatches."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {tuple(state[k].shape)} in checkpoint, {tuple(own[k].shape)} in model"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise SystemExit(f"error: {source} does not match the {type(module).__name__} being built "
                         f"(another method, model size or input length?)\n  missing: {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}\n  unexpected: {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}\n  shape mismatches: {shapes[:8]}")
    module.load_state_dict(state)


def init_weights(m):
    """xavier-uniform Linear (and patch conv, treated as a Linear), zero biases (ref: MAE)."""
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        assert dim % heads == 0, f"width {dim} is not divisible by {heads} heads"
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, L, D/h)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, L, D/h)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm Transformer block (timm key names, LayerNorm eps 1e-6)."""

    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, attn_mask=None):
        x = x + self.attn(self.norm1(x), attn_mask)
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Audio ViT encoder that runs on visible tokens only."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D, N = cfg.width, cfg.grid[0] * cfg.grid[1]
        self.patch_embed = nn.Conv2d(1, D, cfg.patch, stride=cfg.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        pos = torch.cat([torch.zeros(1, D), sincos_pos_embed(D, cfg.grid)])  # CLS gets a zero embedding (ref: M2D)
        self.register_buffer('pos_embed', pos[None])  # (1, 1+N, D), fixed
        self.blocks = nn.ModuleList([Block(D, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.apply(init_weights)
        nn.init.normal_(self.cls_token, std=0.02)
        assert self.pos_embed.shape[1] == 1 + N

    def embed(self, spec):
        """(B, 1, F, T) -> patch tokens with position embeddings (B, N, D)."""
        assert spec.shape[2:] == (self.cfg.n_mels, self.cfg.n_frames), \
            f"input {tuple(spec.shape[2:])} does not match the model's {(self.cfg.n_mels, self.cfg.n_frames)}"
        x = self.patch_embed(spec).flatten(2).transpose(1, 2)  # (B, N, D), frequency-major
        return x + self.pos_embed[:, 1:]

    def forward(self, spec, ids_keep=None):
        """spec (B, 1, F, T), ids_keep (B, K) or None for all tokens -> (B, 1+K, D) with CLS first."""
        x = self.embed(spec)
        B, N, D = x.shape
        if ids_keep is not None:
            x = x.gather(1, ids_keep[..., None].expand(-1, -1, D))  # (B, K, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], 1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class Decoder(nn.Module):
    """MAE decoder / M2D predictor: Linear(D -> Dd), mask tokens scattered back to the grid,
    fixed sin-cos positions, Transformer blocks (optionally local), LayerNorm, Linear(Dd -> out)."""

    def __init__(self, in_dim, dim, depth, out_dim, grid, window=None):
        super().__init__()
        N = grid[0] * grid[1]
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer('pos_embed', torch.cat([torch.zeros(1, dim), sincos_pos_embed(dim, grid)])[None])  # (1, 1+N, Dd)
        self.blocks = nn.ModuleList([Block(dim, dim // 32) for _ in range(depth)])  # head width 32 (ref: 512-d, 16 heads)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim)
        # AudioMAE's local decoder (ref): 4x4 windows, every other block shifted by half a window along time.
        self.register_buffer('attn_mask', torch.stack([local_attention_mask(grid, window, s) for s in (0, window[1] // 2)])
                             if window else None, persistent=False)  # (2, 1+N, 1+N) or None
        self.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)
        assert self.pos_embed.shape[1] == 1 + N

    def forward(self, x, ids_restore):
        """x (B, 1+K, D) encoder output, ids_restore (B, N) -> predictions for all N tokens (B, N, out)."""
        x = self.embed(x)  # (B, 1+K, Dd)
        (B, N), Dd = ids_restore.shape, x.shape[2]
        tokens = torch.cat([x[:, 1:], self.mask_token.expand(B, N + 1 - x.shape[1], -1).to(x.dtype)], 1)  # (B, N, Dd) shuffled
        tokens = tokens.gather(1, ids_restore[..., None].expand(-1, -1, Dd))  # (B, N, Dd) grid order
        x = torch.cat([x[:, :1], tokens], 1) + self.pos_embed  # (B, 1+N, Dd)
        for i, blk in enumerate(self.blocks):
            x = blk(x, None if self.attn_mask is None else self.attn_mask[i % 2])
        return self.pred(self.norm(x))[:, 1:]  # (B, N, out)


class AudioMAE(nn.Module):
    """AudioMAE pre-training: encode the visible patches, reconstruct the masked ones."""

    def __init__(self, cfg: ViTConfig, mask_ratio=0.8, dec_dim=512, dec_depth=16, local_attn=True):
        super().__init__()
        self.mask_ratio = mask_ratio
        self.encoder = ViT(cfg)
        self.decoder = Decoder(cfg.width, dec_dim, dec_depth, cfg.patch ** 2, cfg.grid,
                               window=(4, 4) if local_attn else None)

    def forward(self, spec):
        """spec (B, 1, F, T) -> {'loss_rec': scalar}."""
        B, cfg = spec.shape[0], self.encoder.cfg
        ids_keep, _, ids_restore, mask = random_masking(B, cfg.grid[0] * cfg.grid[1], self.mask_ratio, spec.device)
        pred = self.decoder(self.encoder(spec, ids_keep), ids_restore)  # (B, N, p*p)
        return {'loss_rec': losses.mae_loss(pred, patchify(spec, cfg.patch), mask)}
