"""Downstream evaluation of a pre-trained encoder: linear evaluation and fine-tuning.

    python finetune.py --ckpt runs/m2d/checkpoint.pt --mode linear     # frozen encoder + one Linear layer
    python finetune.py --ckpt runs/m2d/checkpoint.pt --mode finetune   # encoder + BatchNorm/Linear head, all trained
    python finetune.py --ckpt none --model vit_tiny --mode linear      # random-init baseline
    torchrun --nproc_per_node=gpu finetune.py --ckpt CKPT --mode finetune --data audioset.csv  # data-parallel

--ckpt takes a train.py checkpoint or an official M2D / M2D-CLAP / AudioMAE release (tools/checkpoints.py).
Splits come from the manifest: a `fold` column gives K-fold (each fold is the test set once; mean ± std),
else `split` train/valid/test (a validation set is carved from train when there is none). Single-label
manifests are scored by accuracy (cross-entropy), multi-label ones by mAP (BCE). Evaluation sees whole
clips: the encoder runs on consecutive chunks of its input length and pools the tokens of all chunks.
The last stdout line is one JSON object.
"""
import argparse
import json
import os
import statistics
import sys
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from losses import accuracy, classification_loss, mean_average_precision
from model import VIT_PRESETS, ViT, ViTConfig, encode_clip, structured_masking
from tools.demo import DEMO_FRAMES
from tools.embed import Encoder, load_encoder
from tools.run import init_distributed, keep_freed_memory, save_checkpoint, shared_flags, warmup_cosine

# Patch-out (fraction of time columns, of frequency rows) per front-end family: AudioMAE fine-tunes
# with 0.2/0.2 (ref); M2D masks 0.5 in total, split at random between rows and columns per batch (ref) -- we
# fix 0.4 of the columns and 0.2 of the rows (52 % masked), to keep one structured-masking rule (ours).
PATCHOUT = {'fbank128': (0.2, 0.2), 'mel80': (0.4, 0.2)}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument('--ckpt', required=True, help="checkpoint (ours or an official release), or 'none' for random init")
    p.add_argument('--mode', choices=['linear', 'finetune'], default='linear')
    shared_flags(p)
    p.add_argument('--model', default='vit_base', choices=sorted(VIT_PRESETS), help='with --ckpt none')
    p.add_argument('--frontend', choices=sorted(data.FRONTENDS), default='mel80', help='with --ckpt none')
    p.add_argument('--n_frames', type=int, help="fine-tuning input length (default: the checkpoint's); the position "
                   "table is interpolated to it")
    p.add_argument('--epochs', type=int, help='max epochs (default: 200 linear, 100 finetune)')
    p.add_argument('--lr', type=float, help='default: 1e-3 (linear, Adam), 0.02 (finetune, SGD), 1e-4 (finetune, AdamW)')
    p.add_argument('--patience', type=int, default=20, help='linear: stop after this many epochs without a better '
                   'validation score')
    p.add_argument('--optim', choices=['sgd', 'adamw'], default='sgd', help='finetune: SGD momentum 0.9 (ref: M2D/EVAR) '
                   'or AdamW (ref: AudioMAE)')
    p.add_argument('--weight_decay', type=float, default=0.0)
    p.add_argument('--warmup', type=int, default=5, help='finetune: warm-up epochs')
    p.add_argument('--layer_decay', type=float, default=1.0, help='finetune: lr x decay^(depth - layer) (1 = off; '
                   'AudioMAE used 0.75)')
    p.add_argument('--mixup', type=float, default=0.3, help='finetune: Beta(a, a) per-sample mixup (0 = off)')
    p.add_argument('--freq_mask', type=int, default=15, help='finetune: SpecAugment max frequency-mask width (bins)')
    p.add_argument('--time_mask', type=int, default=48, help='finetune: SpecAugment max time-mask width (frames)')
    p.add_argument('--rrc', action=argparse.BooleanOptionalAction, default=True, help='finetune: random resize crop')
    p.add_argument('--patchout', type=float, nargs=2, metavar=('TIME', 'FREQ'),
                   help='finetune: fraction of time columns and frequency rows of tokens dropped (default per '
                        'front-end: 0.2 0.2 fbank128, 0.4 0.2 mel80)')
    p.add_argument('--freeze_embed', action=argparse.BooleanOptionalAction, default=False,
                   help='finetune: keep the patch embedding frozen (ref: M2D ESC-50 recipe)')
    p.add_argument('--out', help='folder for the best head/model per fold (default runs/<mode>)')
    known = p.parse_known_args(argv)[0]
    p.set_defaults(epochs=200 if known.mode == 'linear' else 100, out=os.path.join('runs', known.mode),
                   lr=1e-3 if known.mode == 'linear' else 0.02 if known.optim == 'sgd' else 1e-4)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Whole clips through the encoder

