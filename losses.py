"""Loss functions, one per objective, and the evaluation metrics. Pure: tensors in, tensors out.

Shapes: B batch, N tokens, M masked tokens, P values per patch (p*p), D feature width, E joint
audio-text width, C classes. Mask convention: mask (B, N), 1 = masked. Every loss is computed in
float32 whatever the input dtype (bf16 under autocast) and returns a 0-dim tensor.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed._functional_collectives import all_gather_tensor_autograd


def token_mse(pred, target, weight):
    """Per-token squared error averaged over the feature dim, then averaged over the tokens with
    weight 1: sum_bn w_bn * mean_d (pred - target)^2 / max(sum_bn w_bn, 1).

    pred, target: (B, N, P); weight: (B, N) 0/1 selecting the tokens. The building block of
    AudioMAE's loss (masked tokens) and of MAM-CLAP Eq. (1) (visible and masked tokens).
    """
    per_token = (pred.float() - target.float()).pow(2).mean(-1)  # (B, N)
    return (per_token * weight).sum() / weight.sum().clamp_min(1)


def mae_loss(pred, target, mask, norm_pix=True, eps=1e-6):
    """AudioMAE / MAE reconstruction loss (He+ 2022 §3; AudioMAE §2).

    pred, target: (B, N, P) predicted and true patches; mask: (B, N), 1 = masked. With norm_pix,
    each target patch is first normalized by its own mean and variance over its P values:
    (x - mean) / sqrt(var + eps), var the unbiased variance (torch.var's default; ref:
    norm_pix_loss; the biased one is as good a reading of the paper). Then per-patch MSE (mean over
    P), averaged over the masked patches only (token_mse).
    """
    target = target.float()
    if norm_pix:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + eps) ** 0.5
    return token_mse(pred, target, mask)


def mam_clap_loss(pred, target, mask):
    """MAM-CLAP Eq. (1): (L_v, L_m), the MSE between the head's outputs Y and the CLAP teacher's map
    T over the visible tokens and over the masked tokens, each averaged over its own count (l_v,
    l_m) and over the feature dim (token_mse). pred, target: (B, N, Dt); mask: (B, N), 1 = masked.
    The objective is L_v + L_m."""
    return token_mse(pred, target, 1 - mask), token_mse(pred, target, mask)


def classification_loss(logits, y, multi_label, tau=1.0):
    """SupMAM Eq. (2): CE(logits / tau, y), averaged over the batch; also the downstream heads' loss
    (tau 1).

    logits: (B, C). y: (B, C) float targets: class probabilities for single-label data (one-hot,
    or soft after mixup: cross-entropy with probabilities), multi-hot for multi-label data (binary
    cross-entropy with logits, mean over B and C; ours: the paper writes CE).
    """
    logits = logits.float() / tau
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, y.float())
    return F.cross_entropy(logits, y.float())


def m2d_loss(pred, target, eps=1e-6):
    """M2D loss, M2D-CLAP Eq. (1): 2 - 2 cos(z^_m, z~_m), averaged over all B*M masked tokens.

    pred: (B, M, D) online predictions z^_m; target: (B, M, D) target outputs z_m for the same
    tokens in the same order. The target is standardized per token over D first,
    z~_m = (z_m - mean) / sqrt(var + eps) with the unbiased variance (ref: norm_pix_loss; the cosine
    ignores its scale, so the variance convention does not matter). The target has no gradient
    (M2D.predict computes it under no_grad).
    """
    target = target.float()
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + eps) ** 0.5
    cos = (F.normalize(pred.float(), dim=-1) * F.normalize(target, dim=-1)).sum(-1)  # (B, M)
    return (2 - 2 * cos).mean()


def clap_loss(audio, text, logit_scale):
    """Symmetric NT-Xent, M2D-CLAP Eq. (2)-(3) (CLIP's loss): S = cosine similarities of the
    L2-normalized embeddings, logits = S / tau = logit_scale * S; the mean of the cross-entropies
    along the audio axis (each clip against all captions) and the caption axis.

    audio, text: (B, E) paired embeddings (row i of each belong together), not normalized;
    logit_scale = 1 / tau, a positive number or 0-dim tensor (exp of the learnable parameter).
    Under torch.distributed both sides are all-gathered WITH autograd and each process scores its B
    local rows against all B*W columns, labels arange(B) + rank*B (ref: open_clip's local loss); the
    gradients, averaged over processes by DDP, equal one process on the whole batch.
    """
    audio, text = F.normalize(audio.float(), dim=-1), F.normalize(text.float(), dim=-1)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    all_audio, all_text = audio, text
    if world > 1:
        # a functional collective (reduce-scatter of the gradients, as torch.distributed.nn's
        # all_gather): torch.compile traces it into the step's graph, where the other would break it
        all_audio, all_text = (all_gather_tensor_autograd(x, 0, dist.group.WORLD) for x in (audio, text))
    labels = torch.arange(len(audio), device=audio.device) + rank * len(audio)
    a2t = F.cross_entropy(logit_scale * audio @ all_text.T, labels)  # softmax over captions
    t2a = F.cross_entropy(logit_scale * text @ all_audio.T, labels)  # softmax over clips
    return (a2t + t2a) / 2


# ---------------------------------------------------------------------------------------------
# Evaluation metrics (finetune.py, zeroshot.py)

def accuracy(scores, targets):
    """Top-1 accuracy as a float: the fraction of rows whose highest score is at their target class.
    scores, targets (n, C), targets one-hot."""
    return (scores.argmax(1) == targets.argmax(1)).float().mean().item()


def mean_average_precision(scores, targets):
    """mAP as a float: per class, the mean of the precision at the rank of each positive (ranks by
    descending score); averaged over the classes that have a positive. scores, targets (n, C)."""
    t = targets.gather(0, scores.argsort(0, descending=True)).float()  # (n, C) in score order
    precision = t.cumsum(0) / torch.arange(1, len(t) + 1)[:, None]
    has = t.sum(0) > 0
    return ((precision * t).sum(0)[has] / t.sum(0)[has]).mean().item()


def recall_at_k(sim, positive, ks=(1, 5, 10)):
    """sim (Q, G) query-candidate scores, positive (Q, G) bool -> {k: the fraction (float) of
    queries whose best-scoring positive ranks in the top k}. That positive's rank is the number of
    candidates that score strictly higher (a tie counts in the query's favour); every query has a
    positive."""
    best = sim.masked_fill(~positive, float('-inf')).max(1).values  # (Q,)
    rank = (sim > best[:, None]).sum(1)
    return {k: (rank < k).float().mean().item() for k in ks}
