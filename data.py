"""Audio data: CSV manifests, decoding, random crops, the two front-ends, class and caption targets.

Workers only decode and crop waveforms; log-mel features are computed afterwards, batched
on the training device, by `FrontEnd`. (Caption embeddings are cached by tools/sentence.py, whole
clips run through an encoder by tools/embed.py.) Spectrograms are (B, 1, F, T): F mel bins, T frames.
Manifest columns: file (required), label (`;`-separated), caption (`|`-separated), split
(train/valid/test), fold (int), weight (>= 0: balanced sampling in training).
"""
import csv
import math
import os
import signal
import sys

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
import torchaudio
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from tools import demo, synth

SAMPLE_RATE = 16000
HOP = 160  # 10 ms frame shift for both front-ends
EPS = torch.finfo(torch.float32).eps

# name: mel bins, training crop in frames, default (mean, std), the factor on a data-computed std (AudioMAE/AST
# divide by 2·std)
FRONTENDS = {
    'fbank128': dict(n_mels=128, n_frames=1024, mean=-4.2677393, std=4.5689974 * 2, std_mult=2.0),  # AudioMAE
    'mel80': dict(n_mels=80, n_frames=608, mean=-7.1, std=4.2, std_mult=1.0),  # M2D
}


class FrontEnd(torch.nn.Module):
    """Waveforms (B, L) at 16 kHz -> normalized log-mel spectrograms (B, 1, F, T), batched, fp32."""

    def __init__(self, name='fbank128', n_frames=None, mean=None, std=None):
        super().__init__()
        if name not in FRONTENDS:
            raise SystemExit(f"error: unknown front-end {name!r}; choose from {sorted(FRONTENDS)}")
        cfg = FRONTENDS[name]
        self.name, self.n_mels, self.std_mult = name, cfg['n_mels'], cfg['std_mult']
        self.n_frames = n_frames or cfg['n_frames']
        self.mean = cfg['mean'] if mean is None else float(mean)
        self.std = cfg['std'] if std is None else float(std)
        if name == 'fbank128':
            # kaldi.fbank(htk_compat=True, use_energy=False, window_type='hanning', num_mel_bins=128,
            # dither=0, frame_shift=10): 25 ms frames, FFT 512, kaldi mel banks 20 Hz-8 kHz (AudioMAE)
            kaldi = torchaudio.compliance.kaldi
            banks, _ = kaldi.get_mel_banks(128, 512, float(SAMPLE_RATE), 20.0, 0.0, 100.0, -500.0, 1.0)
            self.register_buffer('mel_fb', F.pad(banks, (0, 1)), persistent=False)  # (128, 257)
            self.register_buffer('window', torch.hann_window(400, periodic=False), persistent=False)
        else:
            self.melspec = torchaudio.transforms.MelSpectrogram(
                SAMPLE_RATE, n_fft=400, win_length=400, hop_length=HOP, n_mels=80, f_min=50, f_max=8000,
                power=2, norm='slaney', mel_scale='slaney', pad_mode='reflect')

    @property
    def n_samples(self):
        """Waveform length that yields exactly n_frames frames."""
        return self.samples_for(self.n_frames)

    def samples_for(self, frames):
        if self.name == 'fbank128':
            return (frames - 1) * HOP + 400  # kaldi snip_edges: frames = 1 + (L - 400) // 160
        return (frames - 1) * HOP  # centered STFT: frames = 1 + L // 160

    def frame_seconds(self, index):
        """Time of frame `index` (a number or tensor; fractions interpolate): the center of its
        400-sample window."""
        return (index * HOP + (200 if self.name == 'fbank128' else 0)) / SAMPLE_RATE

    @torch.autocast('cuda', enabled=False)
    @torch.autocast('cpu', enabled=False)
    def log_mel(self, wave):
        """(B, L) -> un-normalized log-mel (B, F, T), always in fp32."""
        wave = wave.float()
        if self.name == 'mel80':
            return (self.melspec(wave) + EPS).log()  # (B, 80, T)
        x = wave - wave.mean(1, keepdim=True)  # AudioMAE removes the waveform mean first
        frames = x.unfold(1, 400, HOP)  # (B, T, 400)
        frames = frames - frames.mean(-1, keepdim=True)  # kaldi remove_dc_offset
        frames = frames - 0.97 * torch.cat([frames[..., :1], frames[..., :-1]], -1)  # pre-emphasis
        power = torch.fft.rfft(frames * self.window, n=512).abs().pow(2)  # (B, T, 257)
        return (power @ self.mel_fb.T).clamp_min(EPS).log().transpose(1, 2)  # (B, 128, T)

    def forward(self, wave):
        return ((self.log_mel(wave) - self.mean) / self.std).unsqueeze(1)  # (B, 1, F, T)

    def config(self):
        return dict(name=self.name, n_frames=self.n_frames, mean=self.mean, std=self.std)


