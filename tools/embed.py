"""Embeddings from any checkpoint this project reads (ours; the authors' M2D, M2D-CLAP and AudioMAE releases), the way
finetune.py and zeroshot.py compute them:

    from tools.embed import load_encoder
    enc = load_encoder('runs/m2d_clap/checkpoint.pt')   # or a release, e.g. m2d_vit_base-80x608p16x16-221006/....pth
    frames, times = enc.embed(wave, sr)                 # (B, T', D) one per patch column; (T',) seconds
    clip = enc.embed_clip(wave, sr)                     # (B, D): the mean of all patch tokens of all chunks
    text = enc.embed_text(['a dog barks'])              # CLAP checkpoints: (N, E) unit vectors in the audio-text space
    audio = enc.embed_audio_text(wave, sr)              # ... and the clips' (B, E) unit vectors in the same space

`wave`: (L,), (B, L) or (B, C, L) at any sample rate `sr`, a tensor or an array; channels are averaged, then the audio
is resampled to 16 kHz (as data.load_audio does for files). Long audio is cut into chunks of the model's input length
(encode_clip); results are float32 on the model's device, computed under bf16 autocast on a GPU.
"""
import sys
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio
from torch.utils.data import DataLoader
from tqdm import tqdm

import data
from model import AudioToSemantic, ViT, ViTConfig
from tools.checkpoints import load_state, part, read_checkpoint
from tools.run import resolve_amp, share_outputs
from tools.sentence import UNCASED_BERTS, SentenceEncoder, bert_from_state


def load_encoder(path, device=None, n_frames=None, text_encoder=None, trust=False):
    """The Encoder of the checkpoint at `path` (ours or an official release), in eval mode on `device` (default: cuda
    when available). n_frames resizes its position table to another input length; text_encoder replaces a CLAP
    checkpoint's sentence encoder (a Hugging Face id or folder); trust unpickles any object (--trust_checkpoint)."""
    ckpt = read_checkpoint(path, trust)
    encoder, frontend = build_encoder(ckpt, path, n_frames)
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    return Encoder(encoder, frontend, ckpt, path, text_encoder).to(device).eval()


def build_encoder(ckpt, source, n_frames=None):
    """ViT and FrontEnd of a read_checkpoint() dict; with n_frames, the position table is resized to that input."""
    cfg = ViTConfig(**ckpt['model_config'])
    enc = part(ckpt['model'], 'encoder.')
    if n_frames and n_frames != cfg.n_frames:
        new = replace(cfg, n_frames=n_frames)
        enc['pos_embed'] = resize_pos_embed(enc['pos_embed'], cfg.grid, new.grid)
        cfg = new
    encoder = ViT(cfg)
    load_state(encoder, enc, source)
    fe = ckpt['frontend']
    return encoder, data.FrontEnd(fe['name'], cfg.n_frames, fe['mean'], fe['std'])


def text_projector(tp, source):
    """text_proj from its weights (ref: the authors' runtime): none (Identity), a Linear, or the MLP Linear-ReLU-Linear of
    the 2025 ablation models (keys 0.* and 2.*)."""
    if not tp:
        return nn.Identity()
    if tp.keys() == {'weight', 'bias'}:
        return nn.Linear(tp['weight'].shape[1], tp['weight'].shape[0])
    if tp.keys() == {'0.weight', '0.bias', '2.weight', '2.bias'}:
        (h, d), (e, _) = tp['0.weight'].shape, tp['2.weight'].shape
        return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, e))
    raise SystemExit(f"error: {source}: text_proj has keys {sorted(tp)}; readable are a Linear (weight, bias) and the "
                     "2025 releases' MLP (0.weight, 0.bias, 2.weight, 2.bias)")


