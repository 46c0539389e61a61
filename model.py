"""Audio ViT encoder, MAE decoder, masking, and the pre-training models.

Papers: AudioMAE (Huang+ 2022, "Masked Autoencoders that Listen"), MAE (He+ 2022);
MAM-CLAP, SupMAM, SupMAM-CLAP (Xin+ 2023, "Masked Audio Modeling with CLAP and Multi-Objective
Learning"; their CLAP teacher is in tools/htsat.py); M2D (Niizumi+ 2023, "Masked Modeling Duo"),
M2D-CLAP (Niizumi+ 2024) and M2D2 (Niizumi+ / Nguyen+ 2025), with sentence encoders.

Read bottom-up: patches, positions and masking; the Transformer block; the encoder and the decoder
(whose local-attention variant, AudioMAE's, uses the Swin-V2 block of tools/swin.py); then one class
per method family, whose forward returns (losses, metrics): the named loss terms train.py weights
and sums, and what is only logged.

Shapes: spectrograms (B, 1, F, T); patch grid (F/p, T/p) = (Fp, Tp); N = Fp*Tp tokens,
frequency-major (token index = f * Tp + t); K visible and M masked tokens; D encoder width,
Dd decoder width, d_s sentence-embedding width (the audio-text space has width D).
Mask convention: mask (B, N), 1 = masked (hidden from the encoder), 0 = visible.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import losses
from tools.kernels import BatchNormAcrossRanks, attention
from tools.sentence import SentenceEncoder


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
        """(Fp, Tp). A time length that is not a multiple of p loses its last n_frames % p frames,
        as in the strided patch conv (ref: M2D-CLAP 2025's 80x1001 inputs, a 5x62 grid)."""
        assert self.n_mels % self.patch == 0, f"{self.n_mels} mel bins: not divisible by patch {self.patch}"
        return self.n_mels // self.patch, self.n_frames // self.patch


VIT_PRESETS = {
    'vit_tiny': dict(width=192, depth=12, heads=3),
    'vit_small': dict(width=384, depth=12, heads=6),
    'vit_base': dict(width=768, depth=12, heads=12),  # the papers' encoder
}


# ---------------------------------------------------------------------------------------------
# Patches, positions and masking (MAE §3; AudioMAE §2)

def patchify(spec, p):
    """(B, 1, F, T) -> (B, N, p*p): tokens frequency-major (index f * Tp + t); the p*p values of a
    patch in (freq, time) order, i.e. the patch's rows one after another (as the patch conv's
    weight)."""
    B, _, Fd, Td = spec.shape
    assert Fd % p == 0 and Td % p == 0, f"spectrogram {Fd}x{Td} is not divisible by patch size {p}"
    x = spec.reshape(B, Fd // p, p, Td // p, p).permute(0, 1, 3, 2, 4)  # (B, Fp, Tp, p, p)
    return x.reshape(B, (Fd // p) * (Td // p), p * p)


def unpatchify(x, p, grid):
    """(B, N, p*p) -> (B, 1, F, T); inverse of patchify."""
    B, (Fp, Tp) = x.shape[0], grid
    x = x.reshape(B, Fp, Tp, p, p).permute(0, 1, 3, 2, 4)  # (B, Fp, p, Tp, p)
    return x.reshape(B, 1, Fp * p, Tp * p)


def sincos_pos_embed(dim, grid):
    """Fixed 2-D sin-cos position embeddings (N, dim) on the (Fp, Tp) grid, float32, row f * Tp + t.

    Layout of MAE/M2D's get_2d_sincos_pos_embed: channels [sin(t w), cos(t w), sin(f w), cos(f w)],
    dim/4 each, with frequencies w_k = 1 / 10000^(k / (dim/4)), k = 0 .. dim/4 - 1: the first half
    encodes the time index t, the second the frequency index f. Computed in float64.
    """
    assert dim % 4 == 0, "position embedding width must be divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)

    def embed_1d(pos):
        out = pos.double()[:, None] * omega[None]  # (N, dim/4)
        return torch.cat([out.sin(), out.cos()], 1)  # (N, dim/2)

    f, t = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing='ij')  # (Fp, Tp)
    return torch.cat([embed_1d(t.flatten()), embed_1d(f.flatten())], 1).float()  # (N, dim)


def split_order(ids_shuffle, K):
    """The first K tokens of each row's order are visible. Returns ids_keep (B, K), ids_masked (B,
    M), ids_restore (B, N) = the inverse permutation, mask (B, N) float (1 = masked)."""
    ids_restore = ids_shuffle.argsort(1)  # position of each token in the shuffled order
    mask = (ids_restore >= K).float()  # 1 = masked
    return ids_shuffle[:, :K], ids_shuffle[:, K:], ids_restore, mask


def random_masking(B, N, ratio, device):
    """Unstructured per-sample masking (MAE §3): for each sample, a uniformly random subset of
    exactly K = int(N * (1 - ratio)) tokens stays visible, independently of the other samples.

    Returns ids_keep (B, K) and ids_masked (B, M = N - K), token indices in any order; ids_restore
    (B, N), the inverse of the order [ids_keep, ids_masked]: cat([ids_keep, ids_masked],
    1).gather(1, ids_restore) == arange(N) (the decoder un-shuffles with it); and mask (B, N) float,
    1 = masked. Draws from torch's global RNG on `device` (ref: MAE, argsort of uniform noise).
    """
    K = int(N * (1 - ratio))
    return split_order(torch.rand(B, N, device=device).argsort(1), K)


def init_weights(m):
    """xavier-uniform Linear (and patch conv, treated as a Linear), zero biases (ref: MAE)."""
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------
# The Transformer block (ViT; timm's key names)

class Attention(nn.Module):
    """Multi-head self-attention: qkv = Linear(D, 3D), split as (3, heads, D/heads) along the
    output; softmax(q k^T / sqrt(D/heads)) v per head; heads concatenated, then Linear(D, D)."""

    def __init__(self, dim, heads):
        super().__init__()
        assert dim % heads == 0, f"width {dim} is not divisible by {heads} heads"
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        """x (B, L, D) -> (B, L, D)."""
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, h, L, D/h)
        x = attention(q, k, v).transpose(1, 2)  # (B, L, h, D/h)
        return self.proj(x.reshape(B, L, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden, out=None, act=nn.GELU, drop=0.0):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), act(), nn.Linear(hidden, out or dim)
        self.drop = nn.Dropout(drop) if drop else nn.Identity()

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm1(x)), then + mlp(norm2(x)); LayerNorm eps 1e-6."""

    def __init__(self, dim, heads, mlp_ratio=4.0, eps=1e-6):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=eps), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=eps), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        """x (B, L, D) -> (B, L, D)."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# ---------------------------------------------------------------------------------------------
# The encoder and the decoder

class PatchEmbed(nn.Conv2d):
    """The patch embedding, Conv2d(1, D, p, stride=p) (ViT §3.1), applied as the Linear on flattened
    patches that it is: (B, 1, F, T) -> (B, N, D) in patchify's order. (ours) oneDNN's AMX bf16
    convolution (CPU, torch 2.11) returned NaN for some short inputs; the matmul does not."""

    def forward(self, spec):
        w = self.weight.flatten(1)  # (D, p*p), pixels in (freq, time) order like patchify's
        return F.linear(patchify(spec, self.kernel_size[0]), w, self.bias)


class ViT(nn.Module):
    """Audio ViT encoder that runs on visible tokens only."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D, N = cfg.width, cfg.grid[0] * cfg.grid[1]
        self.patch_embed = PatchEmbed(1, D, cfg.patch, stride=cfg.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        pos = torch.cat([torch.zeros(1, D), sincos_pos_embed(D, cfg.grid)])  # CLS: zeros (ref: M2D)
        self.register_buffer('pos_embed', pos[None])  # (1, 1+N, D), fixed
        self.blocks = nn.ModuleList([Block(D, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(D, eps=1e-6) if cfg.final_norm else nn.Identity()
        self.apply(init_weights)
        nn.init.normal_(self.cls_token, std=0.02)
        assert self.pos_embed.shape[1] == 1 + N

    def embed(self, spec):
        """(B, 1, F, T) -> patch tokens plus position embeddings (B, Fp*t, D), t = T // p columns.

        An input shorter than the model's uses the first t columns of the position table (ref: M2D
        runtime)."""
        (Fp, Tp), t = self.cfg.grid, spec.shape[3] // self.cfg.patch
        assert spec.shape[2] == self.cfg.n_mels and 0 < t <= Tp, \
            f"input {tuple(spec.shape[2:])} does not fit the model's {(self.cfg.n_mels, self.cfg.n_frames)}"
        x = self.patch_embed(spec[..., :t * self.cfg.patch])  # (B, Fp*t, D)
        pos = self.pos_embed[:, 1:].unflatten(1, (Fp, Tp))[:, :, :t].flatten(1, 2)  # (1, Fp*t, D)
        return x + pos

    def encode(self, x, ids=None, blocks=None, norm=None):
        """Patch tokens x (B, N, D) (positions already added), the ones to encode ids (B, K) or None
        for all -> (B, 1+K, D): the CLS token (cls_token plus the position table's row 0) first, then
        the tokens of ids in the order of ids, through the blocks and the norm.

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
        """spec (B, 1, F, T), ids_keep (B, K) or None for all tokens -> (B, 1+K, D) with CLS
        first."""
        return self.encode(self.embed(spec), ids_keep)


class Decoder(nn.Module):
    """MAE decoder / M2D predictor (MAE §3): Linear(D -> Dd), mask tokens, fixed sin-cos positions,
    Transformer blocks, LayerNorm, Linear(Dd -> out). With `window`, AudioMAE's local decoder (ref):
    CLS dropped before the blocks, Swin-V2 blocks on (wf, wt) windows, every other block shifted by
    half a window along time; `depth` of them with width / 32 heads (ours: the reference always
    builds 16 blocks of 16 heads; MAM-CLAP uses 1 block)."""

    def __init__(self, in_dim, dim, depth, out_dim, grid, window=None):
        super().__init__()
        N = grid[0] * grid[1]
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        pos = torch.cat([torch.zeros(1, dim), sincos_pos_embed(dim, grid)])
        self.register_buffer('pos_embed', pos[None])  # (1, 1+N, Dd), CLS first
        heads = dim // 32  # (ours) head width 32, as the reference's 512-d decoder with 16 heads
        self.local = window is not None
        # AudioMAE's local decoder (tools/swin.py builds on this file's Mlp: imported here)
        if self.local:
            from tools.swin import WindowBlock
            self.blocks = nn.ModuleList([WindowBlock(dim, heads, grid, window, window[1] // 2 if i % 2 else 0)
                                         for i in range(depth)])
        else:
            self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim)
        self.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)
        assert self.pos_embed.shape[1] == 1 + N

    def forward(self, x, ids_restore):
        """x (B, 1+K, D) encoder output (CLS, then the visible tokens in ids_keep order),
        ids_restore (B, N) from random_masking -> predictions for all N tokens (B, N, out), in grid
        order.

        The K embedded visible tokens followed by M mask tokens are put back in grid order by
        ids_restore; then the position table is added (CLS gets its zero row) and the blocks run.
        """
        x = self.embed(x)  # (B, 1+K, Dd)
        (B, N), Dd = ids_restore.shape, x.shape[2]
        masked = self.mask_token.expand(B, N + 1 - x.shape[1], -1).to(x.dtype)  # (B, M, Dd)
        tokens = torch.cat([x[:, 1:], masked], 1)  # (B, N, Dd), shuffled order
        tokens = tokens.gather(1, ids_restore[..., None].expand(-1, -1, Dd))  # (B, N, Dd) grid order
        x = torch.cat([x[:, :1], tokens], 1) + self.pos_embed  # (B, 1+N, Dd)
        if self.local:
            x = x[:, 1:]  # the local decoder drops CLS (ref)
        for blk in self.blocks:
            x = blk(x)
        x = self.pred(self.norm(x))
        return x if self.local else x[:, 1:]  # (B, N, out)


