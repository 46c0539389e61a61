"""The course's experiments on the built-in benchmark (--data synth, --recipe short, vit_tiny): each one or two
short pre-training runs, the quantity it measures, and the range that quantity took over the seeds we ran:
ranges.json, written by `python -m tools.course measure RUNS --ranges` (docs/course.md has every seed's value, the
commands and the CPU minutes).

The measurement is re-run on the submitted checkpoints (`python -m tools.course probe E2 m2d=... m2d_clap=...`):
linear probes on the benchmark's two tasks (finetune.py, probe seeds 0-2, their mean) and zero-shot
classification (zeroshot.py), never a number the student reports."""
import json
import os
import statistics
import subprocess
import sys
from collections import namedtuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
RANGES = os.path.join(HERE, 'ranges.json')
TASKS = ('instrument', 'event')
TRAIN = 'python train.py --model vit_tiny --data synth --recipe short'

# runs: name -> the train.py flags after TRAIN (S: the pre-training seed).
# measure: per task, `probe` (linear probe accuracy) or `zeroshot` of a run, or a difference of two, as
# ('minus', a, b). minutes: per seed, the runs' minutes on one core each of an fp32 CPU (2-core AMD EPYC, two
# runs at a time), measured where docs/course.md says so, else estimated from the bf16 runs' times.
Experiment = namedtuple('Experiment', 'id title question runs measure minutes')

EXPERIMENTS = [
    Experiment(
        'E1', 'Pre-trained against a random encoder',
        "How many points does M2D-CLAP's pre-training add to a linear probe, over the same encoder at random "
        'init (`finetune.py --ckpt none --model vit_tiny`), on each task?',
        {'m2d_clap': '--method m2d_clap --seed S --out runs/m2d_clap_sS'},
        {'gain': ('minus', ('probe', 'm2d_clap'), ('probe', 'random'))}, 91),
    Experiment(
        'E2', 'Captions against none', 'What does the CLAP loss add to M2D (m2d_clap against m2d, the same seed)?',
        {'m2d': '--method m2d --seed S --out runs/m2d_sS',
         'm2d_clap': '--method m2d_clap --seed S --out runs/m2d_clap_sS'},
        {'captions': ('minus', ('probe', 'm2d_clap'), ('probe', 'm2d'))}, 169),
    Experiment(
        'E3', 'Zero-shot against the linear probe',
        "Does M2D-CLAP's zero-shot classification (class names as prompts, no training) beat a linear probe fitted "
        'on the labeled training clips?',
        {'m2d_clap': '--method m2d_clap --seed S --out runs/m2d_clap_sS'},
        {'zeroshot_minus_probe': ('minus', ('zeroshot', 'm2d_clap'), ('probe', 'm2d_clap'))}, 91),
    Experiment(
        'E4', 'M2D2 stage 2', "What does stage 2 (CLAP on the frozen stage-1 encoder) do to zero-shot accuracy?",
        {'m2d_clap': '--method m2d_clap --seed S --out runs/m2d_clap_sS',
         'm2d2_stage2': '--method m2d2 --stage 2 --init runs/m2d_clap_sS/checkpoint.pt --seed S '
                        '--out runs/m2d2_stage2_sS'},
        {'zeroshot_gain': ('minus', ('zeroshot', 'm2d2_stage2'), ('zeroshot', 'm2d_clap'))}, 121),
    Experiment(
        'E5', "MAM-CLAP's teacher: a CLAP model against a random one",
        'MAM-CLAP distills a CLAP teacher. How much of its probe comes from what the teacher learned (our '
        'm2d_clap run as the teacher, against the random HTSAT you get without --clap_ckpt)?',
        {'m2d_clap': '--method m2d_clap --seed S --out runs/m2d_clap_sS',
         'mam_clap': '--method mam_clap --clap_ckpt runs/m2d_clap_sS/checkpoint.pt --seed S --out runs/mam_clap_sS',
         'mam_clap_random': '--method mam_clap --seed S --out runs/mam_clap_random_sS'},
        {'teacher': ('minus', ('probe', 'mam_clap'), ('probe', 'mam_clap_random'))}, 300),
    Experiment(
        'E6', 'Learning curves', "Is M2D-CLAP's probe still rising at the end of the short run (step 2000 against "
        'step 1000, from --keep_every 250)?',
        {'m2d_clap': '--method m2d_clap --seed S --keep_every 250 --out runs/m2d_clap_sS'},
        {'last_1000_steps': ('minus', ('probe', 'm2d_clap'), ('probe', 'm2d_clap@step1000'))}, 91),
    Experiment(
        'E7', "Ablations of M2D-CLAP's recipe",
        'Mask ratio 0.5 instead of 0.7; lambda_clap 0.1 instead of 0.01; the papers\' EMA (0.99995 -> 0.99999) '
        "instead of the short recipe's (0.9925 -> 0.9985): which way does each move the probe at this scale?",
        {'m2d_clap': '--method m2d_clap --seed S --out runs/m2d_clap_sS',
         'mask05': '--method m2d_clap --mask_ratio 0.5 --seed S --out runs/mask05_sS',
         'lambda01': '--method m2d_clap --lambda_clap 0.1 --seed S --out runs/lambda01_sS',
         'paper_ema': '--method m2d_clap --ema_decay_init 0.99995 --ema_decay 0.99999 --seed S '
                      '--out runs/paper_ema_sS'},
        {'mask_0.5': ('minus', ('probe', 'mask05'), ('probe', 'm2d_clap')),
         'lambda_0.1': ('minus', ('probe', 'lambda01'), ('probe', 'm2d_clap')),
         'paper_ema': ('minus', ('probe', 'paper_ema'), ('probe', 'm2d_clap'))}, 364),
    Experiment(
        'E8', 'A control: shuffled captions',
        "Train M2D-CLAP on captions that belong to other clips (`--data synth:shuffled`: each scene's captions are "
        "another scene's). Is what the captions teach their content, or just a second loss?",
        {'m2d_clap': '--method m2d_clap --seed S --out runs/m2d_clap_sS',
         'shuffled': '--method m2d_clap --data synth:shuffled --seed S --out runs/shuffled_sS'},
        {'shuffled': ('minus', ('probe', 'shuffled'), ('probe', 'm2d_clap'))}, 182),
]
BY_ID = {e.id: e for e in EXPERIMENTS}


