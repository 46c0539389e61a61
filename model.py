"""Audio ViT encoder, MAE decoder, masking, and the pre-training models.

Papers: AudioMAE (Huang+ 2022, "Masked Autoencoders that Listen"), MAE (He+ 2022),
MAM-CLAP, SupMAM, SupMAM-CLAP (Xin+ 2023, "Masked Audio Modeling with CLAP and Multi-Objective
Learning"); the CLAP teacher is LAION-CLAP's HTSAT-tiny (Wu+ 2023).
Shapes: spectrograms (B, 1, F, T); patch grid (F/p, T/p) = (Fp, Tp); N = Fp*Tp tokens flattened
frequency-major (index = f * Tp + t); K visible and M masked tokens; D encoder width,
Dd decoder width. Mask convention: mask (B, N), 1 = masked (hidden from the encoder).
"""
import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio

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
                 tau=10.0, target_dim=0):
        super().__init__()
        self.mask_ratio, self.tau = mask_ratio, tau
        self.encoder = ViT(cfg)
        self.decoder = Decoder(cfg.width, dec_dim, dec_depth, target_dim or cfg.patch ** 2, cfg.grid,
                               window=(4, 4) if local_attn else None)
        self.head_norm = nn.LayerNorm(target_dim) if target_dim else None  # h = Linear + LayerNorm (MAM-CLAP)
        D = cfg.width
        self.classifier = nn.Sequential(nn.Linear(D, 4 * D), nn.BatchNorm1d(4 * D), nn.ReLU(),
                                        nn.Linear(4 * D, n_classes)).apply(init_weights) if n_classes else None

    def forward(self, spec, y=None, target=None):
        """spec (B, 1, F, T); y labels (SupMAM); target (B, N, Dt) teacher map (MAM-CLAP) -> named loss terms."""
        B, cfg = spec.shape[0], self.encoder.cfg
        ids_keep, _, ids_restore, mask = random_masking(B, cfg.grid[0] * cfg.grid[1], self.mask_ratio, spec.device)
        z = self.encoder(spec, ids_keep)  # (B, 1+K, D)
        pred = self.decoder(z, ids_restore)  # (B, N, p*p or Dt)
        if self.head_norm is None:
            terms = {'loss_rec': losses.mae_loss(pred, patchify(spec, cfg.patch), mask)}
        else:  # MAM-CLAP Eq. (1): visible and masked tokens, each averaged over its own count
            pred = self.head_norm(pred)
            terms = {'loss_visible': losses.token_mse(pred, target, 1 - mask),
                     'loss_masked': losses.token_mse(pred, target, mask)}
        if self.classifier is not None:
            logits = self.classifier(z[:, 1:].mean(1))  # (B, C), from the visible tokens only (G_v)
            terms['loss_cls'] = losses.classification_loss(logits, y, self.tau)  # SupMAM Eq. (2)
        return terms


# ---------------------------------------------------------------------------------------------
# The MAM-CLAP teacher: LAION-CLAP's HTSAT-tiny audio branch

HTSAT_TINY = dict(model_type='HTSAT', model_name='tiny', sample_rate=48000, audio_length=1024, window_size=1024,
                  hop_size=480, fmin=50, fmax=14000, class_num=527, mel_bins=64, clip_samples=480000)


def create_htsat_tiny():
    """HTSAT-tiny from the laion-clap package, without importing `laion_clap` itself: its
    __init__ imports the training code, which downloads tokenizers at import time (SPEC §5)."""
    folder = os.path.dirname(importlib.util.find_spec('laion_clap').origin)  # locates, does not import
    if folder not in sys.path:
        sys.path.append(folder)
    from clap_module.htsat import create_htsat_model
    from clap_module.model import CLAPAudioCfp
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='torch.meshgrid')  # inside HTSAT's Swin blocks; harmless
        return create_htsat_model(CLAPAudioCfp(**HTSAT_TINY))


class CLAPTeacher(nn.Module):
    """Frozen CLAP audio encoder -> patch-level targets on the student's grid (MAM-CLAP §2.1).

    Input: the student's exact 16 kHz segment, resampled to 48 kHz on the device. HTSAT folds
    its 1024 frames x 64 mels into a 256x256 image (4 time chunks stacked along the height);
    its final stage is an 8x8 map = (4 chunks x 2 freq) x 8 time. Unfolding the chunks gives
    (2 freq, 32 time), resized bilinearly to (F/p, T/p) and flattened frequency-major (ours),
    then standardized per token (LayerNorm without affine, ours: h ends in a LayerNorm).
    """
    dim = 768

    def __init__(self, ckpt=None):
        super().__init__()
        self.htsat = create_htsat_tiny()
        if ckpt:
            state = torch.load(ckpt, map_location='cpu', weights_only=True)
            state = {k.removeprefix('module.'): v for k, v in state.get('state_dict', state).items()}
            load_state(self.htsat, {k[len('audio_branch.'):]: v for k, v in state.items() if k.startswith('audio_branch.')},
                       ckpt)
        else:
            print("WARNING: no --clap_ckpt: the CLAP teacher has RANDOM weights, so its targets are meaningless. "
                  "Fine for tests and demos; for real MAM-CLAP pass an official LAION-CLAP HTSAT-tiny checkpoint, "
                  "e.g. --clap_ckpt 630k-audioset-best.pt", file=sys.stderr)
        self.htsat.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        return super().train(False)  # always in eval mode (frozen BatchNorm, no SpecAugment)

    @torch.no_grad()
    def feature_map(self, wave):
        """wave (B, L) at 16 kHz -> HTSAT's final-stage map (B, 768, 2 freq, 32 time)."""
        h = self.htsat
        with torch.autocast(wave.device.type, enabled=False):  # front-end in fp32
            x = torchaudio.functional.resample(wave.float(), 16000, 48000)
            x = h.logmel_extractor(h.spectrogram_extractor(x))[:, :, :1024]  # (B, 1, T, 64); HTSAT takes <= 1024 frames
            x = h.bn0(x.transpose(1, 3)).transpose(1, 3)
            x = h.reshape_wav2img(x)  # (B, 1, 256, 256): time stretched to 1024 frames, folded into 4 chunks
        x = h.patch_embed(x)  # trunk under the caller's autocast
        if h.ape:
            x = x + h.absolute_pos_embed
        for layer in h.layers:
            x, _ = layer(x)
        x = h.norm(x).float()  # (B, 64, 768)
        B, _, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, 4, 2, 8)  # (B, C, chunk, freq, time)
        return x.permute(0, 1, 3, 2, 4).reshape(B, C, 2, 32)  # (B, C, 2 freq, 32 time): time fold undone

    def forward(self, wave, grid):
        """wave (B, L) at 16 kHz, grid (Fp, Tp) -> standardized targets (B, Fp*Tp, 768)."""
        x = F.interpolate(self.feature_map(wave), size=grid, mode='bilinear', align_corners=False)  # (B, C, Fp, Tp)
        return F.layer_norm(x.flatten(2).transpose(1, 2), (self.dim,))  # (B, N, 768)
