"""The MAM-CLAP teacher (Xin+ 2023 §2.1): LAION-CLAP's HTSAT-tiny audio encoder (Wu+ 2023), built from the laion-clap
package without importing `laion_clap` itself (its __init__ imports the training code, which downloads tokenizers at
import time), and `CLAPTeacher`, which turns its final feature map into patch-level targets on the student's grid;
or (ours) `EncoderTeacher`, the audio encoder of one of this project's CLAP checkpoints. `clap_teacher` picks one for
--clap_ckpt."""
import importlib.util
import os
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio

from tools.checkpoints import load_file, load_state, part
from tools.embed import encode_clip, load_encoder

HTSAT_TINY = dict(model_type='HTSAT', model_name='tiny', sample_rate=48000, audio_length=1024, window_size=1024,
                  hop_size=480, fmin=50, fmax=14000, class_num=527, mel_bins=64, clip_samples=480000)


def create_htsat_tiny():
    """HTSAT-tiny with random weights (CLAPTeacher loads a checkpoint into it)."""
    folder = os.path.dirname(importlib.util.find_spec('laion_clap').origin)  # locates, does not import
    if folder not in sys.path:
        sys.path.append(folder)
    from clap_module.htsat import create_htsat_model
    from clap_module.model import CLAPAudioCfp
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='torch.meshgrid')  # inside HTSAT's Swin blocks; harmless
        return create_htsat_model(CLAPAudioCfp(**HTSAT_TINY))



class CLAPTeacher(nn.Module):
    """Frozen CLAP audio encoder -> patch-level targets on the student's grid (MAM-CLAP §2.1).

    Input: the student's exact 16 kHz segment, resampled to 48 kHz on the device. HTSAT folds
    its 1024 frames x 64 mels into a 256x256 image (4 time chunks stacked along the height);
    its final stage is an 8x8 map = (4 chunks x 2 freq) x 8 time. Unfolding the chunks gives
    (2 freq, 32 time), resized bilinearly to (F/p, T/p) and flattened frequency-major (ours),
    then standardized per token (LayerNorm without affine, ours: h ends in a LayerNorm).
    """
    dim = 768

    def __init__(self, state=None, source=None):
        """state: a LAION-CLAP checkpoint's state dict, read from `source` (None: random weights)."""
        super().__init__()
        self.htsat = create_htsat_tiny()
        if state is not None:
            load_state(self.htsat, part(state, 'audio_branch.'), source)
        else:
            print("WARNING: no --clap_ckpt: the CLAP teacher has RANDOM weights, so its targets are meaningless. "
                  "Fine for tests and demos; for real MAM-CLAP pass an official LAION-CLAP HTSAT-tiny checkpoint, "
                  "e.g. --clap_ckpt 630k-audioset-best.pt", file=sys.stderr)
        self.htsat.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        return super().train(False)  # always in eval mode (frozen BatchNorm, no SpecAugment)

    @torch.no_grad()
    def feature_map(self, wave):
        """wave (B, L) at 16 kHz -> HTSAT's final-stage map (B, 768, 2 freq, 32 time)."""
        h = self.htsat
        with torch.autocast(wave.device.type, enabled=False):  # front-end in fp32
            x = torchaudio.functional.resample(wave.float(), 16000, 48000)
            x = h.logmel_extractor(h.spectrogram_extractor(x))[:, :, :1024]  # (B, 1, T, 64); HTSAT takes <= 1024 frames
            x = h.bn0(x.transpose(1, 3)).transpose(1, 3)
            x = h.reshape_wav2img(x)  # (B, 1, 256, 256): time stretched to 1024 frames, folded into 4 chunks
        x = h.patch_embed(x)  # trunk under the caller's autocast
        if h.ape:
            x = x + h.absolute_pos_embed
        for layer in h.layers:
            x, _ = layer(x)
        x = h.norm(x).float()  # (B, 64, 768)
        B, _, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, 4, 2, 8)  # (B, C, chunk, freq, time)
        return x.permute(0, 1, 3, 2, 4).reshape(B, C, 2, 32)  # (B, C, 2 freq, 32 time): time fold undone

    def forward(self, wave, grid):
        """wave (B, L) at 16 kHz, grid (Fp, Tp) -> standardized targets (B, Fp*Tp, 768)."""
        x = F.interpolate(self.feature_map(wave), size=grid, mode='bilinear', align_corners=False)  # (B, C, Fp, Tp)
        return F.layer_norm(x.flatten(2).transpose(1, 2), (self.dim,))  # (B, N, 768)


class EncoderTeacher(nn.Module):
    """(ours) MAM-CLAP's teacher from one of this project's CLAP checkpoints (m2d_clap, m2d2 stage 1 or 2) or an
    M2D-CLAP release, for where LAION-CLAP's weights cannot be had: its audio encoder's patch tokens of the student's
    segment, through its own front-end, resized bilinearly to the student's grid and standardized per token, as
    CLAPTeacher does with HTSAT's map. Frozen."""

    def __init__(self, path, trust=False):
        super().__init__()
        enc = load_encoder(path, 'cpu', trust=trust)
        enc.check_clap()  # the paper's teacher is a CLAP model: an encoder trained against text
        self.encoder, self.frontend, self.dim = enc.encoder, enc.frontend, enc.encoder.cfg.width
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, wave, grid):
        """wave (B, L) at 16 kHz, grid (Fp, Tp) -> standardized targets (B, Fp*Tp, D_teacher)."""
        spec = self.frontend(wave)  # (B, 1, F', T'): the teacher's own front-end
        whole = spec.shape[-1] // self.encoder.cfg.patch * self.encoder.cfg.patch  # the frames its patches cover
        x = encode_clip(self.encoder, spec[..., :whole]).float()  # (B, Fp', T'/p, D_teacher)
        x = F.interpolate(x.permute(0, 3, 1, 2), size=grid, mode='bilinear', align_corners=False)  # (B, D, Fp, Tp)
        return F.layer_norm(x.flatten(2).transpose(1, 2), (self.dim,))  # (B, N, D_teacher)


def clap_teacher(path=None, trust=False):
    """The teacher for --clap_ckpt: LAION-CLAP's HTSAT-tiny (the paper's) for a LAION-CLAP checkpoint, random without
    one; EncoderTeacher (ours) for a checkpoint of this project or an M2D-CLAP release."""
    if path is None:
        return CLAPTeacher()
    ckpt = load_file(path, trust)
    state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else {}
    state = {k.removeprefix('module.'): v for k, v in state.items()} if isinstance(state, dict) else {}
    if any(k.startswith('audio_branch.') for k in state):
        return CLAPTeacher(state, path)
    return EncoderTeacher(path, trust)
