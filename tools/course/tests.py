"""The course's graded tests, one group per assignment (pytest marks A1-A11; tools/course/__init__.py lists
what each assignment implements). The code under test is the folder the harness puts first on sys.path.

Outputs are compared with the reference implementation's on the same inputs (`check`: snapshots of the
reference, recorded by the grader for its own inputs, or shipped with a handout for others), with a
relative tolerance that holds in fp32 and under bf16 autocast, on CPU or GPU. Where the papers leave a
convention open, `check` accepts each reading the docstring names (norm-pix's variance, the order of the
masked tokens). Random functions are checked by their statistics, never against a seeded output; functions
that mask call model.random_masking, which the tests replace by a fixed draw.
"""
import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

import losses as L
import model as M
from conftest import AMP, DEVICE, SNAP

SEED = SNAP.seed
mark = {f'A{i}': getattr(pytest.mark, f'A{i}') for i in range(1, 12)}


def randn(*shape, k=0):
    """Inputs drawn from the grading seed: the same in the reference's run and in the graded one."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(SEED * 1000 + k)).to(DEVICE)


def perms(B, N, k=0):
    """(B, N) random permutations from the grading seed."""
    g = torch.Generator().manual_seed(SEED * 1000 + k)
    return torch.stack([torch.randperm(N, generator=g) for _ in range(B)]).to(DEVICE)


def autocast():
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16) if AMP == 'bf16' else nullcontext()


def built(make, k=0):
    """A module made with the grading seed's weights, on the device, in eval mode (no dropout)."""
    torch.manual_seed(SEED * 1000 + k)
    return make().to(DEVICE).eval()


def fixed_masking(name, order):
    """A stand-in for model.random_masking: the masking of the permutations `order` (B, N), the first K of
    each row visible, K = int(N * (1 - ratio)), as the reference's split_order gives it (a snapshot)."""
    def masking(B, N, ratio, device):
        K = int(N * (1 - ratio))
        return SNAP.given(f'masking {name}', lambda: M.split_order(order[:B, :N], K))
    return masking


def sorted_by(ids, *xs):
    """Each x (B, M, ...) with its tokens in ascending order of ids (B, M)."""
    order = ids.argsort(1)
    return [x.gather(1, order.view(*order.shape, *[1] * (x.dim() - 2)).expand_as(x)) for x in xs]


# ---------------------------------------------------------------------------------------------
# A1: patches and position tables

@mark['A1']
def test_patchify_against_the_reference(check):
    for k, (shape, p) in enumerate([((2, 1, 32, 48), 16), ((1, 1, 48, 32), 16), ((3, 1, 16, 40), 8)]):
        check(f'patchify {shape} {p}', M.patchify(randn(*shape, k=k), p))


@mark['A1']
def test_unpatchify_inverts_patchify_and_matches_the_reference(check):
    spec = randn(2, 1, 32, 48, k=1)
    assert torch.equal(M.unpatchify(M.patchify(spec, 16), 16, (2, 3)), spec)
    check('unpatchify', M.unpatchify(randn(2, 6, 256, k=2), 16, (2, 3)))


@mark['A1']
def test_patchify_equals_the_patch_convolution():
    """A patch embedding is a convolution with kernel = stride = p: the Linear on patchify's rows."""
    spec, w = randn(2, 1, 32, 48, k=3), randn(8, 1, 16, 16, k=4)
    conv = F.conv2d(spec, w, stride=16).flatten(2).transpose(1, 2)  # (B, N, 8), N frequency-major
    assert torch.allclose(M.patchify(spec, 16) @ w.view(8, -1).T, conv, atol=1e-3, rtol=1e-4)


@mark['A1']
def test_sincos_pos_embed_against_the_reference(check):
    for dim, grid in [(16, (3, 5)), (32, (2, 7)), (8, (1, 4)), (64, (5, 38))]:
        pos = M.sincos_pos_embed(dim, grid)
        assert pos.shape == (grid[0] * grid[1], dim) and pos.dtype == torch.float32
        check(f'sincos {dim} {grid}', pos)


