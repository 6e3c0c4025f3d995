"""Text encoder: any Hugging Face BERT-style model, or a small BERT from scratch; sentence embeddings.

``text_encoder`` is a Hub name (``emilyalsentzer/Bio_ClinicalBERT``, the paper's), a local folder
written by ``save_pretrained`` (config, weights, tokenizer), or ``scratch``: a BERT built from a
config without weights, with a WordPiece vocabulary made from the *training* reports only.

The scratch vocabulary: tokenizers' BERT normaliser and pre-tokeniser, the training reports'
words counted by tokenizers' ``WordLevelTrainer`` (most frequent first, ties by spelling), plus
every character seen (word-initial and ``##`` continuation), in a tokenizers ``WordPiece`` model
(greedy longest-match-first; unseen words fall back to sub-words and characters, never lose
text). tokenizers' own ``WordPieceTrainer`` is not used: it learns merges with BPE whose ties are
broken in hash-map order, so two runs on the same reports give different vocabularies
(huggingface/tokenizers#1794), which would break run-to-run reproducibility.

Sentence embeddings: the report's sentences are tokenised one by one and concatenated into one
sequence ``[CLS] s1 s2 ... [SEP]`` (truncated to ``max_tokens``). ``context="report"`` encodes that
sequence in one pass, so every token sees the whole report (GLoRIA's words); ``context="sentence"``
encodes each sentence as its own ``[CLS] s [SEP]``, so a sentence's embedding is the one it has
standing alone, as a zero-shot prompt does (a prompt is then no longer a one-sentence report
unlike any seen in training). Either way a sentence's embedding is the mean of its tokens'
last-layer embeddings, the report's the mean over all its sentence tokens.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

SCRATCH = "scratch"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
BIOCLINICALBERT = "emilyalsentzer/Bio_ClinicalBERT"
#: What a sentence's tokens see when encoded (module doc).
CONTEXTS = ("report", "sentence")


class TextEncoderUnavailableError(RuntimeError):
    """A text encoder named by Hub id could neither be found locally nor downloaded."""


def train_wordpiece(texts: Sequence[str], vocab_size: int, min_frequency: int = 1):
    """A BERT tokenizer (``PreTrainedTokenizerFast``) whose WordPiece vocabulary comes from ``texts``.

    Deterministic: the same texts give the same vocabulary, ids included (see the module doc).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True, handle_chinese_chars=True,
                                            strip_accents=None)
    pre = pre_tokenizers.BertPreTokenizer()
    counter = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    counter.normalizer, counter.pre_tokenizer = normalizer, pre
    counter.train_from_iterator(list(texts), trainers.WordLevelTrainer(
        vocab_size=max(vocab_size, 1), min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        show_progress=False))
    words = [w for w, _ in sorted(counter.get_vocab().items(), key=lambda kv: kv[1]) if w not in SPECIAL_TOKENS]
    chars = sorted({c for text in texts for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)) for c in w})
    vocab = list(SPECIAL_TOKENS) + chars + [f"##{c}" for c in chars]
    seen = set(vocab)
    room = max(0, vocab_size - len(vocab))
    vocab += [w for w in words if w not in seen][:room]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]",
                                     max_input_chars_per_word=100))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre, decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab.index("[CLS]")), ("[SEP]", vocab.index("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)


def scratch_bert(tokenizer, hidden: int, layers: int, heads: int, intermediate: int, max_positions: int,
                 dropout: float = 0.1) -> nn.Module:
    """A randomly initialised ``BertModel`` (no pooler) sized for ``tokenizer``'s vocabulary."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate,
                        max_position_embeddings=max_positions, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout, pad_token_id=tokenizer.pad_token_id)
    return BertModel(config, add_pooling_layer=False)


def quiet_progress() -> None:
    """Silence transformers' own progress bars (weight loading/saving) when cxrssl's are off."""
    from transformers.utils import logging as hf_logging

    from cxrssl.utils import progress_disabled

    if progress_disabled():
        hf_logging.disable_progress_bar()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def load_pretrained(name_or_path: str, local_files_only: bool | None = None):
    """(model, tokenizer) of a Hugging Face BERT-style encoder from a Hub name or a local folder.

    A local folder is used as is. A Hub name is looked up in the local cache and, unless
    ``local_files_only`` (default: the ``HF_HUB_OFFLINE`` environment variable), downloaded;
    failing both, :class:`TextEncoderUnavailableError` says what to download and where to point
    the configuration.
    """
    from transformers import AutoModel, AutoTokenizer

    quiet_progress()
    path = Path(name_or_path).expanduser()
    local = path.is_dir()
    if not local and (path.is_absolute() or str(name_or_path).startswith((".", "~"))):
        raise FileNotFoundError(f"text encoder folder {path} does not exist")
    only_local = local or (_offline() if local_files_only is None else local_files_only)
    source = str(path) if local else str(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=only_local)
        model = AutoModel.from_pretrained(source, local_files_only=only_local, add_pooling_layer=False)
    except OSError as exc:
        if local:
            raise
        raise TextEncoderUnavailableError(
            f"text encoder {name_or_path!r} is not in the local Hugging Face cache and could not be downloaded "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). On a machine with internet run "
            f"`hf download {name_or_path} --local-dir /path/to/{Path(str(name_or_path)).name}` (or "
            f"`huggingface-cli download ...`), copy that folder here and set `text_encoder: "
            f"/path/to/{Path(str(name_or_path)).name}` in the method's settings; or use `text_encoder: {SCRATCH}` "
            "(a small BERT trained from scratch on the reports).") from None
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise ValueError(f"text encoder {name_or_path!r}: its tokenizer has no [CLS]/[SEP] tokens (not BERT-style)")
    log.info("text encoder %s (%s, %d parameters)", name_or_path, type(model).__name__,
             sum(p.numel() for p in model.parameters()))
    return model, tokenizer


class SentenceTextEncoder(nn.Module):
    """A BERT-style ``model`` and its ``tokenizer``: reports -> report and sentence embeddings."""

    def __init__(self, model: nn.Module, tokenizer, max_tokens: int = 128, max_sentences: int = 12,
                 context: str = "report"):
        super().__init__()
        if context not in CONTEXTS:
            raise ValueError(f"sentence context must be one of {CONTEXTS}, got {context!r}")
        self.model, self.tokenizer, self.context = model, tokenizer, context
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", max_tokens)
        self.max_tokens, self.max_sentences = min(int(max_tokens), int(limit)), int(max_sentences)
        self.width = int(model.config.hidden_size)

    def tokenize(self, sentences: Sequence[str]) -> tuple[list[int], list[int]]:
        """``[CLS] s1 s2 ... [SEP]`` ids and each token's sentence index (-1 for [CLS]/[SEP]).

        At most ``max_sentences`` sentences and ``max_tokens`` tokens; a sentence cut off entirely
        by the token limit is dropped.
        """
        tok = self.tokenizer
        pieces = tok(list(sentences[: self.max_sentences]), add_special_tokens=False)["input_ids"] if sentences else []
        ids, sid = [tok.cls_token_id], [-1]
        for k, p in enumerate(pieces):
            room = self.max_tokens - 1 - len(ids)
            if room <= 0:
                break
            ids += p[:room]
            sid += [k] * len(p[:room])
        return ids + [tok.sep_token_id], sid + [-1]

    def collate(self, tokenized: Sequence[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        """Pad a batch of :meth:`tokenize` outputs (:func:`pad_tokens`)."""
        return pad_tokens(tokenized, self.tokenizer.pad_token_id)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sentence_ids: torch.Tensor):
        """(report ``(B, H)``, sentences ``(B, max_sentences, H)``, sentence mask ``(B, max_sentences)``)."""
        if self.context == "sentence":
            return self._encode_sentences(input_ids, sentence_ids)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool_sentences(hidden, sentence_ids, self.max_sentences)

    def _encode_sentences(self, input_ids: torch.Tensor, sentence_ids: torch.Tensor):
        """``context="sentence"``: every sentence of the packed batch as its own ``[CLS] s [SEP]``
        sequence, all in one pass; pooled as :func:`pool_sentences` pools."""
        tok, n_sent = self.tokenizer, self.max_sentences
        onehot = sentence_ids.unsqueeze(-1) == torch.arange(n_sent, device=input_ids.device)  # (B, L, S)
        lengths = onehot.sum(1)  # (B, S)
        b, pos = torch.nonzero(sentence_ids >= 0, as_tuple=True)
        k = sentence_ids[b, pos]
        within = (onehot.cumsum(1) - 1).gather(2, sentence_ids.clamp(min=0).unsqueeze(-1)).squeeze(-1)[b, pos]
        present = torch.nonzero(lengths > 0)  # (N, 2): (report, sentence) of each sequence
        row = torch.full_like(lengths, -1)
        row[present[:, 0], present[:, 1]] = torch.arange(len(present), device=row.device)
        n_len = int(lengths.max()) + 2 if len(present) else 2
        ids = torch.full((len(present), n_len), tok.pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
        mask = torch.zeros_like(ids)
        r = row[b, k]
        ids[r, within + 1], mask[r, within + 1] = input_ids[b, pos], 1
        ids[:, 0], mask[:, 0] = tok.cls_token_id, 1
        seq_len = lengths[present[:, 0], present[:, 1]]
        ends = torch.arange(len(present), device=ids.device)
        ids[ends, seq_len + 1], mask[ends, seq_len + 1] = tok.sep_token_id, 1
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (N, n_len, H)
        words = mask.clone()
        words[:, 0] = 0
        words[ends, seq_len + 1] = 0
        sums = (hidden * words.unsqueeze(-1)).sum(1)  # (N, H)
        sentences = hidden.new_zeros(*lengths.shape, hidden.shape[-1])
        sentences[present[:, 0], present[:, 1]] = sums / seq_len.clamp(min=1).unsqueeze(-1).to(hidden.dtype)
        totals = hidden.new_zeros(lengths.shape[0], hidden.shape[-1]).index_add(0, present[:, 0], sums)
        report = totals / lengths.sum(1, keepdim=True).clamp(min=1).to(hidden.dtype)
        return report, sentences, lengths > 0


def pad_tokens(tokenized: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad (ids, sentence ids) pairs: pad token, attention mask 0, sentence index -1."""
    length = max(len(ids) for ids, _ in tokenized)
    ids = torch.full((len(tokenized), length), pad_id, dtype=torch.long)
    sid = torch.full((len(tokenized), length), -1, dtype=torch.long)
    mask = torch.zeros((len(tokenized), length), dtype=torch.long)
    for b, (i, s) in enumerate(tokenized):
        ids[b, : len(i)], sid[b, : len(s)], mask[b, : len(i)] = torch.tensor(i), torch.tensor(s), 1
    return {"input_ids": ids, "attention_mask": mask, "sentence_ids": sid}


def pool_sentences(hidden: torch.Tensor, sentence_ids: torch.Tensor, max_sentences: int):
    """Mean of each sentence's token embeddings, and of all sentence tokens for the report.

    ``hidden`` ``(B, L, H)``; ``sentence_ids`` ``(B, L)`` with -1 for tokens of no sentence.
    Returns (report ``(B, H)``, sentences ``(B, S, H)``, mask ``(B, S)``); absent sentences are 0.
    """
    onehot = (sentence_ids.unsqueeze(-1) == torch.arange(max_sentences, device=hidden.device)).to(hidden.dtype)
    counts = onehot.sum(1)  # (B, S)
    sentences = torch.einsum("bls,blh->bsh", onehot, hidden) / counts.clamp(min=1).unsqueeze(-1)
    words = (sentence_ids >= 0).to(hidden.dtype)
    report = (hidden * words.unsqueeze(-1)).sum(1) / words.sum(1, keepdim=True).clamp(min=1)
    return report, sentences, counts > 0


def build_text_encoder(name: str, training_texts: Sequence[str] | None, *, vocab_size: int, hidden: int,
                       layers: int, heads: int, intermediate: int, max_tokens: int, max_sentences: int,
                       dropout: float | None = None, local_files_only: bool | None = None,
                       context: str = "report") -> SentenceTextEncoder:
    """``scratch`` (vocabulary from ``training_texts``) or a pretrained name/folder, wrapped for sentences.

    ``dropout`` (if given) overrides the model's hidden and attention dropout.
    """
    if name == SCRATCH:
        if not training_texts:
            raise ValueError("text_encoder: scratch needs the training reports to build its vocabulary")
        tokenizer = train_wordpiece(training_texts, vocab_size)
        model = scratch_bert(tokenizer, hidden, layers, heads, intermediate, max_tokens,
                             0.1 if dropout is None else dropout)
    else:
        model, tokenizer = load_pretrained(name, local_files_only)
        if dropout is not None:
            for m in model.modules():
                if isinstance(m, nn.Dropout):
                    m.p = float(dropout)
    return SentenceTextEncoder(model, tokenizer, max_tokens, max_sentences, context)
