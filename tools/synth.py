"""The synthetic benchmark (`--data synth`): a pre-training pool of captioned scenes and two downstream tasks whose
train and test splits differ in nuisance, generated with numpy on first use into ~/.cache/mam-clap (MAMCLAP_CACHE
moves it), deterministic per clip, so that a short run can show whether pre-training learns.

    --data synth              the pool: 3000 scenes of 1-3 sources (instrument melodies, sound events) in sequence over
                              a background, captioned by their sources, every nuisance value from the whole range
    --data synth:instrument   which of 8 instruments plays a 1-4 note melody; the test split's melodies are on other
                              notes (odd MIDI numbers, training's even) over other backgrounds
    --data synth:event        which of 10 sound events occurs; the test split's backgrounds are unseen in training
    --data synth:shuffled     the pool with each scene's captions taken from another scene (a fixed permutation):
                              a control for the CLAP methods, whose captions then say nothing of their audio

Clips are 2 s of 16 kHz mono 16-bit FLAC. Every sound is additive synthesis (partials with envelopes) or shaped
noise: nothing is recorded, nothing is downloaded. Each task manifest has nuisance columns (register, background,
snr_db, gain) so that the split shift can be checked (test_all.py does; docs/guide.md describes every sound).
"""
import csv
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import soundfile as sf

from tools.demo import SAMPLE_RATE, cache_dir, colored_noise, generate_once, rms

SYNTH_VERSION, SECONDS = 1, 2.0  # a change to any sound needs a new version (a new cache folder)
N = int(SECONDS * SAMPLE_RATE)
POOL_SIZE = 3000
TASKS = {  # name: (train clips per class, test clips per class)
    'instrument': (120, 30),
    'event': (120, 30),
}


# ---------------------------------------------------------------------------------------------
# Building blocks

def envelope(n, attack, decay=None, release=0.02):
    """(n,) amplitude: linear attack (s), then exponential decay with time constant `decay` (s; None = sustain),
    linear release (s) at the end."""
    t = np.arange(n) / SAMPLE_RATE
    env = np.minimum(1.0, t / max(attack, 1e-3))
    if decay is not None:
        env = env * np.exp(-np.maximum(t - attack, 0) / decay)
    return env * np.minimum(1.0, (t[-1] - t) / release + 1e-9)


def partials(n, f0, ratios, amps, rng, decays=None, attack=0.01, vibrato=0.0, release=0.03):
    """Sum of sinusoids at f0 * ratios (Hz) with amplitudes amps, each with its own exponential decay (s) or sustained,
    a common attack, and optional vibrato (relative depth at 5-7 Hz). Partials above 7.5 kHz are left out."""
    t = np.arange(n) / SAMPLE_RATE
    phase_f0 = 2 * np.pi * f0 * (t + vibrato * np.sin(2 * np.pi * rng.uniform(5, 7) * t) / (2 * np.pi * 6))
    x = np.zeros(n)
    for k, (r, a) in enumerate(zip(ratios, amps)):
        if f0 * r > 7500:
            continue
        env = envelope(n, attack, None if decays is None else decays[k], release)
        x += a * env * np.sin(r * phase_f0 + rng.uniform(0, 2 * np.pi))
    return x


