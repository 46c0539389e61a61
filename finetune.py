"""Downstream evaluation of a pre-trained encoder: linear evaluation and fine-tuning.

    python finetune.py --ckpt runs/m2d/checkpoint.pt                  # linear: frozen encoder + a Linear
    python finetune.py --ckpt runs/m2d/checkpoint.pt --mode finetune  # encoder + BatchNorm/Linear head
    python finetune.py --ckpt none --model vit_tiny                   # a random-init baseline
    torchrun --nproc_per_node=gpu finetune.py --ckpt C --mode finetune --data as.csv  # data-parallel

--ckpt takes a train.py checkpoint or an official M2D / M2D-CLAP / AudioMAE release
(tools/checkpoints.py).
Splits come from the manifest: a `fold` column gives K-fold (each fold is the test set once; mean ±
std), else `split` train/valid/test (a validation set is carved from train when there is none).
Single-label manifests are scored by accuracy (cross-entropy), multi-label ones by mAP (BCE).
Evaluation sees whole clips: the encoder runs on consecutive chunks of its input length and pools
the tokens of all chunks. The last stdout line is one JSON object.
"""
import json
import math
import os
import signal
import statistics
import sys
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from losses import accuracy, classification_loss, mean_average_precision
from model import VIT_PRESETS, ViT, ViTConfig
from tools.augment import PATCHOUT, mixup, random_resize_crop, spec_augment, structured_masking
from tools.cli import finetune_args
from tools.embed import Encoder, check_finite, clip_outputs, encode_clip, load_encoder
from tools.kernels import BatchNormAcrossRanks
from tools.run import (any_rank_signal, compile_training, init_distributed,
                       keep_freed_memory, mean_over_ranks, read_finetune_state, resolve_amp,
                       save_checkpoint, save_finetune_state, set_rng_state, stop_on_signals,
                       warmup_cosine)

# ---------------------------------------------------------------------------------------------
# Linear evaluation (ref: EVAR)

def linear_features(enc: Encoder):
    """spec -> (B, Fp*D): per time step the Fp frequency tokens concatenated, averaged over time
    (ref: EVAR)."""
    return lambda spec: enc.tokens(spec).mean(2).flatten(1)


def train_linear(X, Y, Xv, Yv, multi, score, args):
    """Standardize with the training statistics, train one Linear layer with Adam, keep the epoch
    with the best validation score, then the lowest validation loss; stop after --patience epochs
    without one (early stopping). Returns (head, mean, std, best validation score)."""
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
        # a better score, or the same score at a lower loss (ours: small validation sets tie often)
        if val > best:
            best, best_state, since = val, {k: v.clone() for k, v in head.state_dict().items()}, 0
        elif (since := since + 1) >= args.patience:
            break
    head.load_state_dict(best_state)
    return head, mean, std, best[0]


@torch.no_grad()
def linear_scores(head, mean, std, X):
    """The trained head's scores (n, C) for features X (n, X), standardized with the training
    statistics."""
    return head((X - mean) / std)


def run_linear(enc: Encoder, splits, task, args, device, world):
    """Features of every clip once (shared by the processes under torchrun), then a head per
    fold."""
    enc.eval()
    rows = [r for _, tr, va, te in splits for r in tr + va + te]
    # K-fold shares clips between folds: one pass over each file
    uniq = list({r['file']: r for r in rows}.values())
    feats, good = clip_outputs(linear_features(enc), uniq, enc.frontend, enc.encoder.cfg.patch,
                               'features', args, device, world)
    check_finite(feats, [uniq[i] for i in good], task.source)
    by_file = {uniq[i]['file']: f for i, f in zip(good, feats)}
    results = []
    for name, train, valid, test in splits:
        parts = []
        for part in (train, valid, test):
            part = [r for r in part if r['file'] in by_file]
            parts += [torch.stack([by_file[r['file']] for r in part]),
                      data.class_targets(part, task.source, task.classes)[1]]
        # the same in every process
        head, mean, std, val = train_linear(*parts[:4], task.multi, task.score, args)
        test_score = task.score(linear_scores(head, mean, std, parts[4]), parts[5])
        if world[1] == 0:
            save_checkpoint(os.path.join(args.out, f"best_{name.replace(' ', '')}.pt"), {
                'head': head.state_dict(), 'mean': mean, 'std': std, 'class_names': task.classes,
                'args': vars(args)})
            print(f"{name}: valid {val:.4f}, test {test_score:.4f}")
        results.append(test_score)
    return results


# ---------------------------------------------------------------------------------------------
# Fine-tuning (ref: M2D util/ft-*.sh with EVAR's finetune.py; AudioMAE's fine-tuning)

