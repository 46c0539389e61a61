"""The results table on the synthetic benchmark: every method's short recipe, its learning curve, and the baselines.

    nohup python -m tools.table --out runs/table --jobs 2 > runs/table.log 2>&1 &   # hours on 2 CPU cores; resumable
    python -m tools.table --out runs/table --seeds 0 --methods m2d_clap m2d          # a part of it

For each pre-training seed and method: `train.py --method M --model vit_tiny --data synth --recipe short --seed S
--keep_every K` (MAM-CLAP and SupMAM-CLAP with that seed's m2d_clap run as their CLAP teacher, ours; M2D2: stage 2 on
that m2d_clap run, whose recipe and computation M2D2's stage 1 shares here). Then `finetune.py --ckpt C --data
synth:TASK --seed P` (linear evaluation): the last checkpoint of every run with every probe seed P, and the
checkpoints the first seed's runs kept along the way with the first probe seed (the curves); `zeroshot.py` for the
CLAP methods; and the baselines: a random-init encoder (`finetune.py --ckpt none`) and supervised fine-tuning from
random init (`--mode finetune`). Each command runs as its own process; its result is appended to
<out>/results.jsonl, so a stopped table continues where it was with the same command. At the end, and whenever asked
with --report, it writes <out>/table.md and <out>/curves.png.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

import data
from tools.synth import TASKS

METHODS = ['m2d_clap', 'm2d', 'audiomae', 'supmam', 'mam_clap', 'supmam_clap', 'm2d2']  # teachers before students
TEACHER = 'm2d_clap'  # the CLAP run that MAM-CLAP's teacher and M2D2's stage 2 build on (ours)
COMMON = ['--model', 'vit_tiny', '--data', 'synth', '--recipe', 'short']
LOCK = threading.Lock()  # results.jsonl is written by several job threads


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='runs/table')
    p.add_argument('--methods', nargs='+', choices=METHODS, default=METHODS)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1], help='pre-training seeds')
    p.add_argument('--probe_seeds', type=int, nargs='+', default=[0, 1, 2], help='linear-evaluation seeds')
    p.add_argument('--supervised_seeds', type=int, nargs='*', default=[0, 1], help='supervised fine-tuning seeds')
    p.add_argument('--steps', type=int, help="pre-training steps instead of the recipes' (a quick look)")
    p.add_argument('--keep_every', type=int, default=250, help='checkpoints along each run, for the curves')
    p.add_argument('--jobs', type=int, default=1, help='commands at a time, each on its share of the cores')
    p.add_argument('--report', action='store_true', help='only write table.md and curves.png from the results so far')
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# The jobs: (key, argv) in the order they run; a job whose key is in results.jsonl is done

def pretrain_jobs(args):
    jobs = []
    for seed in args.seeds:
        teacher = os.path.join(args.out, f'{TEACHER}_s{seed}')
        for method in args.methods:
            out = os.path.join(args.out, f'{method}_s{seed}')
            argv = ['train.py', '--method', method, *COMMON, '--seed', str(seed), '--out', out,
                    *(['--steps', str(args.steps)] if args.steps else [])]
            if method == 'm2d2':  # stage 2 on the m2d_clap run: M2D2's stage 1 is that recipe and computation here
                argv += ['--stage', '2', '--init', os.path.join(teacher, 'checkpoint.pt')]
            else:
                argv += ['--keep_every', str(args.keep_every)]
            if method in ('mam_clap', 'supmam_clap'):
                argv += ['--clap_ckpt', os.path.join(teacher, 'checkpoint.pt')]
            jobs.append((('train', method, seed), argv))
    return jobs


def probe_jobs(args, results):
    """Linear evaluation of the checkpoints the finished runs kept, zero-shot of the CLAP ones, and the baselines; the
    curves' points last, so that a table stopped early has its final rows."""
    jobs, curve = [], []
    for (kind, *rest), rec in sorted(results.items()):
        if kind != 'train':
            continue
        method, seed = rest
        out = os.path.join(args.out, f'{method}_s{seed}')
        final = rec['step']
        steps = sorted({int(f[4:-3]) for f in os.listdir(out) if f.startswith('step') and f.endswith('.pt')} - {final})
        for task in TASKS:
            if method != 'm2d2':  # M2D2 stage 2 keeps the stage-1 encoder frozen: m2d_clap's probe is its own
                for step in (steps if seed == args.seeds[0] else []) + [final]:  # the curve: the first seed's
                    ckpt = os.path.join(out, 'checkpoint.pt' if step == final else f'step{step}.pt')
                    for p in args.probe_seeds if step == final else args.probe_seeds[:1]:
                        (jobs if step == final else curve).append((
                            ('linear', method, seed, step, task, p),
                            ['finetune.py', '--ckpt', ckpt, '--data', f'synth:{task}', '--seed', str(p), '--out',
                             os.path.join(out, 'linear')]))
            if method in ('m2d_clap', 'm2d2'):
                jobs.append((('zeroshot', method, seed, final, task),
                             ['zeroshot.py', '--ckpt', os.path.join(out, 'checkpoint.pt'), '--data', f'synth:{task}']))
    for task in TASKS:
        random_init = ['finetune.py', '--ckpt', 'none', '--model', 'vit_tiny', '--data', f'synth:{task}']
        jobs += [(('linear', 'random', 0, 0, task, p), [*random_init, '--seed', str(p), '--out',
                                                         os.path.join(args.out, 'random')]) for p in args.probe_seeds]
        jobs += [(('finetune', 'supervised', 0, 0, task, p), [*random_init, '--mode', 'finetune', '--seed', str(p),
                  '--out', os.path.join(args.out, f'supervised_{task}_{p}')]) for p in args.supervised_seeds]
    return jobs + curve