# ---------------------------------------------------------------------------------------------
# Manifests and decoding

def read_manifest(path, split=None):
    """Rows of a CSV manifest as dicts (file made absolute, labels and captions as lists).

    With `split`, keeps the rows of that split when the manifest has a split column. UTF-8 (with or
    without a BOM); header names are stripped of spaces; quoted fields may hold commas, quotes and
    line breaks; optional columns may be absent or empty. A row without a file, a file that is not
    UTF-8 text or CSV, and a manifest without rows are errors naming the line; rows that repeat a
    file are kept, each one sample, with a warning (docs/guide.md).
    """
    rows, seen, repeats = [], {}, []
    try:
        with open(path, newline='', encoding='utf-8-sig') as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise SystemExit(f"error: {path}: the manifest is empty. The first line must be a "
                                 "header such as: file,label,caption,split")
            reader.fieldnames = cols = [c.strip() for c in reader.fieldnames]
            if 'file' not in cols:
                raise SystemExit(f"error: {path}: the manifest has no 'file' column (found columns: "
                                 f"{cols}). The first line must be a header such as: "
                                 "file,label,caption,split")
            root = os.path.dirname(os.path.abspath(path))
            for r in reader:
                if not (r['file'] or '').strip():
                    raise SystemExit(f"error: {path}, line {reader.line_num}: the row has no file: {r}")
                if r['file'] in seen:
                    repeats.append(f"{r['file']} (lines {seen[r['file']]} and {reader.line_num})")
                seen.setdefault(r['file'], reader.line_num)
                weight = row_weight(r, path, reader.line_num) if 'weight' in cols else None
                rows.append(dict(file=os.path.join(root, r['file']), labels=split_field(r, 'label', ';'),
                                 captions=split_field(r, 'caption', '|', intern=False),
                                 split=sys.intern((r.get('split') or '').strip()),
                                 fold=sys.intern((r.get('fold') or '').strip()), weight=weight))
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: {path}: not UTF-8 text ({e}); save the manifest as UTF-8")
    except csv.Error as e:
        raise SystemExit(f"error: {path}, line {reader.line_num}: not a valid CSV row ({e})")
    if repeats:
        print(f"warning: {path}: {len(repeats)} row(s) repeat a file of an earlier row, e.g. "
              f"{repeats[0]}; each row is kept as its own sample", file=sys.stderr)
    if split and 'split' in cols:
        rows = [r for r in rows if r['split'] == split]
    if not rows:
        which = f" with split == {split!r}" if split and 'split' in cols else ''
        raise SystemExit(f"error: {path}: no rows{which}")
    return rows


def split_field(r, column, sep, intern=True):
    """A column's `sep`-separated items, stripped, empty ones dropped; labels as one string object each."""
    items = [s.strip() for s in (r.get(column) or '').split(sep) if s.strip()]
    return [sys.intern(s) for s in items] if intern else items


def row_weight(r, path, line):
    """The `weight` column: a finite number >= 0, the row's relative chance to be drawn (balanced sampling)."""
    try:
        w = float(r['weight'])
    except (TypeError, ValueError):
        w = -1.0
    if not (w >= 0 and math.isfinite(w)):
        raise SystemExit(f"error: {path}, line {line}: weight {r['weight']!r} is not a number >= 0 (a manifest with a "
                         "'weight' column needs one on every row)")
    return w


