"""The demo set: 12 synthetic sound classes, 2 s clips at 16 kHz with captions, deterministic, generated with numpy
on first use into ~/.cache/mam-clap (MAMCLAP_CACHE moves it), so that every command runs with no download."""
import csv
import os
import shutil
import tempfile

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000  # as data.SAMPLE_RATE (data.py imports this module)

DEMO_VERSION, DEMO_SECONDS, DEMO_FRAMES = 2, 2.0, 192  # 192 frames = 1.92 s crops of 2 s clips
DEMO_TRAIN, DEMO_TEST = 30, 10  # clips per class


def colored_noise(rng, n, exponent):
    """Noise whose amplitude spectrum falls as f^-exponent (0 white, 1 pink, 2 brown)."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    return np.fft.irfft(spec / np.maximum(f, 20.0) ** exponent, n)


def _bursts(n, times, length, rng, make):
    """Sum of short events `make(length)` placed at `times` (seconds)."""
    x = np.zeros(n)
    for t0 in times:
        i = int(t0 * SAMPLE_RATE)
        ev = make(length)[:max(n - i, 0)]
        x[i:i + len(ev)] += ev
    return x


def rms(x):
    return np.sqrt(np.mean(x ** 2)) + 1e-9


def _event(x, rng):
    """Keep a random stretch of 30-100 % of x (20 ms fades), silence elsewhere; unit RMS before the envelope."""
    n = len(x)
    length = int(rng.uniform(0.3, 1.0) * n)
    start = int(rng.integers(0, n - length + 1))
    env = np.zeros(n)
    env[start:start + length] = np.minimum(1, np.minimum(np.arange(length), np.arange(length)[::-1]) / 320)
    return x / rms(x) * env


def _synth(label, rng, n):
    t = np.arange(n) / SAMPLE_RATE
    u = rng.uniform
    if label == 'low_hum':
        f = u(90, 160)
        return sum(np.sin(2 * np.pi * k * f * t + u(0, 6)) / k for k in (1, 2, 3))
    if label == 'whistle':
        f = u(1800, 3200)
        return np.sin(2 * np.pi * f * t + 0.002 * f * np.sin(2 * np.pi * u(4, 6) * t))
    if label == 'buzz':
        return 2 * ((t * u(110, 220) + u(0, 1)) % 1.0) - 1  # sawtooth: every harmonic
    if label in ('rising_sweep', 'falling_sweep'):
        f0, f1 = u(300, 600), u(2500, 4000)
        if label == 'falling_sweep':
            f0, f1 = f1, f0
        return np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t ** 2 / (2 * t[-1])))
    if label == 'white_noise':
        return rng.standard_normal(n)
    if label == 'rumble':
        return colored_noise(rng, n, 2.0)
    if label == 'clicks':
        rate = u(12, 25)
        return _bursts(n, np.arange(u(0, 1 / rate), t[-1], 1 / rate), 64, rng,
                       lambda m: rng.standard_normal(m) * np.exp(-np.arange(m) / 8))
    if label == 'beeps':
        f, rate = u(800, 1200), u(2, 3)
        return np.sin(2 * np.pi * f * t) * ((t * rate + u(0, 1)) % 1.0 < 0.3)
    if label == 'tremolo':
        return np.sin(2 * np.pi * u(300, 700) * t) * (1 + 0.9 * np.sin(2 * np.pi * u(5, 10) * t)) / 2
    if label == 'birdsong':
        def syllable(m):
            tt = np.arange(m) / SAMPLE_RATE
            f0 = u(3500, 5000)
            return np.sin(2 * np.pi * (f0 * tt - 1500 * tt ** 2 / (2 * tt[-1]))) * np.hanning(m)
        return _bursts(n, np.cumsum(u(0.12, 0.3, size=12)) - 0.1, 960, rng, syllable)
    if label == 'knocks':
        return _bursts(n, np.sort(u(0, t[-1] - 0.1, size=rng.integers(2, 6))), 1600, rng,
                       lambda m: colored_noise(rng, m, 1.0) * np.exp(-np.arange(m) / 480))
    raise KeyError(label)


DEMO_CLASSES = {  # label: caption phrasings
    'low_hum': ["a low steady hum", "a deep humming drone", "low-pitched humming"],
    'whistle': ["a high-pitched whistle", "a shrill steady whistle", "someone whistling one high note"],
    'buzz': ["a harsh buzzing tone", "an electric buzz", "a raspy sawtooth buzz"],
    'rising_sweep': ["a tone sweeping upward", "a rising siren-like sweep", "pitch going up"],
    'falling_sweep': ["a tone sweeping downward", "a falling whistle", "pitch going down"],
    'white_noise': ["hissing white noise", "static hiss", "a steady broadband hiss"],
    'rumble': ["a low rumble", "distant rumbling", "a deep noisy rumble like thunder"],
    'clicks': ["rapid clicking", "a fast train of clicks", "ticking clicks in quick succession"],
    'beeps': ["slow repeated beeps", "an alarm beeping", "a beep every half second"],
    'tremolo': ["a wobbling tone", "a tone with tremolo", "a pulsating warbling note"],
    'birdsong': ["birds chirping", "short high chirps like birdsong", "tweeting bird calls"],
    'knocks': ["knocking on a door", "a few dull knocks", "thuds and knocks"],
}


def cache_dir():
    """Where the built-in sets are generated: ~/.cache/mam-clap, or MAMCLAP_CACHE."""
    return os.environ.get('MAMCLAP_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'mam-clap'))


def demo_root():
    return os.path.join(cache_dir(), f'demo-v{DEMO_VERSION}')


def generate_once(root, make, marker):
    """Run make(folder) into a fresh folder renamed to `root` unless root/marker exists: atomic, so that when several
    ranks race one wins and the others find the finished set."""
    if not os.path.exists(os.path.join(root, marker)):
        os.makedirs(os.path.dirname(root), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(root), prefix='.tmp-')
        make(tmp)
        try:
            os.rename(tmp, root)
        except OSError:
            shutil.rmtree(tmp)


def make_demo(root):
    """Synthesize the demo set into `root` (audio/*.wav + demo.csv). Deterministic per clip."""
    os.makedirs(os.path.join(root, 'audio'), exist_ok=True)
    n = int(DEMO_SECONDS * SAMPLE_RATE)
    with open(os.path.join(root, 'demo.csv'), 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['file', 'label', 'caption', 'split'])
        for c, (label, captions) in enumerate(DEMO_CLASSES.items()):
            for i in range(DEMO_TRAIN + DEMO_TEST):
                rng = np.random.default_rng([DEMO_VERSION, c, i])
                x = _event(_synth(label, rng, n), rng)
                x = x + colored_noise(rng, n, rng.uniform(0, 2)) * rms(x) * 10 ** (-rng.uniform(0, 20) / 20)  # SNR 0-20 dB
                x = x / (np.abs(x).max() + 1e-9) * rng.uniform(0.1, 0.8)  # random loudness
                name = f'audio/{label}_{i:03d}.wav'
                sf.write(os.path.join(root, name), np.clip(x, -1, 1), SAMPLE_RATE, subtype='PCM_16')
                w.writerow([name, label, '|'.join(captions), 'train' if i < DEMO_TRAIN else 'test'])


def demo_manifest():
    """Path of the demo manifest, synthesizing the set on first use."""
    generate_once(demo_root(), make_demo, 'demo.csv')
    return os.path.join(demo_root(), 'demo.csv')
