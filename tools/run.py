"""Run plumbing shared by the entry points: the device and DDP set-up, the lr schedule, atomic checkpoints, log
trimming, stop signals, finetune.py's resumable state, `Run`: train.py's output
folder, logging window and the cross-rank checks at every log and checkpoint step, and its --resume.
None of it is in the papers; it is what keeps a long run safe (docs/reliability.md says what each guarantees)."""
import ctypes
import json
import math
import os
import signal
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

import data
from tools.checkpoints import load_file, load_state


def pick_device(name):
    if name and name.startswith('mps'):
        raise SystemExit("error: --device mps (Apple GPUs) is not supported: its autocast, fused AdamW and attention "
                         "paths are untested here; use --device cpu")
    return torch.device(name or ('cuda' if torch.cuda.is_available() else 'cpu'))


AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'none': torch.float32}


def resolve_amp(amp, device, fp16=True):
    """--amp auto -> the precision the device computes natively: bf16 on CUDA of capability >= 8.0 and on CPUs with
    bf16 units (AVX512-BF16, AMX), fp16 on older CUDA GPUs (T4, V100; train.py adds the gradient
    scaler; `fp16=False` for evaluation paths without one gives fp32 there), else fp32 ('none'): emulated bf16 is about
    20x slower than fp32 (docs/performance.md). Any other value is returned as it is."""
    if amp != 'auto':
        return amp
    if device.type == 'cuda':
        return 'bf16' if torch.cuda.get_device_capability(device) >= (8, 0) else 'fp16' if fp16 else 'none'
    return 'bf16' if device.type == 'cpu' and cpu_bf16_is_native() else 'none'


def cpu_bf16_is_native():
    """Whether this CPU has bf16 matmul units (AVX512-BF16 or AMX, from cpuinfo as torch reads it) that oneDNN may use:
    ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16 (e.g. AVX2) emulates bf16, about 20x slower than fp32. Read from the
    CPU's flags, not timed: a timing probe on a busy machine can answer differently in a run and in its resume."""
    isa = os.environ.get('ONEDNN_MAX_CPU_ISA', 'ALL').upper()
    allowed = isa in ('ALL', 'DEFAULT') or 'BF16' in isa or 'AMX' in isa
    return allowed and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def compile_training(module, backend):
    """--compile: torch.compile of the module's forward and, through AOTAutograd, its backward, in place
    (nn.Module.compile): the module keeps its class and state_dict keys, so a compiled run's checkpoint has the eager
    layout and either resumes the other. Compiled once per input shape (a batch shrunk by unreadable files once more,
    with a dynamic batch size); a recompilation is logged with its reason. (ours) fallback_random: masks and dropout
    come from the same RNG calls as in eager mode, so a compiled run and an eager one of a seed draw the same masks."""
    import torch._inductor.config
    torch._inductor.config.fallback_random = True
    torch._logging.set_logs(recompiles=True)
    module.compile(backend=backend)


def init_distributed(device_name):
    """(ddp, rank, world, device) from torchrun's environment variables (plain single process without them)."""
    device = pick_device(device_name)
    if 'RANK' not in os.environ:
        return False, 0, 1, device
    rank, world, local_rank = int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), int(os.environ['LOCAL_RANK'])
    if device.type == 'cuda':
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
    # torchrun keeps one key-value store across restarts (--max-restarts): prefix this attempt's keys, or a restarted
    # rank may read a dead rank's address (gloo: "connectFullMesh failed ... Connection refused").
    store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}/", dist.TCPStore(
        os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), world,
        is_master=rank == 0 and os.environ.get('TORCHELASTIC_USE_AGENT_STORE') != 'True'))  # else torchrun's own
    dist.init_process_group('cpu:gloo,cuda:nccl' if device.type == 'cuda' else 'gloo',  # gloo: the CPU-side flags
                            store=store, rank=rank, world_size=world)
    return True, rank, world, device


def warmup_cosine(optimizer, total, warmup):
    """Per-step lr factor: linear warm-up over `warmup` steps (the first step already non-zero), then half-cycle cosine
    to 0 (ref: MAE/M2D). The closed form through LambdaLR: SequentialLR(LinearLR, CosineAnnealingLR) computes the same
    curve recursively, with rounding drift (ours). Each param group's lr is its initial lr times the factor."""
    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return LambdaLR(optimizer, factor)


