"""Dataset recipes: the official download layout of a dataset -> this project's manifest CSV (file, label, caption,
split or fold, weight), with the official protocol (fold-wise ESC-50 and UrbanSound8K; the official splits elsewhere).
Datasets without one official layout or split (VoxForge, CREMA-D, Surge, GTZAN) follow the metadata of EVAR
(nttcslab/eval-audio-repr), the evaluation suite the M2D papers report, given with --meta.

    python -m tools.recipes esc50 ~/data/ESC-50-master                 # -> ~/data/ESC-50-master/esc50.csv
    python finetune.py --ckpt runs/m2d/checkpoint.pt --data ~/data/ESC-50-master/esc50.csv

    python -m tools.recipes NAME ROOT [--meta FILE] [--out CSV] [--subset 20k|2m] [--audio DIR] [--ext wav]

Paths in the manifest are relative to its folder. Listed files that are not on disk (AudioSet and AudioCaps clips
that could not be downloaded) are left out and counted.
"""
import argparse
import csv
import json
import os
import sys
from collections import Counter, defaultdict
from glob import glob


def read_csv(path, **kw):
    with open(path, newline='', encoding='utf-8-sig') as f:
        return list(csv.DictReader(f, **kw))


def need(path, what):
    """path, or a clear error saying where `what` comes from."""
    if not path or not os.path.exists(path):
        raise SystemExit(f"error: {what} not found{f' at {path}' if path else ''}")
    return path


def row(file, labels=(), captions=(), split='', fold='', weight=None):
    return dict(file=file, labels=list(labels), captions=list(captions), split=split, fold=str(fold), weight=weight)


def esc50(root, args):
    """ESC-50 (ESC-50-master/): meta/esc50.csv, audio/; 5 folds (official), 50 classes."""
    return [row(os.path.join(root, 'audio', r['filename']), [r['category']], fold=r['fold'])
            for r in read_csv(need(os.path.join(root, 'meta', 'esc50.csv'), 'meta/esc50.csv'))]


def us8k(root, args):
    """UrbanSound8K (UrbanSound8K/): metadata/UrbanSound8K.csv, audio/foldN/; 10 folds (official), 10 classes."""
    return [row(os.path.join(root, 'audio', f"fold{r['fold']}", r['slice_file_name']), [r['class']], fold=r['fold'])
            for r in read_csv(need(os.path.join(root, 'metadata', 'UrbanSound8K.csv'), 'metadata/UrbanSound8K.csv'))]


def spcv2(root, args):
    """Speech Commands V2 (speech_commands_v0.02/): WORD/*.wav (35 words), validation_list.txt, testing_list.txt."""
    lists = {}
    for split, name in (('valid', 'validation_list.txt'), ('test', 'testing_list.txt')):
        with open(need(os.path.join(root, name), name)) as f:
            lists.update({line.strip(): split for line in f if line.strip()})
    files = sorted(os.path.relpath(p, root) for p in glob(os.path.join(root, '[a-z]*', '*.wav')))  # no _background_*
    return [row(os.path.join(root, f), [f.split(os.sep)[0]], split=lists.get(f.replace(os.sep, '/'), 'train'))
            for f in files]


def vc1(root, args):
    """VoxCeleb1 identification (root holding wav/ID/VIDEO/NNNNN.wav and iden_split.txt, or --meta iden_split.txt):
    1 = train, 2 = valid, 3 = test; 1,251 speakers."""
    path = need(args.meta or os.path.join(root, 'iden_split.txt'),
                'iden_split.txt (https://www.robots.ox.ac.uk/~vgg/data/voxceleb/meta/iden_split.txt; --meta)')
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                split, file = line.split()
                rows.append(row(os.path.join(root, 'wav', file), [file.split('/')[0]],
                                split={'1': 'train', '2': 'valid', '3': 'test'}[split]))
    return rows


def nsynth(root, args):
    """NSynth (root holding nsynth-train/, nsynth-valid/, nsynth-test/, each examples.json and audio/): instrument
    family (11 classes), the official splits."""
    rows = []
    for split in ('train', 'valid', 'test'):
        with open(need(os.path.join(root, f'nsynth-{split}', 'examples.json'), f'nsynth-{split}/examples.json')) as f:
            examples = json.load(f)
        rows += [row(os.path.join(root, f'nsynth-{split}', 'audio', f'{k}.wav'), [v['instrument_family_str']],
                     split=split) for k, v in sorted(examples.items())]
    return rows