def clip_outputs(fn, rows, encoder, frontend, args, device, desc):
    """fn(spec) -> (B, X) over every readable clip of rows, whole (data.clip_outputs)."""
    return data.clip_outputs(fn, rows, frontend, device, args.amp == 'bf16', args.batch_size, args.num_workers,
                             args.max_bad, encoder.cfg.patch, desc)


# ---------------------------------------------------------------------------------------------
# Splits and labels

def folds(rows, source, seed):
    """[(name, train, valid, test)]: one per `fold` value (that fold is the test set), else the manifest's splits."""
    if any(r['fold'] for r in rows):
        if not all(r['fold'] for r in rows):
            raise SystemExit(f"error: {source}: some rows have no 'fold'; K-fold needs it on every row")
        names = sorted({r['fold'] for r in rows}, key=lambda f: (len(f), f))
        return [(f'fold {k}', *carve([r for r in rows if r['fold'] != k], seed), [r for r in rows if r['fold'] == k])
                for k in names]
    split = {s: [r for r in rows if r['split'] == s] for s in ('train', 'valid', 'test')}
    if not split['train'] or not split['test']:
        raise SystemExit(f"error: {source}: needs a 'fold' column, or a 'split' column with train and test rows "
                         f"(found {', '.join(f'{k}: {len(v)}' for k, v in split.items())})")
    train, valid = (split['train'], split['valid']) if split['valid'] else carve(split['train'], seed)
    return [('split', train, valid, split['test'])]


