"""Loss functions, one per objective. Pure: tensors in, scalar out; no module state.

Shapes: B batch, N tokens, P values per patch (p*p). Mask convention: mask (B, N), 1 = masked.
"""
import torch


def mae_loss(pred, target, mask, norm_pix=True, eps=1e-6):
    """AudioMAE / MAE reconstruction loss (He+ 2022 §3; AudioMAE §2).

    pred, target: (B, N, P) predicted and true patches; mask: (B, N), 1 = masked.
    With norm_pix, each target patch is normalized by its own mean and variance over its P
    values (ref: norm_pix_loss). Per-patch MSE, averaged over the masked patches only.
    """
    target = target.float()
    if norm_pix:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + eps) ** 0.5
    per_patch = (pred.float() - target).pow(2).mean(-1)  # (B, N)
    return (per_patch * mask).sum() / mask.sum()
