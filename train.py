"""Pre-training entry point for every method.

    python train.py --method audiomae --model vit_tiny            # built-in demo set, CPU or one GPU
    torchrun --nproc_per_node=2 train.py --method audiomae        # DDP (gloo on CPU, nccl on GPU)

A method is a PRESETS entry (its flag defaults, from the papers) plus a model class in model.py
whose forward returns the method's named loss terms; this file sums them, steps the optimizer,
logs, checkpoints and resumes. The last stdout line of a run is one JSON object.
"""
import argparse
import json
import math
import os
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import data
from model import VIT_PRESETS, AudioMAE, CLAPTeacher, ViTConfig, load_state

# Per-method flag defaults (SPEC §5). Later methods add entries; flags override any value.
PRESETS = {
    # ref: AudioMAE pre-training recipe: 80% unstructured masking, 16-block decoder with local
    # attention, norm-pix MSE on masked patches, blr 2e-4, weight decay 1e-4, no grad clipping, 32 epochs.
    'audiomae': dict(frontend='fbank128', target='patches', mask_ratio=0.8, dec_depth=16, local_attn=True,
                     blr=2e-4, weight_decay=1e-4, clip_grad=0.0, epochs=32, lambda_cls=0.0),
    # Xin+ 2023 §3.1 (AudioMAE's training pipeline otherwise): CLAP targets for visible and masked
    # patches with 20% masking and a 1-block decoder (Tables 2-3); classification branch with
    # lambda_cls 0.01 (SupMAM) / 1e-4 (SupMAM-CLAP), tau 10, 40% masking (Tables 4, 6, 7).
    'mam_clap': dict(frontend='fbank128', target='clap', mask_ratio=0.2, dec_depth=1, local_attn=True,
                     blr=2e-4, weight_decay=1e-4, clip_grad=0.0, epochs=32, lambda_cls=0.0),
    'supmam': dict(frontend='fbank128', target='patches', mask_ratio=0.4, dec_depth=16, local_attn=True,
                   blr=2e-4, weight_decay=1e-4, clip_grad=0.0, epochs=32, lambda_cls=0.01, tau=10.0),
    'supmam_clap': dict(frontend='fbank128', target='clap', mask_ratio=0.4, dec_depth=1, local_attn=True,
                        blr=2e-4, weight_decay=1e-4, clip_grad=0.0, epochs=32, lambda_cls=1e-4, tau=10.0),
}


def build_mae(cfg, a, n_classes):
    """AudioMAE; MAM-CLAP with --target clap; Sup* when there are classes (--lambda_cls > 0)."""
    return AudioMAE(cfg, a.mask_ratio, a.dec_dim, a.dec_depth, a.local_attn, n_classes, a.tau,
                    CLAPTeacher.dim if a.target == 'clap' else 0)


MODELS = {m: build_mae for m in ('audiomae', 'mam_clap', 'supmam', 'supmam_clap')}  # -> model returning named losses


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--method', required=True, choices=sorted(PRESETS))
    g = p.add_argument_group('data')
    g.add_argument('--data', default='demo', help="'demo' (built-in synthetic set) or a CSV manifest")
    g.add_argument('--split', default='train', help='manifest rows used when it has a split column')
    g.add_argument('--frontend', choices=sorted(data.FRONTENDS), help='log-mel front-end (preset per method)')
    g.add_argument('--n_frames', type=int, help='crop length in frames (default: the front-end\'s; '
                   f'{data.DEMO_FRAMES} on the demo set)')
    g.add_argument('--norm_stats', choices=['default', 'data'], default='default',
                   help="spectrogram mean/std: the front-end's defaults, or measured on the training set")
    g.add_argument('--num_workers', type=int, default=2, help='decoding workers per process')
    g.add_argument('--max_bad', type=float, default=0.05, help='abort when more than this fraction of files fail')
    g = p.add_argument_group('model')
    g.add_argument('--model', default='vit_base', choices=sorted(VIT_PRESETS))
    g.add_argument('--mask_ratio', type=float)
    g.add_argument('--dec_dim', type=int, help='decoder width (default: min(512, encoder width); 512 is the papers\')')
    g.add_argument('--dec_depth', type=int)
    g.add_argument('--local_attn', action=argparse.BooleanOptionalAction, help='windowed decoder attention')
    g.add_argument('--lambda_cls', type=float, help='weight of the classification loss (> 0 adds the SupMAM branch)')
    g.add_argument('--tau', type=float, default=10.0, help='classification temperature: CE(logits / tau, y)')
    g.add_argument('--target', choices=['patches', 'clap'], help='reconstruct spectrogram patches, or CLAP teacher features')
    g.add_argument('--clap_ckpt', help='official LAION-CLAP HTSAT-tiny checkpoint for the teacher (random weights without)')
    g = p.add_argument_group('optimization')
    g.add_argument('--steps', type=int, help='optimizer steps (overrides --epochs)')
    g.add_argument('--epochs', type=int)
    g.add_argument('--batch_size', type=int, default=32, help='clips per process per micro-step')
    g.add_argument('--accum', type=int, default=1, help='gradient-accumulation micro-steps per optimizer step')
    g.add_argument('--blr', type=float, help='base lr; lr = blr * effective batch / 256')
    g.add_argument('--weight_decay', type=float, default=0.05)
    g.add_argument('--warmup', type=float, default=0.1, help='linear warm-up, as a fraction of all steps')
    g.add_argument('--clip_grad', type=float, help='max grad norm (0 = off)')
    g.add_argument('--amp', choices=['bf16', 'fp16', 'none'], default='bf16')
    g = p.add_argument_group('run')
    g.add_argument('--out', help='output folder (default runs/<method>)')
    g.add_argument('--resume', action=argparse.BooleanOptionalAction, default=False,
                   help='continue from <out>/checkpoint.pt when it exists')
    g.add_argument('--init', help='initialize the encoder from a checkpoint')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--device', help='cpu or cuda (default: cuda when available)')
    g.add_argument('--log_every', type=int, default=10)
    g.add_argument('--save_every', type=int, default=500, help='checkpoint every N steps (and at the end)')
    g.add_argument('--bench', type=int, default=0, metavar='N', help='time N training steps, print one JSON line, exit')
    method = p.parse_known_args(argv)[0].method
    p.set_defaults(**PRESETS[method])
    args = p.parse_args(argv)
    args.out = args.out or os.path.join('runs', args.method)
    return args


