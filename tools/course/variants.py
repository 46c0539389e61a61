"""Implementations the grader must tell apart, per assignment: known-wrong ones (each a mistake a student makes,
named by it) and correct ones that differ from the reference. Each is {qualified name: the function's whole
source}; tools/course/test_grader.py puts each into a copy of this repository, grades its assignment, and
requires every wrong one to lose points and every correct one to score full marks."""

WRONG, CORRECT = 'wrong', 'correct'

VARIANTS = {
    'A1': {
        WRONG: {
            'time-major tokens': {'patchify': '''
def patchify(spec, p):
    B, _, Fd, Td = spec.shape
    x = spec.reshape(B, Fd // p, p, Td // p, p).permute(0, 3, 1, 2, 4)  # (B, Tp, Fp, p, p)
    return x.reshape(B, (Fd // p) * (Td // p), p * p)
'''},
            'pixels in (time, freq) order': {'patchify': '''
def patchify(spec, p):
    B, _, Fd, Td = spec.shape
    x = spec.reshape(B, Fd // p, p, Td // p, p).permute(0, 1, 3, 4, 2)
    return x.reshape(B, (Fd // p) * (Td // p), p * p)
'''},
            'frequency half first': {'sincos_pos_embed': '''
def sincos_pos_embed(dim, grid):
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    f, t = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing='ij')
    embed = lambda pos: torch.cat([(pos.double()[:, None] * omega).sin(), (pos.double()[:, None] * omega).cos()], 1)
    return torch.cat([embed(f.flatten()), embed(t.flatten())], 1).float()
'''},
            'sin and cos interleaved': {'sincos_pos_embed': '''
def sincos_pos_embed(dim, grid):
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    f, t = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing='ij')
    def embed(pos):
        a = pos.double()[:, None] * omega
        return torch.stack([a.sin(), a.cos()], 2).flatten(1)
    return torch.cat([embed(t.flatten()), embed(f.flatten())], 1).float()
'''},
        },
        CORRECT: {
            'unfold and a loop': {'patchify': '''
def patchify(spec, p):
    cols = torch.nn.functional.unfold(spec, p, stride=p)  # (B, p*p, N), patches row-major over (Fp, Tp)
    return cols.transpose(1, 2).contiguous()
''', 'unpatchify': '''
def unpatchify(x, p, grid):
    return torch.nn.functional.fold(x.transpose(1, 2), (grid[0] * p, grid[1] * p), p, stride=p)
''', 'sincos_pos_embed': '''
def sincos_pos_embed(dim, grid):
    import math
    rows = []
    for f in range(grid[0]):
        for t in range(grid[1]):
            half = []
            for pos in (t, f):
                w = [pos / 10000 ** (k / (dim / 4)) for k in range(dim // 4)]
                half += [math.sin(a) for a in w] + [math.cos(a) for a in w]
            rows.append(half)
    return torch.tensor(rows, dtype=torch.float64).float()
'''},
        },
    },
    'A2': {
        WRONG: {
            'contiguous block': {'random_masking': '''
def random_masking(B, N, ratio, device):
    K = int(N * (1 - ratio))
    start = torch.randint(0, N, (B, 1), device=device)
    ids_shuffle = (start + torch.arange(N, device=device)) % N  # K visible in a row, from a random start
    return split_order(ids_shuffle, K)
'''},
            'one mask for the whole batch': {'random_masking': '''
def random_masking(B, N, ratio, device):
    K = int(N * (1 - ratio))
    return split_order(torch.rand(1, N, device=device).argsort(1).expand(B, N), K)
'''},
            'ids_restore not inverted': {'split_order': '''
def split_order(ids_shuffle, K):
    mask = torch.ones_like(ids_shuffle, dtype=torch.float).scatter_(1, ids_shuffle[:, :K], 0.0)
    return ids_shuffle[:, :K], ids_shuffle[:, K:], ids_shuffle, mask
'''},
            'ratio read as the kept fraction': {'random_masking': '''
def random_masking(B, N, ratio, device):
    return split_order(torch.rand(B, N, device=device).argsort(1), int(N * ratio))
'''},
        },
        CORRECT: {
            'randperm per sample, scatter inverse': {'random_masking': '''
def random_masking(B, N, ratio, device):
    K = int(N * (1 - ratio))
    ids_shuffle = torch.stack([torch.randperm(N, device=device) for _ in range(B)])
    return split_order(ids_shuffle, K)
''', 'split_order': '''
def split_order(ids_shuffle, K):
    B, N = ids_shuffle.shape
    ids_restore = torch.empty_like(ids_shuffle)
    ids_restore.scatter_(1, ids_shuffle, torch.arange(N, device=ids_shuffle.device).expand(B, N))
    mask = (ids_restore >= K).float()
    return ids_shuffle[:, :K], ids_shuffle[:, K:], ids_restore, mask
'''},
            'top-k of noise': {'random_masking': '''
def random_masking(B, N, ratio, device):
    K = int(N * (1 - ratio))
    return split_order(torch.rand(B, N, device=device).topk(N, 1).indices, K)
'''},
        },
    },
    'A3': {
        WRONG: {
            'scaled by the whole width': {'Attention.forward': '''
def forward(self, x):
    B, L, D = x.shape
    q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
    x = attention(q, k, v, scale=D ** -0.5).transpose(1, 2)
    return self.proj(x.reshape(B, L, D))
'''},
            'heads split before q, k, v': {'Attention.forward': '''
def forward(self, x):
    B, L, D = x.shape
    q, k, v = self.qkv(x).view(B, L, self.heads, 3, D // self.heads).permute(3, 0, 2, 1, 4)
    x = attention(q, k, v).transpose(1, 2)
    return self.proj(x.reshape(B, L, D))
'''},
            'post-norm block': {'Block.forward': '''
def forward(self, x):
    x = self.norm1(x + self.attn(x))
    return self.norm2(x + self.mlp(x))
'''},
        },
        CORRECT: {
            'einsum and an explicit softmax': {'Attention.forward': '''
def forward(self, x):
    B, L, D = x.shape
    d = D // self.heads
    q, k, v = self.qkv(x).chunk(3, dim=-1)
    q, k, v = (t.reshape(B, L, self.heads, d) for t in (q, k, v))
    weights = torch.einsum('blhd,bmhd->bhlm', q, k).mul(d ** -0.5).softmax(-1)
    return self.proj(torch.einsum('bhlm,bmhd->blhd', weights, v).reshape(B, L, D))
''', 'Block.forward': '''
def forward(self, x):
    h = x + self.attn(self.norm1(x))
    return h + self.mlp(self.norm2(h))
'''},
        },
    },
    'A4': {
        WRONG: {
            'never un-shuffles': {'Decoder.forward': '''
def forward(self, x, ids_restore):
    x = self.embed(x)
    (B, N), Dd = ids_restore.shape, x.shape[2]
    masked = self.mask_token.expand(B, N + 1 - x.shape[1], -1).to(x.dtype)
    x = torch.cat([x, masked], 1) + self.pos_embed  # visible tokens take the first positions
    if self.local:
        x = x[:, 1:]
    for blk in self.blocks:
        x = blk(x)
    x = self.pred(self.norm(x))
    return x if self.local else x[:, 1:]
'''},
            'positions added in shuffled order': {'Decoder.forward': '''
def forward(self, x, ids_restore):
    x = self.embed(x)
    (B, N), Dd = ids_restore.shape, x.shape[2]
    masked = self.mask_token.expand(B, N + 1 - x.shape[1], -1).to(x.dtype)
    tokens = torch.cat([x[:, 1:], masked], 1) + self.pos_embed[:, 1:]
    tokens = tokens.gather(1, ids_restore[..., None].expand(-1, -1, Dd))
    x = torch.cat([x[:, :1] + self.pos_embed[:, :1], tokens], 1)
    if self.local:
        x = x[:, 1:]
    for blk in self.blocks:
        x = blk(x)
    x = self.pred(self.norm(x))
    return x if self.local else x[:, 1:]
'''},
            'encodes the tokens in sorted order': {'ViT.encode': '''
def encode(self, x, ids=None, blocks=None, norm=None):
    B, N, D = x.shape
    if ids is not None:
        x = x.gather(1, ids.sort(1).values[..., None].expand(-1, -1, D))
    cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)
    x = torch.cat([cls, x], 1)
    for blk in blocks if blocks is not None else self.blocks:
        x = blk(x)
    return (norm or self.norm)(x)
'''},
        },
        CORRECT: {
            'scatter into a grid of mask tokens': {'Decoder.forward': '''
def forward(self, x, ids_restore):
    x = self.embed(x)
    (B, N), Dd = ids_restore.shape, x.shape[2]
    K = x.shape[1] - 1
    ids_keep = ids_restore.argsort(1)[:, :K]  # the grid positions of the visible tokens, in their order
    grid = self.mask_token.to(x.dtype).expand(B, N, Dd).clone()
    grid = grid.scatter(1, ids_keep[..., None].expand(-1, -1, Dd), x[:, 1:])
    x = torch.cat([x[:, :1], grid], 1) + self.pos_embed
    if self.local:
        x = x[:, 1:]
    for blk in self.blocks:
        x = blk(x)
    x = self.pred(self.norm(x))
    return x if self.local else x[:, 1:]
''', 'ViT.encode': '''
def encode(self, x, ids=None, blocks=None, norm=None):
    B = len(x)
    if ids is not None:
        x = torch.stack([x[b, ids[b]] for b in range(B)])
    x = torch.cat([self.cls_token.expand(B, -1, -1) + self.pos_embed[:, :1], x], 1)
    for blk in (self.blocks if blocks is None else blocks):
        x = blk(x)
    return self.norm(x) if norm is None else norm(x)
'''},
        },
    },
    'A5': {
        WRONG: {
            'averaged over every patch': {'mae_loss': '''
def mae_loss(pred, target, mask, norm_pix=True, eps=1e-6):
    target = target.float()
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + eps) ** 0.5
    return token_mse(pred, target, torch.ones_like(mask))
'''},
            'normalized by the batch statistics': {'mae_loss': '''
def mae_loss(pred, target, mask, norm_pix=True, eps=1e-6):
    target = target.float()
    if norm_pix:
        target = (target - target.mean()) / (target.var() + eps) ** 0.5
    return token_mse(pred, target, mask)
'''},
            'summed over the feature dim': {'token_mse': '''
def token_mse(pred, target, weight):
    per_token = (pred.float() - target.float()).pow(2).sum(-1)
    return (per_token * weight).sum() / weight.sum().clamp_min(1)
'''},
        },
        CORRECT: {
            'the biased variance, boolean indexing': {'mae_loss': '''
def mae_loss(pred, target, mask, norm_pix=True, eps=1e-6):
    target = target.float()
    if norm_pix:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, unbiased=False, keepdim=True)
        target = (target - mean) / torch.sqrt(var + eps)
    return token_mse(pred, target, mask)
''', 'token_mse': '''
def token_mse(pred, target, weight):
    chosen = weight.bool()
    if not chosen.any():
        return pred.float().sum() * 0
    return torch.nn.functional.mse_loss(pred.float()[chosen], target.float()[chosen])
'''},
        },
    },
    'A6': {
        WRONG: {
            'one average over all tokens': {'mam_clap_loss': '''
def mam_clap_loss(pred, target, mask):
    both = token_mse(pred, target, torch.ones_like(mask))
    return both, both
'''},
            'visible and masked swapped': {'mam_clap_loss': '''
def mam_clap_loss(pred, target, mask):
    return token_mse(pred, target, mask), token_mse(pred, target, 1 - mask)
'''},
            'the head on the masked tokens only': {'AudioMAE.predict': '''
def predict(self, spec):
    B, cfg = spec.shape[0], self.encoder.cfg
    ids_keep, _, ids_restore, mask = random_masking(B, cfg.grid[0] * cfg.grid[1], self.mask_ratio, spec.device)
    z = self.encoder(spec, ids_keep)
    pred = self.decoder(z, ids_restore)
    if self.target == 'clap':
        pred = torch.where(mask[..., None].bool(), self.head_norm(pred), pred)
    return z, pred, mask
'''},
        },
        CORRECT: {
            'per sample, then over the batch': {'mam_clap_loss': '''
def mam_clap_loss(pred, target, mask):
    per_token = (pred.float() - target.float()).pow(2).mean(-1)  # (B, N)
    visible = ((per_token * (1 - mask)).sum(1) / (1 - mask).sum(1)).mean()
    masked = ((per_token * mask).sum(1) / mask.sum(1)).mean()
    return visible, masked
''', 'AudioMAE.predict': '''
def predict(self, spec):
    grid = self.encoder.cfg.grid
    ids_keep, ids_masked, ids_restore, mask = random_masking(len(spec), grid[0] * grid[1], self.mask_ratio,
                                                             spec.device)
    z = self.encoder.encode(self.encoder.embed(spec), ids_keep)
    pred = self.decoder(z, ids_restore)
    return z, (self.head_norm(pred) if self.target == 'clap' else pred), mask
'''},
        },
    },
    'A7': {
        WRONG: {
            'classifier on every token, CLS included': {'AudioMAE.forward': '''
def forward(self, spec, y=None, target=None):
    z, pred, mask = self.predict(spec)
    if self.target == 'patches':
        terms = {'loss_rec': losses.mae_loss(pred, patchify(spec, self.encoder.cfg.patch), mask)}
    else:
        visible, masked = losses.mam_clap_loss(pred, target, mask)
        terms = {'loss_visible': visible, 'loss_masked': masked}
    if self.classify:
        terms['loss_cls'] = losses.classification_loss(self.classifier(z.mean(1)), y, self.multi_label, self.tau)
    return terms, {}
'''},
            'temperature multiplies': {'classification_loss': '''
def classification_loss(logits, y, multi_label, tau=1.0):
    logits = logits.float() * tau
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, y.float())
    return F.cross_entropy(logits, y.float())
'''},
            'BCE for single-label targets': {'classification_loss': '''
def classification_loss(logits, y, multi_label, tau=1.0):
    return F.binary_cross_entropy_with_logits(logits.float() / tau, y.float())
'''},
        },
        CORRECT: {
            'log-softmax by hand': {'classification_loss': '''
def classification_loss(logits, y, multi_label, tau=1.0):
    z = logits.float() / tau
    if multi_label:
        return (torch.clamp(z, min=0) - z * y + torch.log1p(torch.exp(-z.abs()))).mean()
    return -(y.float() * torch.log_softmax(z, dim=1)).sum(1).mean()
''', 'AudioMAE.forward': '''
def forward(self, spec, y=None, target=None):
    z, pred, mask = self.predict(spec)
    terms = {}
    if self.target == 'clap':
        terms['loss_visible'], terms['loss_masked'] = losses.mam_clap_loss(pred, target, mask)
    else:
        terms['loss_rec'] = losses.mae_loss(pred, patchify(spec, self.encoder.cfg.patch), mask)
    if self.classify:
        pooled = z[:, 1:].sum(1) / (z.shape[1] - 1)
        terms['loss_cls'] = losses.classification_loss(self.classifier(pooled), y, self.multi_label, self.tau)
    return terms, {}
'''},
        },
    },
    'A8': {
        WRONG: {
            'targets in another order than the predictions': {'M2D.predict': '''
def predict(self, spec):
    B, enc = spec.shape[0], self.encoder
    ids_keep, ids_masked, ids_restore, _ = random_masking(B, enc.cfg.grid[0] * enc.cfg.grid[1], self.mask_ratio,
                                                          spec.device)
    x = enc.embed(spec)
    z = enc.encode(x, ids_keep)
    pred = self.predictor(z, ids_restore)
    pred = pred.gather(1, ids_masked[..., None].expand(-1, -1, pred.shape[2]))
    with torch.no_grad():
        target = enc.encode(x.detach(), ids_masked.sort(1).values, self.target_blocks, self.target_norm)
    return z, pred, target[:, 1:], ids_masked
'''},
            'the target network sees every patch': {'M2D.predict': '''
def predict(self, spec):
    B, enc = spec.shape[0], self.encoder
    ids_keep, ids_masked, ids_restore, _ = random_masking(B, enc.cfg.grid[0] * enc.cfg.grid[1], self.mask_ratio,
                                                          spec.device)
    x = enc.embed(spec)
    z = enc.encode(x, ids_keep)
    pred = self.predictor(z, ids_restore)
    pred = pred.gather(1, ids_masked[..., None].expand(-1, -1, pred.shape[2]))
    with torch.no_grad():
        target = enc.encode(x.detach(), None, self.target_blocks, self.target_norm)[:, 1:]
        target = target.gather(1, ids_masked[..., None].expand(-1, -1, target.shape[2]))
    return z, pred, target, ids_masked
'''},
            'the target not centered': {'m2d_loss': '''
def m2d_loss(pred, target, eps=1e-6):
    cos = (F.normalize(pred.float(), dim=-1) * F.normalize(target.float(), dim=-1)).sum(-1)
    return (2 - 2 * cos).mean()
'''},
        },
        CORRECT: {
            'every token in grid order, cosine_similarity': {'M2D.predict': '''
def predict(self, spec):
    enc = self.encoder
    ids_keep, ids_masked, ids_restore, _ = random_masking(len(spec), enc.cfg.grid[0] * enc.cfg.grid[1],
                                                          self.mask_ratio, spec.device)
    ids_masked = ids_masked.sort(1).values  # the masked tokens in grid order, for both sides
    x = enc.embed(spec)
    z = enc.encode(x, ids_keep)
    pred = self.predictor(z, ids_restore)
    pred = torch.stack([pred[b, ids_masked[b]] for b in range(len(spec))])
    with torch.no_grad():
        target = enc.encode(x, ids_masked, self.target_blocks, self.target_norm)[:, 1:]
    return z, pred, target, ids_masked
''', 'm2d_loss': '''
def m2d_loss(pred, target, eps=1e-6):
    centered = target.float() - target.float().mean(-1, keepdim=True)
    return (2 - 2 * F.cosine_similarity(pred.float(), centered, dim=-1)).mean()
'''},
        },
    },
    'A9': {
        WRONG: {
            'weights swapped: alpha on theta': {'M2D.update_target': '''
@torch.no_grad()
def update_target(self, step, total_steps):
    alpha = self.alpha[0] + (self.alpha[1] - self.alpha[0]) * step / max(1, total_steps - 1)
    online = [*self.encoder.blocks.parameters(), *self.encoder.norm.parameters()]
    target = [*self.target_blocks.parameters(), *self.target_norm.parameters()]
    torch._foreach_lerp_(target, online, alpha)
'''},
            'the schedule ends a step late': {'M2D.update_target': '''
@torch.no_grad()
def update_target(self, step, total_steps):
    alpha = self.alpha[0] + (self.alpha[1] - self.alpha[0]) * step / total_steps
    online = [*self.encoder.blocks.parameters(), *self.encoder.norm.parameters()]
    target = [*self.target_blocks.parameters(), *self.target_norm.parameters()]
    torch._foreach_lerp_(target, online, 1 - alpha)
'''},
            'the norm left out': {'M2D.update_target': '''
@torch.no_grad()
def update_target(self, step, total_steps):
    alpha = self.alpha[0] + (self.alpha[1] - self.alpha[0]) * step / max(1, total_steps - 1)
    for xi, theta in zip(self.target_blocks.parameters(), self.encoder.blocks.parameters()):
        xi.mul_(alpha).add_(theta, alpha=1 - alpha)
'''},
        },
        CORRECT: {
            'a loop of mul_ and add_': {'M2D.update_target': '''
def update_target(self, step, total_steps):
    a0, a1 = self.alpha
    alpha = a0 + (a1 - a0) * (step / (total_steps - 1) if total_steps > 1 else 0.0)
    pairs = list(zip(self.target_blocks.parameters(), self.encoder.blocks.parameters()))
    pairs += list(zip(self.target_norm.parameters(), self.encoder.norm.parameters()))
    with torch.no_grad():
        for xi, theta in pairs:
            xi.mul_(alpha).add_(theta, alpha=1 - alpha)
'''},
        },
    },
    'A10': {
        WRONG: {
            'audio to text only': {'clap_loss': '''
def clap_loss(audio, text, logit_scale):
    audio, text = F.normalize(audio.float(), dim=-1), F.normalize(text.float(), dim=-1)
    return F.cross_entropy(logit_scale * audio @ text.T, torch.arange(len(audio), device=audio.device))
'''},
            'no L2 normalization': {'clap_loss': '''
def clap_loss(audio, text, logit_scale):
    logits = logit_scale * audio.float() @ text.float().T
    labels = torch.arange(len(audio), device=audio.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
'''},
            'the scale divides': {'clap_loss': '''
def clap_loss(audio, text, logit_scale):
    audio, text = F.normalize(audio.float(), dim=-1), F.normalize(text.float(), dim=-1)
    logits = audio @ text.T / logit_scale
    labels = torch.arange(len(audio), device=audio.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
'''},
            'clamped at 100 on the log scale': {'clamp_logit_scale': '''
@torch.no_grad()
def clamp_logit_scale(logit_scale):
    logit_scale.clamp_(0, 100)
'''},
        },
        CORRECT: {
            'log-softmax by hand': {'clap_loss': '''
def clap_loss(audio, text, logit_scale):
    a = audio.float() / audio.float().norm(dim=-1, keepdim=True)
    t = text.float() / text.float().norm(dim=-1, keepdim=True)
    logits = logit_scale * (a @ t.T)
    diagonal = torch.arange(len(a), device=a.device)
    a2t = -logits.log_softmax(1)[diagonal, diagonal].mean()
    t2a = -logits.log_softmax(0)[diagonal, diagonal].mean()
    return 0.5 * (a2t + t2a)
''', 'clamp_logit_scale': '''
def clamp_logit_scale(logit_scale):
    with torch.no_grad():
        logit_scale.copy_(logit_scale.clamp(min=0.0, max=math.log(100.0)))
'''},
        },
    },
    'A11': {
        WRONG: {
            'ties count against the query': {'recall_at_k': '''
def recall_at_k(sim, positive, ks=(1, 5, 10)):
    best = sim.masked_fill(~positive, float('-inf')).max(1).values
    rank = (sim >= best[:, None]).sum(1) - 1
    return {k: (rank < k).float().mean().item() for k in ks}
'''},
            'every positive must be in the top k': {'recall_at_k': '''
def recall_at_k(sim, positive, ks=(1, 5, 10)):
    worst = sim.masked_fill(~positive, float('inf')).min(1).values
    rank = (sim > worst[:, None]).sum(1)
    return {k: (rank < k).float().mean().item() for k in ks}
'''},
            'mAP over classes without positives too': {'mean_average_precision': '''
def mean_average_precision(scores, targets):
    t = targets.gather(0, scores.argsort(0, descending=True)).float()
    precision = t.cumsum(0) / torch.arange(1, len(t) + 1)[:, None]
    return ((precision * t).sum(0) / t.sum(0).clamp_min(1)).mean().item()
'''},
        },
        CORRECT: {
            'loops': {'recall_at_k': '''
def recall_at_k(sim, positive, ks=(1, 5, 10)):
    ranks = []
    for q in range(len(sim)):
        best = max(sim[q, j].item() for j in range(sim.shape[1]) if positive[q, j])
        ranks.append(sum(1 for j in range(sim.shape[1]) if sim[q, j].item() > best))
    return {k: sum(r < k for r in ranks) / len(ranks) for k in ks}
''', 'mean_average_precision': '''
def mean_average_precision(scores, targets):
    aps = []
    for c in range(scores.shape[1]):
        order = scores[:, c].argsort(descending=True)
        hits, precisions = 0, []
        for rank, i in enumerate(order.tolist(), 1):
            if targets[i, c] > 0:
                hits += 1
                precisions.append(hits / rank)
        if precisions:
            aps.append(sum(precisions) / len(precisions))
    return sum(aps) / len(aps)
'''},
        },
    },
}