def multi_hot(lists, names):
    """(n, C) float: row i has 1 at the names in lists[i]."""
    index = {c: j for j, c in enumerate(names)}
    y = torch.zeros(len(lists), len(names))
    for i, items in enumerate(lists):
        y[i, [index[name] for name in items]] = 1.0
    return y


def class_targets(rows, source, classes=None):
    """(class names, (n, C) multi-hot float targets) for rows that must each have a label. The class
    names are the rows' own labels, sorted, unless `classes` (the training rows') is given; a label
    outside it is an error."""
    unlabeled = [r['file'] for r in rows if not r['labels']]
    if unlabeled:
        raise SystemExit(f"error: {source}: {len(unlabeled)} of {len(rows)} rows have no label (e.g. {unlabeled[0]}); "
                         "a classifier needs a 'label' on every row")
    names = classes or sorted({name for r in rows for name in r['labels']})
    unknown = sorted({name for r in rows for name in r['labels']} - set(names))
    if unknown:
        raise SystemExit(f"error: {source}: labels not in the training rows: {unknown[:10]}")
    return names, multi_hot([r['labels'] for r in rows], names)


def row_captions(row):
    """A row's captions; a row with labels but no caption gets "The sound of A, B, and C." (ref:
    M2D-CLAP §4.1; underscores in label names become spaces, ours)."""
    if row['captions']:
        return row['captions']
    names = [name.replace('_', ' ') for name in row['labels']]
    if len(names) <= 2:
        return [f"The sound of {' and '.join(names)}."] if names else []
    return [f"The sound of {', '.join(names[:-1])}, and {names[-1]}."]


def caption_ids(rows, texts, source):
    """(n_rows, max captions) ids into `texts`, padded with each row's first id, and (n_rows,)
    caption counts; a method that needs captions refuses rows with neither a caption nor a label."""
    missing = [r['file'] for r in rows if not row_captions(r)]
    if missing:
        raise SystemExit(f"error: {source}: {len(missing)} of {len(rows)} rows have neither a caption nor a label "
                         f"(e.g. {missing[0]}); this method trains on audio-text pairs and needs a 'caption' "
                         "(or at least a 'label') on every row")
    index = {t: i for i, t in enumerate(texts)}
    ids = [[index[t] for t in row_captions(r)] for r in rows]
    width = max(map(len, ids))
    return torch.tensor([i + i[:1] * (width - len(i)) for i in ids]), torch.tensor([len(i) for i in ids])


def load_audio(path, n=None, rng=None):
    """Decode a file to a mono float32 waveform at 16 kHz, shape (L,).

    With n, a 16 kHz file longer than n samples is decoded only in the crop crop_or_pad would take:
    from a random start drawn from the numpy Generator rng, or from the start (ours, for speed:
    docs/performance.md). Other files are decoded whole (and resampled), for crop_or_pad to crop.
    """
    with sf.SoundFile(path) as f:
        if n is not None and f.samplerate == SAMPLE_RATE and f.frames > n:
            f.seek(int(rng.integers(0, f.frames - n + 1)) if rng is not None else 0)
            wave = f.read(n, dtype='float32', always_2d=True)  # (n, C)
        else:
            wave = f.read(dtype='float32', always_2d=True)  # (L, C)
        sr = f.samplerate
    wave = torch.from_numpy(wave.mean(1))  # mix to mono
    if sr != SAMPLE_RATE:
        wave = torchaudio.functional.resample(wave, sr, SAMPLE_RATE)
    return wave


def crop_or_pad(wave, n, rng=None):
    """Random crop (with a numpy Generator) or start crop to n samples; short clips are
    zero-padded."""
    if len(wave) < n:
        # pad in the waveform, not in the log domain (ours; AudioMAE pads the fbank)
        return F.pad(wave, (0, n - len(wave)))
    start = int(rng.integers(0, len(wave) - n + 1)) if rng is not None else 0
    return wave[start:start + n]


