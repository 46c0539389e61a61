"""The fine-tuning augmentations of finetune.py, batched on the device: SpecAugment, random resize crop (ref: EVAR),
mixup, and patch-out (structured masking of the tokens)."""
import torch
import torch.nn.functional as F

from model import split_order

# Patch-out (fraction of time columns, of frequency rows) per front-end family: AudioMAE fine-tunes
# with 0.2/0.2 (ref); M2D masks 0.5 in total, split at random between rows and columns per batch
# (ref) -- we fix 0.4 of the columns and 0.2 of the rows (52 % masked), to keep one
# structured-masking rule (ours).
PATCHOUT = {'fbank128': (0.2, 0.2), 'mel80': (0.4, 0.2)}


def spec_augment(spec, max_f, max_t):
    """SpecAugment: one frequency band of width U[0, max_f) and one time band of width U[0, max_t) per sample
    set to 0 (the normalized mean), batched."""
    B, _, Fd, T = spec.shape
    keep = torch.ones(B, 1, Fd, T, dtype=torch.bool, device=spec.device)
    for size, max_w, axis in ((Fd, max_f, 2), (T, max_t, 3)):
        w = (torch.rand(B, device=spec.device) * min(max_w, size)).long()
        start = (torch.rand(B, device=spec.device) * (size - w + 1)).long()
        pos = torch.arange(size, device=spec.device)
        band = (pos >= start[:, None]) & (pos < (start + w)[:, None])  # (B, size)
        keep &= ~band.view(B, 1, size, 1) if axis == 2 else ~band.view(B, 1, 1, size)
    return spec * keep


def random_resize_crop(spec, canvas=(1.0, 1.5), scale=(0.6, 1.5)):
    """Random resize crop (ref: EVAR RandomResizeCrop), batched: the input sits centered on a zero canvas
    (1x its height, 1.5x its width); a random box of 0.6-1.5x the input's size (within the canvas) is
    resized back to the input's size with bicubic interpolation."""
    B, _, H, W = spec.shape
    dev = spec.device
    ch, cw = int(H * canvas[0]), int(W * canvas[1])
    h = (torch.empty(B, device=dev).uniform_(*scale) * H).long().clamp(1, ch)
    w = (torch.empty(B, device=dev).uniform_(*scale) * W).long().clamp(1, cw)
    i = (torch.rand(B, device=dev) * (ch - h + 1)).long() - (ch - H) // 2  # box origin in input coordinates
    j = (torch.rand(B, device=dev) * (cw - w + 1)).long() - (cw - W) // 2
    u = torch.linspace(0, 1, H, device=dev)
    v = torch.linspace(0, 1, W, device=dev)
    ys = i[:, None] + u[None] * (h - 1)[:, None]  # (B, H) source rows
    xs = j[:, None] + v[None] * (w - 1)[:, None]  # (B, W) source columns
    grid = torch.stack([(2 * xs / max(W - 1, 1) - 1)[:, None, :].expand(B, H, W),
                        (2 * ys / max(H - 1, 1) - 1)[:, :, None].expand(B, H, W)], -1)  # (B, H, W, 2) as (x, y)
    return F.grid_sample(spec, grid, mode='bicubic', padding_mode='zeros', align_corners=True)


def mixup(spec, y, alpha):
    """Per-sample mixup with lambda ~ Beta(alpha, alpha) on inputs and targets."""
    lam = torch.distributions.Beta(alpha, alpha).sample((len(spec),)).to(spec.device)
    perm = torch.randperm(len(spec), device=spec.device)
    return (lam.view(-1, 1, 1, 1) * spec + (1 - lam.view(-1, 1, 1, 1)) * spec[perm],
            lam[:, None] * y + (1 - lam[:, None]) * y[perm])


def structured_masking(B, grid, t_ratio, f_ratio, device):
    """Mask whole time columns and frequency rows (fine-tuning patch-out); same K for every sample.
    Returns as random_masking, the visible tokens in grid order."""
    Fp, Tp = grid
    nf, nt = int(Fp * f_ratio), int(Tp * t_ratio)
    rows = torch.rand(B, Fp, device=device).argsort(1) < nf  # (B, Fp) nf random rows masked
    cols = torch.rand(B, Tp, device=device).argsort(1) < nt  # (B, Tp) nt random columns masked
    mask = (rows[:, :, None] | cols[:, None, :]).flatten(1)  # (B, N)
    ids_shuffle = mask.int().argsort(dim=1, stable=True)  # visible tokens first, in grid order
    return split_order(ids_shuffle, (Fp - nf) * (Tp - nt))