# ---------------------------------------------------------------------------------------------
# AudioMAE, MAM-CLAP, SupMAM, SupMAM-CLAP (Huang+ 2022; Xin+ 2023)

class AudioMAE(nn.Module):
    """AudioMAE pre-training and its variants from Xin+ 2023 (AudioMAE is their backbone).

    - target 'patches' (AudioMAE, SupMAM): reconstruct the normalized pixels of the masked patches.
    - target 'clap' (MAM-CLAP, SupMAM-CLAP; §2.1, Fig. 1): the decoder g runs on [Z_v; mask tokens]
      and the head h (the decoder's last Linear + a LayerNorm) maps ALL its outputs to the teacher
      width Dt: predictions Y_v at the visible positions, Y_m from the mask tokens (our reading of
      Fig. 1: one g/h path for both).
    - n_classes > 0 (SupMAM, SupMAM-CLAP; §2.2): a classifier on the mean of the visible encoder
      tokens G_v, Linear(D, 4D) -> BatchNorm -> ReLU -> Linear(4D, C) (ref: SupMAE), temperature tau.
    """

    def __init__(self, cfg: ViTConfig, mask_ratio, dec_dim, dec_depth, local_attn, target='patches',
                 target_dim=None, n_classes=0, tau=None, multi_label=False):
        super().__init__()
        self.mask_ratio, self.target = mask_ratio, target
        self.classify, self.tau, self.multi_label = n_classes > 0, tau, multi_label
        self.encoder = ViT(cfg)
        out_dim = cfg.patch ** 2 if target == 'patches' else target_dim  # a patch's pixels, or Dt
        self.decoder = Decoder(cfg.width, dec_dim, dec_depth, out_dim, cfg.grid,
                               window=(4, 4) if local_attn else None)
        if target == 'clap':
            self.head_norm = nn.LayerNorm(target_dim)  # h = the decoder's Linear + LayerNorm
        if self.classify:
            D = cfg.width
            # (ours) BatchNorm over all DDP processes' batch: data-parallel training equals one process
            self.classifier = nn.Sequential(nn.Linear(D, 4 * D), BatchNormAcrossRanks(4 * D), nn.ReLU(),
                                            nn.Linear(4 * D, n_classes)).apply(init_weights)

    def predict(self, spec):
        """spec (B, 1, F, T) -> the visible tokens' encoder outputs z (B, 1+K, D) (CLS, then ids_keep's
        order), the decoder's predictions for every token in grid order (B, N, p*p; target 'clap': h's,
        (B, N, Dt), head_norm applied to all N) and the mask (B, N), 1 = masked. The masks come from
        random_masking(B, N, self.mask_ratio, device), one call."""
        B, cfg = spec.shape[0], self.encoder.cfg
        ids_keep, _, ids_restore, mask = random_masking(B, cfg.grid[0] * cfg.grid[1], self.mask_ratio,
                                                        spec.device)
        z = self.encoder(spec, ids_keep)  # (B, 1+K, D)
        pred = self.decoder(z, ids_restore)  # (B, N, p*p or Dt)
        return z, pred if self.target == 'patches' else self.head_norm(pred), mask

    def forward(self, spec, y=None, target=None):
        """spec (B, 1, F, T); y (B, C) class targets (SupMAM); target (B, N, Dt) the teacher's map
        (MAM-CLAP) -> (losses, metrics), from one predict: losses {'loss_rec'} (target 'patches':
        mae_loss against patchify(spec)) or {'loss_visible', 'loss_masked'} (target 'clap': Eq. 1),
        plus 'loss_cls' when classifying (the classifier on the mean of z's K visible tokens, CLS
        left out); metrics {}."""
        z, pred, mask = self.predict(spec)
        if self.target == 'patches':  # AudioMAE §2 (MAE §3): norm-pix MSE on the masked patches
            patches = patchify(spec, self.encoder.cfg.patch)
            terms = {'loss_rec': losses.mae_loss(pred, patches, mask)}
        else:  # MAM-CLAP Eq. (1): visible and masked tokens, each averaged over its own count
            visible, masked = losses.mam_clap_loss(pred, target, mask)
            terms = {'loss_visible': visible, 'loss_masked': masked}
        if self.classify:  # SupMAM Eq. (2): CE(p_v / tau, y) from the visible tokens only (G_v)
            logits = self.classifier(z[:, 1:].mean(1))  # (B, C)
            terms['loss_cls'] = losses.classification_loss(logits, y, self.multi_label, self.tau)
        return terms, {}

    def after_step(self, step, total_steps):
        """Nothing to update between optimizer steps (M2D updates its target network here)."""


