"""Pictures of what a model does, drawn with matplotlib and saved as PNG files:

    python -m tools.plots --ckpt runs/audiomae/checkpoint.pt runs/m2d_clap/checkpoint.pt --out figures

For each checkpoint, what fits its method, on one clip (--clip, cropped to the model's input) of --data's --split:
- AudioMAE, SupMAM: the input spectrogram, the masked input, the reconstruction, and the reconstruction with the
  visible patches pasted back (the AudioMAE paper's Fig. 2, MAE's visualization);
- MAM-CLAP, SupMAM-CLAP: the CLAP teacher's map next to the prediction (their first principal component over the
  patches), and the per-patch cosine between them;
- M2D, M2D-CLAP, M2D2 stage 1: the cosine between the predictor's output and the target network's on every masked patch;
- CLAP checkpoints (m2d_clap, m2d2, official M2D-CLAP releases): the audio-text cosine of every clip of the split with
  every class prompt, clips grouped by class;
and the training curves of every logged term, from each checkpoint's log.jsonl and the --log files, overlaid.
The masks are drawn with --seed.
"""
import argparse
import json
import os
import sys
from argparse import Namespace

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F

import data
import losses
from model import ViTConfig, patchify, unpatchify
from tools.checkpoints import load_state, read_checkpoint
from tools.embed import clip_outputs, load_encoder
from tools.htsat import CLAPTeacher, clap_teacher
from tools.cli import shared_flags
from tools.run import pick_device

matplotlib.use('Agg')
import matplotlib.lines  # noqa: E402  (after choosing the file-only backend)
import matplotlib.pyplot as plt  # noqa: E402


def pretraining_model(ckpt, path, device):
    """The whole pre-training model (decoder, predictor, target network) of one of our checkpoints, in eval mode."""
    import train  # the presets and build_model of the method that wrote it
    args, run = saved_args(ckpt), ckpt.get('run', {})
    teacher_dim = run.get('teacher_dim', CLAPTeacher.dim if args.target == 'clap' else 0)  # 768: HTSAT
    model = train.build_model(args, ViTConfig(**ckpt['model_config']), n_classes=run.get('n_classes', 0),
                              text_dim=run.get('text_dim', 0), teacher_dim=teacher_dim)
    load_state(model, ckpt['model'], path)
    return model.to(device).eval()


def saved_args(ckpt):
    """A checkpoint's arguments over its method's preset (train.py), so that a checkpoint written before a preset
    key existed names its model too."""
    import train
    saved = ckpt['args']
    preset = {**train.PRESETS[saved['method']], **(train.STAGE2 if saved.get('stage', 1) == 2 else {})}
    return Namespace(**{'target': None, **preset, **saved})


@torch.no_grad()
def reconstruction(model, spec):
    """AudioMAE: spec (1, 1, F, T) -> {input, masked, reconstruction, reconstruction + visible} as (F, T) arrays
    (masked patches NaN in 'masked'). The model predicts each patch normalized by its own mean and variance (norm-pix),
    so the prediction is mapped back with the input patch's statistics, as MAE's visualization does."""
    p, (_, Tp) = model.encoder.cfg.patch, model.encoder.cfg.grid
    _, pred, mask = model.predict(spec)
    patches = patchify(spec[..., :Tp * p], p)  # (1, N, p*p)
    mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
    recon = pred.float() * (var + 1e-6) ** 0.5 + mean
    m = mask[..., None].bool()
    image = lambda x: unpatchify(x, p, model.encoder.cfg.grid)[0, 0].cpu().numpy()  # noqa: E731
    return {'input': image(patches), 'masked': image(patches.masked_fill(m, float('nan'))),
            'reconstruction': image(recon), 'reconstruction + visible': image(torch.where(m, recon, patches))}


@torch.no_grad()
def teacher_view(model, teacher, wave, spec):
    """MAM-CLAP: the teacher's map and the prediction projected on the teacher map's first principal component over
    the patches, and their per-patch cosine, each (Fp, Tp); plus the mask (Fp, Tp)."""
    grid = model.encoder.cfg.grid
    target = teacher(wave, grid)[0]  # (N, teacher width)
    _, pred, mask = model.predict(spec)
    center = target.mean(0)
    pc = torch.linalg.svd(target - center, full_matrices=False)[2][0]  # (teacher width,)
    as_grid = lambda x: x.view(grid).cpu().numpy()  # noqa: E731
    return {'teacher (PC 1)': as_grid((target - center) @ pc),
            'prediction (PC 1)': as_grid((pred[0].float() - center) @ pc),
            'cosine': as_grid(F.cosine_similarity(pred[0].float(), target, dim=-1)), 'mask': as_grid(mask[0])}