def encode_clip(encoder, spec, chunk=None, group=64):
    """(B, 1, F, T) of any length -> patch tokens (B, Fp, t, D) of consecutive chunks of `chunk` frames (default: the
    model's input length), concatenated in time; at most `group` chunks pass the encoder at once, so memory stays bounded
    on long audio. The last chunk is zero-padded to a whole patch (ref: M2D runtime)."""
    (B, _, Fd, T), n, p = spec.shape, chunk or encoder.cfg.n_frames, encoder.cfg.patch
    full, rest = divmod(T, n)
    parts = []
    if full:  # all full chunks, `group` at a time
        x = spec[..., :full * n].reshape(B, 1, Fd, full, n).permute(0, 3, 1, 2, 4).reshape(B * full, 1, Fd, n)
        z = torch.cat([encoder(c)[:, 1:] for c in x.split(group)]).unflatten(1, (encoder.cfg.grid[0], -1))
        parts.append(z.unflatten(0, (B, full)).permute(0, 2, 1, 3, 4).flatten(2, 3))  # (B, Fp, full*t, D)
    if rest:
        x = F.pad(spec[..., full * n:], (0, min(-rest % p, n - rest)))  # at most n frames (e.g. 999 of 1001)
        parts.append(encoder(x)[:, 1:].unflatten(1, (encoder.cfg.grid[0], -1)))  # (B, Fp, t, D)
    return torch.cat(parts, 2)


def resize_pos_embed(pos, grid, new_grid):
    """(1, 1+N, D) position table on `grid` -> (1, 1+N', D) on `new_grid`: bicubic interpolation of the patch
    part over (Fp, Tp), CLS kept (ref: MAE/M2D fine-tuning with inputs of another length)."""
    x = pos[:, 1:].unflatten(1, tuple(grid)).permute(0, 3, 1, 2)  # (1, D, Fp, Tp)
    x = F.interpolate(x.float(), size=tuple(new_grid), mode='bicubic', align_corners=False)
    return torch.cat([pos[:, :1], x.flatten(2).transpose(1, 2)], 1)  # (1, 1+N', D)


