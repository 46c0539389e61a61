"""Reading checkpoints: this project's own, and the authors' released weights converted to its layout.

Official releases (nttcslab/m2d: M2D, M2D-CLAP; facebookresearch/AudioMAE) store a timm ViT; read_checkpoint
recognizes them by their keys and returns the same dict as one of ours: {'model': state dict in our key names,
'model_config': ViTConfig fields, 'frontend': FrontEnd config, 'args': at least 'method' and 'text_encoder'}.
"""
import argparse
import os
import pickle
import re

import torch


def load_file(path, trust=False):
    """torch.load of a checkpoint that may come from anywhere. By default (weights_only) only tensors,
    containers, numbers, strings and argparse.Namespace (official releases pickle their args) are unpickled, so a file
    that carries any other object -- which could run code while it is unpickled -- is refused. trust=True
    (--trust_checkpoint) unpickles anything: only for files from a source you trust."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint file at {path}")
    try:
        if trust:
            return torch.load(path, map_location='cpu', weights_only=False)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'Weights only load failed' not in str(e):
            raise SystemExit(f"error: cannot read {path} as a PyTorch checkpoint ({str(e).splitlines()[0]})")
        what = next((line.strip() for line in str(e).splitlines() if 'GLOBAL' in line), None)
        if what is None:  # not an object outside the allow-list: the bytes are not a pickle (corrupt, or another format)
            raise SystemExit(f"error: cannot read {path} as a PyTorch checkpoint (not a pickle torch.load can read: "
                             f"{str(e).split('WeightsUnpickler error:')[-1].strip().splitlines()[0]})")
        raise SystemExit(f"error: refused to load {path}: it holds Python objects other than tensors, numbers, strings "
                         f"and containers, and unpickling them could run arbitrary code ({what}). If you trust the "
                         "file's source, pass --trust_checkpoint")
    except (RuntimeError, EOFError, OSError) as e:
        raise SystemExit(f"error: cannot read {path} as a PyTorch checkpoint ({str(e).splitlines()[0]})")


def load_state(module, state, source):
    """Strict load_state_dict whose error lists missing/unexpected keys and shape mismatches."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {tuple(state[k].shape)} in checkpoint, {tuple(own[k].shape)} in model"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise SystemExit(f"error: {source} does not match the {type(module).__name__} being built "
                         f"(another method, model size or input length?)\n  missing: {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}\n  unexpected: {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}\n  shape mismatches: {shapes[:8]}")
    module.load_state_dict(state)