def gtzan(root, args):
    """GTZAN (root, or its genres/ or genres_original/, holding GENRE/GENRE.NNNNN.wav): the fault-filtered splits
    EVAR uses (jongpillee/music_dataset_split GTZAN_split: --meta FOLDER with {train,valid,test}_filtered.txt)."""
    folder = need(args.meta, '--meta FOLDER with train_filtered.txt, valid_filtered.txt, test_filtered.txt (github.com/'
                  'jongpillee/music_dataset_split/tree/master/GTZAN_split)')
    listed = []
    for split in ('train', 'valid', 'test'):
        with open(need(os.path.join(folder, f'{split}_filtered.txt'), f'{split}_filtered.txt')) as f:
            listed += [(line.strip(), split) for line in f if line.strip()]
    base = next((os.path.join(root, d) for d in ('', 'genres', 'genres_original')  # the archive's, or Kaggle's, folder
                 if listed and os.path.exists(os.path.join(root, d, listed[0][0]))), root)
    return [row(os.path.join(base, file), [file.split('/')[0]], split=split) for file, split in listed]


def evar(root, args):
    """An EVAR metadata CSV (file_name, label, split; --meta), e.g. evar/metadata/voxforge.csv or cremad.csv: its
    files under root (for CREMA-D also root/AudioWAV, the official folder)."""
    meta = read_csv(need(args.meta, '--meta: an EVAR metadata CSV (nttcslab/eval-audio-repr evar/metadata/)'))
    sub = next((d for d in ('', 'AudioWAV') if meta and os.path.exists(os.path.join(root, d, meta[0]['file_name']))),
               '')
    return [row(os.path.join(root, sub, r['file_name']), [r['label']], split=r['split']) for r in meta]


def surge(root, args):
    """Surge synthesizer tones (root/TONE/NOTE.ogg; the label is the note): EVAR's tone splits
    (evar/predefined/dataset_surge_tone_splits.csv: tone, split; --meta)."""
    splits = {r['tone']: r['split'] for r in read_csv(need(args.meta, "--meta: EVAR's dataset_surge_tone_splits.csv"))}
    files = sorted(glob(os.path.join(root, '*', '*.ogg')))
    return [row(f, [os.path.splitext(os.path.basename(f))[0]], split=splits[os.path.basename(os.path.dirname(f))])
            for f in files if os.path.basename(os.path.dirname(f)) in splits]


def audioset(root, args):
    """AudioSet: the segment CSVs (balanced_train_segments.csv, unbalanced_train_segments.csv, eval_segments.csv) and
    class_labels_indices.csv (or ontology.json) in root; audio as <audio>/<csv stem>/<YTID>_<start>.<ext> (e.g.
    eval_segments/-22tna7KHzI_28.000.wav, the M2D authors' layout). --subset 20k: balanced train; 2m: balanced +
    unbalanced. Multi-label rows with the ontology's names, the eval set as test, and the usual inverse label
    frequency weights for balanced sampling: each label 1000 / (its training count + 0.01), a row the sum over its
    labels (ref: PSLA / AudioMAE)."""
    if os.path.exists(os.path.join(root, 'class_labels_indices.csv')):
        names = {r['mid']: r['display_name'] for r in read_csv(os.path.join(root, 'class_labels_indices.csv'))}
    else:
        with open(need(os.path.join(root, 'ontology.json'), 'class_labels_indices.csv or ontology.json')) as f:
            names = {c['id']: c['name'] for c in json.load(f)}
    parts = [('balanced_train_segments', 'train'), ('eval_segments', 'test')]
    parts += [('unbalanced_train_segments', 'train')] if args.subset == '2m' else []
    rows = []
    for stem, split in parts:
        with open(need(os.path.join(root, stem + '.csv'), stem + '.csv'), newline='') as f:
            for r in csv.reader((line for line in f if not line.startswith('#')), skipinitialspace=True):
                if r:
                    file = os.path.join(args.audio or root, stem, f'{r[0]}_{float(r[1]):.3f}.{args.ext}')
                    rows.append(row(file, [names[m] for m in r[3].split(',')], split=split))
    counts = Counter(label for r in rows if r['split'] == 'train' for label in r['labels'])
    for r in rows:
        r['weight'] = sum(1000 / (counts[label] + 0.01) for label in r['labels'])
    return rows