def run_job(key, argv, args, log):
    """Run one command; its last stdout line (one JSON object) and its minutes go to results.jsonl."""
    if key[0] == 'train' and os.path.exists(os.path.join(argv[argv.index('--out') + 1], 'checkpoint.pt')):
        argv = argv + ['--resume']  # a run the table was stopped in
    t = time.perf_counter()
    threads = str(max(1, len(os.sched_getaffinity(0)) // args.jobs))
    with open(os.path.join(args.out, 'logs', '_'.join(map(str, key)) + '.log'), 'w') as f:
        proc = subprocess.run([sys.executable, *argv], stdout=subprocess.PIPE, stderr=f, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              env={**os.environ, 'OMP_NUM_THREADS': threads})
        f.write(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(argv)} failed (exit {proc.returncode}); see {f.name}")
    rec = {'key': list(key), 'minutes': (time.perf_counter() - t) / 60, 'jobs': args.jobs,
           **json.loads(proc.stdout.strip().splitlines()[-1])}
    with LOCK:
        log.write(json.dumps(rec) + '\n')
        log.flush()
    return rec


def read_results(path):
    results = {}
    if os.path.exists(path):
        for line in open(path):
            rec = json.loads(line)
            results[tuple(rec['key'])] = rec
    return results


def run_all(jobs, desc, results, args, log):
    """The jobs not yet in results, --jobs at a time (each with its share of the cores), with a progress bar."""
    todo = [(key, argv) for key, argv in jobs if key not in results]
    with tqdm(total=len(todo), desc=desc, dynamic_ncols=True) as bar, ThreadPoolExecutor(args.jobs) as pool:
        def one(key, argv):
            tqdm.write(f"{time.strftime('%H:%M')} python {' '.join(argv)}")
            results[key] = run_job(key, argv, args, log)
            bar.update()
        for future in [pool.submit(one, key, argv) for key, argv in todo]:
            future.result()  # a failed job stops the table (the others finish first)


def main(argv=None):
    args = get_args(argv)
    os.makedirs(os.path.join(args.out, 'logs'), exist_ok=True)
    path = os.path.join(args.out, 'results.jsonl')
    results = read_results(path)
    if not args.report:
        data.resolve_manifest('synth')  # generate the benchmark once, before any job
        with open(path, 'a') as log:
            jobs = pretrain_jobs(args)
            later = [job for job in jobs if job[0][1] in ('mam_clap', 'supmam_clap', 'm2d2')]  # on an m2d_clap run
            run_all([job for job in jobs if job not in later], 'pre-training', results, args, log)
            run_all(later, 'pre-training on m2d_clap', results, args, log)
            run_all(probe_jobs(args, results), 'evaluation', results, args, log)
    from tools.plots import table_curves  # matplotlib only when drawing
    with open(os.path.join(args.out, 'table.md'), 'w') as f:
        f.write(markdown(results, args))
    table_curves(results, args, os.path.join(args.out, 'curves.png'))
    print(f"wrote {os.path.join(args.out, 'table.md')} and {os.path.join(args.out, 'curves.png')}")


# ---------------------------------------------------------------------------------------------
# The table

def spread(values):
    """'mean ± std' in percent over the values, '—' without any."""
    if not values:
        return '—'
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.pstdev(values):.1f}"


def scores(results, args, kind, method, task, final=True):
    """(test scores, validation scores) of the `kind` jobs of `method` on `task` over every seed; with `final`, the
    linear probes of the runs' last checkpoints only. The validation score (held-out clips of the training split, so
    of the training conditions) is the `split: valid` line each job printed, read from its log."""
    keys = [k for k in results if k[:2] == (kind, method) and k[4] == task
            and (not final or kind != 'linear' or method == 'random'
                 or k[3] == results.get(('train', method, k[2]), {}).get('step'))]
    valid = []
    for k in keys:
        with open(os.path.join(args.out, 'logs', '_'.join(map(str, k)) + '.log')) as f:
            valid += [float(line.split()[2].rstrip(',')) for line in f if line.startswith('split: valid')]
    return [results[k]['test'] for k in keys], valid


def markdown(results, args):
    """The table: per method, minutes per run, and per task the linear probe on the shifted test split (its gain over
    the random-init encoder) and on held-out clips of the training conditions; zero-shot for the CLAP methods."""
    cols = [f'{t}: {what}' for t in TASKS for what in ('test, shifted (vs random)', 'training conditions')]
    lines = ['| method | steps | minutes | ' + ' | '.join(cols) + ' | zero-shot |\n',
             '|' + '---|' * (4 + len(cols)) + '\n']
    base = {t: scores(results, args, 'linear', 'random', t) for t in TASKS}
    for method in args.methods:
        runs = [r for k, r in results.items() if k[:2] == ('train', method)]
        if not runs:
            continue
        cells = []
        for t in TASKS:
            test, valid = scores(results, args, 'linear', 'm2d_clap' if method == 'm2d2' else method, t)
            gain = 100 * (statistics.mean(test) - statistics.mean(base[t][0])) if test and base[t][0] else None
            gain = f' ({gain:+.1f})' if gain is not None else ''
            cells += [spread(test) + gain, spread(valid)]
        zs = [f"{t} {100 * statistics.mean(v):.1f}" for t in TASKS
              if (v := [r['accuracy'] for k, r in results.items() if k[:2] == ('zeroshot', method) and k[4] == t])]
        steps = f"{runs[0]['step']}" + (' (stage 2 on m2d_clap)' if method == 'm2d2' else '')
        minutes = ' / '.join(f"{r['minutes']:.0f}" for r in runs)
        lines.append(f"| {method} | {steps} | {minutes} | {' | '.join(cells)} | {', '.join(zs) or '—'} |\n")
    for name, kind, method in (('random init (`--ckpt none`)', 'linear', 'random'),
                               ('supervised from random init (`--mode finetune`)', 'finetune', 'supervised')):
        runs = [r for k, r in results.items() if k[:2] == (kind, method)]
        minutes = f"{statistics.mean(r['minutes'] for r in runs):.1f} each" if runs else '—'
        cells = [spread(part) for t in TASKS for part in scores(results, args, kind, method, t)]
        lines.append(f"| {name} | — | {minutes} | {' | '.join(cells)} | — |\n")
    return ''.join(lines)


if __name__ == '__main__':
    main(sys.argv[1:])