@torch.no_grad()
def m2d_cosine(model, spec):
    """M2D: (Fp, Tp) cosine between prediction and the standardized target on each masked patch, NaN where visible:
    1 - L_m2d / 2 of that patch alone (losses.m2d_loss, M2D-CLAP Eq. 1)."""
    _, pred, target, ids_masked = model.predict(spec)
    cos = [1 - losses.m2d_loss(pred[:, i:i + 1], target[:, i:i + 1]) / 2 for i in range(pred.shape[1])]
    grid = torch.full((model.encoder.cfg.grid[0] * model.encoder.cfg.grid[1],), float('nan'), device=spec.device)
    grid[ids_masked[0]] = torch.stack(cos).to(grid.dtype)
    return grid.view(model.encoder.cfg.grid).cpu().numpy()


def similarity(enc, rows, source, args, device):
    """CLAP: cosine (n, C) of every readable clip with every class prompt, rows ordered by first label; the class names
    and each row's first label."""
    audio, good = clip_outputs(enc.audio_text, rows, enc.frontend, enc.encoder.cfg.patch, 'audio', args, device)
    rows = [rows[i] for i in good]
    classes = sorted({c for r in rows for c in r['labels']})
    if not classes:
        raise SystemExit(f"error: {source}: the similarity matrix needs labels on the rows")
    text = enc.embed_text([args.template.format(label=c.replace('_', ' ')) for c in classes]).cpu()
    order = sorted(range(len(rows)), key=lambda i: (rows[i]['labels'][0] if rows[i]['labels'] else '', i))
    return (audio @ text.T)[order].numpy(), classes, [rows[i]['labels'][0] if rows[i]['labels'] else '' for i in order]


def curves(paths):
    """{run name: [log records]} of log.jsonl files."""
    out = {}
    for path in paths:
        with open(path) as f:
            out[os.path.basename(os.path.dirname(os.path.abspath(path))) or path] = [json.loads(line) for line in f]
    return out


# ---------------------------------------------------------------------------------------------
# Drawing