class Classifier(nn.Module):
    """Encoder + BatchNorm1d(affine=False) + Linear on the mean of the patch tokens (ref: EVAR
    TaskHead)."""

    def __init__(self, encoder, n_classes):
        super().__init__()
        D = encoder.cfg.width
        self.encoder = encoder
        self.head = nn.Sequential(BatchNormAcrossRanks(D, affine=False), nn.Linear(D, n_classes))
        nn.init.normal_(self.head[1].weight, std=0.01)  # ref: EVAR
        nn.init.zeros_(self.head[1].bias)

    def forward(self, spec, ids_keep=None):
        """Training crops (B, 1, F, T) with optional patch-out ids_keep (B, K) -> logits (B, C)."""
        return self.head(self.encoder(spec, ids_keep)[:, 1:].mean(1))

    def clip_logits(self, spec):
        """Whole clips of any length -> logits (B, C) from all tokens of all chunks."""
        return self.head(encode_clip(self.encoder, spec).flatten(1, 2).mean(1))


def layer_groups(model, lr, weight_decay, layer_decay):
    """Param groups with lr x decay^(depth + 1 - layer): patch embedding 0, block i -> i + 1, norm
    and head depth + 1 (ref: BEiT/MAE layer-wise decay); weight decay on >= 2-D weights only."""
    depth = len(model.encoder.blocks)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split('.')
        layer = depth + 1  # the final norm and the head
        if parts[0] == 'encoder' and parts[1] == 'blocks':
            layer = int(parts[2]) + 1
        elif parts[0] == 'encoder' and parts[1] in ('patch_embed', 'cls_token'):
            layer = 0
        g = groups.setdefault((layer, p.ndim >= 2), {
            'params': [], 'lr': lr * layer_decay ** (depth + 1 - layer),
            'weight_decay': weight_decay if p.ndim >= 2 else 0.0})
        g['params'].append(p)
    return list(groups.values())


@dataclass
class Tuning:
    """One fold's fine-tuning: what its steps use, and where it is."""
    model: nn.Module  # the Classifier, DDP-wrapped under torchrun
    raw: Classifier
    opt: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # warm-up, then cosine, per step
    dataset: data.AudioDataset  # crops of the training rows
    frontend: data.FrontEnd
    y_train: torch.Tensor  # (rows, C) targets on the device
    multi: bool  # multi-label: BCE
    at: dict  # fold, epoch, batch index, best validation score, unreadable files


def setup_fold(encoder, frontend, name, train, task, args, device, world, resumed):
    """The classifier on `encoder`, its optimizer and schedule, and the training crops; with
    `resumed`, all of them as they were saved."""
    ddp, rank, size = world
    torch.manual_seed(args.seed)
    raw = Classifier(encoder, len(task.classes)).to(device)
    raw.encoder.patch_embed.requires_grad_(not args.freeze_embed)
    model = DDP(raw, device_ids=[device.index] if device.type == 'cuda' else None) if ddp else raw
    if args.compile:
        compile_training(model, args.compile)  # the training forward; evaluation stays eager
    torch.manual_seed(args.seed + 1000 * rank)  # the same init everywhere, then per-process augmentations
    groups = layer_groups(raw, args.lr, args.weight_decay, args.layer_decay)
    opt = (torch.optim.SGD(groups, lr=args.lr, momentum=0.9) if args.optim == 'sgd' else
           torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999)))
    dataset = data.AudioDataset(train, frontend.n_samples, random_crop=True, seed=args.seed)
    steps_per_epoch = len(train) // size // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(train)} training clips cannot fill one batch of {args.batch_size} "
                         f"x {size} process(es); lower --batch_size")
    scheduler = warmup_cosine(opt, args.epochs * steps_per_epoch, args.warmup * steps_per_epoch)
    at = {'fold': name, 'epoch': 0, 'batch_idx': 0, 'best': -1.0, 'bad': set()}
    if resumed is not None:
        raw.load_state_dict(resumed['model'])
        opt.load_state_dict(resumed['optimizer'])
        scheduler.load_state_dict(resumed['scheduler'])
        set_rng_state(resumed['rng'], rank, size, device, print if rank == 0 else lambda *a: None)
        at.update({k: resumed[k] for k in at}, bad=set(resumed['bad']))
    y_train = data.class_targets(train, task.source, task.classes)[1].to(device)
    return Tuning(model, raw, opt, scheduler, dataset, frontend, y_train, task.multi, at), steps_per_epoch


