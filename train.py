"""Pre-training entry point for every method.

    python train.py --method m2d_clap --model vit_tiny      # the built-in demo set, on CPU or a GPU
    torchrun --nproc_per_node=gpu train.py --method m2d_clap # DDP on every GPU (gloo on CPU)

Read top to bottom: each method's recipe (PRESETS, every number with its source), the model a method
builds (build_model), how its loss terms are weighted (loss_weights), one optimizer step
(train_step), then the set-up and the training loop. A model's forward returns (losses, metrics);
train_step sums the losses with their lambdas, steps the optimizer and runs the model's after_step
(M2D's EMA). The command line is tools/cli.py; DDP, checkpoints, --resume and signals are
tools/run.py; the benchmark is tools/bench.py. The last stdout line of a run is one JSON object.
"""
import functools
import itertools
import json
import math
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
from model import M2D, VIT_PRESETS, AudioMAE, CLAPStage2, ViTConfig, random_masking
from tools.bench import bench
from tools.checkpoints import encoder_state, load_state, read_checkpoint
from tools.cli import train_args
from tools.htsat import clap_teacher
from tools.run import (AMP_DTYPES, Run, any_rank_signal, compile_training, init_distributed,
                       keep_freed_memory, resolve_amp, restore, stop_on_signals, warmup_cosine)
from tools.sentence import SentenceEncoder, caption_embeddings, pooling_of

# ---------------------------------------------------------------------------------------------
# Methods: each one's recipe. A preset's values are flag defaults (any flag overrides them) but
# for the model's named switches: `family` (its class in model.py), `target` (what AudioMAE's
# decoder predicts), `classify` (SupMAM's branch), `clap` (M2D-CLAP's). lr = blr x batch / 256 for the
# effective batch; (ours) 32 clips per process for every method, where the papers train on 128-2048.

# AudioMAE (Huang+ 2022) as its authors ran it (facebookresearch/AudioMAE
# submit_pretrain_audioset2M.sh and models_mae.py) and as MAM-CLAP §3.2 follows it: 128-bin fbank of
# 1024 frames; 80 % masking; the local decoder, 16 Swin-V2 blocks (decoder_mode 1); blr 2e-4 at
# batch 512; weight decay 1e-4; no gradient clipping; 32 epochs (the script: 33), 3 of them warm-up.
AUDIOMAE = dict(family='audiomae', target='patches', frontend='fbank128', mask_ratio=0.8, dec_depth=16,
                local_attn=True, blr=2e-4, weight_decay=1e-4, clip_grad=0.0, epochs=32, warmup=3 / 32,
                batch_size=32)
# M2D (Niizumi+ 2023), whose settings M2D-CLAP §4.2 keeps, from the authors' train_audio.py
# (nttcslab/m2d patch_m2d.diff): 80-bin log-mel of 608 frames; 70 % masking; an 8-block predictor;
# EMA decay alpha 0.99995 -> 0.99999 (their --ema_decay_init, --ema_decay); blr 3e-4 (batch 2048,
# §4.2); weight decay 0.05; gradient clipping at 3; 300 epochs, 20 of them warm-up.
M2D_RECIPE = dict(family='m2d', frontend='mel80', mask_ratio=0.7, dec_depth=8,
                  ema_decay_init=0.99995, ema_decay=0.99999, lambda_m2d=1.0, blr=3e-4, weight_decay=0.05,
                  clip_grad=3.0, epochs=300, warmup=20 / 300, batch_size=32)
