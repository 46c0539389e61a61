"""The HEAR 2021 API (Turian+ 2022, "HEAR: Holistic Evaluation of Audio Representations") for any checkpoint this
project reads, through tools/embed.py:

    PYTHONPATH=. hear-validator tools.hear -m runs/m2d/checkpoint.pt --device cpu   # from the repository root

(the validator's installed script does not look in the current folder: PYTHONPATH=. lets it find this module; its
installation is in docs/guide.md)

    from tools import hear
    model = hear.load_model('runs/m2d/checkpoint.pt')
    emb, ms = hear.get_timestamp_embeddings(audio, model)    # audio (n_sounds, n_samples) at 16 kHz
    scene = hear.get_scene_embeddings(audio, model)

Timestamp embeddings: one per patch column (every p frames = 160 ms), the Fp tokens of the column averaged (D-d, as
the authors' M2D runtime's timestamp embeddings), stamped at the column's center. Audio longer than the model's input
is cut into chunks of a whole number of patches (992 frames for the 1001-frame M2D-CLAP 2025 models: the encoder
drops the 9 frames after the last whole patch anyway), so the timestamps stay evenly spaced, as HEAR requires.
Scene embeddings: the mean of the timestamp embeddings. Sounds go through in groups of at most 10 minutes of audio,
and chunks through the encoder 64 at a time, so memory stays bounded on long recordings.
"""
import torch

import data
from tools.embed import load_encoder

GROUP_SECONDS = 600  # audio per forward group


def load_model(model_file_path='', device=None):
    """The Encoder of a checkpoint, with HEAR's attributes: sample_rate (16 kHz), timestamp_embedding_size and
    scene_embedding_size (the encoder width D)."""
    if not model_file_path:
        raise ValueError("tools.hear needs a checkpoint: load_model('runs/m2d/checkpoint.pt'), or -m PATH with "
                         "hear-validator (ours or an official M2D / M2D-CLAP / AudioMAE release)")
    model = load_encoder(model_file_path, device)
    model.sample_rate = data.SAMPLE_RATE
    model.timestamp_embedding_size = model.scene_embedding_size = model.encoder.cfg.width
    return model


def get_timestamp_embeddings(audio, model):
    """audio (n_sounds, n_samples) at model.sample_rate -> embeddings (n_sounds, n_timestamps, D) float32 and
    timestamps (n_sounds, n_timestamps) in milliseconds."""
    if audio.ndim != 2:
        raise ValueError(f"audio must be (n_sounds, n_samples), not {tuple(audio.shape)}")
    chunk = model.encoder.cfg.grid[1] * model.encoder.cfg.patch  # whole patches: evenly spaced timestamps
    per_group = max(1, GROUP_SECONDS * model.sample_rate // max(1, audio.shape[1]))
    embeddings, times = [], None
    for group in audio.split(per_group):
        frames, times = model.embed(group, model.sample_rate, chunk)
        embeddings.append(frames)
    embeddings = torch.cat(embeddings)
    return embeddings, (times * 1000).expand(len(embeddings), -1)


def get_scene_embeddings(audio, model):
    """audio (n_sounds, n_samples) -> (n_sounds, D) float32: the mean of the timestamp embeddings."""
    return get_timestamp_embeddings(audio, model)[0].mean(1)