def audiocaps(root, args):
    """AudioCaps: train.csv, val.csv, test.csv (audiocap_id, youtube_id, start_time, caption) in root; audio under
    --audio as <youtube_id>*.wav or Y<youtube_id>*.wav in any subfolder. The captions of a clip are one row."""
    by_id = {}
    for path in sorted(glob(os.path.join(args.audio or root, '**', f'*.{args.ext}'), recursive=True)):
        stem = os.path.basename(path)
        by_id.setdefault(stem[:11], path)  # <youtube_id>...
        if stem.startswith('Y'):
            by_id.setdefault(stem[1:12], path)  # Y<youtube_id>... (AudioSet downloaders' prefix)
    rows = []
    for split, name in (('train', 'train.csv'), ('valid', 'val.csv'), ('test', 'test.csv')):
        captions = defaultdict(list)
        for r in read_csv(need(os.path.join(root, name), name)):
            captions[r['youtube_id']].append(r['caption'])
        rows += [row(by_id.get(y, os.path.join(args.audio or root, f'{y}.{args.ext}')), captions=c, split=split)
                 for y, c in captions.items()]
    return rows


def clotho(root, args):
    """Clotho (v2): clotho_captions_{development,validation,evaluation}.csv (file_name, caption_1..5) and the audio
    folders development/, validation/, evaluation/ in root."""
    rows = []
    for split, part in (('train', 'development'), ('valid', 'validation'), ('test', 'evaluation')):
        for r in read_csv(need(os.path.join(root, f'clotho_captions_{part}.csv'), f'clotho_captions_{part}.csv')):
            rows.append(row(os.path.join(root, part, r['file_name']),
                            captions=[r[f'caption_{i}'] for i in range(1, 6) if r.get(f'caption_{i}')], split=split))
    return rows


RECIPES = {'esc50': esc50, 'us8k': us8k, 'spcv2': spcv2, 'vc1': vc1, 'voxforge': evar, 'cremad': evar, 'gtzan': gtzan,
           'nsynth': nsynth, 'surge': surge, 'audioset': audioset, 'audiocaps': audiocaps, 'clotho': clotho}


def write_manifest(rows, out):
    """The rows that exist on disk as a manifest at out (paths relative to it); returns (written, missing)."""
    have = [r for r in rows if os.path.isfile(r['file'])]
    if not have:
        example = rows[0]['file'] if rows else '-'
        raise SystemExit(f"error: none of the {len(rows)} listed audio files exist (e.g. {example}); is ROOT "
                         "(or --audio) the dataset's folder?")
    optional = (('label', 'labels'), ('caption', 'captions'), ('split', 'split'), ('fold', 'fold'),
                ('weight', 'weight'))
    cols = ['file'] + [c for c, key in optional if any(r[key] not in ([], '', None) for r in have)]
    base = os.path.dirname(os.path.abspath(out))
    with open(out, 'w', newline='', encoding='utf-8') as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in have:
            values = {'file': os.path.relpath(r['file'], base), 'label': ';'.join(r['labels']),
                      'caption': '|'.join(c.replace('|', '/') for c in r['captions']), 'split': r['split'],
                      'fold': r['fold'], 'weight': f"{r['weight']:.6g}" if r['weight'] is not None else ''}
            w.writerow([values[c] for c in cols])
    return len(have), len(rows) - len(have)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('name', choices=sorted(RECIPES))
    p.add_argument('root', help='the dataset folder as downloaded')
    p.add_argument('--meta', help='split/label metadata the dataset does not ship (see its recipe)')
    p.add_argument('--out', help='manifest path (default: ROOT/NAME.csv)')
    p.add_argument('--subset', choices=['20k', '2m'], default='20k', help='audioset: balanced only, or + unbalanced')
    p.add_argument('--audio', help='audioset, audiocaps: the audio folder, if not ROOT')
    p.add_argument('--ext', default='wav', help='audioset, audiocaps: audio file extension')
    args = p.parse_args(argv)
    out = args.out or os.path.join(args.root, f'{args.name}.csv')
    written, missing = write_manifest(RECIPES[args.name](args.root, args), out)
    print(f"{out}: {written} rows" + (f"; {missing} listed files are not on disk and were left out" if missing else ''))
    return out


if __name__ == '__main__':
    main(sys.argv[1:])