def keep_freed_memory():
    """glibc hands freed blocks over 128 KB straight back to the OS, so on CPU every step page-faults its activations
    afresh. Raise the mmap and trim thresholds so they stay in the heap for reuse (ours; docs/performance.md)."""
    libc = ctypes.CDLL(None)
    if hasattr(libc, 'mallopt'):
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: glibc's maximum, 32 MiB
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap


def save_checkpoint(path, state):
    """Atomic save: write a temp file, flush it to disk, rename it over the old checkpoint, flush the rename. A process
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
    """Keep the JSON-lines records of steps <= step, the ones a checkpoint at `step` covers: a resumed run logs the
    later steps again, and a killed run may have left half a line. Atomic, like save_checkpoint."""
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
    """SIGINT and SIGTERM (Ctrl-C, a scheduler's pre-emption, torchrun passing either on) do not kill the run: the loop
    finishes its step, saves a checkpoint and exits with 128 + the signal number. Yields a list that holds the signal
    once one came. A repeated signal is ignored (torchrun re-sends the one its workers already got); SIGKILL stops at
    once and leaves the last checkpoint whole (save_checkpoint)."""
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


def any_rank_signal(got, ddp):
    """The signal (number) any rank got, else 0, so that all ranks stop at the same step. A CPU flag (gloo): no GPU sync."""
    flag = torch.tensor([got[0] if got else 0])
    if ddp:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag)


def all_rng_states(device, ddp, world):
    """Every rank's RNG state, so that each resumes its own masking stream."""
    state = {'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state(device) if device.type == 'cuda' else None}
    if not ddp:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


def set_rng_state(states, rank, world, device, say):
    if len(states) != world:
        say(f"warning: the checkpoint was written by {len(states)} processes, this run has {world}; masking randomness "
            "will differ from an uninterrupted run")
        return
    torch.set_rng_state(states[rank]['torch'])
    if device.type == 'cuda' and states[rank]['cuda'] is not None:
        torch.cuda.set_rng_state(states[rank]['cuda'], device)


def pool_bad_files(bad, fresh, ddp, world):
    """Under DDP, every rank learns the files the others could not read since the last call (fresh), so that all
    ranks count the same files and abort together."""
    if ddp:
        pooled = [None] * world
        dist.all_gather_object(pooled, sorted(fresh))
        bad.update(*pooled)
    fresh.clear()


def share_outputs(out, good, rows, max_bad, world):
    """Every process's outputs for its rows[rank::world] (their local indices `good`) -> all outputs in row order and
    their indices, on every process; unreadable clips are counted over all of `rows`."""
    _, rank, size = world
    parts = [None] * size
    dist.all_gather_object(parts, [(rank + size * i, x) for i, x in zip(good, out)])
    pairs = sorted((pair for part in parts for pair in part), key=lambda pair: pair[0])
    good = [i for i, _ in pairs]
    data.check_bad([rows[i]['file'] for i in set(range(len(rows))) - set(good)], len(rows), max_bad)
    return torch.stack([x for _, x in pairs]), good


def mean_over_ranks(sums, device, ddp, world):
    """{name: tensor or float} summed on each rank -> {name: float} averaged over ranks: the one host-device sync (and
    collective) per log interval or checkpoint, not per step."""
    if not sums:
        return {}
    vals = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device) for v in sums.values()])
    if ddp:
        dist.all_reduce(vals)
        vals /= world
    return dict(zip(sums, vals.tolist()))


# ---------------------------------------------------------------------------------------------
# finetune.py's checkpoint: where an unfinished fine-tuning run is

RESUME_MUST_MATCH = ('ckpt', 'data', 'model', 'frontend', 'n_frames', 'epochs', 'batch_size', 'lr', 'optim', 'warmup',
                     'seed')


def save_finetune_state(out, device, world, state):
    """<out>/resume.pt, atomically: `state` (fold, epoch, batch, best score, model, optimizer, scheduler, ...) with
    every process's RNG and the files no process could read."""
    ddp, rank, size = world
    rng = all_rng_states(device, ddp, size)
    pool_bad_files(state['bad'], set(state['bad']), ddp, size)  # every process's unreadable files, on every process
    if rank == 0:
        save_checkpoint(os.path.join(out, 'resume.pt'), {**state, 'bad': sorted(state['bad']), 'rng': rng, 'world': size})