def read_checkpoint(path, trust=False):
    """A checkpoint of this project, or an official release converted to its layout (the module docstring)."""
    ckpt = load_file(path, trust)
    if not isinstance(ckpt, dict):
        raise SystemExit(f"error: {path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt if 'model_config' in ckpt else convert_official(ckpt, path)


def convert_official(ckpt, path):
    """nttcslab M2D / M2D-CLAP and AudioMAE releases (timm ViT keys) -> our layout.

    M2D's image is (freq, time) like ours. AudioMAE's is (time, freq): its patch kernel is transposed and
    its position table reordered from t*Fp + f to our f*Tp + t. Parts that are not the encoder or the
    audio-text heads (decoders, M2D targets, task heads) are dropped, and named.
    """
    state = ckpt.get('model', ckpt)
    for prefix in ('module.ar.runtime.backbone.', 'backbone.', 'module.'):  # EVAR fine-tuned, RuntimeM2D, DDP
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    if 'patch_embed.proj.weight' not in state or 'pos_embed' not in state:
        raise SystemExit(f"error: {path} is neither a checkpoint of this project (no 'model_config') nor an official "
                         f"M2D/M2D-CLAP/AudioMAE release (no timm ViT keys); its keys start with {list(state)[:6]}")
    w, pos = state['patch_embed.proj.weight'], state['pos_embed']
    p, N, D = w.shape[-1], pos.shape[1] - 1, pos.shape[2]
    m2d = 'norm_stats' in state or 'target_norm.weight' in state
    n_mels = 80 if m2d else 128
    Fp = n_mels // p
    if N % Fp:
        raise SystemExit(f"error: {path}: {N} position embeddings do not form a grid of {Fp} frequency rows "
                         f"({'M2D' if m2d else 'AudioMAE'}, {n_mels} mel bins, patch {p}); unsupported release")
    Tp = N // Fp
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))  # e.g. m2d_clap_vit_base-80x1001p16x16-240128
    enc = {k: v for k, v in state.items() if k.startswith(('cls_token', 'blocks.', 'norm.'))}
    enc['patch_embed.bias'] = state['patch_embed.proj.bias']
    if m2d:
        size = re.search(r'-80x(\d+)p', folder)  # the only record of a length that is not a multiple of p (1001)
        n_frames = int(size[1]) if size and int(size[1]) // p == Tp else Tp * p
        enc['patch_embed.weight'], enc['pos_embed'] = w, pos
        mean, std = state['norm_stats'].tolist() if 'norm_stats' in state else (-7.1, 4.2)  # 2022 releases: default
        frontend = dict(name='mel80', n_frames=n_frames, mean=mean, std=std)
    else:
        n_frames = Tp * p
        enc['patch_embed.weight'] = w.transpose(2, 3)  # kernel (t, f) -> (f, t)
        enc['pos_embed'] = torch.cat([pos[:, :1], pos[:, 1:].unflatten(1, (Tp, Fp)).transpose(1, 2).flatten(1, 2)], 1)
        frontend = dict(name='fbank128', n_frames=n_frames, mean=-4.2677393, std=4.5689974 * 2)
    cfg = dict(width=D, depth=1 + max(int(k.split('.')[1]) for k in enc if k.startswith('blocks.')), heads=D // 64,
               patch=p, n_mels=n_mels, n_frames=n_frames, final_norm='norm.weight' in state)
    model = {'encoder.' + k: v for k, v in enc.items()}
    model.update({k: v for k, v in state.items() if k.startswith(('audio_proj.', 'text_proj.'))})
    # Text-encoder weights inside "...pTI" releases: BERT (code B) under text_encoder.text_encoder., GTE (A) under
    # text_encoder.model.; ours are under text_encoder.model. BERT's pooler head is unused by either pooling.
    for prefix in ('text_encoder.text_encoder.', 'text_encoder.model.'):
        model.update({'text_encoder.model.' + k: v for k, v in part(state, prefix).items()
                      if not k.startswith('pooler.') and not k.endswith('position_ids')})
    used = {'patch_embed.proj.weight', 'patch_embed.proj.bias', 'pos_embed', 'norm_stats', *enc, *model}
    used |= {k for k in state if k.startswith('text_encoder.')}
    print(f"{path}: official {'M2D' if m2d else 'AudioMAE'} release, {D}-d x {cfg['depth']} blocks, input "
          f"{n_mels} x {n_frames} frames; not used: {sorted({k.split('.')[0] for k in state if k not in used})}")
    # M2D-CLAP releases name their text encoder in the folder (ref: the authors' runtime): none or A = GTE-base,
    # B = BERT-base-uncased, N = NV-Embed-v2; a following TI says its weights are in the checkpoint.
    kind = re.search(r'-\d+x\d+p\d+x\d+(?:p\d+k)?p([ABN])', folder)
    text_encoder = RELEASE_TEXT_ENCODERS[kind[1] if kind else 'A']
    return {'model': model, 'model_config': cfg, 'frontend': frontend,
            'args': {'method': 'official ' + ('m2d' if m2d else 'audiomae'), 'text_encoder': text_encoder}}


RELEASE_TEXT_ENCODERS = {'A': 'thenlper/gte-base', 'B': 'google-bert/bert-base-uncased', 'N': 'nvidia/NV-Embed-v2'}


def encoder_state(ckpt, encoder, say, source):
    """The encoder's weights in a read_checkpoint() dict, for `encoder`. Fixed sin-cos position embeddings
    depend only on each patch's (f, t) index: on another grid, the encoder's own table equals the checkpoint's
    on the shared positions and extends it to the others (ours; exact, unlike interpolation)."""
    enc = part(ckpt['model'], 'encoder.')
    if 'pos_embed' in enc and enc['pos_embed'].shape != encoder.pos_embed.shape:
        say(f"position embeddings: {tuple(enc['pos_embed'].shape)} in {source}, using this grid's "
            f"{tuple(encoder.pos_embed.shape)}")
        enc['pos_embed'] = encoder.pos_embed
    return enc


def part(state, prefix):
    """The entries of a state dict under `prefix`, with the prefix removed: part(state, 'encoder.') is the encoder's."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