PRESETS = {
    'audiomae': AUDIOMAE,
    # MAM-CLAP (Xin+ 2023): CLAP targets for visible and masked patches (§2.1, Eq. 1), 20 % masking
    # (Table 2), a 1-block decoder (Table 3). §3.2's "batch size of 128 and a learning rate of
    # 0.0002" we read as AudioMAE's blr 2e-4, whose pipeline it follows (read as lr, blr would be
    # 4e-4).
    'mam_clap': {**AUDIOMAE, 'target': 'clap', 'mask_ratio': 0.2, 'dec_depth': 1},
    # SupMAM: + the classification branch (§2.2), tau 10 (§2.3), lambda_cls 0.01 (§3.2, Table 6),
    # 40 % masking (Table 4). SupMAM-CLAP: MAM-CLAP + the branch, lambda_cls 1e-4, 40 % (Table 7).
    'supmam': {**AUDIOMAE, 'classify': True, 'mask_ratio': 0.4, 'lambda_cls': 0.01, 'tau': 10.0},
    'supmam_clap': {**AUDIOMAE, 'target': 'clap', 'classify': True, 'mask_ratio': 0.4, 'dec_depth': 1,
                    'lambda_cls': 1e-4, 'tau': 10.0},
    'm2d': M2D_RECIPE,
    # M2D-CLAP (Niizumi+ 2024): + the CLAP loss, lambda_clap 0.01 (§4.2, Eq. 4). M2D2 stage 1
    # (2025): the same with an LLM-based sentence encoder (the release: --text_encoder
    # nvidia/NV-Embed-v2).
    'm2d_clap': {**M2D_RECIPE, 'clap': True, 'lambda_clap': 0.01},
    'm2d2': {**M2D_RECIPE, 'clap': True, 'lambda_clap': 0.01},
}
# M2D2 stage 2 (--stage 2) over the m2d2 preset: the CLAP loss only; 10 s inputs (1001 frames, ref:
# the 2025 releases' 80x1001); 30 % masking (ref: the 2025 recipe, whose stage 2.1 continues with
# --mask_ratio 0). The release trains BERT-base ([CLS]); here the offline MiniLM is the default.
# (ours) blr 1e-4, 30 epochs, warm-up 10 %: the papers give none.
STAGE2 = dict(family='m2d2_stage2', lambda_clap=1.0, crop_frames=1001, mask_ratio=0.3, blr=1e-4,
              epochs=30, warmup=0.1)

# Short runs (ours; --recipe short, docs/guide.md): the papers' recipes are tuned for 1e5-3e5 steps
# of 512-2048 clips; a CPU run has ~2000 steps of 32. The lr follows the batch by the square root
# (blr x sqrt(B_paper / 32)), not linearly (16-64x less: too little for 2000 steps); M2D's EMA
# horizon 1 / (1 - alpha) keeps its fraction of the run (20k and 100k of 300k steps: 133 and 667 of
# 2000); 10 % warm-up; at vit_tiny a run takes ~20 minutes of a bf16 CPU core (~90 in fp32).
# Flags override them.
SHORT_M2D = dict(steps=2000, blr=2.4e-3, ema_decay_init=0.9925, ema_decay=0.9985, warmup=0.1)
SHORT_RECIPES = {
    'audiomae': dict(steps=1200, blr=8e-4, warmup=0.1),  # 2e-4 x sqrt(512 / 32)
    'supmam': dict(steps=1000, blr=8e-4, warmup=0.1),  # its encoder sees 60 % of the patches
    **dict.fromkeys(['mam_clap', 'supmam_clap'], dict(steps=2000, blr=8e-4, warmup=0.1)),
    **dict.fromkeys(['m2d', 'm2d_clap', 'm2d2'], SHORT_M2D),
    'm2d2_stage2': dict(steps=1000, blr=1e-3),  # 1e-4 at batch 32 barely moves in 1000 steps
}


def build_model(args, cfg, n_classes=0, text_dim=None, teacher_dim=None, multi_label=False):
    """The method's model (model.py); its forward returns (losses, metrics). Models raise ValueError
    for a configuration they cannot build."""
    dec_dim = args.dec_dim or min(512, cfg.width)  # 512 at vit_base (ref); (ours) <= a small D
    if args.family == 'audiomae':  # AudioMAE, MAM-CLAP, SupMAM, SupMAM-CLAP
        return AudioMAE(cfg, args.mask_ratio, dec_dim, args.dec_depth, args.local_attn,
                        target=args.target,  # 'patches' or 'clap' (MAM-CLAP's teacher, width teacher_dim)
                        target_dim=teacher_dim,
                        n_classes=n_classes if args.classify else 0,  # SupMAM's classifier
                        tau=args.tau, multi_label=multi_label)
    if args.family == 'm2d':  # M2D; M2D-CLAP and M2D2 stage 1 with `clap`
        return M2D(cfg, args.mask_ratio, dec_dim, args.dec_depth, (args.ema_decay_init, args.ema_decay),
                   clap=args.clap, text_dim=text_dim)
    return CLAPStage2(cfg, args.text_encoder, args.text_pooling, args.sem_depth, args.unfreeze,
                      args.mask_ratio)  # M2D2 stage 2; its encoder comes from --init