def read_finetune_state(args, world, say):
    """--resume: the unfinished fine-tuning run in <out>/resume.pt, or None. Without --resume such a file is an error,
    as a checkpoint.pt is in train.py (a finished run deletes it: its results are the best_*.pt files; the name keeps
    it apart from a pre-training folder's checkpoint.pt)."""
    path = os.path.join(args.out, 'resume.pt')
    if args.mode == 'linear' or not os.path.exists(path):
        if args.resume:
            say(f"--resume: no checkpoint at {path}; starting from scratch")
        return None
    if not args.resume:
        raise SystemExit(f"error: {path} is an unfinished fine-tuning run; continue it with --resume, or pass another "
                         "--out (or delete the folder) to start a new one")
    state = load_file(path, args.trust_checkpoint)
    if not isinstance(state, dict) or not {'fold', 'args', 'world'} <= state.keys():
        raise SystemExit(f"error: {path} is not a fine-tuning state written by finetune.py; move it away or pass "
                         "another --out")
    differ = [f'--{k}' for k in RESUME_MUST_MATCH if state['args'].get(k) != vars(args).get(k)]
    differ += ['the number of processes'] if state['world'] != world else []
    if differ:
        raise SystemExit(f"error: {path} was written with another {', '.join(differ)}; resume with the same settings")
    say(f"resumed from {path}: {state['fold']}, epoch {state['epoch']}, batch {state['batch_idx']}")
    return state


# ---------------------------------------------------------------------------------------------
# One training run's state outside the training story (train.py)

class Run:
    """One training run's ranks and device, its output folder, the last saved step, the files no rank could read,
    and the checks made at every log and checkpoint step (docs/reliability.md)."""

    def __init__(self, args, ddp, rank, world, device):
        self.args, self.ddp, self.rank, self.world, self.device = args, ddp, rank, world, device
        self.master = rank == 0
        self.ckpt_path = os.path.join(args.out, 'checkpoint.pt')
        self.saved = self.checked = None  # the last saved step; the last step whose loss terms were found finite
        self.bad, self.fresh_bad = set(), set()  # unreadable files: all, and those not yet pooled across ranks
        self.n_files, self.skips_in_a_row = 0, 0  # files in the training set; fp16 steps skipped in a row
        if os.path.exists(self.ckpt_path) and not args.resume and not args.bench:
            raise SystemExit(f"error: {self.ckpt_path} exists; continue that run with --resume, or pass another --out "
                             "(or delete the folder) to start a new one")
        os.makedirs(args.out, exist_ok=True)

    def say(self, *a, **k):
        if self.master:
            print(*a, **k)

    def note_bad(self, paths):
        self.bad.update(paths)
        self.fresh_bad.update(paths)
        data.check_bad(self.bad, self.n_files, self.args.max_bad)  # this rank's own; settle() checks all ranks'

    def add(self, window, terms, step, scales):
        """Add a step's terms (device tensors) to the logging window. An fp16 step that GradScaler skipped (its scale
        went down: scales = (before, after)) is counted instead, and 20 in a row stop the run."""
        if scales[1] >= scales[0]:
            self.skips_in_a_row = 0
            return {**{k: window.get(k, 0.0) + v for k, v in terms.items()}, 'n': window.get('n', 0) + 1,
                    **({'skipped': window['skipped']} if 'skipped' in window else {})}
        self.skips_in_a_row += 1
        if self.master:
            tqdm.write(f"fp16: step {step} skipped, gradients not finite "
                       f"(GradScaler scale {scales[0]:g} -> {scales[1]:g})")
        if self.skips_in_a_row >= 20:  # ours: a 1e6-fold smaller scale did not help, so it is not an overflow
            raise SystemExit(f"error: fp16 gradients were not finite for 20 steps in a row (steps {step - 19}-{step}); "
                             f"stopped. The last checkpoint ({self.ckpt_path}, step {self.saved}) is intact; "
                             "try --amp bf16")
        return {**window, 'skipped': window.get('skipped', 0) + 1}

    def settle(self, window, step):
        """The window's sums as floats averaged over ranks: the one host-device sync (and collective) per log interval
        or checkpoint. A non-finite value stops the run before anything is saved. The ranks also pool the files
        they could not read, and abort together."""
        pool_bad_files(self.bad, self.fresh_bad, self.ddp, self.world)
        data.check_bad(self.bad, self.n_files, self.args.max_bad)
        counts = {k: window[k] for k in ('n', 'skipped') if k in window}
        vals = mean_over_ranks({k: v for k, v in window.items() if k not in counts}, self.device, self.ddp, self.world)
        if not all(map(math.isfinite, vals.values())):
            when = f"at step {step}" if step == (self.checked or 0) + 1 else f"in steps {(self.checked or 0) + 1}-{step}"
            raise SystemExit(f"error: non-finite loss or gradient {when}: " + ', '.join(
                f"{k}={v / max(counts.get('n', 1), 1):.4g}" for k, v in vals.items()) + (
                f". Stopped; the last good checkpoint ({self.ckpt_path}, step {self.saved}) is intact." if self.saved
                else ". Stopped before any checkpoint was written."))
        self.checked = step
        return {**vals, **counts}

    def save(self, model, optimizer, scheduler, scaler, frontend, extra, state):
        """Every rank's RNG, and on rank 0 everything else, in one atomic checkpoint."""
        rng = all_rng_states(self.device, self.ddp, self.world)  # each rank resumes its own masking stream
        raw_model = model.module if self.ddp else model
        if self.master:
            save_checkpoint(self.ckpt_path, {
                'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(),
                'scheduler': scheduler.state_dict(), 'scaler': scaler.state_dict(), **state, 'rng': rng,
                'args': vars(self.args), 'frontend': frontend.config(),
                **extra})
        self.saved = state['step']

    def keep(self, model, frontend, extra, step):
        """<out>/step<step>.pt on rank 0: the model's weights alone, readable wherever a checkpoint is (--ckpt)."""
        if self.master:
            raw_model = model.module if self.ddp else model
            save_checkpoint(os.path.join(self.args.out, f'step{step}.pt'), {
                'model': raw_model.state_dict(), 'step': step, 'args': vars(self.args), 'frontend': frontend.config(),
                **extra})

    def open_log(self, step):
        """<out>/log.jsonl on rank 0, trimmed to the checkpoint's step (a resumed run logs the later steps again)."""
        if not self.master:
            return None
        path = os.path.join(self.args.out, 'log.jsonl')
        trim_log(path, step)
        return open(path, 'a')

    def write_log(self, log, record, bar):
        if self.master:
            log.write(json.dumps(record) + '\n')
            log.flush()
            bar.set_postfix(loss=f"{record.get('loss', math.nan):.4f}")
            tqdm.write(' | '.join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))


