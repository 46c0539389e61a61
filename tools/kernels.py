"""The papers' computations by other means (ours), each with its reason: attention by the kernel that is fastest
on CPU for each sequence length (model.py calls it wherever attention is computed), and BatchNorm whose statistics
are those of all DDP processes' batch (SupMAM's classifier, the fine-tuning head)."""
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed._functional_collectives import all_gather_tensor_autograd
from torch.nn.attention import SDPBackend, sdpa_kernel


# On CPU the backward of PyTorch's flash-attention kernel is slower than the math path (two batched
# matmuls and a softmax) up to ~200 tokens: the visible tokens, demo-length decoders, M2D's predictor at
# 608 frames (191 tokens); from ~208 on flash is faster (docs/performance.md).
SHORT_CPU = 200


def attention(q, k, v, mask=None, scale=None):
    """softmax(q k^T * scale + mask) v by SDPA, q k v (..., L, d), scale 1/sqrt(d) by default; the math
    kernel for short CPU sequences under autograd (SHORT_CPU)."""
    short = q.device.type == 'cpu' and q.shape[-2] <= SHORT_CPU and torch.is_grad_enabled()
    with sdpa_kernel(SDPBackend.MATH) if short else nullcontext():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class BatchNormAcrossRanks(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the whole batch of all DDP processes, so data-parallel
    training (SupMAM's classifier) and fine-tuning equal one process on the global batch (ours: the authors' BatchNorm
    normalizes each GPU's share; nn.SyncBatchNorm needs a GPU). The batch is gathered
    with autograd (a functional collective, which torch.compile traces); every process updates the same running
    statistics."""

    def forward(self, x):
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        rank, B = dist.get_rank(), len(x)
        return super().forward(all_gather_tensor_autograd(x, 0, dist.group.WORLD))[rank * B:(rank + 1) * B]