def finetune_fold(encoder, frontend, split, task, args, device, world, resumed, done, got):
    """Fine-tune on train, keep the epoch with the best validation score, score it on test. Under
    torchrun each process trains on its share of every batch (DDP); all evaluate, the first saves.
    After every epoch and on SIGINT/SIGTERM (`got`) <out>/resume.pt holds where the run is, with the
    scores of the folds `done`; `resumed` is that state when --resume continues this fold."""
    name, train, valid, test = split
    ddp, rank, size = world
    t, steps_per_epoch = setup_fold(encoder, frontend, name, train, task, args, device, world, resumed)
    at, raw = t.at, t.raw
    y_valid, y_test = (data.class_targets(rows, task.source, task.classes)[1] for rows in (valid, test))
    path = os.path.join(args.out, f"best_{name.replace(' ', '')}.pt")
    done_steps = at['epoch'] * steps_per_epoch + at['batch_idx']
    bar = tqdm(total=args.epochs * steps_per_epoch, initial=done_steps, desc=f'finetune {name}',
               dynamic_ncols=True, disable=rank > 0)
    progress = lambda: save_finetune_state(args.out, device, world, {  # noqa: E731
        **at, 'done': done, 'model': raw.state_dict(), 'optimizer': t.opt.state_dict(),
        'scheduler': t.scheduler.state_dict(), 'args': vars(args)})
    while at['epoch'] < args.epochs:
        loss = train_epoch(t, args, device, world, got, bar)
        loss = mean_over_ranks({'loss': loss}, device, ddp, size)['loss']  # the last step's, all processes
        if (stop := any_rank_signal(got, ddp)):
            progress()
            if rank == 0:
                print(f"stopped by {signal.Signals(stop).name} in {name}, epoch {at['epoch']}; {args.out}/"
                      "resume.pt is saved: continue with the same command and --resume", file=sys.stderr)
            raise SystemExit(128 + stop)
        t.model.eval()
        scores, good = clip_outputs(raw.clip_logits, valid, frontend, encoder.cfg.patch, 'valid', args,
                                    device, world)
        val = task.score(scores, y_valid[good])  # the same on every process: they hold the same weights
        if val > at['best']:
            at['best'] = val
            if rank == 0:
                save_checkpoint(path, {'model': raw.state_dict(), 'model_config': asdict(encoder.cfg),
                                       'frontend': frontend.config(), 'class_names': task.classes,
                                       'epoch': at['epoch'], 'valid': val,
                                       'args': {**vars(args), 'method': 'finetune'}})
        if rank == 0:
            tqdm.write(f"{name} epoch {at['epoch']}: loss {loss:.4f}, valid {val:.4f} (best {at['best']:.4f})")
        at.update(epoch=at['epoch'] + 1, batch_idx=0)
        progress()
    bar.close()
    if ddp:
        dist.barrier()  # the best checkpoint is written
    raw.load_state_dict(torch.load(path, weights_only=True)['model'])
    raw.eval()
    scores, good = clip_outputs(raw.clip_logits, test, frontend, encoder.cfg.patch, 'test', args, device,
                                world)
    test_score = task.score(scores, y_test[good])
    if rank == 0:
        print(f"{name}: valid {at['best']:.4f}, test {test_score:.4f}")
    return test_score


def train_epoch(t, args, device, world, got, bar):
    """One epoch from batch at['batch_idx'] (a resumed epoch skips the batches done), stopping after
    the step in which any process got SIGINT/SIGTERM. Returns the last step's loss."""
    ddp, rank, size = world
    t.model.train()
    loss = torch.tensor(math.nan)
    for batch in data.epoch_loader(t.dataset, args.batch_size, t.at['epoch'], t.at['batch_idx'], rank,
                                   size, args.seed, args.num_workers):
        t.at['batch_idx'] += 1
        t.at['bad'].update(batch['bad'])
        data.check_bad(t.at['bad'], len(t.dataset), args.max_bad)
        if len(batch['wave']):  # else every clip of the batch was unreadable
            loss = finetune_step(t, batch, args, device)
            bar.update()
            bar.set_postfix(loss=f'{loss.item():.4f}')
        if any_rank_signal(got, ddp):
            break
    return loss.item()


