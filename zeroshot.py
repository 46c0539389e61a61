"""Zero-shot classification and audio-text retrieval through a checkpoint's audio-text head.

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
from losses import accuracy, mean_average_precision, recall_at_k
from model import AudioToSemantic, build_encoder, encode_clip
from tools.checkpoints import load_state, part, read_checkpoint
from tools.run import pick_device, shared_flags
from tools.sentence import UNCASED_BERTS, SentenceEncoder, bert_from_state


class AudioText(nn.Module):
    """The audio-text side of a checkpoint: encoder, audio projector, text projector and sentence encoder,
    each built from the checkpoint's keys (M2D-CLAP: MLP projector; M2D2 stage 2: AudioToSemantic and a
    trained sentence encoder)."""

    def __init__(self, ckpt, source, text_encoder=None):
        super().__init__()
        state, method = ckpt['model'], ckpt['args'].get('method')
        self.encoder, self.frontend = build_encoder(ckpt, source)
        proj = part(state, 'audio_proj.')
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
        tp = part(state, 'text_proj.')
        self.text_proj = nn.Linear(tp['weight'].shape[1], tp['weight'].shape[0]) if tp else nn.Identity()
        load_state(self.text_proj, tp, source)
        name = text_encoder or ckpt['args'].get('text_encoder')
        weights = part(state, 'text_encoder.model.')  # M2D2 stage 2 and "...pTI" releases carry a trained one
        if text_encoder and weights:
            raise SystemExit(f"error: {source} carries its own trained text encoder; --text_encoder cannot replace it")
        bert = bert_from_state(weights) if weights and name in UNCASED_BERTS else None  # self-contained, offline
        self.text_encoder = SentenceEncoder(name, None if text_encoder else ckpt['args'].get('text_pooling'), bert)
        if weights:
            load_state(self.text_encoder.model, weights, source)

    def embed_audio(self, spec):
        """(B, 1, F, T) whole clips -> (B, E) unit vectors."""
        tokens = encode_clip(self.encoder, spec).flatten(1, 2)  # (B, N, D): all tokens of all chunks
        return F.normalize(self.audio_proj(tokens.mean(1) if self.pool else tokens).float(), dim=-1)

    @torch.no_grad()
    def embed_text(self, texts, batch_size=256):
        """list of str -> (n, E) unit vectors."""
        return torch.cat([F.normalize(self.text_proj(self.text_encoder(texts[i:i + batch_size])).float(), dim=-1)
                          for i in range(0, len(texts), batch_size)]).cpu()


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument('--ckpt', required=True, help='checkpoint with an audio-text head (ours or an official M2D-CLAP)')
    shared_flags(p, seed=False)
    p.add_argument('--split', default='test', help="manifest rows used when it has a split column ('all' for every row)")
    p.add_argument('--template', default='{label} can be heard', help='class prompt (ref: M2D-CLAP / EVAR)')
    p.add_argument('--retrieval', action='store_true', help='also audio->text and text->audio R@1/5/10 over the captions')
    p.add_argument('--text_encoder', help="override the checkpoint's sentence encoder (a Hugging Face id or folder)")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    device = pick_device(args.device)
    manifest = data.resolve_manifest(args.data)
    rows = data.read_manifest(manifest, None if args.split == 'all' else args.split)
    model = AudioText(read_checkpoint(args.ckpt, args.trust_checkpoint), args.ckpt, args.text_encoder).to(device).eval()
    labeled = all(r['labels'] for r in rows)
    if not labeled and not args.retrieval:
        raise SystemExit(f"error: {manifest}: zero-shot classification needs a 'label' on every row "
                         f"({sum(not r['labels'] for r in rows)} of {len(rows)} have none); --retrieval needs captions")
    if args.retrieval and not all(r['captions'] for r in rows):
        raise SystemExit(f"error: {manifest}: --retrieval needs a 'caption' on every row")
    audio, good = data.clip_outputs(model.embed_audio, rows, model.frontend, device, args.amp == 'bf16', args.batch_size,
                                    args.num_workers, args.max_bad, model.encoder.cfg.patch, 'audio')  # (n, E)
    rows = [rows[i] for i in good]
    data.check_finite(audio, rows, args.ckpt)
    record = {'ckpt': args.ckpt, 'clips': len(rows)}
    if labeled:
        classes = sorted({name for r in rows for name in r['labels']})
        text = model.embed_text([args.template.format(label=c.replace('_', ' ')) for c in classes])  # (C, E)
        targets = data.class_targets(rows, manifest, classes)[1]  # (n, C)
        scores = audio @ text.T  # (n, C) cosine
        multi = any(len(r['labels']) > 1 for r in rows)
        record.update({'classes': len(classes), 'template': args.template},
                      **({'mAP': mean_average_precision(scores, targets)} if multi else {'accuracy': accuracy(scores, targets)}))
    if args.retrieval:
        texts = sorted({c for r in rows for c in r['captions']})
        positive = data.multi_hot([r['captions'] for r in rows], texts).bool()  # (n, U): text j is a caption of clip i
        sim = audio @ model.embed_text(texts).T  # (n, U)
        record.update({f'a2t_R@{k}': v for k, v in recall_at_k(sim, positive).items()})
        record.update({f't2a_R@{k}': v for k, v in recall_at_k(sim.T, positive.T).items()})
    print(json.dumps(record))
    return record


if __name__ == '__main__':
    main(sys.argv[1:])