def panels(images, title, path, same_scale=False, cmap='magma'):
    """The images one above the other, each with its title and colorbar (with same_scale, the first image's range for
    all), saved to path."""
    fig, axes = plt.subplots(len(images), 1, figsize=(9, 1.6 * len(images) + 0.6), squeeze=False)
    first = next(iter(images.values()))
    scale = dict(vmin=np.nanmin(first), vmax=np.nanmax(first)) if same_scale else {}
    for ax, (name, img) in zip(axes[:, 0], images.items()):
        im = ax.imshow(img, origin='lower', aspect='auto', cmap=cmap, interpolation='nearest', **scale)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def draw_similarity(sim, classes, labels, title, path):
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * len(classes), 5))
    im = ax.imshow(sim, aspect='auto', cmap='viridis', interpolation='nearest')
    ax.set_xticks(range(len(classes)), [c.replace('_', ' ') for c in classes], rotation=60, ha='right', fontsize=8)
    starts = [i for i in range(len(labels)) if i == 0 or labels[i] != labels[i - 1]]
    ax.set_yticks([(s + e) / 2 - 0.5 for s, e in zip(starts, starts[1:] + [len(labels)])],
                  [labels[s].replace('_', ' ') for s in starts], fontsize=8)
    ax.set_xlabel('class prompt')
    ax.set_ylabel('clips, grouped by class')
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label='cosine')
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def draw_curves(runs, path):
    keys = sorted({k for records in runs.values() for r in records for k, v in r.items()
                   if isinstance(v, (int, float)) and k not in ('step', 'epoch')})
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for i, (name, records) in enumerate(runs.items()):
            points = [(r['step'], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), color=f'C{i}', label=name)  # one color per run in every panel
        ax.set_title(key, fontsize=9)
        ax.set_xlabel('step', fontsize=8)
    for ax in axes.flat[len(keys):]:
        ax.axis('off')
    fig.legend(handles=[matplotlib.lines.Line2D([], [], color=f'C{i}', label=name) for i, name in enumerate(runs)],
               loc='upper center', ncols=len(runs), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------

def table_curves(results, args, path):
    """tools/table.py's learning curves: per task, linear-evaluation accuracy (the first probe seed) against
    pre-training steps for each method's first seed, with the random-init and supervised lines (means over seeds)."""
    from tools.synth import TASKS
    fig, axes = plt.subplots(1, len(TASKS), figsize=(6 * len(TASKS), 4.2), squeeze=False)
    for ax, task in zip(axes[0], TASKS):
        for method in args.methods:
            points = sorted((k[3], 100 * r['test']) for k, r in results.items()  # (step, accuracy)
                            if k[:3] == ('linear', method, args.seeds[0]) and k[4:] == (task, args.probe_seeds[0]))
            if points:
                ax.plot(*zip(*points), marker='o', ms=3, label=method)
        for name, key, style in (('random init', ('linear', 'random'), ':'),
                                 ('supervised', ('finetune', 'supervised'), '--')):
            scores = [100 * r['test'] for k, r in results.items() if k[:2] == key and k[4] == task]
            if scores:  # the line's value on each panel: the tasks' baselines differ
                ax.axhline(np.mean(scores), color='k', ls=style, lw=1, label=name)
                ax.text(0.01, np.mean(scores), f'{name} {np.mean(scores):.1f}', transform=ax.get_yaxis_transform(),
                        va='bottom', fontsize=8)
        ax.set(title=f'synth:{task}', xlabel='pre-training step (vit_tiny, batch 32)', ylabel='linear accuracy (%)')
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc='center left', bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_checkpoint(path, args, device, manifest, rows):
    """Every figure that fits the checkpoint at path; returns the files written."""
    ckpt = read_checkpoint(path, args.trust_checkpoint)
    name = os.path.basename(os.path.dirname(os.path.abspath(path))) or 'checkpoint'
    import train
    ours = ckpt['args']['method'] in train.PRESETS  # not a release's encoder, nor a fine-tuned model
    family, written = saved_args(ckpt).family if ours else None, []
    if family in ('audiomae', 'm2d'):
        torch.manual_seed(args.seed)
        model = pretraining_model(ckpt, path, device)
        frontend = data.FrontEnd(**ckpt['frontend']).to(device)
        row = rows[args.clip % len(rows)]
        wave = data.crop_or_pad(data.load_audio(row['file']), frontend.n_samples)[None].to(device)  # (1, L)
        spec, clip = frontend(wave), f"{os.path.basename(row['file'])}, mask {model.mask_ratio:g}"
        if family == 'm2d':
            view = {'input': spec[0, 0].cpu().numpy(),
                    'cosine(prediction, target) on the masked patches': m2d_cosine(model, spec)}
            written.append(panels(view, f"{name}: M2D prediction vs target ({clip})",
                                  os.path.join(args.out, f'{name}_m2d.png')))
        elif ckpt['args'].get('target') == 'clap':
            teacher = clap_teacher(ckpt['args'].get('clap_ckpt'), args.trust_checkpoint).to(device)
            view = {'input': spec[0, 0].cpu().numpy(), **teacher_view(model, teacher, wave, spec)}
            written.append(panels(view, f"{name}: MAM-CLAP teacher vs prediction ({clip})",
                                  os.path.join(args.out, f'{name}_teacher.png')))
        else:
            written.append(panels(reconstruction(model, spec), f"{name}: masked reconstruction ({clip})",
                                  os.path.join(args.out, f'{name}_reconstruction.png'), same_scale=True))
    if any(k.startswith('audio_proj.') for k in ckpt['model']):
        enc = load_encoder(path, device, trust=args.trust_checkpoint)
        sim, classes, labels = similarity(enc, rows, manifest, args, device)
        written.append(draw_similarity(sim, classes, labels, f"{name}: audio-text cosine ({args.split} split)",
                                       os.path.join(args.out, f'{name}_similarity.png')))
    if not written:
        print(f"{path}: no figure fits it (official releases keep only the encoder: no decoder to draw)",
              file=sys.stderr)
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument('--ckpt', nargs='*', default=[], help='checkpoints to draw (ours, or an official release)')
    p.add_argument('--log', nargs='*', default=[], help='more log.jsonl files for the training curves')
    shared_flags(p)
    p.add_argument('--split', default='test', help="manifest rows used ('all' for every row)")
    p.add_argument('--clip', type=int, default=0, help='which row of the split to draw')
    p.add_argument('--template', default='{label} can be heard', help='class prompt for the similarity matrix')
    p.add_argument('--out', default='figures', help='folder for the PNG files')
    args = p.parse_args(argv)
    if not args.ckpt and not args.log:
        p.error('nothing to draw: pass --ckpt and/or --log')
    os.makedirs(args.out, exist_ok=True)
    device = pick_device(args.device)
    manifest = data.resolve_manifest(args.data)
    rows = data.read_manifest(manifest, None if args.split == 'all' else args.split)
    written = [f for path in args.ckpt for f in draw_checkpoint(path, args, device, manifest, rows)]
    logs = [os.path.join(os.path.dirname(os.path.abspath(c)), 'log.jsonl') for c in args.ckpt] + args.log
    logs = [f for f in dict.fromkeys(logs) if os.path.exists(f)]
    if logs:
        written.append(draw_curves(curves(logs), os.path.join(args.out, 'curves.png')))
    print('\n'.join(written))
    return written


if __name__ == '__main__':
    main(sys.argv[1:])