# ---------------------------------------------------------------------------------------------
# --resume: everything of this run's checkpoint (train.py)

def restore(args, run, raw_model, optimizer, scheduler, scaler, frontend):
    """With --resume and <out>/checkpoint.pt: the model, optimizer, schedule, scaler, front-end statistics
    and every rank's RNG as they were saved. Returns where the loop starts: step, loader position, last
    record and partial logging window (step 0 for a fresh run)."""
    if not (args.resume and os.path.exists(run.ckpt_path)):
        if args.resume:
            run.say(f"--resume: no checkpoint at {run.ckpt_path}; starting from scratch")
        return dict(step=0, epoch=0, batch_idx=0, record={}, window={})
    ckpt = load_file(run.ckpt_path, args.trust_checkpoint)
    method, stage = ckpt['args']['method'], ckpt['args'].get('stage', 1)
    if (method, stage) != (args.method, args.stage):
        raise SystemExit(f"error: {run.ckpt_path} is a {method} (stage {stage}) checkpoint, not {args.method} "
                         f"(stage {args.stage})")
    proj = ckpt['model'].get('audio_proj.2.weight')  # (joint width, D)
    if proj is not None and len(proj) != raw_model.encoder.cfg.width:
        raise SystemExit(f"error: {run.ckpt_path} projects audio to the sentence width, as this project did before it "
                         "followed the authors' joint space; zero-shot and fine-tuning read it, training cannot continue it")
    load_state(raw_model, ckpt['model'], run.ckpt_path)
    optimizer.load_state_dict(ckpt['optimizer'])
    scheduler.load_state_dict(ckpt['scheduler'])
    scaler.load_state_dict(ckpt['scaler'])
    frontend.mean, frontend.std = ckpt['frontend']['mean'], ckpt['frontend']['std']
    set_rng_state(ckpt['rng'], run.rank, run.world, run.device, run.say)
    run.saved = run.checked = ckpt['step']
    run.say(f"resumed from {run.ckpt_path} at step {ckpt['step']}")
    return {k: ckpt[k] for k in ('step', 'epoch', 'batch_idx', 'record', 'window')}
