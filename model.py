"""Audio ViT encoder, MAE decoder, masking, and the pre-training models.

Papers: AudioMAE (Huang+ 2022, "Masked Autoencoders that Listen"), MAE (He+ 2022),
MAM-CLAP, SupMAM, SupMAM-CLAP (Xin+ 2023, "Masked Audio Modeling with CLAP and Multi-Objective
Learning"; their CLAP teacher is in tools/htsat.py); M2D (Niizumi+ 2023, "Masked
Modeling Duo"), M2D-CLAP (Niizumi+ 2024) and M2D2 (Niizumi+ / Nguyen+ 2025), with sentence encoders.
Shapes: spectrograms (B, 1, F, T); patch grid (F/p, T/p) = (Fp, Tp); N = Fp*Tp tokens flattened
frequency-major (index = f * Tp + t); K visible and M masked tokens; D encoder width,
Dd decoder width, d_s sentence-embedding width (the audio-text space has width D). Mask convention:
mask (B, N), 1 = masked (hidden from the encoder).
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import losses
from tools.sentence import OFFLINE_TEXT_ENCODER, SentenceEncoder


@dataclass
class ViTConfig:
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    patch: int = 16
    n_mels: int = 128
    n_frames: int = 1024
    final_norm: bool = True  # False: no LayerNorm after the blocks (AudioMAE's fine-tuned models pool first)

    @property
    def grid(self):
        assert self.n_mels % self.patch == 0, f"{self.n_mels} mel bins are not divisible by patch size {self.patch}"
        # A time length that is not a multiple of the patch size loses its last n_frames % p frames in
        # the strided patch conv (ref: M2D-CLAP 2025 uses 80x1001 inputs, a 5x62 grid).
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


def shifted_window_mask(grid, window, shift):
    """(nW, A, A) additive mask of the windows of a grid rolled by -shift along time: 0 within a window, -100 between
    tokens that the cyclic roll brought together from opposite ends of the grid (ref: Swin, AudioMAE's local decoder).
    Windows are numbered frequency-major, A = wf * wt tokens each, frequency-major within a window."""
    (Fp, Tp), (wf, wt) = grid, window
    t = torch.arange(Tp)  # rolled time position -> region: [0, Tp - wt), [Tp - wt, Tp - shift), [Tp - shift, Tp)
    region = (t >= Tp - wt).long() + (t >= Tp - shift).long()
    region = region.expand(Fp, Tp).reshape(Fp // wf, wf, Tp // wt, wt).permute(0, 2, 1, 3).reshape(-1, wf * wt)
    return (region[:, :, None] != region[:, None, :]).float() * -100.0  # (nW, A, A)


def init_weights(m):
    """xavier-uniform Linear (and patch conv, treated as a Linear), zero biases (ref: MAE)."""
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# (ours) On CPU the backward of PyTorch's flash-attention kernel is slower than the math path (two batched matmuls
# and a softmax) up to ~200 tokens: the visible tokens, demo-length decoders, M2D's predictor at 608 frames (191
# tokens); from ~208 on flash is faster (docs/performance.md).
SHORT_CPU = 200


def attention(q, k, v, mask=None, scale=None):
    """softmax(q k^T * scale + mask) v with SDPA, q k v (..., L, d); the math kernel for short CPU sequences under
    autograd (SHORT_CPU)."""
    short = q.device.type == 'cpu' and q.shape[-2] <= SHORT_CPU and torch.is_grad_enabled()
    with sdpa_kernel(SDPBackend.MATH) if short else nullcontext():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        assert dim % heads == 0, f"width {dim} is not divisible by {heads} heads"
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, L, D/h)
        return self.proj(attention(q, k, v).transpose(1, 2).reshape(B, L, D))  # (B, h, L, D/h) -> (B, L, D)


class Mlp(nn.Module):
    def __init__(self, dim, hidden, out=None, act=nn.GELU, drop=0.0):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), act(), nn.Linear(hidden, out or dim)
        self.drop = nn.Dropout(drop) if drop else nn.Identity()

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm Transformer block (timm key names, LayerNorm eps 1e-6)."""

    def __init__(self, dim, heads, mlp_ratio=4.0, eps=1e-6):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=eps), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=eps), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class WindowAttention(nn.Module):
    """Swin-V2 attention within windows (ref: AudioMAE's local decoder, its timm_patch/swin_transformer.py): scaled
    cosine attention cos(q, k) / tau with a learnable tau per head (>= 0.01), plus a continuous relative position bias,
    an MLP (2 -> 384, ReLU -> heads, dropout 0.1 as the reference) on the log-spaced (time, freq) offsets."""

    def __init__(self, dim, heads, window, hidden=384):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.meta_mlp = Mlp(2, hidden, heads, act=nn.ReLU, drop=0.1)
        self.tau = nn.Parameter(torch.ones(heads))
        f, t = torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]), indexing='ij')
        pos = torch.stack([t.flatten(), f.flatten()], 1)  # (A, 2): (time, freq), the reference's (H, W) order
        rel = (pos[:, None] - pos[None]).float()  # (A, A, 2) offsets between the tokens of a window
        self.register_buffer('rel_log', rel.sign() * rel.abs().log1p(), persistent=False)

    def forward(self, x, mask=None):
        """x (B, nW, A, D) the tokens of each window, mask (nW, A, A) additive or None -> (B, nW, A, D)."""
        B, nW, A, D = x.shape
        q, k, v = self.qkv(x).view(B, nW, A, 3, self.heads, D // self.heads).permute(3, 0, 1, 4, 2, 5)  # (B, nW, h, A, d)
        q = F.normalize(q, dim=-1) / self.tau.clamp(min=0.01)[:, None, None]  # cos(q, k) / tau
        bias = self.meta_mlp(self.rel_log).permute(2, 0, 1)  # (h, A, A)
        bias = bias + mask[:, None] if mask is not None else bias  # (nW, h, A, A) or (h, A, A)
        x = attention(q, F.normalize(k, dim=-1), v, bias.to(q.dtype), scale=1.0)  # (B, nW, h, A, d)
        return self.proj(x.transpose(2, 3).reshape(B, nW, A, D))


class WindowBlock(nn.Module):
    """Swin-V2 block of AudioMAE's local decoder (ref): post-norm residuals x + norm1(attn(x)), x + norm2(mlp(x)),
    attention within (wf, wt) windows of the (Fp, Tp) grid, cyclically shifted by `shift` along time."""

    def __init__(self, dim, heads, grid, window=(4, 4), shift=0, mlp_ratio=4.0):
        super().__init__()
        window = (min(window[0], grid[0]), min(window[1], grid[1]))  # a grid smaller than a window is one window (ref)
        shift = shift if grid[1] > window[1] else 0
        if grid[0] % window[0] or grid[1] % window[1]:
            raise SystemExit(f"error: the local decoder needs a patch grid divisible by its {window} windows, not {grid} "
                             "(frequency rows, time columns of patches): pass --no-local_attn, or a front-end and "
                             "--n_frames that give such a grid")
        self.window = window
        self.attn, self.norm1 = WindowAttention(dim, heads, window), nn.LayerNorm(dim, eps=1e-6)
        self.mlp, self.norm2 = Mlp(dim, int(dim * mlp_ratio)), nn.LayerNorm(dim, eps=1e-6)
        self.register_buffer('attn_mask', shifted_window_mask(grid, window, shift) if shift else None, persistent=False)
        # The cyclic roll and the window partition as one gather: token index of each (window, position in it).
        (Fp, Tp), (wf, wt) = grid, window
        f, t = torch.meshgrid(torch.arange(Fp), (torch.arange(Tp) + shift) % Tp, indexing='ij')  # rolled grid
        order = (f * Tp + t).view(Fp // wf, wf, Tp // wt, wt).transpose(1, 2).flatten()  # (N,) in window order
        self.register_buffer('order', order, persistent=False)
        self.register_buffer('inverse', order.argsort(), persistent=False)

    def forward(self, x):
        """x (B, N, D) grid tokens, frequency-major -> (B, N, D)."""
        B, N, D = x.shape
        h = x.index_select(1, self.order).view(B, -1, self.window[0] * self.window[1], D)  # (B, nW, A, D)
        h = self.attn(h, self.attn_mask).view(B, N, D).index_select(1, self.inverse)  # back to grid order
        x = x + self.norm1(h)
        return x + self.norm2(self.mlp(x))


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
        self.norm = nn.LayerNorm(D, eps=1e-6) if cfg.final_norm else nn.Identity()
        self.apply(init_weights)
        nn.init.normal_(self.cls_token, std=0.02)
        assert self.pos_embed.shape[1] == 1 + N

    def embed(self, spec):
        """(B, 1, F, T) -> patch tokens with position embeddings (B, Fp*t, D), t = T // p time columns.

        An input shorter than the model's uses the first t columns of the position table (ref: M2D runtime).
        """
        (Fp, Tp), t = self.cfg.grid, spec.shape[3] // self.cfg.patch
        assert spec.shape[2] == self.cfg.n_mels and 0 < t <= Tp, \
            f"input {tuple(spec.shape[2:])} does not fit the model's {(self.cfg.n_mels, self.cfg.n_frames)}"
        # The patch conv (kernel = stride = p) as the Linear on flattened patches it is (ViT §3.1); (ours) computed as
        # a matmul because oneDNN's AMX bf16 convolution (CPU, torch 2.11) returned NaN for some short inputs.
        w = self.patch_embed.weight.flatten(1)  # (D, p*p), pixels in (freq, time) order like patchify's
        x = F.linear(patchify(spec[..., :t * self.cfg.patch], self.cfg.patch), w, self.patch_embed.bias)  # (B, Fp*t, D)
        pos = self.pos_embed[:, 1:].unflatten(1, (Fp, Tp))[:, :, :t].flatten(1, 2)  # (1, Fp*t, D)
        return x + pos

    def encode(self, x, ids=None, blocks=None, norm=None):
        """Patch tokens x (B, N, D), the ones to encode ids (B, K) or None for all -> (B, 1+K, D), CLS first.

        Runs this encoder's blocks and norm, or the ones given (M2D's target network shares the
        patch embedding, position embeddings and CLS token but has its own blocks and norm).
        """
        B, N, D = x.shape
        if ids is not None:
            x = x.gather(1, ids[..., None].expand(-1, -1, D))  # (B, K, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], 1)
        for blk in blocks if blocks is not None else self.blocks:
            x = blk(x)
        return (norm or self.norm)(x)

    def forward(self, spec, ids_keep=None):
        """spec (B, 1, F, T), ids_keep (B, K) or None for all tokens -> (B, 1+K, D) with CLS first."""
        return self.encode(self.embed(spec), ids_keep)


class Decoder(nn.Module):
    """MAE decoder / M2D predictor: Linear(D -> Dd), mask tokens scattered back to the grid, fixed sin-cos positions,
    Transformer blocks, LayerNorm, Linear(Dd -> out). With `window`, AudioMAE's local decoder (ref): CLS dropped,
    Swin-V2 blocks on (wf, wt) windows, every other block shifted by half a window along time; `depth` of them with
    width / 32 heads (ours: the reference always builds 16 blocks of 16 heads; MAM-CLAP uses 1 block)."""

    def __init__(self, in_dim, dim, depth, out_dim, grid, window=None):
        super().__init__()
        N = grid[0] * grid[1]
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer('pos_embed', torch.cat([torch.zeros(1, dim), sincos_pos_embed(dim, grid)])[None])  # (1, 1+N, Dd)
        heads = dim // 32  # (ours) head width 32, as the reference's 512-d decoder with 16 heads
        self.local = window is not None
        self.blocks = nn.ModuleList([WindowBlock(dim, heads, grid, window, window[1] // 2 if i % 2 else 0)
                                     if self.local else Block(dim, heads) for i in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim)
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
        if self.local:
            x = x[:, 1:]  # the local decoder drops CLS (ref)
        for blk in self.blocks:
            x = blk(x)
        x = self.pred(self.norm(x))
        return x if self.local else x[:, 1:]  # (B, N, out)


class AudioMAE(nn.Module):
    """AudioMAE pre-training and its variants from Xin+ 2023 (AudioMAE is their backbone).

    - AudioMAE: reconstruct the normalized pixels of the masked patches.
    - MAM-CLAP (target_dim set, §2.1, Fig. 1): the decoder g runs on [Z_v; mask tokens] and
      the head h (the decoder's last Linear + LayerNorm) maps ALL its outputs to the teacher
      width: visible predictions Y_v come from g's outputs at the visible positions, masked
      predictions Y_m from the mask tokens (our reading of Fig. 1: one g/h path for both).
    - SupMAM / SupMAM-CLAP (n_classes > 0, §2.2): a classifier on the mean of the visible
      encoder tokens G_v, Linear(D, 4D) -> BatchNorm -> ReLU -> Linear(4D, C) (ref: SupMAE).
    """

    def __init__(self, cfg: ViTConfig, mask_ratio=0.8, dec_dim=512, dec_depth=16, local_attn=True, n_classes=0,
                 tau=10.0, target_dim=0, multi_label=False):
        super().__init__()
        self.mask_ratio, self.tau, self.multi_label = mask_ratio, tau, multi_label
        self.encoder = ViT(cfg)
        self.decoder = Decoder(cfg.width, dec_dim, dec_depth, target_dim or cfg.patch ** 2, cfg.grid,
                               window=(4, 4) if local_attn else None)
        self.head_norm = nn.LayerNorm(target_dim) if target_dim else None  # h = Linear + LayerNorm (MAM-CLAP)
        D = cfg.width
        self.classifier = nn.Sequential(nn.Linear(D, 4 * D), nn.BatchNorm1d(4 * D), nn.ReLU(),
                                        nn.Linear(4 * D, n_classes)).apply(init_weights) if n_classes else None

    def predict(self, spec):
        """spec (B, 1, F, T) -> visible-token encoder outputs z (B, 1+K, D), predictions for every token (B, N, p*p;
        MAM-CLAP: (B, N, Dt) through h) and the mask (B, N), 1 = masked."""
        B, cfg = spec.shape[0], self.encoder.cfg
        ids_keep, _, ids_restore, mask = random_masking(B, cfg.grid[0] * cfg.grid[1], self.mask_ratio, spec.device)
        z = self.encoder(spec, ids_keep)  # (B, 1+K, D)
        pred = self.decoder(z, ids_restore)  # (B, N, p*p or Dt)
        return z, pred if self.head_norm is None else self.head_norm(pred), mask

    def forward(self, spec, y=None, target=None):
        """spec (B, 1, F, T); y (B, C) class targets (SupMAM); target (B, N, Dt) teacher map (MAM-CLAP) -> named terms."""
        z, pred, mask = self.predict(spec)
        if self.head_norm is None:
            terms = {'loss_rec': losses.mae_loss(pred, patchify(spec, self.encoder.cfg.patch), mask)}
        else:  # MAM-CLAP Eq. (1): visible and masked tokens, each averaged over its own count
            terms = {'loss_visible': losses.token_mse(pred, target, 1 - mask),
                     'loss_masked': losses.token_mse(pred, target, mask)}
        if self.classifier is not None:
            logits = self.classifier(z[:, 1:].mean(1))  # (B, C), from the visible tokens only (G_v)
            terms['loss_cls'] = losses.classification_loss(logits, y, self.multi_label, self.tau)  # SupMAM Eq. (2)
        return terms


# ---------------------------------------------------------------------------------------------
# M2D, M2D-CLAP and M2D2 (Niizumi+ 2023, 2024, 2025)

class M2D(nn.Module):
    """Masked Modeling Duo (M2D-CLAP §3.1, Fig. 1a), and M2D-CLAP (§3.2, Fig. 1b) when text_dim > 0.

    The online encoder sees the visible patches x_v; the predictor g (a decoder, 512-d, 8 blocks)
    fills in mask tokens and predicts z^_m for the masked ones. The target network xi = separate
    blocks + norm that share the online patch embedding, position embeddings and CLS token (ref)
    encodes ONLY the masked patches x_m, without gradients, and follows the online weights by EMA.
    M2D-CLAP adds an audio projector (D -> D -> D) on the mean of the visible tokens z_v and aligns it
    with frozen sentence embeddings s_t, which a Linear brings to the encoder width D when their width
    d_s differs (ref: the authors' M2D_CLAP_ViT; none for GTE-base with ViT-B, both 768-d).
    """

    def __init__(self, cfg: ViTConfig, mask_ratio=0.7, pred_dim=512, pred_depth=8, ema=(0.99995, 0.99999), text_dim=0):
        super().__init__()
        self.mask_ratio, self.ema = mask_ratio, ema
        D = cfg.width
        self.encoder = ViT(cfg)
        self.predictor = Decoder(D, pred_dim, pred_depth, D, cfg.grid)  # predicts target embeddings (D)
        # The reference initializes the target blocks independently (random), not as a copy of the
        # online ones; we do the same. They never get gradients: no DDP reduction, only the EMA.
        self.target_blocks = nn.ModuleList([Block(D, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.target_norm = nn.LayerNorm(D, eps=1e-6)
        self.target_blocks.apply(init_weights)
        self.target_blocks.requires_grad_(False)
        self.target_norm.requires_grad_(False)
        self.audio_proj = None
        if text_dim:  # the projectors keep PyTorch's default init, as the reference's (created after its init pass)
            self.audio_proj = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D))
            self.text_proj, self.logit_scale = text_side(text_dim, D)

    def predict(self, spec):
        """spec (B, 1, F, T) -> online outputs z (B, 1+K, D) of the visible patches, predictions z^_m and targets z_m
        (B, M, D) of the masked ones, and their indices ids_masked (B, M)."""
        B, enc = spec.shape[0], self.encoder
        ids_keep, ids_masked, ids_restore, _ = random_masking(B, enc.cfg.grid[0] * enc.cfg.grid[1], self.mask_ratio,
                                                              spec.device)
        x = enc.embed(spec)  # (B, N, D), shared by the online and target networks
        z = enc.encode(x, ids_keep)  # (B, 1+K, D) online, visible patches only
        pred = self.predictor(z, ids_restore)  # (B, N, D)
        pred = pred.gather(1, ids_masked[..., None].expand(-1, -1, pred.shape[2]))  # (B, M, D): z^_m
        with torch.no_grad():
            target = enc.encode(x.detach(), ids_masked, self.target_blocks, self.target_norm)[:, 1:]  # (B, M, D): z_m
        return z, pred, target, ids_masked

    def forward(self, spec, text=None):
        """spec (B, 1, F, T); text (B, d_s) sentence embeddings (M2D-CLAP) -> named terms."""
        z, pred, target, _ = self.predict(spec)
        terms = {'loss_m2d': losses.m2d_loss(pred, target)}  # M2D-CLAP Eq. (1)
        if self.audio_proj is not None:
            audio = self.audio_proj(z[:, 1:].mean(1))  # (B, D): s_a from the mean of the visible tokens
            terms.update(clap_terms(audio, self.text_proj(text), self.logit_scale))
        return terms

    @torch.no_grad()
    def update_target(self, step, total):
        """After optimizer step `step` (0-based) of `total`: EMA xi <- tau xi + (1 - tau) theta (M2D-CLAP §3.1), tau
        linear from ema[0] to ema[1] over the run (ref)."""
        tau = self.ema[0] + (self.ema[1] - self.ema[0]) * step / max(1, total - 1)
        online = [*self.encoder.blocks.parameters(), *self.encoder.norm.parameters()]
        target = [*self.target_blocks.parameters(), *self.target_norm.parameters()]
        torch._foreach_lerp_(target, online, 1 - tau)  # xi + (1 - tau)(theta - xi)


def clap_terms(audio, text, logit_scale):
    """M2D-CLAP Eq. (2)-(3) loss, plus the in-batch audio->text top-1 accuracy (per process) to watch."""
    with torch.no_grad():
        sim = F.normalize(audio.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T  # (B, B) cosine
        acc = (sim.argmax(1) == torch.arange(len(sim), device=sim.device)).float().mean()
    return {'loss_clap': losses.clap_loss(audio, text, logit_scale.exp()), 'acc_a2t': acc}


def text_side(text_dim, D):
    """text_proj (a Linear to the encoder width D when the widths differ, else Identity; ref) and the
    learnable logit scale 1/tau, initialized at 1/0.07 (CLIP's; M2D-CLAP §3.2)."""
    proj = nn.Linear(text_dim, D) if text_dim != D else nn.Identity()
    return proj, nn.Parameter(torch.tensor(math.log(1 / 0.07)))


@torch.no_grad()
def clamp_logit_scale(logit_scale):
    """After each optimizer step: keep exp(logit_scale) <= 100, so the logits are scaled by at most 100 (CLIP;
    M2D-CLAP §3.2)."""
    logit_scale.clamp_(0, math.log(100))


class AudioToSemantic(nn.Module):
    """M2D2 stage-2 audio projector (ref: M2D-CLAP 2025): a learned token prepended to all patch
    tokens, 1-4 single-head Transformer blocks (MLP ratio 1 for 1-2 blocks, 2 for 3-4), LayerNorm;
    the output is that token. Its LayerNorms keep PyTorch's default eps 1e-5, as the reference's."""

    def __init__(self, dim, depth=1):
        super().__init__()
        assert 1 <= depth <= 4, f"AudioToSemantic has 1-4 blocks, not {depth}"
        self.sem_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.sem_blocks = nn.ModuleList([Block(dim, 1, 1.0 if depth <= 2 else 2.0, eps=1e-5) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.apply(init_weights)

    def forward(self, x):
        """x (B, N, D) patch tokens -> (B, D)."""
        x = torch.cat([self.sem_token.expand(len(x), -1, -1), x], 1)  # (B, 1+N, D); no position embedding (ref)
        for blk in self.sem_blocks:
            x = blk(x)
        return self.norm(x[:, 0])


class CLAPStage2(nn.Module):
    """M2D2 stage 2 (our reading of the 2025 papers, with the released recipe's masking): CLAP on top of the
    stage-1 audio encoder.

    The encoder (frozen unless `unfreeze`) sees the patches left visible by `mask_ratio` (0.3 in stage 2, 0 in
    stage 2.1; all of them in evaluation); AudioToSemantic turns their tokens into the audio embedding; a trainable
    sentence encoder + text_proj (Linear to the encoder width when the widths differ) gives the text embedding; the
    loss is CLAP's only.
    """

    def __init__(self, cfg: ViTConfig, text_encoder=OFFLINE_TEXT_ENCODER, text_pooling=None, sem_depth=1,
                 unfreeze=False, mask_ratio=0.3):
        super().__init__()
        D, self.mask_ratio = cfg.width, mask_ratio
        self.encoder = ViT(cfg).requires_grad_(unfreeze)
        self.audio_proj = AudioToSemantic(D, sem_depth)
        self.text_encoder = SentenceEncoder(text_encoder, text_pooling)
        if self.text_encoder.pooling == 'eos':
            raise SystemExit(f"error: {text_encoder} (pooled by its own sentence-transformers code) cannot be trained in "
                             "stage 2; choose a transformers model (e.g. google-bert/bert-base-uncased, as the release)")
        self.text_proj, self.logit_scale = text_side(self.text_encoder.dim, D)

    def forward(self, spec, text):
        """spec (B, 1, F, T); text: list of B captions -> named terms."""
        ids_keep, (Fp, Tp) = None, self.encoder.cfg.grid
        if self.training and self.mask_ratio > 0:
            ids_keep = random_masking(len(spec), Fp * Tp, self.mask_ratio, spec.device)[0]  # (B, K)
        audio = self.audio_proj(self.encoder(spec, ids_keep)[:, 1:])  # (B, D) from the visible patch tokens
        return clap_terms(audio, self.text_proj(self.text_encoder(text)), self.logit_scale)
