"""Zero-shot classification and audio-text retrieval through a checkpoint's audio-text head (SPEC §8).

    python zeroshot.py --ckpt runs/m2d_clap/checkpoint.pt                  # demo test split: accuracy
    python zeroshot.py --ckpt runs/m2d2_stage2/checkpoint.pt --retrieval   # + audio<->text R@1/5/10

Works for m2d_clap, m2d2 (stage 1 and 2) and official M2D-CLAP releases. Audio embedding: the
projector over the mean of all tokens of all chunks of the whole clip (AudioToSemantic, M2D2 stage 2:
over all those tokens), L2-normalized. Class text: --template with the label (`_` -> space) through the
checkpoint's own text path (sentence encoder, then text projection), L2-normalized. Prediction: cosine
similarity; accuracy for single-label manifests, mAP for multi-label ones. The last stdout line is one
JSON object.
"""
import argparse
import json
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from finetune import (accuracy, build_encoder, check_finite, clip_outputs, encode_clip, label_targets,
                      mean_average_precision, multi_hot)
from model import AudioToSemantic, SentenceEncoder, load_state, read_checkpoint


class AudioText(nn.Module):
    """The audio-text side of a checkpoint: encoder, audio projector, text projector and sentence encoder,
    each built from the checkpoint's keys (M2D-CLAP: MLP projector; M2D2 stage 2: AudioToSemantic and a
    trained sentence encoder)."""

    def __init__(self, ckpt, source, text_encoder=None):
        super().__init__()
        state, method = ckpt['model'], ckpt['args'].get('method')
        part = lambda prefix: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        self.encoder, self.frontend = build_encoder(ckpt, source)
        proj = part('audio_proj.')
        if not proj:
            raise SystemExit(f"error: {source} ({method}) has no audio-text head; zero-shot needs a checkpoint of "
                             "--method m2d_clap or m2d2 (stage 1 or 2), or an official M2D-CLAP release")
        D = self.encoder.cfg.width
        self.pool = 'sem_token' not in proj  # M2D-CLAP pools the tokens first; AudioToSemantic attends to all of them
        if self.pool:
            (hidden, _), (out, _) = proj['0.weight'].shape, proj['2.weight'].shape
            self.audio_proj = nn.Sequential(nn.Linear(D, hidden), nn.ReLU(), nn.Linear(hidden, out))
        else:
            self.audio_proj = AudioToSemantic(D, 1 + max(int(k.split('.')[1]) for k in proj if k.startswith('sem_blocks.')))
        load_state(self.audio_proj, proj, source)
        tp = part('text_proj.')
        self.text_proj = nn.Linear(tp['weight'].shape[1], tp['weight'].shape[0]) if tp else nn.Identity()
        load_state(self.text_proj, tp, source)
        name = text_encoder or ckpt['args'].get('text_encoder')
        if not name:
            raise SystemExit(f"error: {source}: this release's text encoder (BERT with CLS pooling, or NV-Embed-v2) is not "
                             "supported by SentenceEncoder; --text_encoder NAME would use another, unaligned one")
        self.text_encoder = SentenceEncoder(name)
        if part('text_encoder.'):  # M2D2 stage 2 trained its own copy
            load_state(self.text_encoder, part('text_encoder.'), source)

    def embed_audio(self, spec):
        """(B, 1, F, T) whole clips -> (B, E) unit vectors."""
        tokens = encode_clip(self.encoder, spec).flatten(1, 2)  # (B, N, D): all tokens of all chunks
        return F.normalize(self.audio_proj(tokens.mean(1) if self.pool else tokens).float(), dim=-1)

    @torch.no_grad()
    def embed_text(self, texts, batch_size=256):
        """list of str -> (n, E) unit vectors."""
        return torch.cat([F.normalize(self.text_proj(self.text_encoder(texts[i:i + batch_size])).float(), dim=-1)
                          for i in range(0, len(texts), batch_size)]).cpu()