def carve(rows, seed, fraction=0.1):
    """(train, valid): a seeded random `fraction` of the rows (at least one) becomes the validation set (ours)."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    n = max(1, round(fraction * len(rows)))
    return [rows[i] for i in sorted(order[n:])], [rows[i] for i in sorted(order[:n])]


# ---------------------------------------------------------------------------------------------
# Linear evaluation (ref: EVAR)

def linear_features(enc: Encoder):
    """spec -> (B, Fp*D): per time step the Fp frequency tokens concatenated, averaged over time (ref: EVAR)."""
    return lambda spec: enc.tokens(spec).mean(2).flatten(1)


def train_linear(X, Y, Xv, Yv, multi, score, args):
    """Standardize with the training statistics, train one Linear layer with Adam, keep the epoch with the best
    validation score, then the lowest validation loss; stop after --patience epochs without one (early stopping).
    Returns (head, mean, std, best validation score)."""
    mean, std = X.mean(0), X.std(0).clamp_min(1e-6)
    X, Xv = (X - mean) / std, (Xv - mean) / std
    head = nn.Linear(X.shape[1], Y.shape[1])
    opt = torch.optim.Adam(head.parameters(), lr=args.lr)
    best, best_state, since = (-1.0, 0.0), None, 0
    for epoch in tqdm(range(args.epochs), desc='linear', leave=False):
        for idx in torch.randperm(len(X)).split(args.batch_size):
            logits = head(X[idx])
            loss = classification_loss(logits, Y[idx], multi)
            if not torch.isfinite(loss):
                raise SystemExit(f"error: non-finite linear-evaluation loss at epoch {epoch} (lower --lr?)")
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            logits = head(Xv)
            val = (score(logits, Yv), -classification_loss(logits, Yv, multi).item())
        if val > best:  # a better score, or the same score at a lower loss (ours: small validation sets tie often)
            best, best_state, since = val, {k: v.clone() for k, v in head.state_dict().items()}, 0
        elif (since := since + 1) >= args.patience:
            break
    head.load_state_dict(best_state)
    return head, mean, std, best[0]


def run_linear(enc: Encoder, splits, classes, multi, score, args, device, source):
    enc.eval()
    rows = [r for _, tr, va, te in splits for r in tr + va + te]
    uniq = list({r['file']: r for r in rows}.values())  # K-fold shares clips between folds: one pass over each file
    feats, good = clip_outputs(linear_features(enc), uniq, enc.encoder, enc.frontend, args, device, 'features')
    data.check_finite(feats, [uniq[i] for i in good], source)
    by_file = {uniq[i]['file']: f for i, f in zip(good, feats)}
    results = []
    for name, train, valid, test in splits:
        parts = []
        for part in (train, valid, test):
            part = [r for r in part if r['file'] in by_file]
            parts += [torch.stack([by_file[r['file']] for r in part]), data.class_targets(part, source, classes)[1]]
        head, mean, std, val = train_linear(*parts[:4], multi, score, args)
        with torch.no_grad():
            test_score = score(head((parts[4] - mean) / std), parts[5])
        save_checkpoint(os.path.join(args.out, f"best_{name.replace(' ', '')}.pt"), {
            'head': head.state_dict(), 'mean': mean, 'std': std, 'class_names': classes, 'args': vars(args)})
        print(f"{name}: valid {val:.4f}, test {test_score:.4f}")
        results.append(test_score)
    return results


# ---------------------------------------------------------------------------------------------
# Fine-tuning (ref: M2D util/ft-*.sh with EVAR's finetune.py; AudioMAE's fine-tuning)

class BatchNormAcrossRanks(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the whole batch of all DDP processes, so data-parallel
    fine-tuning equals one process on the global batch (ours: nn.SyncBatchNorm needs a GPU). The batch is gathered
    with autograd; every process updates the same running statistics."""

    def forward(self, x):
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        rank, B = dist.get_rank(), len(x)
        return super().forward(torch.cat(dist_nn.all_gather(x)))[rank * B:(rank + 1) * B]


class Classifier(nn.Module):
    """Encoder + BatchNorm1d(affine=False) + Linear on the mean of the patch tokens (ref: EVAR TaskHead)."""

    def __init__(self, encoder, n_classes):
        super().__init__()
        D = encoder.cfg.width
        self.encoder, self.head = encoder, nn.Sequential(BatchNormAcrossRanks(D, affine=False), nn.Linear(D, n_classes))
        nn.init.normal_(self.head[1].weight, std=0.01)  # ref: EVAR
        nn.init.zeros_(self.head[1].bias)

    def forward(self, spec, ids_keep=None):
        """Training crops (B, 1, F, T) with optional patch-out ids_keep (B, K) -> logits (B, C)."""
        return self.head(self.encoder(spec, ids_keep)[:, 1:].mean(1))

    def clip_logits(self, spec):
        """Whole clips of any length -> logits (B, C) from all tokens of all chunks."""
        return self.head(encode_clip(self.encoder, spec).flatten(1, 2).mean(1))


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