# ---------------------------------------------------------------------------------------------
# M2D, M2D-CLAP and M2D2 (Niizumi+ 2023, 2024, 2025)

class M2D(nn.Module):
    """Masked Modeling Duo (M2D-CLAP §3.1, Fig. 1a), and M2D-CLAP (§3.2, Fig. 1b) with `clap`.

    The online encoder sees the visible patches x_v; the predictor (a decoder: 512-d, 8 blocks in
    the papers) fills in mask tokens and predicts z^_m for the masked ones. The target network xi
    (separate blocks + norm that share the online patch embedding, position embeddings and CLS
    token; ref) encodes ONLY the masked patches, without gradients, and follows the online weights
    by an EMA with decay alpha, linear from alpha[0] to alpha[1] over the run (ref). M2D-CLAP adds
    an audio projector (D -> D -> D) on the mean of the visible tokens z_v and aligns it with frozen
    sentence embeddings s_t (width text_dim), which a Linear brings to the encoder width D when the
    widths differ (ref: the authors' M2D_CLAP_ViT; none for GTE-base with ViT-B, both 768-d).
    """

    def __init__(self, cfg: ViTConfig, mask_ratio, pred_dim, pred_depth, alpha, clap=False, text_dim=None):
        super().__init__()
        self.mask_ratio, self.alpha, self.clap = mask_ratio, alpha, clap
        D = cfg.width
        self.encoder = ViT(cfg)
        self.predictor = Decoder(D, pred_dim, pred_depth, D, cfg.grid)  # predicts the targets (D)
        # The reference initializes the target blocks on their own (random), not as a copy of the
        # online ones; so do we. They never get gradients: no DDP reduction, only the EMA.
        self.target_blocks = nn.ModuleList([Block(D, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.target_norm = nn.LayerNorm(D, eps=1e-6)
        self.target_blocks.apply(init_weights)
        self.target_blocks.requires_grad_(False)
        self.target_norm.requires_grad_(False)
        # the projectors keep PyTorch's default init, as the reference's (made after its init pass)
        if clap:
            self.audio_proj = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D))
            self.text_proj, self.logit_scale = text_side(text_dim, D)

    def predict(self, spec):
        """spec (B, 1, F, T) -> online outputs z (B, 1+K, D) of the visible patches (CLS, then
        ids_keep's order), predictions z^_m and targets z_m (B, M, D) of the masked ones, both in the
        order of the returned ids_masked (B, M) (any order, the same for both), and ids_masked. The
        masks come from random_masking(B, N, self.mask_ratio, device), one call. The targets are the
        target network's outputs (encode with target_blocks and target_norm, on the masked patches
        only, no gradient) without CLS, not yet standardized."""
        B, enc = spec.shape[0], self.encoder
        ids_keep, ids_masked, ids_restore, _ = random_masking(B, enc.cfg.grid[0] * enc.cfg.grid[1],
                                                              self.mask_ratio, spec.device)
        x = enc.embed(spec)  # (B, N, D), shared by the online and target networks
        z = enc.encode(x, ids_keep)  # (B, 1+K, D) online, visible patches only
        pred = self.predictor(z, ids_restore)  # (B, N, D) grid order
        pred = pred.gather(1, ids_masked[..., None].expand(-1, -1, pred.shape[2]))  # (B, M, D) z^_m
        with torch.no_grad():
            target = enc.encode(x.detach(), ids_masked, self.target_blocks, self.target_norm)
        return z, pred, target[:, 1:], ids_masked  # target (B, M, D): z_m

    def forward(self, spec, text=None):
        """spec (B, 1, F, T); text (B, d_s) sentence embeddings (M2D-CLAP) -> (losses, metrics)."""
        z, pred, target, _ = self.predict(spec)
        terms, metrics = {'loss_m2d': losses.m2d_loss(pred, target)}, {}  # M2D-CLAP Eq. (1)
        if self.clap:  # M2D-CLAP Eq. (2)-(3): s_a from the mean of the visible tokens against s_t
            audio = self.audio_proj(z[:, 1:].mean(1))  # (B, D)
            terms['loss_clap'], metrics['acc_a2t'] = clap_terms(audio, self.text_proj(text), self.logit_scale)
        return terms, metrics

    @torch.no_grad()
    def update_target(self, step, total_steps):
        """After optimizer step `step` (0-based) of `total_steps`: xi <- alpha xi + (1 - alpha)
        theta (M2D-CLAP §3.1) for every parameter of the target blocks and norm, theta the online
        encoder's blocks and norm; alpha = alpha[0] at step 0, alpha[1] at the last step, linear in
        between (ref)."""
        alpha = self.alpha[0] + (self.alpha[1] - self.alpha[0]) * step / max(1, total_steps - 1)
        online = [*self.encoder.blocks.parameters(), *self.encoder.norm.parameters()]
        target = [*self.target_blocks.parameters(), *self.target_norm.parameters()]
        torch._foreach_lerp_(target, online, 1 - alpha)  # xi + (1 - alpha)(theta - xi)

    def after_step(self, step, total_steps):
        """The EMA target (M2D-CLAP §3.1); with CLAP, the temperature's clip (§3.2)."""
        self.update_target(step, total_steps)
        if self.clap:
            clamp_logit_scale(self.logit_scale)


def clap_terms(audio, text, logit_scale):
    """(M2D-CLAP Eq. (2)-(3) loss, the in-batch audio->text top-1 accuracy per process, to watch)."""
    with torch.no_grad():
        audio_n, text_n = F.normalize(audio.float(), dim=-1), F.normalize(text.float(), dim=-1)
        sim = audio_n @ text_n.T  # (B, B) cosine
        acc = (sim.argmax(1) == torch.arange(len(sim), device=sim.device)).float().mean()
    return losses.clap_loss(audio, text, logit_scale.exp()), acc


def text_side(text_dim, D):
    """text_proj (a Linear to the encoder width D when the widths differ, else Identity; ref) and
    the learnable logit scale log(1/tau), 1/tau initialized at 1/0.07 (CLIP's; M2D-CLAP §3.2)."""
    proj = nn.Linear(text_dim, D) if text_dim != D else nn.Identity()
    return proj, nn.Parameter(torch.tensor(math.log(1 / 0.07)))


@torch.no_grad()
def clamp_logit_scale(logit_scale):
    """After each optimizer step, in place: logit_scale (= log(1/tau)) into [0, log(100)], so the
    logits are scaled by at most 100 (CLIP; M2D-CLAP §3.2)."""
    logit_scale.clamp_(0, math.log(100))


class AudioToSemantic(nn.Module):
    """M2D2 stage-2 audio projector (ref: M2D-CLAP 2025): a learned token prepended to all patch
    tokens, 1-4 single-head Transformer blocks (MLP ratio 1 for 1-2 blocks, 2 for 3-4), LayerNorm;
    the output is that token. Its LayerNorms keep PyTorch's default eps 1e-5, as the reference's."""

    def __init__(self, dim, depth=1):
        super().__init__()
        assert 1 <= depth <= 4, f"AudioToSemantic has 1-4 blocks, not {depth}"
        self.sem_token = nn.Parameter(torch.zeros(1, 1, dim))
        ratio = 1.0 if depth <= 2 else 2.0
        self.sem_blocks = nn.ModuleList([Block(dim, 1, ratio, eps=1e-5) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.apply(init_weights)

    def forward(self, x):
        """x (B, N, D) patch tokens -> (B, D)."""
        x = torch.cat([self.sem_token.expand(len(x), -1, -1), x], 1)  # (B, 1+N, D), no positions (ref)
        for blk in self.sem_blocks:
            x = blk(x)
        return self.norm(x[:, 0])


class CLAPStage2(nn.Module):
    """M2D2 stage 2 (our reading of the 2025 papers, with the released recipe's masking): CLAP on
    top of the stage-1 audio encoder.

    The encoder (frozen unless `unfreeze`) sees the patches left visible by `mask_ratio` (0.3 in
    stage 2, 0 in stage 2.1; all of them in evaluation); AudioToSemantic turns their tokens into the
    audio embedding; a trainable sentence encoder + text_proj (Linear to the encoder width when the
    widths differ) gives the text embedding; the loss is CLAP's only.
    """

    def __init__(self, cfg: ViTConfig, text_encoder, text_pooling, sem_depth, unfreeze, mask_ratio):
        super().__init__()
        D, self.mask_ratio = cfg.width, mask_ratio
        self.encoder = ViT(cfg).requires_grad_(unfreeze)
        self.audio_proj = AudioToSemantic(D, sem_depth)
        self.text_encoder = SentenceEncoder(text_encoder, text_pooling)
        if self.text_encoder.pooling == 'eos':
            raise ValueError(f"{text_encoder} (pooled by its own sentence-transformers code) cannot be "
                             "trained in stage 2; choose a transformers model (e.g. "
                             "google-bert/bert-base-uncased, as the release)")
        self.text_proj, self.logit_scale = text_side(self.text_encoder.dim, D)

    def forward(self, spec, text):
        """spec (B, 1, F, T); text: list of B captions -> (losses, metrics)."""
        ids_keep, (Fp, Tp) = None, self.encoder.cfg.grid
        if self.training and self.mask_ratio > 0:
            ids_keep = random_masking(len(spec), Fp * Tp, self.mask_ratio, spec.device)[0]  # (B, K)
        audio = self.audio_proj(self.encoder(spec, ids_keep)[:, 1:])  # (B, D), visible patch tokens
        text = self.text_proj(self.text_encoder(text))  # (B, D)
        loss, acc = clap_terms(audio, text, self.logit_scale)  # M2D-CLAP Eq. (2)-(3)
        return {'loss_clap': loss}, {'acc_a2t': acc}

    def after_step(self, step, total_steps):
        """The temperature's clip (M2D-CLAP §3.2)."""
        clamp_logit_scale(self.logit_scale)