class Probes:
    """Linear-probe and zero-shot accuracies (points), computed once each by finetune.py and zeroshot.py and
    remembered in a JSON-lines file (a stopped measurement continues where it was)."""

    def __init__(self, path=None, seeds=(0, 1, 2)):
        self.path, self.seeds, self.done = path, tuple(seeds), {}
        if path and os.path.exists(path):
            with open(path) as f:
                for line in f:
                    rec = json.loads(line)
                    self.done[tuple(rec['key'])] = rec['value']

    def get(self, kind, ckpt, task, seed=None):
        # a checkpoint is known by its path and its time of writing: a rewritten one is probed again
        file = (os.path.abspath(ckpt), int(os.stat(ckpt).st_mtime)) if ckpt != 'none' else (ckpt, None)
        key = (kind, *file, task, seed)
        if key not in self.done:
            self.done[key] = run_probe(kind, ckpt, task, seed)
            if self.path:
                with open(self.path, 'a') as f:
                    f.write(json.dumps({'key': list(key), 'value': self.done[key]}) + '\n')
        return self.done[key]

    def value(self, term, ckpts, task):
        """A term of a measure, ('probe' | 'zeroshot', run name), on these checkpoints; 'random': the random-init
        encoder; 'run@stepN': the checkpoint the run kept at step N."""
        kind, name = term
        if name == 'random':
            ckpt = 'none'
        elif '@' in name:
            name, step = name.split('@')
            ckpt = os.path.join(os.path.dirname(ckpts[name]), f'{step}.pt')
        else:
            ckpt = ckpts[name]
        if kind == 'zeroshot':
            return self.get('zeroshot', ckpt, task)
        return statistics.mean(self.get('probe', ckpt, task, s) for s in self.seeds)

    def measure(self, experiment, ckpts):
        """{quantity: {task: points}} of an experiment on one seed's checkpoints {run: path}."""
        return {quantity: {t: self.value(a, ckpts, t) - self.value(b, ckpts, t) for t in TASKS}
                for quantity, (_, a, b) in experiment.measure.items()}


