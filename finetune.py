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
import math
import os
import signal
import statistics
import sys
from dataclasses import asdict
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from losses import accuracy, classification_loss, mean_average_precision
from model import VIT_PRESETS, ViT, ViTConfig, structured_masking
from tools.augment import mixup, random_resize_crop, spec_augment
from tools.embed import Encoder, encode_clip, load_encoder
from tools.run import (BatchNormAcrossRanks, any_rank_signal, compile_flag, compile_training, given_flags,
                       init_distributed, keep_freed_memory, mean_over_ranks, read_finetune_state, resolve_amp,
                       save_checkpoint, save_finetune_state, set_rng_state, share_outputs, shared_flags, stop_on_signals,
                       warmup_cosine)

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
    p.add_argument('--model', default='vit_base', choices=sorted(VIT_PRESETS), help='--ckpt none: the architecture')
    p.add_argument('--frontend', choices=sorted(data.FRONTENDS), default='mel80', help='--ckpt none: the front-end')
    p.add_argument('--n_frames', type=int, help="fine-tuning input length (default: the checkpoint's); the position "
                   "table is interpolated to it")
    p.add_argument('--epochs', type=int, help='max epochs (default: 200 linear, 100 finetune)')
    p.add_argument('--lr', type=float, help='default: 1e-3 (linear, Adam), 0.02 (finetune, SGD), 1e-4 (finetune, AdamW)')
    p.add_argument('--patience', type=int, default=20, help='linear: stop after this many epochs without a better '
                   'validation score')
    p.add_argument('--optim', choices=['sgd', 'adamw'], default='sgd', help='finetune: SGD momentum 0.9 (ref: M2D/EVAR) '
                   'or AdamW (ref: AudioMAE)')
    p.add_argument('--weight_decay', type=float, default=0.0, help='finetune: on weights of 2 or more dimensions')
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
    compile_flag(p, 'finetune: ')
    p.add_argument('--resume', action=argparse.BooleanOptionalAction, default=False,
                   help='finetune: continue the unfinished run in <out>/resume.pt (without, one there is an error)')
    p.add_argument('--out', help='folder for the best head/model per fold (default runs/<mode>)')
    known = p.parse_known_args(argv)[0]
    p.set_defaults(epochs=200 if known.mode == 'linear' else 100, out=os.path.join('runs', known.mode),
                   lr=1e-3 if known.mode == 'linear' else 0.02 if known.optim == 'sgd' else 1e-4)
    args = p.parse_args(argv)
    acts = {'linear': args.mode == 'linear', 'finetune': args.mode == 'finetune', '--ckpt none': args.ckpt == 'none'}
    given = given_flags(p, argv)
    for a in p._actions:  # a flag that does nothing here is an error, not a silent no-op; its help says where it acts
        where = (a.help or '').split(':')[0]
        if a.dest in given and not acts.get(where, True):
            p.error(f"{a.option_strings[0]} does nothing here; it is for {'' if where[0] == '-' else '--mode '}{where}")
    return args


# ---------------------------------------------------------------------------------------------
# Whole clips through the encoder

def clip_outputs(fn, rows, encoder, frontend, args, device, desc, world):
    """fn(spec) -> (B, X) over every readable clip of rows, whole (data.clip_outputs), and the indices of those rows.
    Under torchrun each process encodes every world-th clip, and all receive all outputs (tools/run.py)."""
    ddp, rank, size = world
    mine = rows[rank::size]
    bf16 = resolve_amp(args.amp, device, fp16=False) == 'bf16'
    out, good = data.clip_outputs(fn, mine, frontend, device, bf16, args.batch_size, args.num_workers,
                                  1.0 if ddp else args.max_bad, encoder.cfg.patch, desc) if mine else ([], [])
    return share_outputs(out, good, rows, args.max_bad, world) if ddp else (out, good)


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


@torch.no_grad()
def linear_scores(head, mean, std, X):
    """The trained head's scores (n, C) for features X (n, X), standardized with the training statistics."""
    return head((X - mean) / std)