def loss_weights(args):
    """Each loss term's lambda (SupMAM Eq. 3, M2D-CLAP Eq. 4; 1 where the paper has none)."""
    return {'loss_rec': 1.0, 'loss_visible': 1.0, 'loss_masked': 1.0, 'loss_cls': args.lambda_cls,
            'loss_m2d': args.lambda_m2d, 'loss_clap': args.lambda_clap}


def weighted_loss(losses, weights):
    """The total loss, the lambda-weighted sum of the terms. A term without a weight is an error: it
    would go untrained."""
    unknown = sorted(losses.keys() - weights.keys())
    if unknown:
        raise KeyError(f"loss terms without a weight in train.loss_weights: {unknown}")
    return sum(weights[k] * v for k, v in losses.items())


def init_from(args, raw_model, frontend, say):
    """--init: another checkpoint's encoder (ours or a release) and its front-end's statistics. M2D2
    stage 2 so starts from its stage-1 encoder; stage 2.1 continues all of a stage-2 model (ref: the
    2025 recipe)."""
    ckpt = read_checkpoint(args.init, args.trust_checkpoint)
    enc = encoder_state(ckpt, raw_model.encoder, say, args.init)
    stage21 = args.family == 'm2d2_stage2' and 'audio_proj.sem_token' in ckpt['model']
    if stage21:
        load_state(raw_model, {**ckpt['model'], **{'encoder.' + k: v for k, v in enc.items()}}, args.init)
    else:
        load_state(raw_model.encoder, enc, args.init)
    if ckpt['frontend']['name'] == frontend.name:  # the encoder was trained on these statistics
        frontend.mean, frontend.std = ckpt['frontend']['mean'], ckpt['frontend']['std']
    say(f"initialized the {'whole model' if stage21 else 'encoder'} from {args.init} "
        f"({ckpt['args']['method']}, stage {ckpt['args'].get('stage', 1)})")


# ---------------------------------------------------------------------------------------------
# Data: crops of the manifest's audio, and the targets each method needs besides the audio

@dataclass
class TrainSet:
    """The training rows' crops, the front-end, and per-row targets: classes (SupMAM) or captions
    (CLAP)."""
    manifest: str
    dataset: data.AudioDataset
    frontend: data.FrontEnd
    class_names: list
    targets: torch.Tensor = None  # (rows, C) class targets, on the device
    texts: list = None  # every distinct caption (or label caption) of the training rows
    text_ids: torch.Tensor = None  # (rows, max captions) ids into texts, n_captions (rows,) per row
    n_captions: torch.Tensor = None
    # (len(texts), d_s) frozen sentence embeddings (M2D-CLAP, M2D2 stage 1)
    text_emb: torch.Tensor = None
    multi_label: bool = False  # some row has several labels: BCE instead of CE (SupMAM)

    def inputs(self, index, device):
        """Model inputs besides the spectrogram for the rows `index` (B,): class targets, a
        caption."""
        inputs = {}
        if self.targets is not None:
            inputs['y'] = self.targets[index.to(device)]
        if self.texts:
            pick = (torch.rand(len(index)) * self.n_captions[index]).long()  # a row's captions, uniformly
            ids = self.text_ids[index, pick]  # (B,)
            if self.text_emb is not None:
                inputs['text'] = self.text_emb[ids].to(device)
            else:
                inputs['text'] = [self.texts[i] for i in ids]
        return inputs


