"""`train.py --bench N`: time full training steps on one fixed batch, count their FLOPs, measure the device's matmul
peak in the same run (for MFU) and a plain stack of the encoder's blocks at the same shape (the anchor: what PyTorch
reaches here), and time the data loader on its own. Prints and returns one JSON object
(docs/performance.md explains each figure)."""
import json
import resource
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from model import Block
from tools.run import AMP_DTYPES, resolve_amp


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn, n, device):
    """Mean seconds per call of fn over n calls."""
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t) / n


def eager(fn, n, device):
    """timed(), with the compiled modules in fn run eagerly."""
    with torch.compiler.set_stance('force_eager'):
        return timed(fn, n, device)


def flops(fn):
    """The FLOPs of one call of fn, counted eagerly (a compiled graph would hide its ops from the counter)."""
    with torch.compiler.set_stance('force_eager'), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(device, dtype, seconds=0.2):
    """The device's measured dense matmul throughput in TFLOP/s: square matmuls of the given dtype, as large as take
    10 ms each (at most 8192 on a GPU, 2048 on a CPU), the best of 5 trials of about `seconds` each (the best, because
    other load on the machine only ever slows a trial down). A second or two, also where the dtype is emulated."""
    n, top = 256, 8192 if device.type == 'cuda' else 2048
    while True:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # the first call also picks the kernel
        one = timed(lambda: a @ b, 1, device)
        if n >= top or one >= 0.01:
            break
        n *= 2
    reps = max(1, int(seconds / max(one, 1e-6)))
    return max(2 * n ** 3 / timed(lambda: a @ b, reps, device) / 1e12 for _ in range(5))


def plain_stack(cfg, batch, tokens, device, amp, n, backend=None):
    """The anchor: TFLOP/s of a plain stack of the encoder's blocks (model.Block, cfg.depth of them at cfg.width) on
    (batch, tokens, width) inputs, the method's encoder shape without the method around it: forward and backward in
    the run's precision, a fused AdamW step, compiled when the run is. What PyTorch reaches on this machine for this
    shape, to set the method's figure against (docs/performance.md)."""
    blocks = torch.nn.Sequential(*[Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)]).to(device)
    opt = torch.optim.AdamW(blocks.parameters(), fused=True)
    x = torch.randn(batch, tokens, cfg.width, device=device)
    # compiled as a function: in place, it would share the step's nn.Module._call_impl cache and go block by block
    forward = torch.compile(lambda x: blocks(x), backend=backend) if backend else blocks

    def step():
        with torch.autocast(device.type, dtype=AMP_DTYPES[amp], enabled=amp != 'none'):
            loss = forward(x).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(3):
        step()
    return flops(step) / timed(step, n, device) / 1e12


def bench(args, device, world, cfg, tokens, step, teacher, loader):
    """step(): one full training step (front-end, teacher, forward, backward, optimizer, EMA) on a fixed batch;
    teacher(): the frozen CLAP teacher alone on that batch, or None; loader(): a fresh DataLoader; cfg, tokens: the
    encoder's config and the tokens it encodes per clip (visible ones and CLS), for the plain stack (`anchor`).
    FLOPs and TFLOP/s are the student's; the teacher's time per step is reported on its own."""
    t = time.perf_counter()
    step()  # with --compile: the compilation
    first_step_s = time.perf_counter() - t
    for _ in range(2):  # warm-up
        step()
    student, teacher_s = flops(step), 0.0  # (also the eager path's warm-up under --compile)
    if teacher:
        student -= flops(teacher)
        teacher_s = timed(teacher, args.bench, device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    if args.compile:  # compiled and eager steps interleaved, 3 rounds: their ratio without this machine's drift
        rounds = [(timed(step, args.bench, device), eager(step, args.bench, device)) for _ in range(3)]
        step_s, eager_s = (statistics.median(r[i] for r in rounds) for i in (0, 1))
    else:
        step_s, eager_s = timed(step, args.bench, device), None
    tflops = student / (step_s - teacher_s) / 1e12
    amp = resolve_amp(args.amp, device)
    peak = matmul_peak(device, AMP_DTYPES[amp])
    anchor = plain_stack(cfg, args.batch_size, tokens, device, amp, args.bench, args.compile)
    memory = (torch.cuda.max_memory_allocated(device) if device.type == 'cuda'
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    # The loader on its own: decode + crop with --num_workers, over up to 10 batches after the first (worker start-up).
    batches = iter(loader())
    next(batches)
    t, n = time.perf_counter(), 0
    for _, items in zip(range(10), batches):
        n += len(items['wave'])
    loader_rate = n / (time.perf_counter() - t)
    samples = args.batch_size * world * args.accum
    result = {'method': args.method, 'model': args.model, 'device': str(device), 'amp': amp, 'compile': args.compile,
              'batch_size': args.batch_size, 'n_frames': cfg.n_frames, 'samples_per_s': samples / step_s,
              'first_step_s': first_step_s, 'step_s': step_s, 'eager_step_s': eager_s,
              'compile_speedup': eager_s / step_s if eager_s else None, 'teacher_s': teacher_s,
              'teacher_share': teacher_s / step_s, 'model_tflops': tflops, 'peak_tflops': peak, 'mfu': tflops / peak,
              'encoder_tokens': [args.batch_size, tokens], 'anchor_tflops': anchor, 'anchor_mfu': anchor / peak,
              'mfu_of_anchor': tflops / anchor, 'peak_memory_gb': memory / 2 ** 30, 'num_workers': args.num_workers,
              'loader_samples_per_s': loader_rate * world}
    if world == 1 or torch.distributed.get_rank() == 0:
        print(json.dumps(result))
    return result