# ---------------------------------------------------------------------------------------------
# A2: random masking (statistics, not seeded outputs)

@mark['A2']
def test_random_masking_keeps_exactly_k_and_restore_inverts():
    for B, N, ratio in [(7, 40, 0.7), (3, 10, 0.75), (2, 8, 0.0), (5, 190, 0.7)]:
        ids_keep, ids_masked, ids_restore, mask = M.random_masking(B, N, ratio, DEVICE)
        K = int(N * (1 - ratio))
        assert ids_keep.shape == (B, K) and ids_masked.shape == (B, N - K) and ids_restore.shape == (B, N)
        assert mask.shape == (B, N) and mask.is_floating_point() and ids_keep.device.type == DEVICE.type
        shuffled = torch.cat([ids_keep, ids_masked], 1)
        assert torch.equal(shuffled.sort(1).values, torch.arange(N, device=DEVICE).expand(B, N))  # a permutation
        assert torch.equal(shuffled.gather(1, ids_restore), torch.arange(N, device=DEVICE).expand(B, N))
        assert torch.all(mask.gather(1, ids_keep) == 0) and torch.all(mask.gather(1, ids_masked) == 1)


@mark['A2']
def test_random_masking_is_a_uniform_subset_per_sample():
    """Every token visible with probability K/N, every pair with K(K-1)/(N(N-1)), samples independent:
    contiguous blocks, one mask for the batch, or a bias toward some tokens fail. 5-sigma bounds."""
    B, N, ratio = 4000, 16, 0.75
    K = int(N * (1 - ratio))
    visible = 1 - M.random_masking(B, N, ratio, DEVICE)[3].float().cpu()  # (B, N)
    p1, p2 = K / N, K * (K - 1) / (N * (N - 1))
    assert (visible.mean(0) - p1).abs().max() < 5 * math.sqrt(p1 * (1 - p1) / B)
    pairs = visible.T @ visible / B  # (N, N): both visible
    off = ~torch.eye(N, dtype=torch.bool)
    assert (pairs[off] - p2).abs().max() < 5 * math.sqrt(p2 * (1 - p2) / B)
    same = (visible[1:] == visible[:-1]).all(1).float().mean()  # chance: 1 / C(16, 4) = 1/1820
    assert same < 0.01


@mark['A2']
def test_random_masking_draws_from_torchs_rng():
    """The masks replay with torch's seed (a resumed run draws the same ones)."""
    torch.manual_seed(SEED)
    a = M.random_masking(3, 20, 0.5, DEVICE)
    torch.manual_seed(SEED)
    b = M.random_masking(3, 20, 0.5, DEVICE)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------
# A3: the ViT attention block

@mark['A3']
def test_attention_against_the_reference(check):
    for k, (D, heads, L_) in enumerate([(32, 4, 7), (48, 3, 12), (16, 1, 5)]):
        attn = built(lambda: M.Attention(D, heads), k)
        with autocast():
            check(f'attention {D} {heads}', attn(randn(2, L_, D, k=k)))


@mark['A3']
def test_block_against_the_reference(check):
    block = built(lambda: M.Block(32, 4), 5)
    for p in block.parameters():  # LayerNorms away from identity
        p.data.add_(0.1 * randn(*p.shape, k=p.numel()))
    with autocast():
        check('block', block(randn(3, 9, 32, k=6)))