def load_train_set(args, device, master):
    """Everything a method needs from the manifest, checked before training starts."""
    manifest = data.resolve_manifest(args.data)
    rows = data.read_manifest(manifest, args.split)
    crop = None if data.builtin(args.data) else args.crop_frames
    n_frames = args.n_frames or crop or data.default_frames(args.data, args.frontend)
    frontend = data.FrontEnd(args.frontend, n_frames).to(device)
    dataset = data.AudioDataset(rows, frontend.n_samples, random_crop=True, seed=args.seed)
    ts = TrainSet(manifest, dataset, frontend, [])
    if args.classify:  # SupMAM: a label on every row
        ts.class_names, targets = data.class_targets(rows, manifest)
        ts.targets, ts.multi_label = targets.to(device), bool((targets.sum(1) > 1).any())
    if args.clap:  # one of each row's captions per step
        ts.texts = sorted({t for r in rows for t in data.row_captions(r)})
        ts.text_ids, ts.n_captions = data.caption_ids(rows, ts.texts, manifest)  # none: an error
        if args.family == 'm2d':  # a frozen sentence encoder: embeddings once, cached
            pooling = pooling_of(args.text_encoder, args.text_pooling)
            encoder = functools.cache(lambda: SentenceEncoder(args.text_encoder, pooling).to(device).eval())
            name = f'{args.text_encoder}.{pooling}'
            cached, emb = caption_embeddings(manifest, name, lambda t: encoder()(t), master)
            index = {t: i for i, t in enumerate(cached)}
            ts.text_emb = emb[[index[t] for t in ts.texts]]  # (len(texts), d_s) in `texts` order
    return ts


def batches(ts, args, epoch, batch_idx, rank, world, device, run):
    """Endless (epoch, batch index after it, wave (B, L) on the device, model inputs), from
    (epoch, batch_idx) on."""
    while True:
        for batch in data.epoch_loader(ts.dataset, args.batch_size, epoch, batch_idx, rank, world,
                                       args.seed, args.num_workers, pin_memory=device.type == 'cuda'):
            batch_idx += 1
            run.note_bad(batch['bad'])
            if len(batch['wave']):
                wave = batch['wave'].to(device, non_blocking=True)
                yield epoch, batch_idx, wave, ts.inputs(batch['index'], device)
        epoch, batch_idx = epoch + 1, 0


# ---------------------------------------------------------------------------------------------
# One training step

@dataclass
class Trainer:
    """What an optimizer step uses besides the data."""
    model: torch.nn.Module  # DDP-wrapped under torchrun
    frontend: data.FrontEnd  # waveforms -> log-mel spectrograms, batched on the device
    teacher: torch.nn.Module  # MAM-CLAP's frozen CLAP teacher, or None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # warm-up, then cosine, per optimizer step
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    autocast: torch.autocast
    weights: dict  # each loss term's lambda (loss_weights)
    accum: int  # micro-batches per optimizer step
    clip_grad: float  # max gradient norm, 0 = off


def train_step(tr, batches, step, total_steps):
    """One optimizer step: --accum micro-batches of front-end, teacher targets, forward, the
    weighted loss and backward; unscale and clip; the optimizer step; the model's after-step update.
    Returns the losses and the metrics (with the gradient norm) averaged over the micro-batches, as
    device tensors (no host-device sync), and the loader's position (epoch, batch index) after the
    last micro-batch."""
    ddp = isinstance(tr.model, DDP)
    raw_model = tr.model.module if ddp else tr.model
    losses, metrics = {}, {}
    for micro in range(tr.accum):
        epoch, batch_idx, wave, inputs = next(batches)  # wave (B, L); inputs: targets, captions
        with torch.no_grad():
            spec = tr.frontend(wave)  # (B, 1, F, T), always fp32
            if tr.teacher is not None:  # MAM-CLAP §2.1: the CLAP teacher's map of the segment (B, N, Dt)
                with tr.autocast:
                    inputs['target'] = tr.teacher(wave, raw_model.encoder.cfg.grid)
        last = micro == tr.accum - 1
        with tr.model.no_sync() if ddp and not last else nullcontext():  # all-reduce on the last
            with tr.autocast:
                step_losses, step_metrics = tr.model(spec, **inputs)
            tr.scaler.scale(weighted_loss(step_losses, tr.weights) / tr.accum).backward()
        for into, terms in ((losses, step_losses), (metrics, step_metrics)):
            for k, v in terms.items():
                into[k] = into.get(k, 0.0) + v.detach().float() / tr.accum
    tr.scaler.unscale_(tr.optimizer)  # fp16: the true gradients, for the norm and the clip
    max_norm = tr.clip_grad or math.inf
    metrics['grad_norm'] = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), max_norm)
    # fp16: skipped (and the scale halved) when gradients are not finite
    tr.scaler.step(tr.optimizer)
    tr.scaler.update()
    tr.optimizer.zero_grad(set_to_none=True)
    tr.scheduler.step()
    raw_model.after_step(step, total_steps)  # M2D: the EMA target; CLAP: the temperature's clip
    return losses, metrics, epoch, batch_idx


