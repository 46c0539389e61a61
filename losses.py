"""Loss functions, one per objective, and the evaluation metrics. Pure: tensors in, scalar out.

Shapes: B batch, N tokens, M masked tokens, P values per patch (p*p), D feature width, E joint
audio-text width. Mask convention: mask (B, N), 1 = masked.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed._functional_collectives import all_gather_tensor_autograd


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


def classification_loss(logits, y, multi_label, tau=1.0):
    """SupMAM Eq. (2): CE(logits / tau, y); also the downstream heads' loss (tau 1).

    logits: (B, C). y: (B, C) float targets: class probabilities for single-label data (one-hot, or
    soft after mixup; cross-entropy), multi-hot for multi-label data (binary cross-entropy, ours:
    the paper writes CE).
    """
    logits = logits.float() / tau
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, y.float())
    return F.cross_entropy(logits, y.float())


def m2d_loss(pred, target, eps=1e-6):
    """M2D loss, M2D-CLAP Eq. (1): 2 - 2 cos(z^_m, z~_m), averaged over the masked tokens.

    pred: (B, M, D) online predictions z^_m; target: (B, M, D) target outputs z_m, standardized
    per token (z~_m = (z_m - mean) / sqrt(var), over D) before the cosine (ref: norm_pix_loss).
    """
    target = target.float()
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + eps) ** 0.5
    cos = (F.normalize(pred.float(), dim=-1) * F.normalize(target, dim=-1)).sum(-1)  # (B, M)
    return (2 - 2 * cos).mean()


def clap_loss(audio, text, logit_scale):
    """Symmetric NT-Xent, M2D-CLAP Eq. (2)-(3) (CLIP's loss): S = cosine similarities, logits = S / tau.

    audio, text: (B, E) paired embeddings (row i of each belong together); logit_scale = 1 / tau.
    Under torch.distributed both sides are all-gathered WITH autograd and each process scores its
    B local rows against all B*W columns, labels arange(B) + rank*B (ref: open_clip's local loss);
    the gradients, averaged over processes by DDP, equal one process on the whole batch.
    """
    audio, text = F.normalize(audio.float(), dim=-1), F.normalize(text.float(), dim=-1)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    # a functional collective (reduce-scatter of the gradients, as torch.distributed.nn's all_gather): torch.compile
    # traces it into the step's graph, where torch.distributed.nn's would break the graph
    all_audio, all_text = (all_gather_tensor_autograd(x, 0, dist.group.WORLD) for x in (audio, text)) if world > 1 \
        else (audio, text)
    labels = torch.arange(len(audio), device=audio.device) + rank * len(audio)
    return (F.cross_entropy(logit_scale * audio @ all_text.T, labels)  # audio -> text: softmax over captions
            + F.cross_entropy(logit_scale * text @ all_audio.T, labels)) / 2  # text -> audio: softmax over clips


# ---------------------------------------------------------------------------------------------
# Evaluation metrics (finetune.py, zeroshot.py)

def accuracy(scores, targets):
    """Top-1 accuracy; scores, targets (n, C), targets one-hot."""
    return (scores.argmax(1) == targets.argmax(1)).float().mean().item()


def mean_average_precision(scores, targets):
    """mAP: per class, the mean of the precision at the rank of each positive; averaged over the classes that have a
    positive. scores, targets (n, C)."""
    t = targets.gather(0, scores.argsort(0, descending=True)).float()  # (n, C) targets in score order
    precision = t.cumsum(0) / torch.arange(1, len(t) + 1)[:, None]
    has = t.sum(0) > 0
    return ((precision * t).sum(0)[has] / t.sum(0)[has]).mean().item()


def recall_at_k(sim, positive, ks=(1, 5, 10)):
    """sim (Q, G) query-candidate scores, positive (Q, G) bool -> {k: fraction of queries whose best-scoring positive
    ranks in the top k}; its rank = the number of candidates that score strictly higher."""
    best = sim.masked_fill(~positive, float('-inf')).max(1).values  # (Q,)
    rank = (sim > best[:, None]).sum(1)
    return {k: (rank < k).float().mean().item() for k in ks}
