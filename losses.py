"""Loss functions, one per objective. Pure: tensors in, scalar out; no module state.

Shapes: B batch, N tokens, P values per patch (p*p). Mask convention: mask (B, N), 1 = masked.
"""
import torch
import torch.nn.functional as F


def token_mse(pred, target, weight):
    """Per-token squared error (mean over the feature dim), averaged over the tokens with weight 1.

    pred, target: (B, N, P); weight: (B, N) 0/1 selecting the tokens. The building block of
    AudioMAE's loss (masked tokens) and of MAM-CLAP Eq. (1) (visible and masked tokens).
    """
    per_token = (pred.float() - target.float()).pow(2).mean(-1)  # (B, N)
    return (per_token * weight).sum() / weight.sum().clamp_min(1)


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
    return token_mse(pred, target, mask)


def classification_loss(logits, y, tau=10.0):
    """SupMAM Eq. (2): CE(logits / tau, y).

    logits: (B, C). y: (B,) class indices for single-label data (cross-entropy), or (B, C)
    multi-hot floats for multi-label data (binary cross-entropy, ours: the paper writes CE).
    """
    logits = logits.float() / tau
    if y.dtype == torch.long:
        return F.cross_entropy(logits, y)
    return F.binary_cross_entropy_with_logits(logits, y.float())