class AudioDataset(Dataset):
    """Decodes and crops clips; a file that cannot be used comes back as {'bad': path}.

    Random crops are drawn from a generator seeded by (seed, epoch, index), so a resumed run
    sees exactly the crops an uninterrupted run would have seen. With whole=True a clip comes
    back whole, only zero-padded to at least n_samples (evaluation).
    """

    def __init__(self, rows, n_samples, random_crop=True, seed=0, whole=False):
        self.rows, self.n_samples, self.random_crop, self.seed, self.whole = rows, n_samples, random_crop, seed, whole
        self.epoch = 0
        weighted = random_crop and bool(rows) and rows[0].get('weight') is not None  # training only
        self.weights = torch.tensor([r['weight'] for r in rows], dtype=torch.double) if weighted else None
        if weighted and not self.weights.sum() > 0:
            raise SystemExit("error: every row's weight is 0: nothing to sample")

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        """i: a row index, or (row index, draw) from balanced sampling, which may draw a row more
        than once per epoch (each draw its own crop)."""
        i, draw = i if isinstance(i, tuple) else (i, None)
        path = self.rows[i]['file']
        key = [self.seed, self.epoch, i] + ([draw] if draw is not None else [])
        rng = np.random.default_rng(key) if self.random_crop and not self.whole else None
        try:
            wave = load_audio(path, None if self.whole else self.n_samples, rng)
        except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as e:
            print(f"warning: skipping unreadable audio file {path}: {e}", file=sys.stderr)
            return {'bad': path}
        if len(wave) == 0 or not torch.isfinite(wave).all():
            print(f"warning: skipping {'empty' if len(wave) == 0 else 'non-finite'} audio file {path}", file=sys.stderr)
            return {'bad': path}
        if self.whole:
            return {'wave': F.pad(wave, (0, max(self.n_samples - len(wave), 0))), 'index': i}
        return {'wave': crop_or_pad(wave, self.n_samples, rng), 'index': i}  # no-op after a crop


def check_bad(bad, total, max_bad):
    """Unreadable files are skipped with a warning until they are more than max_bad of `total` (ours)."""
    if len(bad) > max_bad * total:
        raise SystemExit(f"error: {len(bad)} of {total} audio files could not be read (more than --max_bad {max_bad}), "
                         f"e.g. {sorted(bad)[:3]}")


def collate(items):
    """Stack the good clips; report the bad ones so the caller can count them."""
    good = [it for it in items if 'wave' in it]
    return {'wave': torch.stack([it['wave'] for it in good]) if good else torch.empty(0),
            'index': torch.tensor([it['index'] for it in good], dtype=torch.long),
            'bad': [it['bad'] for it in items if 'bad' in it]}