def run_linear(enc: Encoder, splits, task, args, device, world):
    """Features of every clip once (shared by the processes under torchrun), then a head per fold."""
    enc.eval()
    rows = [r for _, tr, va, te in splits for r in tr + va + te]
    uniq = list({r['file']: r for r in rows}.values())  # K-fold shares clips between folds: one pass over each file
    feats, good = clip_outputs(linear_features(enc), uniq, enc.encoder, enc.frontend, args, device, 'features', world)
    data.check_finite(feats, [uniq[i] for i in good], task.source)
    by_file = {uniq[i]['file']: f for i, f in zip(good, feats)}
    results = []
    for name, train, valid, test in splits:
        parts = []
        for part in (train, valid, test):
            part = [r for r in part if r['file'] in by_file]
            parts += [torch.stack([by_file[r['file']] for r in part]),
                      data.class_targets(part, task.source, task.classes)[1]]
        head, mean, std, val = train_linear(*parts[:4], task.multi, task.score, args)  # the same in every process
        test_score = task.score(linear_scores(head, mean, std, parts[4]), parts[5])
        if world[1] == 0:
            save_checkpoint(os.path.join(args.out, f"best_{name.replace(' ', '')}.pt"), {
                'head': head.state_dict(), 'mean': mean, 'std': std, 'class_names': task.classes, 'args': vars(args)})
            print(f"{name}: valid {val:.4f}, test {test_score:.4f}")
        results.append(test_score)
    return results


# ---------------------------------------------------------------------------------------------
# Fine-tuning (ref: M2D util/ft-*.sh with EVAR's finetune.py; AudioMAE's fine-tuning)

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


def finetune_fold(encoder, frontend, split, task, args, device, world, resumed, done, got):
    """Fine-tune on train, keep the epoch with the best validation score, score it on test. Under torchrun each
    process trains on its share of every batch (DDP); all evaluate, the first saves. After every epoch and on
    SIGINT/SIGTERM (`got`) <out>/resume.pt holds where the run is, with the scores of the folds `done`; `resumed` is
    that state when --resume continues this fold."""
    name, train, valid, test = split
    ddp, rank, size = world
    torch.manual_seed(args.seed)
    raw = Classifier(encoder, len(task.classes)).to(device)
    raw.encoder.patch_embed.requires_grad_(not args.freeze_embed)
    model = DDP(raw, device_ids=[device.index] if device.type == 'cuda' else None) if ddp else raw
    if args.compile:
        compile_training(model, args.compile)  # the training forward; evaluation (clip_logits) stays eager
    torch.manual_seed(args.seed + 1000 * rank)  # the same init everywhere, then each process its own augmentations
    groups = layer_groups(raw, args.lr, args.weight_decay, args.layer_decay)
    opt = (torch.optim.SGD(groups, lr=args.lr, momentum=0.9) if args.optim == 'sgd' else
           torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999)))
    dataset = data.AudioDataset(train, frontend.n_samples, random_crop=True, seed=args.seed)
    steps_per_epoch = len(train) // size // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(train)} training clips cannot fill one batch of {args.batch_size} x {size} "
                         "process(es); lower --batch_size")
    scheduler = warmup_cosine(opt, args.epochs * steps_per_epoch, args.warmup * steps_per_epoch)
    at = {'fold': name, 'epoch': 0, 'batch_idx': 0, 'best': -1.0, 'bad': set()}  # where this fold is
    if resumed is not None:
        raw.load_state_dict(resumed['model'])
        opt.load_state_dict(resumed['optimizer'])
        scheduler.load_state_dict(resumed['scheduler'])
        set_rng_state(resumed['rng'], rank, size, device, print if rank == 0 else lambda *a: None)
        at.update({k: resumed[k] for k in at}, bad=set(resumed['bad']))

    def save_progress():
        save_finetune_state(args.out, device, world, {
            **at, 'done': done, 'model': raw.state_dict(), 'optimizer': opt.state_dict(),
            'scheduler': scheduler.state_dict(), 'args': vars(args)})

    y_train, y_valid, y_test = (data.class_targets(rows, task.source, task.classes)[1] for rows in (train, valid, test))
    y_train = y_train.to(device)
    path = os.path.join(args.out, f"best_{name.replace(' ', '')}.pt")
    bar = tqdm(total=args.epochs * steps_per_epoch, initial=at['epoch'] * steps_per_epoch + at['batch_idx'],
               desc=f'finetune {name}', dynamic_ncols=True, disable=rank > 0)
    while at['epoch'] < args.epochs:
        loss = train_epoch(model, dataset, frontend, y_train, opt, scheduler, task.multi, args, device, world, at, got, bar)
        loss = mean_over_ranks({'loss': loss}, device, ddp, size)['loss']  # the last step's, over all processes
        if (stop := any_rank_signal(got, ddp)):
            save_progress()
            if rank == 0:
                print(f"stopped by {signal.Signals(stop).name} in {name}, epoch {at['epoch']}; {args.out}/"
                      "resume.pt is saved: continue with the same command and --resume", file=sys.stderr)
            raise SystemExit(128 + stop)
        model.eval()
        scores, good = clip_outputs(raw.clip_logits, valid, encoder, frontend, args, device, 'valid', world)
        val = task.score(scores, y_valid[good])  # the same on every process: they hold the same weights
        if val > at['best']:
            at['best'] = val
            if rank == 0:
                save_checkpoint(path, {'model': raw.state_dict(), 'model_config': asdict(encoder.cfg),
                                       'frontend': frontend.config(), 'class_names': task.classes, 'epoch': at['epoch'],
                                       'valid': val, 'args': {**vars(args), 'method': 'finetune'}})
        if rank == 0:
            tqdm.write(f"{name} epoch {at['epoch']}: loss {loss:.4f}, valid {val:.4f} (best {at['best']:.4f})")
        at.update(epoch=at['epoch'] + 1, batch_idx=0)
        save_progress()
    bar.close()
    if ddp:
        dist.barrier()  # the best checkpoint is written
    raw.load_state_dict(torch.load(path, weights_only=True)['model'])
    raw.eval()
    scores, good = clip_outputs(raw.clip_logits, test, encoder, frontend, args, device, 'test', world)
    test_score = task.score(scores, y_test[good])
    if rank == 0:
        print(f"{name}: valid {at['best']:.4f}, test {test_score:.4f}")
    return test_score