def lr_at(step, total, warmup, peak):
    """Linear warm-up, then half-cycle cosine to 0 (per optimizer step)."""
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def param_groups(model, weight_decay):
    """Weight decay on weights with >= 2 dims only (not biases, norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{'params': [p for p in params if p.ndim >= 2], 'weight_decay': weight_decay},
            {'params': [p for p in params if p.ndim < 2], 'weight_decay': 0.0}]


def rng_state(device):
    return {'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state(device) if device.type == 'cuda' else None}


def save_checkpoint(path, state):
    """Atomic save: write a temp file, flush it to disk, rename over the old checkpoint."""
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def matmul_peak(device, dtype):
    """The device's measured dense matmul throughput in TFLOP/s (square matmuls of the given dtype)."""
    n, reps = (8192, 20) if device.type == 'cuda' else (2048, 5)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def main(argv=None):
    args = get_args(argv)
    ddp = 'RANK' in os.environ
    rank, world, local_rank = 0, 1, 0
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if ddp:
        rank, world, local_rank = int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), int(os.environ['LOCAL_RANK'])
        if device.type == 'cuda':
            device = torch.device('cuda', local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    try:
        return train(args, ddp, rank, world, device)
    finally:
        if ddp:
            dist.destroy_process_group()


def train(args, ddp, rank, world, device):
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    if args.amp == 'fp16' and device.type != 'cuda':
        raise SystemExit("error: --amp fp16 needs a CUDA device; use --amp bf16 (or none) on CPU")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # Data: workers decode and crop; the front-end runs batched on the device.
    manifest = data.resolve_manifest(args.data)
    rows = data.read_manifest(manifest, args.split)
    args.n_frames = args.n_frames or (data.DEMO_FRAMES if args.data == 'demo' else data.FRONTENDS[args.frontend]['n_frames'])
    frontend = data.FrontEnd(args.frontend, args.n_frames).to(device)
    dataset = data.AudioDataset(rows, frontend.n_samples, random_crop=True, seed=args.seed)
    steps_per_epoch = len(dataset) // world // args.batch_size // args.accum  # optimizer steps
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(dataset)} clips cannot fill one step of {args.batch_size} x {world} processes "
                         f"x {args.accum} accum; lower --batch_size")
    total_steps = args.steps or args.epochs * steps_per_epoch
    warmup = int(args.warmup * total_steps)
    # A classification branch needs a label on every training row; refuse before training starts.
    class_names, targets = data.label_table(rows, manifest) if args.lambda_cls > 0 else ([], None)
    targets = targets.to(device) if targets is not None else None
    weights = {'loss_cls': args.lambda_cls}  # lambda for each named term; 1 for terms not listed (SupMAM Eq. 3)

    def weighted_total(terms):
        return sum(weights.get(k, 1.0) * v for k, v in terms.items())

    # Model and optimizer. Same seed on every rank for the init, then a per-rank stream for masking.
    torch.manual_seed(args.seed)
    args.dec_dim = args.dec_dim or min(512, VIT_PRESETS[args.model]['width'])  # (ours) no decoder wider than a small encoder
    cfg = ViTConfig(**VIT_PRESETS[args.model], n_mels=frontend.n_mels, n_frames=args.n_frames)
    raw_model = MODELS[args.method](cfg, args, len(class_names)).to(device)
    teacher = CLAPTeacher(args.clap_ckpt).to(device) if args.target == 'clap' else None  # frozen, never in DDP
    torch.manual_seed(args.seed + 1000 * rank)
    eff_batch = args.batch_size * world * args.accum
    lr = args.blr * eff_batch / 256
    optimizer = torch.optim.AdamW(param_groups(raw_model, args.weight_decay), lr=lr, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    autocast = torch.autocast(device.type, dtype=torch.float16 if args.amp == 'fp16' else torch.bfloat16,
                              enabled=args.amp != 'none')

    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, 'checkpoint.pt')
    step, epoch, batch_idx, record, window, saved = 0, 0, 0, {}, {}, None
    if args.init:
        ckpt = torch.load(args.init, map_location='cpu', weights_only=True)
        sd = ckpt.get('model', ckpt)
        load_state(raw_model.encoder, {k[8:]: v for k, v in sd.items() if k.startswith('encoder.')}, args.init)
        say(f"initialized the encoder from {args.init}")
    if args.resume and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=True)
        if ckpt['args']['method'] != args.method:
            raise SystemExit(f"error: {ckpt_path} is a {ckpt['args']['method']} checkpoint, not {args.method}")
        load_state(raw_model, ckpt['model'], ckpt_path)
        optimizer.load_state_dict(ckpt['optimizer'])
        scaler.load_state_dict(ckpt['scaler'])
        step, epoch, batch_idx, record, window = ckpt['step'], ckpt['epoch'], ckpt['batch_idx'], ckpt['record'], ckpt['window']
        saved = step
        frontend.mean, frontend.std = ckpt['frontend']['mean'], ckpt['frontend']['std']
        if len(ckpt['rng']) == world:
            torch.set_rng_state(ckpt['rng'][rank]['torch'])
            if device.type == 'cuda' and ckpt['rng'][rank]['cuda'] is not None:
                torch.cuda.set_rng_state(ckpt['rng'][rank]['cuda'], device)
        else:
            say(f"warning: the checkpoint was written by {len(ckpt['rng'])} processes, this run has {world}; "
                "masking randomness will differ from an uninterrupted run")
        say(f"resumed from {ckpt_path} at step {step}")
    elif args.resume:
        say(f"--resume: no checkpoint at {ckpt_path}; starting from scratch")
    elif args.norm_stats == 'data':
        frontend.mean, frontend.std = data.norm_stats_from_data(frontend, dataset, device)
    model = DDP(raw_model, device_ids=[device.index] if device.type == 'cuda' else None) if ddp else raw_model

    n_params = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    say(f"{args.method} | {args.model} ({n_params / 1e6:.1f}M trainable params) | {manifest}: {len(dataset)} clips | "
        f"{frontend.name} {args.n_frames} frames, norm ({frontend.mean:.3f}, {frontend.std:.3f}) | {device}, amp {args.amp}")
    say(f"effective batch {eff_batch} = {args.batch_size} x {world} process(es) x {args.accum} accum | "
        f"lr {lr:.3g} = blr {args.blr:g} x {eff_batch} / 256 | {total_steps} steps, {steps_per_epoch} per epoch")

    def stream(epoch, batch_idx):
        """Endless batches, starting at (epoch, batch_idx); yields the position after each batch."""
        while True:
            loader = data.epoch_loader(dataset, args.batch_size, epoch, batch_idx, rank, world, args.seed,
                                       args.num_workers, pin_memory=device.type == 'cuda')
            for batch in loader:
                batch_idx += 1
                yield epoch, batch_idx, batch
            epoch, batch_idx = epoch + 1, 0

    batches, bad_files = stream(epoch, batch_idx), set()

    def next_batch():
        while True:
            e, b, batch = next(batches)
            bad_files.update(batch['bad'])
            if len(bad_files) > args.max_bad * len(dataset):
                raise SystemExit(f"error: {len(bad_files)} of {len(dataset)} audio files could not be read "
                                 f"(more than --max_bad {args.max_bad}), e.g. {sorted(bad_files)[:3]}")
            if len(batch['wave']):
                y = targets[batch['index'].to(device)] if targets is not None else None
                return e, b, batch['wave'].to(device, non_blocking=True), y

    def teacher_targets(wave):
        """(B, L) -> (B, N, 768) CLAP targets: fp32 front-end, trunk under the run's autocast."""
        with torch.no_grad(), autocast:
            return teacher(wave, cfg.grid)

    def forward_backward(wave, y, micro):
        """One micro-step. Returns the loss terms, averaged over ranks, as floats."""
        with torch.no_grad():
            spec = frontend(wave)  # (B, 1, F, T), always fp32
        target = teacher_targets(wave) if teacher else None
        with model.no_sync() if ddp and micro < args.accum - 1 else nullcontext():
            with autocast:
                terms = model(spec, y, target)
            loss = weighted_total(terms)
            vals = torch.stack([v.detach().float() for v in terms.values()])
            if ddp:
                dist.all_reduce(vals)
                vals /= world
            vals = dict(zip(terms, vals.tolist()))
            if not all(map(math.isfinite, vals.values())):
                raise SystemExit(f"error: non-finite loss at step {step + 1}: " + ', '.join(f"{k}={v}" for k, v in vals.items())
                                 + (f". Stopped; the last good checkpoint ({ckpt_path}, step {saved}) is intact." if saved
                                    else ". Stopped before any checkpoint was written."))
            scaler.scale(loss / args.accum).backward()
        return vals

    def optimizer_step():
        if args.clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    if args.bench:
        return bench(args, device, world, next_batch()[2:], forward_backward, optimizer_step, say,
                     teacher_targets if teacher else None)

    log = open(os.path.join(args.out, 'log.jsonl'), 'a') if master else None
    bar = tqdm(total=total_steps, initial=step, disable=not master, dynamic_ncols=True, desc=args.method)
    t_log = time.perf_counter()
    model.train()
    while step < total_steps:
        for g in optimizer.param_groups:
            g['lr'] = lr_at(step, total_steps, warmup, lr)
        for micro in range(args.accum):
            epoch, batch_idx, wave, y = next_batch()
            for k, v in forward_backward(wave, y, micro).items():
                window[k] = window.get(k, 0.0) + v / args.accum
        optimizer_step()
        step += 1
        window['n'] = window.get('n', 0) + 1
        bar.update()
        if step % args.log_every == 0 or step == total_steps:
            n, dt = window.pop('n'), time.perf_counter() - t_log
            terms = {k: v / n for k, v in window.items()}
            record = {'step': step, 'epoch': epoch, 'lr': optimizer.param_groups[0]['lr'], 'loss': weighted_total(terms),
                      **terms, 'samples_per_s': n * eff_batch / dt}
            window, t_log = {}, time.perf_counter()
            if master:
                log.write(json.dumps(record) + '\n')
                log.flush()
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                tqdm.write(' | '.join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        if step % args.save_every == 0 or step == total_steps:
            rng = [rng_state(device)]  # every rank's RNG, so each resumes its own masking stream
            if ddp:
                rng = [None] * world
                dist.all_gather_object(rng, rng_state(device))
            if master:
                save_checkpoint(ckpt_path, {
                    'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
                    'step': step, 'epoch': epoch, 'batch_idx': batch_idx, 'record': record, 'window': window, 'rng': rng,
                    'args': vars(args), 'model_config': asdict(cfg), 'frontend': frontend.config(),
                    'class_names': class_names})
            saved = step
    bar.close()
    if master:
        log.close()
    say(json.dumps(record))
    return record


def bench(args, device, world, batch, forward_backward, optimizer_step, say, teacher=None):
    """Time full training steps (front-end, teacher, forward, backward, optimizer) on one fixed batch.

    FLOPs and TFLOP/s are the student's; the teacher's time per step is reported on its own.
    """
    def timed(fn, n):
        sync(device)
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync(device)
        return (time.perf_counter() - t) / n

    def step():
        forward_backward(*batch, 0)
        optimizer_step()

    for _ in range(3):  # warm-up
        step()
    with FlopCounterMode(display=False) as counter:
        forward_backward(*batch, 0)
    optimizer_step()
    flops = counter.get_total_flops()
    teacher_s = 0.0
    if teacher:
        with FlopCounterMode(display=False) as counter:
            teacher(batch[0])
        flops -= counter.get_total_flops()
        teacher_s = timed(lambda: teacher(batch[0]), args.bench)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    step_s = timed(step, args.bench)
    tflops = flops / (step_s - teacher_s) / 1e12
    peak = matmul_peak(device, {'bf16': torch.bfloat16, 'fp16': torch.float16, 'none': torch.float32}[args.amp])
    memory = (torch.cuda.max_memory_allocated(device) if device.type == 'cuda'
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    result = {'method': args.method, 'model': args.model, 'device': str(device), 'amp': args.amp,
              'batch_size': args.batch_size, 'n_frames': args.n_frames, 'samples_per_s': args.batch_size * world / step_s,
              'step_s': step_s, 'teacher_s': teacher_s, 'teacher_share': teacher_s / step_s, 'model_tflops': tflops,
              'peak_tflops': peak, 'mfu': tflops / peak, 'peak_memory_gb': memory / 2 ** 30}
    say(json.dumps(result))
    return result


if __name__ == '__main__':
    main(sys.argv[1:])