def ignore_stop_signals(worker_id):
    """Loader workers leave SIGINT/SIGTERM to the main process (Ctrl-C and schedulers signal every
    process): it finishes the step and saves a checkpoint, and needs its workers alive until
    then."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def epoch_loader(dataset, batch_size, epoch, skip=0, rank=0, world=1, seed=0, num_workers=2, pin_memory=False):
    """DataLoader for one epoch: DistributedSampler order for (seed, epoch), the first `skip`
    batches dropped. The sampler shuffles identically on every rank and gives each rank its own shard; with one
    process it is a plain seeded shuffle. With row weights (a manifest's `weight` column), the epoch
    is instead len(dataset) draws with replacement, each row with probability weight / sum (balanced
    sampling, e.g. AudioSet's inverse label frequencies), seeded by (seed, epoch) and dealt to the
    ranks in turn. The loader gets its own generator so it never draws from the global torch RNG
    (which drives masking and must replay exactly on resume).
    """
    dataset.epoch = epoch  # read by the (forked) workers when the iterator starts
    if dataset.weights is None:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                     drop_last=True)
        sampler.set_epoch(epoch)
        order = list(sampler)[skip * batch_size:]
    else:
        g = torch.Generator().manual_seed(seed + epoch)  # as DistributedSampler seeds its shuffle
        n = len(dataset) // world * world
        draws = torch.multinomial(dataset.weights, n, replacement=True, generator=g)
        draws = [(i, k) for k, i in enumerate(draws.tolist())]  # (row, draw number)
        order = draws[rank::world][skip * batch_size:]
    return DataLoader(dataset, batch_size=batch_size, sampler=order, drop_last=True, num_workers=num_workers,
                      collate_fn=collate, pin_memory=pin_memory, generator=torch.Generator(),
                      worker_init_fn=ignore_stop_signals)


@torch.no_grad()
def norm_stats_from_data(frontend, dataset, device, n_clips=256, batch_size=32):
    """(mean, std) of the un-normalized log-mel over up to n_clips random training clips."""
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n_clips].tolist()
    total, total_sq, count = 0.0, 0.0, 0
    for i in range(0, len(idx), batch_size):
        items = collate([dataset[j] for j in idx[i:i + batch_size]])
        if len(items['wave']) == 0:
            continue
        x = frontend.log_mel(items['wave'].to(device)).double()
        total, total_sq, count = total + x.sum().item(), total_sq + x.pow(2).sum().item(), count + x.numel()
    if count == 0:
        raise SystemExit("error: could not compute normalization stats: no readable clip in the sample")
    mean = total / count
    std = max(total_sq / count - mean ** 2, 0.0) ** 0.5
    if std < 1e-6:
        raise SystemExit(f"error: normalization stats from data have std {std:.2e} (silent training set?); "
                           "use --norm_stats default")
    return mean, std * frontend.std_mult


def builtin(data):
    """Whether `--data` names a built-in set: demo, synth (the benchmark's pool), synth:TASK or synth:shuffled."""
    return data == 'demo' or data.split(':')[0] == 'synth'


def default_frames(data, frontend):
    """The crop without --n_frames: 192 frames on the built-in sets (2 s clips), else the front-end's."""
    return demo.DEMO_FRAMES if builtin(data) else FRONTENDS[frontend]['n_frames']


def resolve_manifest(data):
    """`--data demo`, `synth`, `synth:TASK` or a CSV path -> CSV path."""
    if data == 'demo':
        return demo.demo_manifest()
    if builtin(data):
        return synth.synth_manifest(data)
    if not os.path.exists(data):
        raise SystemExit(f"error: --data {data}: no such manifest (pass a CSV file, 'demo', 'synth' or 'synth:TASK')")
    return data


# ---------------------------------------------------------------------------------------------
# Evaluation splits (finetune.py)

def folds(rows, source, seed):
    """[(name, train, valid, test)]: one per `fold` value (that fold the test set), else the splits."""
    if any(r['fold'] for r in rows):
        if not all(r['fold'] for r in rows):
            raise SystemExit(f"error: {source}: some rows have no 'fold'; K-fold needs one on every row")
        names = sorted({r['fold'] for r in rows}, key=lambda f: (len(f), f))
        return [(f'fold {k}', *carve([r for r in rows if r['fold'] != k], seed),
                 [r for r in rows if r['fold'] == k]) for k in names]
    split = {s: [r for r in rows if r['split'] == s] for s in ('train', 'valid', 'test')}
    if not split['train'] or not split['test']:
        found = ', '.join(f'{k}: {len(v)}' for k, v in split.items())
        raise SystemExit(f"error: {source}: needs a 'fold' column, or a 'split' column with train and "
                         f"test rows (found {found})")
    train, valid = (split['train'], split['valid']) if split['valid'] else carve(split['train'], seed)
    return [('split', train, valid, split['test'])]


def carve(rows, seed, fraction=0.1):
    """(train, valid): a seeded random `fraction` of the rows (at least one) is the validation set (ours)."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    n = max(1, round(fraction * len(rows)))
    return [rows[i] for i in sorted(order[n:])], [rows[i] for i in sorted(order[:n])]