def train_epoch(model, dataset, frontend, y_train, opt, scheduler, multi, args, device, world, at, got, bar):
    """One epoch from batch at['batch_idx'] (a resumed epoch skips the batches done), stopping after the step in which
    any process got SIGINT/SIGTERM. Returns the last step's loss."""
    ddp, rank, size = world
    model.train()
    loss = torch.tensor(math.nan)
    for batch in data.epoch_loader(dataset, args.batch_size, at['epoch'], at['batch_idx'], rank, size, args.seed,
                                   args.num_workers):
        at['batch_idx'] += 1
        at['bad'].update(batch['bad'])
        data.check_bad(at['bad'], len(dataset), args.max_bad)
        if len(batch['wave']):  # else every clip of the batch was unreadable
            loss = finetune_step(model, batch, frontend, y_train, opt, scheduler, multi, args, device, at)
            bar.update()
            bar.set_postfix(loss=f'{loss.item():.4f}')
        if any_rank_signal(got, ddp):
            break
    return loss.item()


def finetune_step(model, batch, frontend, y_train, opt, scheduler, multi, args, device, at):
    """Augment (SpecAugment, random resize crop, mixup; patch-out), forward, backward, step. Returns the loss."""
    encoder = getattr(model, 'module', model).encoder
    t_ratio, f_ratio = args.patchout or PATCHOUT[frontend.name]
    with torch.no_grad():
        spec = frontend(batch['wave'].to(device))  # (B, 1, F, T)
        y = y_train[batch['index'].to(device)]
        spec = spec_augment(spec, args.freq_mask, args.time_mask)
        if args.rrc:
            spec = random_resize_crop(spec)
        if args.mixup > 0:
            spec, y = mixup(spec, y, args.mixup)
    ids_keep = structured_masking(len(spec), encoder.cfg.grid, t_ratio, f_ratio, device)[0]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolve_amp(args.amp, device, False) == 'bf16'):
        logits = model(spec, ids_keep).float()
    loss = classification_loss(logits, y, multi)  # soft targets after mixup
    if not torch.isfinite(loss):
        raise SystemExit(f"error: non-finite fine-tuning loss in {at['fold']}, epoch {at['epoch']}, batch "
                         f"{at['batch_idx']}; stopped" + (f", the best model so far (valid {at['best']:.4f}) is intact"
                                                          if at['best'] >= 0 else ''))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    scheduler.step()
    return loss


def load(args, device):
    """The encoder to evaluate with its front-end (tools/embed.py): from --ckpt, or a random init (--ckpt none)."""
    torch.manual_seed(args.seed)
    if args.ckpt == 'none':
        n_frames = args.n_frames or data.default_frames(args.data, args.frontend)
        cfg = ViTConfig(**VIT_PRESETS[args.model], n_mels=data.FRONTENDS[args.frontend]['n_mels'], n_frames=n_frames)
        return Encoder(ViT(cfg), data.FrontEnd(args.frontend, n_frames)).to(device)
    return load_encoder(args.ckpt, device, args.n_frames if args.mode == 'finetune' else None,
                        trust=args.trust_checkpoint)


def main(argv=None):
    args = get_args(argv)
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
    splits = folds(rows, manifest, args.seed)
    classes = sorted({name for _, tr, va, _ in splits for r in tr + va for name in r['labels']})
    multi = any(len(r['labels']) > 1 for r in rows)
    task = SimpleNamespace(classes=classes, multi=multi, source=manifest, score=mean_average_precision if multi else
                           accuracy, metric='mAP' if multi else 'accuracy')
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
                encoder = load(args, device).encoder if encoder is None else encoder  # each fold from --ckpt
                done[split[0]] = finetune_fold(encoder, frontend, split, task, args, device, world, resumed, done, got)
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