def recall_at_k(sim, positive, ks=(1, 5, 10)):
    """sim (Q, G) query-candidate scores, positive (Q, G) bool -> {k: fraction of queries whose best-scoring
    positive ranks in the top k}; its rank = the number of candidates that score strictly higher."""
    best = sim.masked_fill(~positive, float('-inf')).max(1).values  # (Q,)
    rank = (sim > best[:, None]).sum(1)
    return {k: (rank < k).float().mean().item() for k in ks}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ckpt', required=True, help='checkpoint with an audio-text head (ours or an official M2D-CLAP)')
    p.add_argument('--data', default='demo', help="'demo' or a CSV manifest with labels (and captions for --retrieval)")
    p.add_argument('--split', default='test', help="manifest rows used when it has a split column ('all' for every row)")
    p.add_argument('--template', default='{label} can be heard', help='class prompt (ref: M2D-CLAP / EVAR)')
    p.add_argument('--retrieval', action='store_true', help='also audio->text and text->audio R@1/5/10 over the captions')
    p.add_argument('--trust_checkpoint', action=argparse.BooleanOptionalAction, default=False,
                   help='unpickle any Python object in --ckpt (can run code: only for files from a trusted source)')
    p.add_argument('--text_encoder', help="override the checkpoint's sentence encoder (a Hugging Face id or folder)")
    p.add_argument('--batch_size', type=int, default=32)
    p.add_argument('--num_workers', type=int, default=2)
    p.add_argument('--max_bad', type=float, default=0.05, help='abort when more than this fraction of files fail')
    p.add_argument('--amp', choices=['bf16', 'none'], default='bf16')
    p.add_argument('--device', help='cpu or cuda (default: cuda when available)')
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    manifest = data.resolve_manifest(args.data)
    rows = data.read_manifest(manifest, None if args.split == 'all' else args.split)
    model = AudioText(read_checkpoint(args.ckpt, args.trust_checkpoint), args.ckpt, args.text_encoder).to(device).eval()
    labeled = all(r['labels'] for r in rows)
    if not labeled and not args.retrieval:
        raise SystemExit(f"error: {manifest}: zero-shot classification needs a 'label' on every row "
                         f"({sum(not r['labels'] for r in rows)} of {len(rows)} have none); --retrieval needs captions")
    if args.retrieval and not all(r['captions'] for r in rows):
        raise SystemExit(f"error: {manifest}: --retrieval needs a 'caption' on every row")
    audio, good = clip_outputs(model.embed_audio, rows, model.frontend, model.encoder.cfg.patch, args, device,
                                'audio')  # (n, E)
    rows = [rows[i] for i in good]
    check_finite(audio, rows, args.ckpt)
    record = {'ckpt': args.ckpt, 'clips': len(rows)}
    if labeled:
        classes = sorted({name for r in rows for name in r['labels']})
        text = model.embed_text([args.template.format(label=c.replace('_', ' ')) for c in classes])  # (C, E)
        targets = label_targets(rows, classes, manifest)  # (n, C)
        scores = audio @ text.T  # (n, C) cosine
        multi = any(len(r['labels']) > 1 for r in rows)
        record.update({'classes': len(classes), 'template': args.template},
                      **({'mAP': mean_average_precision(scores, targets)} if multi else {'accuracy': accuracy(scores, targets)}))
    if args.retrieval:
        texts = sorted({c for r in rows for c in r['captions']})
        positive = multi_hot([r['captions'] for r in rows], texts).bool()  # (n, U): text j is a caption of clip i
        sim = audio @ model.embed_text(texts).T  # (n, U)
        record.update({f'a2t_R@{k}': v for k, v in recall_at_k(sim, positive).items()})
        record.update({f't2a_R@{k}': v for k, v in recall_at_k(sim.T, positive.T).items()})
    print(json.dumps(record))
    return record


if __name__ == '__main__':
    main(sys.argv[1:])