class Encoder(nn.Module):
    """A ViT encoder with its front-end and, for CLAP checkpoints, its audio-text head: the audio projector (M2D-CLAP:
    an MLP on the mean of all tokens; M2D2 stage 2 and the 2025 releases: AudioToSemantic over all of them) and
    text_proj, built from the checkpoint's keys, and its sentence encoder, built on first use of the text side."""

    def __init__(self, encoder: ViT, frontend: data.FrontEnd, ckpt=None, source='the checkpoint', text_encoder=None):
        super().__init__()
        self.encoder, self.frontend, self.source = encoder, frontend, source
        state, args = (ckpt['model'], ckpt['args']) if ckpt else ({}, {})
        self.method = args.get('method', 'a random encoder')
        self.audio_proj = self.text_proj = self.text_encoder = None
        proj, tp, D = part(state, 'audio_proj.'), part(state, 'text_proj.'), encoder.cfg.width
        if proj or tp:  # a CLAP checkpoint (ref: the authors' runtime, make_it_CLAP)
            self.pool = 'sem_token' not in proj  # M2D-CLAP pools the tokens first; AudioToSemantic attends to them all
            if not proj:  # the 2025 ablations with text_proj only: the mean of the tokens is the audio embedding (ref)
                self.audio_proj = nn.Identity()
            elif self.pool:
                (hidden, _), (out, _) = proj['0.weight'].shape, proj['2.weight'].shape
                self.audio_proj = nn.Sequential(nn.Linear(D, hidden), nn.ReLU(), nn.Linear(hidden, out))
            else:
                depth = 1 + max(int(k.split('.')[1]) for k in proj if k.startswith('sem_blocks.'))
                self.audio_proj = AudioToSemantic(D, depth)
            load_state(self.audio_proj, proj, source)
            self.text_proj = text_projector(tp, source)
            load_state(self.text_proj, tp, source)
        weights = part(state, 'text_encoder.model.')  # M2D2 stage 2 and "...pTI" releases carry a trained one
        if text_encoder and weights:
            raise SystemExit(f"error: {source} carries its own trained text encoder; --text_encoder cannot replace it")
        self.text_spec = (text_encoder or args.get('text_encoder'), None if text_encoder else args.get('text_pooling'),
                          weights)

    @property
    def device(self):
        return self.encoder.pos_embed.device

    # Spectrogram level: what finetune.py and zeroshot.py call inside clip_outputs (which decodes the files)

    def tokens(self, spec, chunk=None):
        """(B, 1, F, T) -> patch tokens (B, Fp, T', D) of consecutive chunks (encode_clip)."""
        return encode_clip(self.encoder, spec, chunk)

    def check_clap(self):
        """Stop with a clear error unless the checkpoint has an audio-text head."""
        if self.audio_proj is None:
            raise SystemExit(f"error: {self.source} ({self.method}) has no audio-text head; that needs a checkpoint of "
                             "--method m2d_clap or m2d2 (stage 1 or 2), or an official M2D-CLAP release")

    def audio_text(self, spec):
        """(B, 1, F, T) whole clips -> (B, E) unit vectors in the audio-text space."""
        self.check_clap()
        tokens = self.tokens(spec).flatten(1, 2)  # (B, N, D): all tokens of all chunks
        return F.normalize(self.audio_proj(tokens.mean(1) if self.pool else tokens).float(), dim=-1)

    def times(self, n_frames, chunk=None):
        """(T',) seconds at the center of each time step of tokens() for an n_frames spectrogram: the middle of the
        p frames its patch column covers."""
        n, p = chunk or self.encoder.cfg.n_frames, self.encoder.cfg.patch
        full, rest = divmod(n_frames, n)
        starts = [k * n + j * p for k in range(full) for j in range(n // p)]
        starts += [full * n + j * p for j in range((rest + min(-rest % p, n - rest)) // p)] if rest else []
        return self.frontend.frame_seconds(torch.tensor(starts, dtype=torch.float64) + (p - 1) / 2).float()

    # Waveform level: the one-line API

    def spectrogram(self, wave, sr):
        """wave (L,), (B, L) or (B, C, L) at sr -> the normalized log-mel (B, 1, F, T), at least one patch long."""
        wave = torch.as_tensor(wave, dtype=torch.float32, device=self.device)
        if wave.ndim not in (1, 2, 3) or wave.shape[-1] == 0:
            raise ValueError(f"wave must be (L,), (B, L) or (B, channels, L) with L > 0, not {tuple(wave.shape)}")
        if wave.ndim > 1 and wave.shape[-1] <= 8 < wave.shape[-2]:  # soundfile's (L, channels), read as L clips
            raise ValueError(f"wave {tuple(wave.shape)} looks like (samples, channels), as soundfile.read returns it; "
                             "pass wave.T[None], a (1, channels, L) clip")
        wave = wave.reshape(-1, *wave.shape[-2:]).mean(1) if wave.ndim == 3 else wave.reshape(-1, wave.shape[-1])
        if sr != data.SAMPLE_RATE:
            wave = torchaudio.functional.resample(wave, sr, data.SAMPLE_RATE)
        n = self.frontend.samples_for(self.encoder.cfg.patch)  # as clip_outputs: pad to one patch in the waveform
        return self.frontend(F.pad(wave, (0, max(0, n - wave.shape[1]))))

    def _run(self, fn, *args):
        with torch.no_grad(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.device.type == 'cuda'):
            return fn(*args).float()

    def embed(self, wave, sr, chunk=None):
        """Time-step embeddings (B, T', D), the Fp tokens of each patch column averaged (as the authors' runtime's
        timestamp embeddings), and their times (T',) in seconds."""
        spec = self.spectrogram(wave, sr)
        frames = self._run(lambda s: self.tokens(s, chunk).mean(1), spec)  # (B, T', D)
        return frames, self.times(spec.shape[-1], chunk).to(self.device)

    def embed_clip(self, wave, sr):
        """(B, D): the mean of all patch tokens of all chunks (= the mean of embed()'s time steps)."""
        return self._run(lambda s: self.tokens(s).mean((1, 2)), self.spectrogram(wave, sr))

    def embed_audio_text(self, wave, sr):
        """(B, E) unit vectors of the clips in the audio-text space (CLAP checkpoints)."""
        return self._run(self.audio_text, self.spectrogram(wave, sr))

    @torch.no_grad()
    def embed_text(self, texts, batch_size=256):
        """list of str -> (N, E) unit vectors in the audio-text space (CLAP checkpoints), on the model's device."""
        self.check_clap()
        if self.text_encoder is None:
            name, pooling, weights = self.text_spec
            bert = bert_from_state(weights) if weights and name in UNCASED_BERTS else None  # self-contained, offline
            self.text_encoder = SentenceEncoder(name, pooling, bert)
            if weights:
                load_state(self.text_encoder.model, weights, self.source)
            self.text_encoder.to(self.device).eval()
            self.text_spec = None  # the weights now live in text_encoder
        return torch.cat([F.normalize(self.text_proj(self.text_encoder(texts[i:i + batch_size])).float(), dim=-1)
                          for i in range(0, len(texts), batch_size)])


# ---------------------------------------------------------------------------------------------
# Whole clips of a manifest through any function of the spectrogram (finetune.py, zeroshot.py)

def clip_outputs(fn, rows, frontend, min_frames, desc, args, device, world=(False, 0, 1)):
    """fn(spec (B, 1, F, T)) -> (B, X) over every readable clip of `rows`, whole (zero-padded in the waveform
    to at least min_frames), under bf16 autocast where --amp resolves to it. Returns (n_good, X) in row order
    and the indices of the good rows; unreadable clips are skipped with a warning, up to --max_bad of them.
    Under torchrun (world = (ddp, rank, size)) each process encodes every size-th clip, and all receive all
    outputs (tools/run.py share_outputs)."""
    ddp, rank, size = world
    mine = rows[rank::size]
    bf16 = resolve_amp(args.amp, device, fp16=False) == 'bf16'
    out, good = ([], []) if not mine else local_outputs(
        fn, mine, frontend, device, bf16, args.batch_size, args.num_workers, 1.0 if ddp else args.max_bad,
        min_frames, desc)
    return share_outputs(out, good, rows, args.max_bad, world) if ddp else (out, good)


@torch.no_grad()
def local_outputs(fn, rows, frontend, device, bf16, batch_size, num_workers, max_bad, min_frames, desc):
    """clip_outputs in one process: the clips decoded by workers, batched by equal length on the device."""
    dataset = data.AudioDataset(rows, frontend.samples_for(min_frames), random_crop=False, whole=True)
    outs, bad = {}, []
    loader = DataLoader(dataset, batch_size, num_workers=num_workers, collate_fn=list)
    for items in tqdm(loader, desc=desc, leave=False):
        bad += [it['bad'] for it in items if 'bad' in it]
        items = [it for it in items if 'wave' in it]
        for length in sorted({len(it['wave']) for it in items}):
            group = [it for it in items if len(it['wave']) == length]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                y = fn(frontend(torch.stack([it['wave'] for it in group]).to(device))).float().cpu()
            outs.update({it['index']: o for it, o in zip(group, y)})
    if bad:
        print(f"warning: {desc}: skipped {len(bad)} unreadable clip(s) of {len(rows)}", file=sys.stderr)
    data.check_bad(bad, len(rows), max_bad)
    good = sorted(outs)
    return torch.stack([outs[i] for i in good]), good


def check_finite(outputs, rows, source):
    """Stop when the encoder's outputs (n, X) for `rows` are not finite: a broken checkpoint, not
    bad audio."""
    broken = [r['file'] for r, o in zip(rows, outputs) if not torch.isfinite(o).all()]
    if broken:
        raise SystemExit(f"error: {source}: the encoder's outputs are not finite for {len(broken)} of {len(rows)} clips "
                         f"(e.g. {broken[0]}); the checkpoint's weights are probably broken (NaN/Inf)")