def layer_groups(model, lr, weight_decay, layer_decay):
    """Param groups with lr x decay^(depth + 1 - layer): patch embedding 0, block i -> i + 1, norm and head
    depth + 1 (ref: BEiT/MAE layer-wise decay); weight decay on >= 2-D weights only."""
    depth = len(model.encoder.blocks)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split('.')
        layer = (int(parts[2]) + 1 if parts[1] == 'blocks' else 0 if parts[1] in ('patch_embed', 'cls_token')
                 else depth + 1) if parts[0] == 'encoder' else depth + 1
        g = groups.setdefault((layer, p.ndim >= 2), {'params': [], 'lr': lr * layer_decay ** (depth + 1 - layer),
                                                     'weight_decay': weight_decay if p.ndim >= 2 else 0.0})
        g['params'].append(p)
    return list(groups.values())


def finetune_fold(encoder, frontend, train, valid, test, classes, multi, score, args, device, name, source, world):
    """Fine-tune on train, keep the epoch with the best validation score, score it on test. Under torchrun each
    process trains on its share of every batch (DDP); all evaluate, the first saves."""
    torch.manual_seed(args.seed)
    raw = Classifier(encoder, len(classes)).to(device)
    raw.encoder.patch_embed.requires_grad_(not args.freeze_embed)
    ddp, rank, size = world
    model = DDP(raw, device_ids=[device.index] if device.type == 'cuda' else None) if ddp else raw
    torch.manual_seed(args.seed + 1000 * rank)  # the same init everywhere, then each process its own augmentations
    y_train, y_valid, y_test = (data.class_targets(rows, source, classes)[1] for rows in (train, valid, test))
    y_train = y_train.to(device)
    groups = layer_groups(raw, args.lr, args.weight_decay, args.layer_decay)
    opt = (torch.optim.SGD(groups, lr=args.lr, momentum=0.9) if args.optim == 'sgd' else
           torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999)))
    dataset = data.AudioDataset(train, frontend.n_samples, random_crop=True, seed=args.seed)
    steps_per_epoch = len(train) // size // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(train)} training clips cannot fill one batch of {args.batch_size} x {size} "
                         "process(es); lower --batch_size")
    scheduler = warmup_cosine(opt, args.epochs * steps_per_epoch, args.warmup * steps_per_epoch)
    t_ratio, f_ratio = args.patchout or PATCHOUT[frontend.name]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == 'bf16')
    path = os.path.join(args.out, f"best_{name.replace(' ', '')}.pt")
    best, bad = -1.0, set()
    bar = tqdm(total=args.epochs * steps_per_epoch, desc=f'finetune {name}', dynamic_ncols=True, disable=rank > 0)
    for epoch in range(args.epochs):
        model.train()
        for batch in data.epoch_loader(dataset, args.batch_size, epoch, 0, rank, size, args.seed, args.num_workers):
            bad.update(batch['bad'])
            data.check_bad(bad, len(train), args.max_bad)
            if not len(batch['wave']):
                continue
            with torch.no_grad():
                spec = frontend(batch['wave'].to(device))  # (B, 1, F, T)
                y = y_train[batch['index'].to(device)]
                spec = spec_augment(spec, args.freq_mask, args.time_mask)
                if args.rrc:
                    spec = random_resize_crop(spec)
                if args.mixup > 0:
                    spec, y = mixup(spec, y, args.mixup)
            ids_keep = structured_masking(len(spec), encoder.cfg.grid, t_ratio, f_ratio, device)[0]
            with autocast:
                logits = model(spec, ids_keep).float()
            loss = classification_loss(logits, y, multi)  # soft targets after mixup
            if not torch.isfinite(loss):
                raise SystemExit(f"error: non-finite fine-tuning loss at epoch {epoch}, step {bar.n}; stopped" + (
                    f", the best model so far ({path}, valid {best:.4f}) is intact" if best >= 0 else ''))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            scheduler.step()
            bar.update()
            bar.set_postfix(loss=f'{loss.item():.4f}')
        model.eval()
        scores, good = clip_outputs(raw.clip_logits, valid, encoder, frontend, args, device, 'valid')
        val = score(scores, y_valid[good])  # the same on every process: they hold the same weights
        if val > best:
            best = val
            if rank == 0:
                save_checkpoint(path, {'model': raw.state_dict(), 'model_config': asdict(encoder.cfg),
                                       'frontend': frontend.config(), 'class_names': classes, 'epoch': epoch,
                                       'valid': val, 'args': {**vars(args), 'method': 'finetune'}})
        if rank == 0:
            tqdm.write(f"{name} epoch {epoch}: loss {loss.item():.4f}, valid {val:.4f} (best {best:.4f})")
    bar.close()
    if ddp:
        dist.barrier()  # the best checkpoint is written
    raw.load_state_dict(torch.load(path, weights_only=True)['model'])
    raw.eval()
    scores, good = clip_outputs(raw.clip_logits, test, encoder, frontend, args, device, 'test')
    test_score = score(scores, y_test[good])
    if rank == 0:
        print(f"{name}: valid {best:.4f}, test {test_score:.4f}")
    return test_score