def finetune_step(t, batch, args, device):
    """Augment (SpecAugment, random resize crop, mixup; patch-out), forward, backward, step. Returns
    the loss."""
    encoder = t.raw.encoder
    t_ratio, f_ratio = args.patchout or PATCHOUT[t.frontend.name]
    with torch.no_grad():
        spec = t.frontend(batch['wave'].to(device))  # (B, 1, F, T)
        y = t.y_train[batch['index'].to(device)]
        spec = spec_augment(spec, args.freq_mask, args.time_mask)
        if args.rrc:
            spec = random_resize_crop(spec)
        if args.mixup > 0:
            spec, y = mixup(spec, y, args.mixup)
    ids_keep = structured_masking(len(spec), encoder.cfg.grid, t_ratio, f_ratio, device)[0]
    bf16 = resolve_amp(args.amp, device, False) == 'bf16'
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = t.model(spec, ids_keep).float()
    loss = classification_loss(logits, y, t.multi)  # soft targets after mixup
    if not torch.isfinite(loss):
        at = t.at
        kept = f", the best model so far (valid {at['best']:.4f}) is intact" if at['best'] >= 0 else ''
        raise SystemExit(f"error: non-finite fine-tuning loss in {at['fold']}, epoch {at['epoch']}, "
                         f"batch {at['batch_idx']}; stopped{kept}")
    t.opt.zero_grad(set_to_none=True)
    loss.backward()
    t.opt.step()
    t.scheduler.step()
    return loss


def load(args, device):
    """The encoder to evaluate with its front-end (tools/embed.py): from --ckpt, or a random init
    (--ckpt none)."""
    torch.manual_seed(args.seed)
    if args.ckpt == 'none':
        n_frames = args.n_frames or data.default_frames(args.data, args.frontend)
        n_mels = data.FRONTENDS[args.frontend]['n_mels']
        cfg = ViTConfig(**VIT_PRESETS[args.model], n_mels=n_mels, n_frames=n_frames)
        return Encoder(ViT(cfg), data.FrontEnd(args.frontend, n_frames)).to(device)
    return load_encoder(args.ckpt, device, args.n_frames if args.mode == 'finetune' else None,
                        trust=args.trust_checkpoint)


def main(argv=None):
    args = finetune_args(argv, __doc__)
    keep_freed_memory()
    ddp, rank, size, device = init_distributed(args.device)  # torchrun: data-parallel fine-tuning
    try:
        return evaluate(args, device, (ddp, rank, size))
    finally:
        if ddp:
            dist.destroy_process_group()


def evaluate(args, device, world):
    torch.manual_seed(args.seed)
    manifest = data.resolve_manifest(args.data)
    rows = data.read_manifest(manifest)
    splits = data.folds(rows, manifest, args.seed)
    classes = sorted({name for _, tr, va, _ in splits for r in tr + va for name in r['labels']})
    multi = any(len(r['labels']) > 1 for r in rows)
    task = SimpleNamespace(classes=classes, multi=multi, source=manifest,
                           score=mean_average_precision if multi else accuracy,
                           metric='mAP' if multi else 'accuracy')
    say = print if world[1] == 0 else lambda *a, **k: None
    resumed = read_finetune_state(args, world[2], say)
    done = dict(resumed['done']) if resumed else {}  # {fold: test score}
    os.makedirs(args.out, exist_ok=True)
    enc = load(args, device)
    encoder, frontend = enc.encoder, enc.frontend
    say(f"{args.mode} | {args.ckpt} | {encoder.cfg.width}-d x {encoder.cfg.depth} blocks, {frontend.name} "
        f"{encoder.cfg.n_frames} frames | {manifest}: {len(classes)} classes, {task.metric}, {len(splits)} fold(s), "
        f"{len(splits[0][1])}/{len(splits[0][2])}/{len(splits[0][3])} train/valid/test | {device} x {world[2]}, amp "
        f"{resolve_amp(args.amp, device, fp16=False)}{' (auto)' if args.amp == 'auto' else ''}"
        f"{f', compiled ({args.compile})' if args.compile else ''}")
    if args.mode == 'linear':
        results = run_linear(enc, splits, task, args, device, world)
    else:
        with stop_on_signals() as got:
            for split in [s for s in splits if s[0] not in done]:
                if resumed and resumed['fold'] != split[0]:
                    raise SystemExit(f"error: the checkpoint is in {resumed['fold']!r}, not {split[0]!r}; resume with "
                                     "the same manifest")
                # each fold from --ckpt
                encoder = load(args, device).encoder if encoder is None else encoder
                done[split[0]] = finetune_fold(encoder, frontend, split, task, args, device, world, resumed,
                                               done, got)
                encoder = resumed = None  # the next fold starts afresh from --ckpt
        results = [done[split[0]] for split in splits]
        if world[1] == 0:
            os.remove(os.path.join(args.out, 'resume.pt'))  # the run is finished: nothing to resume
    record = {'mode': args.mode, 'ckpt': args.ckpt, 'metric': task.metric, 'test': statistics.mean(results),
              'std': statistics.pstdev(results), 'folds': results}
    say(json.dumps(record))
    return record


if __name__ == '__main__':
    main(sys.argv[1:])