@mark['A3']
def test_attention_is_permutation_equivariant():
    attn, x, order = built(lambda: M.Attention(32, 4), 7), randn(2, 9, 32, k=8), perms(1, 9, k=9)[0]
    with torch.no_grad():
        assert torch.allclose(attn(x)[:, order], attn(x[:, order]), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# A4: the encoder on visible tokens and the MAE decoder

def tiny_vit():
    return M.ViT(M.ViTConfig(width=32, depth=2, heads=2, n_mels=32, n_frames=64))  # grid (2, 4)


@mark['A4']
def test_encode_visible_tokens_against_the_reference(check):
    vit = built(tiny_vit, 10)
    other = built(lambda: torch.nn.ModuleList([M.Block(32, 2)]), 11)
    x, ids = randn(3, 8, 32, k=12), perms(3, 8, k=13)[:, :3]
    with autocast():
        check('encode visible', vit.encode(x, ids))
        check('encode all', vit.encode(x))
        check('encode other blocks', vit.encode(x, ids, other, torch.nn.Identity()))


@mark['A4']
def test_decoder_against_the_reference(check):
    for k, (window, grid) in enumerate([(None, (2, 4)), ((4, 4), (4, 8))]):
        N = grid[0] * grid[1]
        dec = built(lambda: M.Decoder(32, 64, 2, 12, grid, window), 20 + k)
        ids_restore = fixed_masking(f'A4 {window}', perms(2, N, k=24 + k))(2, N, 0.75, DEVICE)[2]
        z = randn(2, 1 + N // 4, 32, k=22 + k)
        with autocast():
            check(f'decoder {window}', dec(z, ids_restore))


@mark['A4']
def test_decoder_puts_the_tokens_back_in_grid_order():
    """The visible tokens in another order, with the ids_restore of that order: the same predictions."""
    dec = built(lambda: M.Decoder(32, 64, 1, 12, (2, 4)), 30)
    z, order = randn(2, 1 + 3, 32, k=31), perms(2, 8, k=32)  # 3 visible tokens: order[:, :3]
    swap = torch.tensor([0, 3, 1, 2], device=DEVICE)  # CLS stays first; the visible tokens reordered
    order2 = torch.cat([order[:, :3][:, swap[1:] - 1], order[:, 3:]], 1)
    restore = fixed_masking('A4 order', order)(2, 8, 5 / 8, DEVICE)[2]
    restore2 = fixed_masking('A4 order 2', order2)(2, 8, 5 / 8, DEVICE)[2]
    with torch.no_grad():
        assert torch.allclose(dec(z, restore), dec(z[:, swap], restore2), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# A5: AudioMAE's norm-pix loss

def masks(B, N, M_, k):
    """(B, N) 0/1 masks with M_ masked tokens per sample, as random masking draws them."""
    return (perms(B, N, k=k).argsort(1) >= N - M_).float()


@mark['A5']
def test_token_mse_against_the_reference(check):
    pred, target, w = randn(3, 10, 16, k=40), randn(3, 10, 16, k=41), masks(3, 10, 4, k=42)
    check('token_mse', L.token_mse(pred, target, w))
    check('token_mse all', L.token_mse(pred, target, torch.ones_like(w)))
    assert L.token_mse(pred, target, torch.zeros_like(w)) == 0  # no token: 0, not NaN


@mark['A5']
def test_mae_loss_against_the_reference(check):
    """Either variance of a patch (unbiased as the reference's code, or biased): the biased reading scales
    the normalized target by 1/c, c^2 = (P - 1) / P, so its loss is reference(c * pred) / c^2."""
    for k, P in enumerate([16, 256]):
        pred, target, mask = randn(3, 10, P, k=43 + k), 3 * randn(3, 10, P, k=45 + k) + 1, masks(3, 10, 6, 47 + k)
        c = ((P - 1) / P) ** 0.5
        biased = L.mae_loss(c * pred, target, mask) / c ** 2  # used when recording
        check(f'mae_loss {P}', L.mae_loss(pred, target, mask), biased)
        check(f'mae_loss raw {P}', L.mae_loss(pred, target, mask, norm_pix=False))


@mark['A5']
def test_mae_loss_ignores_the_visible_patches():
    pred, target, mask = randn(2, 8, 16, k=50), randn(2, 8, 16, k=51), masks(2, 8, 5, k=52)
    moved = pred + 10 * (1 - mask[..., None])
    assert torch.allclose(L.mae_loss(moved, target, mask), L.mae_loss(pred, target, mask))


# ---------------------------------------------------------------------------------------------
# A6: MAM-CLAP: the head on every token, and Eq. (1)

@mark['A6']
def test_mam_clap_loss_against_the_reference(check):
    Y, T, mask = randn(3, 8, 6, k=60), randn(3, 8, 6, k=61), masks(3, 8, 2, k=62)
    check('mam_clap_loss', list(L.mam_clap_loss(Y, T, mask)))


@mark['A6']
def test_mam_clap_loss_keeps_visible_and_masked_apart():
    Y, T, mask = randn(2, 8, 6, k=63), randn(2, 8, 6, k=64), masks(2, 8, 6, k=65)
    visible, masked = L.mam_clap_loss(Y, T, mask)
    visible2, masked2 = L.mam_clap_loss(Y + 3 * mask[..., None], T, mask)  # only the masked predictions move
    assert torch.allclose(visible, visible2) and not torch.allclose(masked, masked2)


def tiny_audiomae(**kw):
    cfg = M.ViTConfig(width=32, depth=2, heads=2, n_mels=32, n_frames=128)  # grid (2, 8): 16 patches
    return M.AudioMAE(cfg, 0.75, 32, 1, False, **kw)


@mark['A6']
def test_audiomae_predict_against_the_reference(check, monkeypatch):
    monkeypatch.setattr(M, 'random_masking', fixed_masking('A6', perms(2, 16, k=66)))
    for target in ('patches', 'clap'):
        mae = built(lambda: tiny_audiomae(target=target, target_dim=12), 67)
        with autocast():
            z, pred, mask = mae.predict(randn(2, 1, 32, 128, k=68))
        check(f'predict {target}', [z, pred, mask])


# ---------------------------------------------------------------------------------------------
# A7: SupMAM's classification branch and the objective

@mark['A7']
def test_classification_loss_against_the_reference(check):
    logits = randn(5, 4, k=70)
    one_hot = F.one_hot(perms(1, 5, k=71)[0] % 4, 4).float()
    soft = torch.softmax(randn(5, 4, k=72), 1)
    multi = (randn(5, 4, k=73) > 0).float()
    check('ce', L.classification_loss(logits, one_hot, False))
    check('ce tau', L.classification_loss(logits, one_hot, False, 10.0))
    check('ce soft', L.classification_loss(logits, soft, False, 2.0))
    check('bce', L.classification_loss(logits, multi, True, 10.0))


@mark['A7']
def test_audiomae_forward_terms_against_the_reference(check, monkeypatch):
    monkeypatch.setattr(M, 'random_masking', fixed_masking('A7', perms(4, 16, k=74)))
    spec, y = randn(4, 1, 32, 128, k=75), F.one_hot(torch.tensor([0, 1, 2, 0]), 3).float().to(DEVICE)
    for target, classes in (('patches', 3), ('clap', 0), ('clap', 3)):
        mae = built(lambda: tiny_audiomae(target=target, target_dim=12, n_classes=classes, tau=10.0), 76)
        mae.train()  # the classifier's BatchNorm on the batch's statistics
        teacher = randn(4, 16, 12, k=77) if target == 'clap' else None
        with autocast():
            losses, metrics = mae(spec, y=y if classes else None, target=teacher)
        names = {'loss_rec'} if target == 'patches' else {'loss_visible', 'loss_masked'}
        assert set(losses) == names | ({'loss_cls'} if classes else set()) and metrics == {}
        check(f'forward {target} {classes}', losses)


@mark['A7']
def test_supmam_classifies_from_the_visible_tokens_only(monkeypatch):
    masking = fixed_masking('A7 visible', perms(4, 16, k=78))
    monkeypatch.setattr(M, 'random_masking', masking)
    mae = built(lambda: tiny_audiomae(n_classes=3, tau=10.0), 79).train()
    spec, y = randn(4, 1, 32, 128, k=80), F.one_hot(torch.tensor([0, 1, 2, 0]), 3).float().to(DEVICE)
    mask = masking(4, 16, 0.75, DEVICE)[3]  # 12 of 16 masked
    patches = M.patchify(spec, 16)
    hidden = M.unpatchify(patches + 5 * mask[..., None] * randn(*patches.shape, k=81), 16, (2, 8))
    with torch.no_grad():
        a, b = mae(spec, y=y)[0], mae(hidden, y=y)[0]
    assert torch.allclose(a['loss_cls'], b['loss_cls'], atol=1e-6) and not torch.allclose(a['loss_rec'], b['loss_rec'])


# ---------------------------------------------------------------------------------------------
# A8: M2D: the predictor, the target network and the loss

@mark['A8']
def test_m2d_loss_against_the_reference(check):
    pred, target = randn(3, 7, 16, k=90), 2 * randn(3, 7, 16, k=91) + 1
    check('m2d_loss', L.m2d_loss(pred, target))
    z = target - target.mean(-1, keepdim=True)
    assert L.m2d_loss(3 * z, target).abs() < 1e-5 and (L.m2d_loss(-z, target) - 4).abs() < 1e-5


def tiny_m2d(**kw):
    cfg = M.ViTConfig(width=32, depth=2, heads=2, n_mels=32, n_frames=128)  # grid (2, 8)
    return M.M2D(cfg, 0.75, 32, 1, (0.99, 0.999), **kw)


@mark['A8']
def test_m2d_predict_against_the_reference_in_any_consistent_order(check, monkeypatch):
    """z in ids_keep's order; predictions and targets paired token by token, in any one order."""
    monkeypatch.setattr(M, 'random_masking', fixed_masking('A8', perms(3, 16, k=92)))
    m2d = built(tiny_m2d, 93)
    for p in m2d.target_blocks.parameters():  # a target network unlike the online one
        p.data.add_(0.5 * randn(*p.shape, k=p.numel()))
    with autocast():
        z, pred, target, ids_masked = m2d.predict(randn(3, 1, 32, 128, k=94))
    assert ids_masked.shape == (3, 12) and not target.requires_grad
    check('m2d z', z)
    check('m2d pairs', sorted_by(ids_masked, pred, target))


@mark['A8']
def test_m2d_target_sees_only_the_masked_patches(monkeypatch):
    masking = fixed_masking('A8 target', perms(2, 16, k=95))
    monkeypatch.setattr(M, 'random_masking', masking)
    m2d, spec = built(tiny_m2d, 96), randn(2, 1, 32, 128, k=97)
    visible = 1 - masking(2, 16, 0.75, DEVICE)[3]
    patches = M.patchify(spec, 16)
    changed = M.unpatchify(patches + 5 * visible[..., None] * randn(*patches.shape, k=98), 16, (2, 8))
    with torch.no_grad():
        _, _, t1, ids1 = m2d.predict(spec)
        _, _, t2, ids2 = m2d.predict(changed)
    assert torch.allclose(*sorted_by(ids1, t1), *sorted_by(ids2, t2), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# A9: M2D: the target network's EMA

@mark['A9']
def test_ema_against_the_reference(check):
    for step in (0, 4, 9):
        m2d = built(tiny_m2d, 100)
        m2d.alpha = (0.5, 0.9)
        for p in [*m2d.target_blocks.parameters(), *m2d.target_norm.parameters()]:
            p.data.add_(randn(*p.shape, k=p.numel()))
        m2d.update_target(step, 10)
        check(f'ema {step}', [p.data for p in [*m2d.target_blocks.parameters(), *m2d.target_norm.parameters()]])


@mark['A9']
def test_ema_limits():
    m2d = built(tiny_m2d, 101)
    target = lambda: [p.clone() for p in [*m2d.target_blocks.parameters(), *m2d.target_norm.parameters()]]
    before = target()
    m2d.alpha = (1.0, 1.0)
    m2d.update_target(3, 10)  # alpha 1: unchanged
    assert all(torch.equal(a, b) for a, b in zip(before, target()))
    m2d.alpha = (0.0, 0.0)
    m2d.update_target(3, 10)  # alpha 0: the online encoder's blocks and norm
    online = [*m2d.encoder.blocks.parameters(), *m2d.encoder.norm.parameters()]
    assert all(torch.allclose(a, b) for a, b in zip(online, target()))
    assert not any(p.requires_grad for p in m2d.target_blocks.parameters())


# ---------------------------------------------------------------------------------------------
# A10: the CLAP loss and its temperature

@mark['A10']
def test_clap_loss_against_the_reference(check):
    a, t = randn(6, 8, k=110), randn(6, 8, k=111)
    check('clap', L.clap_loss(a, t, 1 / 0.07))
    check('clap tensor scale', L.clap_loss(a, t, torch.tensor(3.0, device=DEVICE)))
    check('clap big', L.clap_loss(randn(32, 16, k=112), randn(32, 16, k=113), 100.0))


@mark['A10']
def test_clap_loss_is_symmetric_and_scale_free():
    a, t = randn(6, 8, k=114), randn(6, 8, k=115)
    assert torch.allclose(L.clap_loss(a, t, 5.0), L.clap_loss(t, a, 5.0), atol=1e-6)
    assert torch.allclose(L.clap_loss(2 * a, 3 * t, 5.0), L.clap_loss(a, t, 5.0), atol=1e-5)


@mark['A10']
def test_clamp_logit_scale_in_place():
    for value, expect in [(10.0, math.log(100)), (-1.0, 0.0), (2.0, 2.0)]:
        p = torch.nn.Parameter(torch.tensor(value))
        M.clamp_logit_scale(p)
        assert math.isclose(p.item(), expect, abs_tol=1e-6) and isinstance(p, torch.nn.Parameter)


# ---------------------------------------------------------------------------------------------
# A11: retrieval and tagging metrics

@mark['A11']
def test_recall_at_k_against_the_reference(check):
    sim = randn(20, 30, k=120).round(decimals=1).cpu()  # ties included
    positive = torch.zeros(20, 30, dtype=torch.bool)
    positive[torch.arange(20), perms(1, 30, k=121)[0, :20].cpu()] = True
    positive[torch.arange(0, 20, 3), perms(1, 30, k=122)[0, :7].cpu()] = True  # some queries: two positives
    check('recall', L.recall_at_k(sim, positive, ks=(1, 3, 5, 10)))


@mark['A11']
def test_recall_at_k_conventions():
    sim = torch.tensor([[0.9, 0.5, 0.5, 0.1], [0.2, 0.8, 0.9, 0.3]])
    positive = torch.tensor([[False, True, False, True], [True, False, False, True]])
    # query 0: best positive 0.5, one candidate strictly higher (a tie does not count): rank 1
    # query 1: best positive 0.3, two candidates higher: rank 2
    assert L.recall_at_k(sim, positive, ks=(1, 2, 3)) == {1: 0.0, 2: 0.5, 3: 1.0}


@mark['A11']
def test_mean_average_precision_against_the_reference(check):
    scores, targets = randn(40, 6, k=123).cpu(), (randn(40, 6, k=124) > 0.8).float().cpu()
    targets[:, 5] = 0  # a class without positives: left out of the mean
    check('mAP', L.mean_average_precision(scores, targets))
    perfect = targets[:, :5] * 2 + 0.01 * randn(40, 5, k=125).cpu()
    assert math.isclose(L.mean_average_precision(perfect, targets[:, :5]), 1.0)