def load(args, device):
    """The encoder to evaluate with its front-end (tools/embed.py): from --ckpt, or a random init (--ckpt none)."""
    torch.manual_seed(args.seed)
    if args.ckpt == 'none':
        n_frames = args.n_frames or (DEMO_FRAMES if args.data == 'demo' else data.FRONTENDS[args.frontend]['n_frames'])
        cfg = ViTConfig(**VIT_PRESETS[args.model], n_mels=data.FRONTENDS[args.frontend]['n_mels'], n_frames=n_frames)
        return Encoder(ViT(cfg), data.FrontEnd(args.frontend, n_frames)).to(device)
    return load_encoder(args.ckpt, device, args.n_frames if args.mode == 'finetune' else None,
                        trust=args.trust_checkpoint)


def main(argv=None):
    args = get_args(argv)
    keep_freed_memory()
    ddp, rank, size, device = init_distributed(args.device)  # torchrun: data-parallel fine-tuning
    try:
        if ddp and args.mode == 'linear':
            raise SystemExit("error: linear evaluation runs in one process (it is fast); torchrun is for --mode finetune")
        return evaluate(args, device, (ddp, rank, size))
    finally:
        if ddp:
            dist.destroy_process_group()


def evaluate(args, device, world):
    torch.manual_seed(args.seed)
    manifest = data.resolve_manifest(args.data)
    rows = data.read_manifest(manifest)
    splits = folds(rows, manifest, args.seed)
    classes = sorted({name for _, tr, va, _ in splits for r in tr + va for name in r['labels']})
    multi = any(len(r['labels']) > 1 for r in rows)
    score, metric = (mean_average_precision, 'mAP') if multi else (accuracy, 'accuracy')
    os.makedirs(args.out, exist_ok=True)
    enc = load(args, device)
    encoder, frontend = enc.encoder, enc.frontend
    say = print if world[1] == 0 else lambda *a: None
    say(f"{args.mode} | {args.ckpt} | {encoder.cfg.width}-d x {encoder.cfg.depth} blocks, {frontend.name} "
        f"{encoder.cfg.n_frames} frames | {manifest}: {len(classes)} classes, {metric}, {len(splits)} fold(s), "
        f"{len(splits[0][1])}/{len(splits[0][2])}/{len(splits[0][3])} train/valid/test | {device} x {world[2]}")
    if args.mode == 'linear':
        results = run_linear(enc, splits, classes, multi, score, args, device, manifest)
    else:
        results = []
        for name, train, valid, test in splits:
            encoder = load(args, device).encoder if results else encoder  # each fold from the checkpoint
            results.append(finetune_fold(encoder, frontend, train, valid, test, classes, multi, score, args, device, name,
                                         manifest, world))
    record = {'mode': args.mode, 'ckpt': args.ckpt, 'metric': metric, 'test': statistics.mean(results),
              'std': statistics.pstdev(results), 'folds': results}
    say(json.dumps(record))
    return record


if __name__ == '__main__':
    main(sys.argv[1:])
