"""LAION-CLAP's HTSAT-tiny audio encoder (the MAM-CLAP teacher's trunk), built from the laion-clap package without
importing `laion_clap` itself: its __init__ imports the training code, which downloads tokenizers at import time."""
import importlib.util
import os
import sys
import warnings

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