def band_noise(rng, n, lo, hi):
    """White noise kept between lo and hi Hz (a brick-wall band in the FFT)."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    return np.fft.irfft(spec * ((f >= lo) & (f <= hi)), n)


def place(x, event, start):
    """Add `event` into x from sample `start` (clipped at the end)."""
    event = event[:max(len(x) - start, 0)]
    x[start:start + len(event)] += event
    return x


def midi_hz(m):
    return 440.0 * 2 ** ((m - 69) / 12)


# ---------------------------------------------------------------------------------------------
# Instruments: one note of n samples at f0 Hz

def _formant_amps(f0, k, formants):
    f = f0 * k
    return sum(np.exp(-0.5 * ((f - c) / w) ** 2) for c, w in formants) + 0.02 / k


def note(name, f0, n, rng):
    k = np.arange(1, 31)
    u = rng.uniform
    if name == 'flute':  # few soft harmonics, breath noise, slow attack, light vibrato
        x = partials(n, f0, k[:4], [1, 0.35, 0.12, 0.04], rng, attack=0.08, vibrato=0.006)
        return x + 0.15 * band_noise(rng, n, f0, 6000) * envelope(n, 0.08)
    if name == 'organ':  # pipes an octave apart (1, 2, 4, 8) and a fifth above (3, 6), switched on and off
        return partials(n, f0, [1, 2, 3, 4, 6, 8], [1, 0.8, 0.3, 0.6, 0.2, 0.4], rng, attack=0.005, release=0.005)
    if name == 'trumpet':  # brassy: the 4th harmonic strongest, many partials, steady
        return partials(n, f0, k[:20], k[:20] * np.exp(-k[:20] / 4.0), rng, attack=0.03)
    if name == 'violin':  # sawtooth with a deep vibrato and a slow bow attack
        return partials(n, f0, k[:20], 1 / k[:20], rng, attack=0.12, vibrato=0.025)
    if name == 'guitar':  # plucked: a noise click, then 1/k partials, the upper ones decaying faster
        x = partials(n, f0, k[:16], 1 / k[:16], rng, decays=u(0.25, 0.45) / k[:16] ** 0.7, attack=0.003)
        return x + 0.3 * band_noise(rng, n, 1000, 5000) * np.exp(-np.arange(n) / 80)
    if name == 'bell':  # inharmonic partials, long decay
        ratios = np.array([0.56, 0.92, 1.19, 1.71, 2.0, 2.74, 3.0, 3.76, 4.07])
        return partials(n, f0, ratios, [1, 0.7, 0.9, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2], rng,
                        decays=u(1.0, 2.0) / ratios ** 0.5, attack=0.002)
    if name == 'marimba':  # partials at 1, 3.9, 9.2 that die out fast
        return partials(n, f0, [1, 3.9, 9.2], [1, 0.4, 0.15], rng, decays=[0.15, 0.05, 0.02], attack=0.002)
    if name == 'voice':  # a sung "ah": harmonics shaped by formants, vibrato
        amps = _formant_amps(f0, k, [(u(650, 800), 90), (u(1050, 1250), 110), (u(2500, 2900), 160)])
        return partials(n, f0, k, amps, rng, attack=0.06, vibrato=0.015)
    raise KeyError(name)


INSTRUMENTS = {  # name: captions' words
    'flute': 'a flute', 'organ': 'an organ', 'trumpet': 'a trumpet', 'violin': 'a violin',
    'guitar': 'a guitar', 'bell': 'bells', 'marimba': 'a marimba', 'voice': 'a singing voice',
}
REGISTER = {'train': range(46, 87, 2), 'test': range(45, 87, 2)}  # MIDI notes: even ones in train, odd ones in test


def melody(name, notes, rng, n):
    """1-4 notes of `name` on MIDI `notes` spread over n samples (each note ends where the next begins)."""
    x = np.zeros(n)
    bounds = np.sort(rng.uniform(0, 1, len(notes) - 1)) if len(notes) > 1 else np.array([])
    edges = (np.concatenate([[0], bounds, [1]]) * n).astype(int)
    for m, a, b in zip(notes, edges[:-1], edges[1:]):
        if b - a > 800:
            x[a:b] += note(name, midi_hz(m), b - a, rng)
    return x


# ---------------------------------------------------------------------------------------------
# Sound events: one event of up to n samples

def event(name, rng, n):
    u = rng.uniform
    t = np.arange(n) / SAMPLE_RATE
    if name == 'dog_bark':  # 1-3 short harmonic barks with a formant
        def bark(m):
            f0 = u(350, 600)
            return partials(m, f0, np.arange(1, 12), _formant_amps(f0, np.arange(1, 12), [(u(900, 1400), 300)]), rng,
                            decays=[0.06] * 11, attack=0.005)
        return _repeat(n, rng, rng.integers(1, 4), 0.25, lambda: bark(int(0.18 * SAMPLE_RATE)))
    if name == 'knock':  # 2-5 low noisy thuds
        return _repeat(n, rng, rng.integers(2, 6), 0.15, lambda: band_noise(rng, 1600, 80, u(600, 1200))
                       * np.exp(-np.arange(1600) / 300))
    if name == 'siren':  # slow sinusoidal frequency sweep
        lo, hi, rate = u(500, 800), u(1100, 1600), u(0.8, 2.0)
        f = lo + (hi - lo) * (0.5 + 0.5 * np.sin(2 * np.pi * rate * t))
        return np.sin(2 * np.pi * np.cumsum(f) / SAMPLE_RATE) * envelope(n, 0.05)
    if name == 'engine':  # low periodic pulses with harmonics
        f0 = u(25, 60)
        return partials(n, f0, np.arange(1, 25), 1 / np.arange(1, 25) ** 0.8, rng, attack=0.1) * \
            (1 + 0.3 * np.sin(2 * np.pi * u(0.5, 2) * t))
    if name == 'bird_chirp':  # fast downward chirps at 3-6 kHz
        def chirp(m):
            tt = np.arange(m) / SAMPLE_RATE
            f0, f1 = u(4500, 6000), u(2500, 3500)
            return np.sin(2 * np.pi * (f0 * tt + (f1 - f0) * tt ** 2 / (2 * tt[-1]))) * np.hanning(m)
        return _repeat(n, rng, rng.integers(3, 8), 0.1, lambda: chirp(int(u(0.04, 0.09) * SAMPLE_RATE)))
    if name == 'glass_clink':  # high inharmonic partials, short ring
        f0 = u(2000, 3000)
        return _repeat(n, rng, rng.integers(1, 3), 0.3, lambda: partials(
            int(0.5 * SAMPLE_RATE), f0, [1, 1.47, 2.09, 2.56], [1, 0.6, 0.4, 0.3], rng,
            decays=[0.15, 0.1, 0.07, 0.05], attack=0.001))
    if name == 'alarm':  # square-ish beeps
        f, rate = u(2000, 3500), u(3, 6)
        gate = ((t * rate) % 1.0) < 0.5
        return partials(n, f, [1, 3, 5], [1, 0.33, 0.2], rng, attack=0.005) * gate
    if name == 'water_drip':  # upward-gliding resonant blips
        def drip(m):
            tt = np.arange(m) / SAMPLE_RATE
            f0 = u(800, 1500)
            return np.sin(2 * np.pi * (f0 * tt + 4 * f0 * tt ** 2)) * np.exp(-tt / 0.02)
        return _repeat(n, rng, rng.integers(2, 6), 0.2, lambda: drip(int(0.08 * SAMPLE_RATE)))
    if name == 'applause':  # dense random claps
        return _repeat(n, rng, rng.integers(30, 60), 0.0, lambda: band_noise(rng, 400, 500, 5000)
                       * np.exp(-np.arange(400) / 60), spread=True)
    if name == 'footsteps':  # regular low steps with a scuff
        period = u(0.35, 0.6)
        return _repeat(n, rng, int(n / SAMPLE_RATE / period), period * 0.9, lambda: (
            band_noise(rng, 2400, 60, 400) * np.exp(-np.arange(2400) / 250)
            + 0.3 * band_noise(rng, 2400, 1000, 4000) * np.exp(-np.arange(2400) / 600)), regular=True)
    raise KeyError(name)


def _repeat(n, rng, count, min_gap, make, spread=False, regular=False):
    """`count` events from make() in n samples: at random times (spread), every n/count samples (regular), or one
    after another with random gaps of at least min_gap s."""
    x = np.zeros(n)
    if spread:
        starts = rng.integers(0, n, count)
    elif regular:
        starts = (np.arange(count) * n / max(count, 1) + rng.uniform(0, 0.05 * SAMPLE_RATE)).astype(int)
    else:
        starts = np.cumsum(rng.uniform(min_gap, min_gap + 0.25, count)) * SAMPLE_RATE - min_gap * SAMPLE_RATE
        starts = (starts * min(1.0, 0.8 * n / max(starts[-1], 1))).astype(int)
    for s in starts:
        place(x, make(), int(s))
    return x


EVENTS = {
    'dog_bark': 'a dog barking', 'knock': 'knocking', 'siren': 'a siren', 'engine': 'an engine running',
    'bird_chirp': 'birds chirping', 'glass_clink': 'glasses clinking', 'alarm': 'an alarm beeping',
    'water_drip': 'water dripping', 'applause': 'applause', 'footsteps': 'footsteps',
}


# ---------------------------------------------------------------------------------------------
# Backgrounds: the task clips' train and test splits share none; the pool has them all

def background(name, rng, n):
    t = np.arange(n) / SAMPLE_RATE
    if name == 'white':
        return rng.standard_normal(n)
    if name == 'brown':
        return colored_noise(rng, n, 2.0)
    if name == 'hum':
        f = rng.choice([50.0, 60.0])
        return partials(n, f, np.arange(1, 12), 1 / np.arange(1, 12), rng, attack=0.001) + 0.1 * rng.standard_normal(n)
    if name == 'rain':
        return _repeat(n, rng, 400, 0.0, lambda: band_noise(rng, 160, 2000, 7000) * np.exp(-np.arange(160) / 20),
                       spread=True) + 0.3 * colored_noise(rng, n, 1.0)
    if name == 'pink':
        return colored_noise(rng, n, 1.0)
    if name == 'babble':  # several "voices": formant-shaped harmonics gliding in pitch, syllable-gated
        x = np.zeros(n)
        for _ in range(4):
            f0 = rng.uniform(100, 220)
            k = np.arange(1, 30)
            amps = _formant_amps(f0, k, [(rng.uniform(300, 900), 120), (rng.uniform(900, 2400), 200)])
            gate = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 6) * t + rng.uniform(0, 6))
            x += partials(n, f0, k, amps, rng, vibrato=0.03) * gate
        return x
    if name == 'traffic':  # low rumble with slow swells
        return colored_noise(rng, n, 1.6) * (1 + 0.7 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t))
    if name == 'wind':  # band noise with slow gusts
        return band_noise(rng, n, 100, rng.uniform(600, 1500)) * (1 + 0.8 * np.sin(2 * np.pi * rng.uniform(0.3, 1) * t))
    raise KeyError(name)


BACKGROUNDS = {'white': 'train', 'brown': 'train', 'hum': 'train', 'pink': 'test', 'wind': 'test', 'rain': 'test',
               'babble': None, 'traffic': None}  # the split whose task clips use each (None: pool scenes only)
SNR = (5, 20)  # signal-to-background ratio (dB), in every split


def mix(x, rng, bg_names):
    """A background from bg_names at a random SNR, then a random peak level 0.1-0.9; returns (clip, background, snr_db,
    gain)."""
    bg_name = str(rng.choice(bg_names))
    snr = rng.uniform(*SNR)
    bg = background(bg_name, rng, len(x))
    y = x / rms(x) + bg / rms(bg) * 10 ** (-snr / 20)
    gain = rng.uniform(0.1, 0.9)
    return y / (np.abs(y).max() + 1e-9) * gain, bg_name, snr, gain


# ---------------------------------------------------------------------------------------------
# Clips of the pool and the tasks

def task_clip(task, label, split, rng):
    """(waveform, nuisance dict) of one task clip."""
    bgs = [b for b, s in BACKGROUNDS.items() if s == split]
    register = ''
    x, length = np.zeros(N), int(rng.uniform(0.5, 1.0) * N)  # the sound fills 50-100 % of the clip
    if task == 'instrument':
        notes = rng.choice(REGISTER[split], rng.integers(1, 5))
        sound, register = melody(label, notes, rng, length), ' '.join(map(str, notes))
    else:
        sound = event(label, rng, length) * envelope(length, 0.01, None, 0.05)
    place(x, sound, int(rng.integers(0, N - length + 1)))
    y, bg, snr, gain = mix(x, rng, bgs)
    return y, dict(register=register, background=bg, snr_db=f'{snr:.1f}', gain=f'{gain:.2f}')


def pool_clip(rng):
    """(waveform, labels, captions) of one pool scene: 1-3 sources in sequence over a background, every nuisance value
    from the whole range (both splits' backgrounds, registers, SNRs and levels), as a large pre-training set covers
    what its downstream tasks will meet."""
    kinds = rng.choice(['instrument', 'event'], rng.integers(1, 4))
    x, labels, words = np.zeros(N), [], []
    edges = (np.concatenate([[0], np.sort(rng.uniform(0.2, 0.8, len(kinds) - 1)), [1]]) * N).astype(int)
    for kind, a, b in zip(kinds, edges[:-1], edges[1:]):
        if kind == 'instrument':
            name = str(rng.choice(list(INSTRUMENTS)))
            notes = rng.integers(45, 87, rng.integers(1, 5))
            part, word = melody(name, notes, rng, b - a), INSTRUMENTS[name] + (' playing' if len(notes) > 1 else '')
        else:
            name = str(rng.choice(list(EVENTS)))
            part, word = event(name, rng, b - a), EVENTS[name]
        x = place(x, part / rms(part), a)
        labels.append(name)
        words.append(word)
    y, _, _, _ = mix(x, rng, list(BACKGROUNDS))
    captions = [', then '.join(words), ' followed by '.join(words)]  # the sources heard, as the task labels name them
    return y, sorted(set(labels)), captions


def task_labels(task):
    return list(INSTRUMENTS if task == 'instrument' else EVENTS)


# ---------------------------------------------------------------------------------------------
# Writing the set

def _write(root, name, x):
    sf.write(os.path.join(root, name), np.clip(x, -1, 1).astype(np.float32), SAMPLE_RATE, format='FLAC',
             subtype='PCM_16')


def _pool_rows(root, indices):
    rows = []
    for i in indices:
        x, labels, captions = pool_clip(np.random.default_rng([SYNTH_VERSION, 0, i]))
        name = f'audio/pool/{i:05d}.flac'
        _write(root, name, x)
        rows.append([name, ';'.join(labels), '|'.join(captions), 'train'])
    return rows


def _task_rows(root, task, jobs):
    rows = []
    for c, label, split, i in jobs:
        key = [SYNTH_VERSION, 1 + list(TASKS).index(task), c, ['train', 'test'].index(split), i]
        x, nuisance = task_clip(task, label, split, np.random.default_rng(key))
        name = f'audio/{task}/{label}_{split}_{i:03d}.flac'
        _write(root, name, x)
        rows.append([name, label, split, *nuisance.values()])
    return rows


def make_synth(root, pool_size=POOL_SIZE, tasks=TASKS, workers=None):
    """Synthesize the benchmark into `root`: audio/ and pool.csv, instrument.csv, event.csv (`pool_size` scenes, `tasks`
    {name: (train, test) clips per class}; a smaller set has the same first clips)."""
    workers = workers or min(8, len(os.sched_getaffinity(0)))
    for sub in ['pool', *TASKS]:
        os.makedirs(os.path.join(root, 'audio', sub), exist_ok=True)
    with ProcessPoolExecutor(workers) as ex:
        chunks = np.array_split(np.arange(pool_size), 8 * workers)
        pool = [r for rows in ex.map(_pool_rows, [root] * len(chunks), chunks) for r in rows]
        manifests = {}
        for task, (n_train, n_test) in tasks.items():
            jobs = [(c, label, split, i) for c, label in enumerate(task_labels(task))
                    for split, count in (('train', n_train), ('test', n_test)) for i in range(count)]
            parts = [jobs[k::4 * workers] for k in range(4 * workers)]
            manifests[task] = sorted(r for rows in ex.map(_task_rows, [root] * len(parts), [task] * len(parts), parts)
                                 for r in rows)
    _write_csv(os.path.join(root, 'pool.csv'), ['file', 'label', 'caption', 'split'], pool)
    for task, rows in manifests.items():
        _write_csv(os.path.join(root, f'{task}.csv'), ['file', 'label', 'split', 'register', 'background', 'snr_db',
                                                       'gain'], rows)


def _write_csv(path, header, rows):
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def synth_manifest(name='synth'):
    """Path of the manifest `synth` (the pool), `synth:TASK` or `synth:shuffled`, synthesizing the set on first
    use."""
    task = name.partition(':')[2] or 'pool'
    if task not in ('pool', 'shuffled') and task not in TASKS:
        raise SystemExit(f"error: --data {name}: no such task; choose synth (the pre-training pool), synth:shuffled "
                         f"or one of {', '.join('synth:' + t for t in TASKS)}")
    root = os.path.join(cache_dir(), f'synth-v{SYNTH_VERSION}')
    if not os.path.exists(os.path.join(root, 'pool.csv')):
        print(f"generating the synthetic benchmark into {root} (once: about a minute on 2 cores, 210 MB)")
    generate_once(root, make_synth, 'pool.csv')
    if task == 'shuffled' and not os.path.exists(os.path.join(root, 'shuffled.csv')):
        shuffle_captions(root)
    return os.path.join(root, f'{task}.csv')


def shuffle_captions(root):
    """root/shuffled.csv: pool.csv with row i's captions those of row perm[i], perm = numpy's permutation of seed 0;
    files, labels and splits unchanged. Written to a temporary name first (DDP ranks may race)."""
    with open(os.path.join(root, 'pool.csv'), newline='') as f:
        rows = list(csv.DictReader(f))
    perm = np.random.default_rng(0).permutation(len(rows))
    tmp = os.path.join(root, f'.shuffled-{os.getpid()}.tmp')
    _write_csv(tmp, list(rows[0]), [[*{**r, 'caption': rows[perm[i]]['caption']}.values()] for i, r in enumerate(rows)])
    os.replace(tmp, os.path.join(root, 'shuffled.csv'))