def run_probe(kind, ckpt, task, seed):
    """One probe in a subprocess: its last stdout line, a JSON record."""
    if kind == 'probe':
        out = os.path.join(REPO, 'runs', 'course_probe', str(os.getpid()))
        argv = ['finetune.py', '--ckpt', ckpt, '--data', f'synth:{task}', '--seed', str(seed), '--out', out]
        argv += ['--model', 'vit_tiny'] if ckpt == 'none' else []
    else:
        argv = ['zeroshot.py', '--ckpt', ckpt, '--data', f'synth:{task}']
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"error: python {' '.join(argv)} failed:\n{proc.stderr[-2000:]}")
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    return 100 * rec['test' if kind == 'probe' else 'accuracy']


def finished(ckpt):
    """Whether a run's checkpoint is its last: the step its recipe ends at (a run still training has one too)."""
    if not os.path.exists(ckpt):
        return False
    import torch
    state = torch.load(ckpt, map_location='cpu', weights_only=False, mmap=True)
    return state['step'] >= (state['args'].get('steps') or 0)


def runs_of(experiment, folder, seed):
    """The checkpoints of an experiment's runs for one seed in `folder` (<run>_s<seed>/checkpoint.pt), or None
    when one is missing or its run has not ended."""
    ckpts = {name: os.path.join(folder, f'{name}_s{seed}', 'checkpoint.pt') for name in experiment.runs}
    return ckpts if all(map(finished, ckpts.values())) else None


def measure_runs(folder, seeds, probe_seeds, write_ranges=False):
    """Every experiment whose runs are in `folder` for the seeds: {id: {seed: {quantity: {task: points}}}}, written
    to <folder>/course_results.json; with write_ranges, the ranges they give to ranges.json (prediction_ranges)."""
    probes = Probes(os.path.join(folder, 'course_probes.jsonl'), probe_seeds)
    results = {}
    for e in EXPERIMENTS:
        for seed in seeds:
            ckpts = runs_of(e, folder, seed)
            if ckpts:
                results.setdefault(e.id, {})[seed] = probes.measure(e, ckpts)
    with open(os.path.join(folder, 'course_results.json'), 'w') as f:
        json.dump(results, f, indent=1)
    if write_ranges:
        with open(RANGES, 'w') as f:
            json.dump({'precision': 'fp32', 'seeds': list(seeds), 'probe_seeds': list(probe_seeds),
                       **prediction_ranges(results)}, f, indent=1)
    return results


def markdown(results):
    """The measured quantities as a table: per experiment, quantity and task, each seed's value, their mean and the
    range (prediction_ranges)."""
    seeds = sorted({seed for per_seed in results.values() for seed in per_seed})
    spans = prediction_ranges(results)['ranges']
    lines = ['| experiment | quantity | task | ' + ' | '.join(f'seed {s}' for s in seeds) + ' | mean | range |',
             '|---|---|---|' + '---|' * (len(seeds) + 2)]
    for eid, per_seed in results.items():
        for q in BY_ID[eid].measure:
            for t in TASKS:
                values = [per_seed[s][q][t] if s in per_seed else None for s in seeds]
                known = [v for v in values if v is not None]
                cells = ' | '.join('' if v is None else f'{v:+.1f}' for v in values)
                span = spans.get(eid, {}).get(q, {}).get(t)
                span = f'{span[0]:+.1f} to {span[1]:+.1f}' if span else ''
                lines.append(f"| {eid} | {q} | {t} | {cells} | {statistics.mean(known):+.1f} | {span} |")
    return '\n'.join(lines)


