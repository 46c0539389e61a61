"""Zero-shot classification and audio-text retrieval through a checkpoint's audio-text head.

    python zeroshot.py --ckpt runs/m2d_clap/checkpoint.pt                # the demo's test split
    python zeroshot.py --ckpt runs/m2d2_stage2/checkpoint.pt --retrieval  # + audio<->text R@1/5/10

Works for m2d_clap, m2d2 (stage 1 and 2) and official M2D-CLAP releases (2024, 2025). Audio
embedding (tools/embed.py): the projector over the mean of all tokens of all chunks of the whole
clip (AudioToSemantic, M2D2 stage 2 and the 2025 releases: over all those tokens), L2-normalized.
Class text: --template with the label (`_` -> space) through the checkpoint's own text path
(sentence encoder, then text projection), L2-normalized. Prediction: cosine similarity; accuracy for
single-label manifests, mAP for multi-label ones. The last stdout line is one JSON object.
"""
import json
import sys

import data
from losses import accuracy, mean_average_precision, recall_at_k
from tools.cli import zeroshot_args
from tools.embed import check_finite, clip_outputs, load_encoder
from tools.run import pick_device


def main(argv=None):
    args = zeroshot_args(argv, __doc__)
    device = pick_device(args.device)
    manifest = data.resolve_manifest(args.data)
    rows = data.read_manifest(manifest, None if args.split == 'all' else args.split)
    model = load_encoder(args.ckpt, device, text_encoder=args.text_encoder, trust=args.trust_checkpoint)
    # the audio projector, text_proj and sentence encoder come from the checkpoint (tools/embed.py)
    model.check_clap()
    labeled = all(r['labels'] for r in rows)
    if not labeled and not args.retrieval:
        unlabeled = sum(not r['labels'] for r in rows)
        raise SystemExit(f"error: {manifest}: zero-shot classification needs a 'label' on every row "
                         f"({unlabeled} of {len(rows)} have none); --retrieval needs captions")
    if args.retrieval and not all(r['captions'] for r in rows):
        raise SystemExit(f"error: {manifest}: --retrieval needs a 'caption' on every row")
    audio, good = clip_outputs(model.audio_text, rows, model.frontend, model.encoder.cfg.patch, 'audio',
                               args, device)  # (n, E)
    rows = [rows[i] for i in good]
    check_finite(audio, rows, args.ckpt)
    record = {'ckpt': args.ckpt, 'clips': len(rows)}
    if labeled:
        classes = sorted({name for r in rows for name in r['labels']})
        prompts = [args.template.format(label=c.replace('_', ' ')) for c in classes]
        text = model.embed_text(prompts).cpu()  # (C, E)
        targets = data.class_targets(rows, manifest, classes)[1]  # (n, C)
        scores = audio @ text.T  # (n, C) cosine
        multi = any(len(r['labels']) > 1 for r in rows)
        record.update({'classes': len(classes), 'template': args.template},
                      **({'mAP': mean_average_precision(scores, targets)} if multi
                         else {'accuracy': accuracy(scores, targets)}))
    if args.retrieval:
        texts = sorted({c for r in rows for c in r['captions']})
        # (n, U): text j is a caption of clip i
        positive = data.multi_hot([r['captions'] for r in rows], texts).bool()
        sim = audio @ model.embed_text(texts).cpu().T  # (n, U)
        record.update({f'a2t_R@{k}': v for k, v in recall_at_k(sim, positive).items()})
        record.update({f't2a_R@{k}': v for k, v in recall_at_k(sim.T, positive.T).items()})
    print(json.dumps(record))
    return record


if __name__ == '__main__':
    main(sys.argv[1:])
