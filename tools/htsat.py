"""The MAM-CLAP teacher (Xin+ 2023 §2.1): LAION-CLAP's HTSAT-tiny audio encoder (Wu+ 2023), built from the laion-clap
package without importing `laion_clap` itself (its __init__ imports the training code, which downloads tokenizers at
import time), and `CLAPTeacher`, which turns its final feature map into patch-level targets on the student's grid."""
import importlib.util
import os
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio

from tools.checkpoints import load_file, load_state, part

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

    def __init__(self, ckpt=None, trust=False):
        super().__init__()
        self.htsat = create_htsat_tiny()
        if ckpt:
            state = load_file(ckpt, trust)
            state = {k.removeprefix('module.'): v for k, v in state.get('state_dict', state).items()}
            load_state(self.htsat, part(state, 'audio_branch.'), ckpt)
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