# ---------------------------------------------------------------------------------------------
# Set-up and the training loop

def main(argv=None):
    args = train_args(argv, PRESETS, STAGE2, SHORT_RECIPES, __doc__)
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
    steps_per_epoch = len(ts.dataset) // run.world // args.batch_size // args.accum  # optimizer
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(ts.dataset)} clips cannot fill one step of {args.batch_size} x "
                         f"{run.world} processes x {args.accum} accum; lower --batch_size")
    total_steps = args.steps or args.epochs * steps_per_epoch
    # Teacher, model and optimizer: one seed on every rank for the inits, then a per-rank stream.
    torch.manual_seed(args.seed)
    teacher = None
    if args.family == 'audiomae' and args.target == 'clap':  # frozen, never DDP-wrapped
        teacher = clap_teacher(args.clap_ckpt, args.trust_checkpoint).to(device)
    torch.manual_seed(args.seed)
    cfg = ViTConfig(**VIT_PRESETS[args.model], n_mels=ts.frontend.n_mels, n_frames=ts.frontend.n_frames)
    run_config = {'text_dim': ts.text_emb.shape[1] if ts.text_emb is not None else 0,
                  'n_classes': len(ts.class_names), 'teacher_dim': teacher.dim if teacher else 0}
    try:
        raw_model = build_model(args, cfg, multi_label=ts.multi_label, **run_config).to(device)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    torch.manual_seed(args.seed + 1000 * run.rank)
    eff_batch = args.batch_size * run.world * args.accum
    lr = args.blr * eff_batch / 256
    # fused: one kernel over all parameters; weight decay on weights with >= 2 dims only
    params = [p for p in raw_model.parameters() if p.requires_grad]
    groups = [{'params': [p for p in params if p.ndim >= 2], 'weight_decay': args.weight_decay},
              {'params': [p for p in params if p.ndim < 2], 'weight_decay': 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)
    scheduler = warmup_cosine(optimizer, total_steps, int(args.warmup * total_steps))
    amp = resolve_amp(args.amp, device)  # auto: the device's native precision
    scaler = torch.amp.GradScaler(device.type, enabled=amp == 'fp16')
    autocast = torch.autocast(device.type, dtype=AMP_DTYPES[amp], enabled=amp != 'none')
    if args.init:
        init_from(args, raw_model, ts.frontend, say)
    state = restore(args, run, raw_model, optimizer, scheduler, scaler, ts.frontend)  # --resume
    if state['step'] == 0 and args.norm_stats == 'data':
        ts.frontend.mean, ts.frontend.std = data.norm_stats_from_data(ts.frontend, ts.dataset, device)
    model = raw_model
    if run.ddp:
        model = DDP(raw_model, device_ids=[device.index] if device.type == 'cuda' else None)
    if args.compile:
        compile_training(model, args.compile)
    tr = Trainer(model, ts.frontend, teacher, optimizer, scheduler, scaler, autocast, loss_weights(args),
                 args.accum, args.clip_grad)
    say_setup(args, run, ts, cfg, params, amp, run_config['text_dim'], eff_batch, lr, total_steps,
              steps_per_epoch)
    stream = batches(ts, args, state['epoch'], state['batch_idx'], run.rank, run.world, device, run)
    if args.bench:  # training steps on one fixed batch, the teacher alone, the loader alone
        batch = next(stream)

        def teacher_alone():
            with autocast:
                return teacher(batch[2], cfg.grid)
        K = random_masking(1, cfg.grid[0] * cfg.grid[1], raw_model.mask_ratio, 'cpu')[0].shape[1]
        return bench(args, device, run.world, cfg, 1 + K,  # the encoder's tokens: CLS + K visible
                     lambda: train_step(tr, itertools.repeat(batch), 0, 1), teacher_alone if teacher else None,
                     lambda: data.epoch_loader(ts.dataset, args.batch_size, 0, 0, run.rank, run.world,
                                               args.seed, args.num_workers))
    extra = {'run': run_config, 'model_config': asdict(cfg), 'class_names': ts.class_names}
    return loop(args, run, tr, stream, state, total_steps, eff_batch, extra)


def say_setup(args, run, ts, cfg, params, amp, text_dim, eff_batch, lr, total_steps, steps_per_epoch):
    """The run's header: the method, the data, the precision, the batch and lr, the steps."""
    n_params = sum(p.numel() for p in params) / 1e6
    compiled = f', compiled ({args.compile})' if args.compile else ''
    run.say(f"{args.method} | {args.model} ({n_params:.1f}M trainable params) | {ts.manifest}: "
            f"{len(ts.dataset)} clips | {ts.frontend.name} {cfg.n_frames} frames, norm "
            f"({ts.frontend.mean:.3f}, {ts.frontend.std:.3f}) | {run.device}, amp {amp}"
            f"{' (auto)' if args.amp == 'auto' else ''}{compiled}")
    if ts.texts:
        encoded = f", {args.text_encoder} embeddings ({text_dim}-d)" if text_dim else f" for {args.text_encoder}"
        run.say(f"captions: {len(ts.texts)} distinct texts{encoded}")
    run.say(f"effective batch {eff_batch} = {args.batch_size} x {run.world} process(es) x {args.accum} "
            f"accum | lr {lr:.3g} = blr {args.blr:g} x {eff_batch} / 256 | {total_steps} steps, "
            f"{steps_per_epoch} per epoch")


def loop(args, run, tr, stream, state, total_steps, eff_batch, extra):
    """The training loop: a step, then every --log_every steps a log record, every --save_every
    steps (and on a stop signal) a checkpoint."""
    step, epoch, batch_idx, record, window = (state[k] for k in
                                              ('step', 'epoch', 'batch_idx', 'record', 'window'))
    log = run.open_log(step)
    bar = tqdm(total=total_steps, initial=step, disable=not run.master, dynamic_ncols=True, desc=args.method)
    t_log = time.perf_counter()
    tr.model.train()
    with stop_on_signals() as got:
        while step < total_steps:
            lr, scale = tr.scheduler.get_last_lr()[0], tr.scaler.get_scale()
            losses, metrics, epoch, batch_idx = train_step(tr, stream, step, total_steps)
            step += 1
            bar.update()
            # fp16: GradScaler may have skipped the step
            window = run.add(window, {**losses, **metrics}, step, (scale, tr.scaler.get_scale()))
            if step % args.log_every == 0 or step == total_steps:
                window = run.settle(window, step)
                n, skips = window.pop('n', 0), window.pop('skipped', 0)
                means = {k: v / n for k, v in window.items()} if n else {}
                total = {'loss': weighted_loss({k: means[k] for k in losses}, tr.weights)} if n else {}
                record = {'step': step, 'epoch': epoch, 'lr': lr, **total, **means,
                          **({'skipped_steps': int(skips)} if tr.scaler.is_enabled() else {}),
                          'samples_per_s': (n + skips) * eff_batch / (time.perf_counter() - t_log)}
                window, t_log = {}, time.perf_counter()
                run.write_log(log, record, bar)
            stop = any_rank_signal(got, run.ddp)
            if args.keep_every and step % args.keep_every == 0:
                run.keep(tr.model, tr.frontend, extra, step)
            if step % args.save_every == 0 or step == total_steps or stop:
                window = run.settle(window, step)
                where = dict(step=step, epoch=epoch, batch_idx=batch_idx, record=record, window=window)
                run.save(tr.model, tr.optimizer, tr.scheduler, tr.scaler, tr.frontend, extra, where)
            if stop and step < total_steps:
                run.say(f"stopped by {signal.Signals(stop).name} at step {step} of {total_steps}; "
                        f"{run.ckpt_path} is saved: continue with the same command and --resume",
                        file=sys.stderr)
                raise SystemExit(128 + stop)
    bar.close()
    if log:
        log.close()
    run.say(json.dumps(record))
    return record


if __name__ == '__main__':
    record_errors(main)(sys.argv[1:])  # under torchrun: a failing rank's traceback in the failure summary
