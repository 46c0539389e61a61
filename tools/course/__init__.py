"""A course in the box: assignments a student implements in this codebase, a grader that tells right from
wrong, and experiments on the built-in benchmark with measured answers (docs/course.md).

    python -m tools.course handout --out DIR      # a student version: a fresh git repository, one commit
    python -m tools.course grade DIR [A1 ...]     # grade a handout folder: a score table
    python -m tools.course experiments            # the experiments, their commands and measured ranges
    python -m tools.course probe E1 CKPT ...      # re-run an experiment's probe on submitted checkpoints

The reading codebase carries no assignment marker: ASSIGNMENTS names the functions a handout stubs.
"""
from collections import namedtuple

Assignment = namedtuple('Assignment', 'id title paper functions hours cpu_s')

# Each assignment needs only the ones before it; `functions` are (file, qualified name) pairs whose bodies a
# handout replaces by `raise NotImplementedError(...)`, keeping their signatures and docstrings. hours: the
# student time we expect; cpu_s: the CPU seconds (user + sys) of grading it alone, `grade DIR A1 --jobs 1`,
# most of them starting Python and torch and recording the reference's outputs (docs/course.md).
ASSIGNMENTS = [
    Assignment('A1', 'Patches and position tables', 'MAE §3, AudioMAE §2; M2D get_2d_sincos_pos_embed',
               [('model.py', 'patchify'), ('model.py', 'unpatchify'), ('model.py', 'sincos_pos_embed')], 1, 18),
    Assignment('A2', 'Random masking', 'MAE §3 (random sampling)',
               [('model.py', 'split_order'), ('model.py', 'random_masking')], 1, 20),
    Assignment('A3', 'The ViT attention block', 'ViT §3.1; Transformer (Vaswani+ 2017) §3.2',
               [('model.py', 'Attention.forward'), ('model.py', 'Block.forward')], 1.5, 22),
    Assignment('A4', 'The encoder on visible tokens and the MAE decoder', 'MAE §3; AudioMAE §2',
               [('model.py', 'ViT.encode'), ('model.py', 'Decoder.forward')], 2, 21),
    Assignment('A5', "AudioMAE's norm-pix loss", 'MAE §3 (reconstruction target); AudioMAE §2',
               [('losses.py', 'token_mse'), ('losses.py', 'mae_loss')], 1, 19),
    Assignment('A6', 'MAM-CLAP: CLAP targets for visible and masked patches', 'MAM-CLAP §2.1, Eq. (1)',
               [('model.py', 'AudioMAE.predict'), ('losses.py', 'mam_clap_loss')], 1.5, 22),
    Assignment('A7', "SupMAM's classification branch", 'MAM-CLAP paper §2.2, Eq. (2)-(3)',
               [('model.py', 'AudioMAE.forward'), ('losses.py', 'classification_loss')], 1.5, 25),
    Assignment('A8', 'M2D: the predictor, the target network and the loss', 'M2D-CLAP §3.1, Eq. (1)',
               [('model.py', 'M2D.predict'), ('losses.py', 'm2d_loss')], 2, 22),
    Assignment('A9', "M2D: the target network's EMA", 'M2D-CLAP §3.1 (xi <- alpha xi + (1 - alpha) theta)',
               [('model.py', 'M2D.update_target')], 0.5, 18),
    Assignment('A10', 'The CLAP loss and its temperature', 'M2D-CLAP §3.2, Eq. (2)-(3); CLIP',
               [('losses.py', 'clap_loss'), ('model.py', 'clamp_logit_scale')], 1.5, 18),
    Assignment('A11', 'Retrieval and tagging metrics', 'M2D-CLAP §4.5; AudioSet mAP',
               [('losses.py', 'recall_at_k'), ('losses.py', 'mean_average_precision')], 1, 21),
]
BY_ID = {a.id: a for a in ASSIGNMENTS}