def prediction_ranges(results):
    """The range published for each quantity: a 95 % prediction interval for one more pre-training seed,
    mean +- t(0.975, df) * sigma * sqrt(1 + 1/n), n its seeds, sigma the seeds' standard deviation pooled over
    the experiment's quantities and tasks measured on two seeds or more (df degrees of freedom). Per experiment:
    their spreads differ by 10x (a probe is a mean of three, zero-shot one measurement; M2D2's stage 2 swings by
    tens of points), and two seeds alone say little about the next one. {'sigma': {id: sigma}, 'df': {id: df},
    'ranges': {id: {quantity: {task: [low, high]}}}}."""
    from scipy.stats import t as student_t
    out = {'sigma': {}, 'df': {}, 'ranges': {}}
    for eid, per_seed in results.items():
        groups = {(q, task): [per_seed[s][q][task] for s in per_seed]
                  for q in BY_ID[eid].measure for task in TASKS}
        groups = {k: g for k, g in groups.items() if len(g) >= 2}
        df = sum(len(g) - 1 for g in groups.values())
        if not df:
            continue
        sigma = (sum((v - statistics.mean(g)) ** 2 for g in groups.values() for v in g) / df) ** 0.5
        out['sigma'][eid], out['df'][eid] = sigma, df
        for (q, task), g in groups.items():
            half = student_t.ppf(0.975, df) * sigma * (1 + 1 / len(g)) ** 0.5
            low, high = statistics.mean(g) - half, statistics.mean(g) + half
            out['ranges'].setdefault(eid, {}).setdefault(q, {})[task] = [round(low, 1), round(high, 1)]
    return out


def ranges():
    if not os.path.exists(RANGES):
        raise SystemExit(f"error: no measured ranges ({RANGES}); write them with python -m tools.course measure "
                         'RUNS --ranges')
    with open(RANGES) as f:
        return json.load(f)['ranges']


def check_submission(eid, pairs, seeds):
    """Measure a student's checkpoints and say, per quantity and task, whether it lies in the published range."""
    if eid not in BY_ID:
        raise SystemExit(f"error: no experiment {eid}; choose from {sorted(BY_ID)}")
    e, published = BY_ID[eid], ranges().get(eid, {})
    ckpts = dict(p.split('=', 1) for p in pairs)
    needed = {n.split('@')[0] for _, a, b in e.measure.values() for _, n in (a, b)} - {'random'}
    if needed - set(ckpts):
        raise SystemExit(f"error: {eid} needs the checkpoints of {sorted(needed - set(ckpts))} (RUN=path)")
    lines = []
    for quantity, per_task in Probes(seeds=seeds).measure(e, ckpts).items():
        for task, v in per_task.items():
            low, high = published.get(quantity, {}).get(task, (None, None))
            verdict = 'not measured yet' if low is None else 'within' if low <= v <= high else 'OUTSIDE'
            where = f" the range {low:+.1f} to {high:+.1f}, fp32" if low is not None else ''
            lines.append(f"{eid} {quantity} {task}: {v:+.1f} points ({verdict}{where})")
    return '\n'.join(lines)


def command(flags):
    """The train.py command line of a run (`S` stays the seed to choose)."""
    base = TRAIN.replace(' --data synth', '') if '--data' in flags else TRAIN
    return f"   {base} {flags}"


def cost(e):
    return f"about {e.minutes} minutes of one fp32 CPU core per seed"


def describe():
    lines = []
    for e in EXPERIMENTS:
        lines += [f"{e.id}. {e.title} ({cost(e)})", f"   {e.question}"]
        lines += [command(flags) for flags in e.runs.values()]
        for quantity, per_task in (ranges().get(e.id, {}) if os.path.exists(RANGES) else {}).items():
            spans = [f"{t} {lo:+.1f} to {hi:+.1f}" for t, (lo, hi) in per_task.items()]
            lines.append(f"   {quantity}: " + ', '.join(spans))
    return '\n'.join(lines)
