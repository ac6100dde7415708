"""`gere`: general-sample replay with a threshold-margin (TM) loss on the samples' hidden states.

Differs from `seq-ft` (the GeRe paper, 2025, "GeRe: Towards Efficient Anti-Forgetting in Continual
Learning of LLM via General Samples Replay"; reference code Qznan/GeRe) in:
- `before_task`, first phase only: reads a fixed set of general, non-task texts (`general_file`;
  default the bundled `migu/assets/general_samples.jsonl`, see `migu/assets/README.md`) and runs the
  *base* model on them once. Per dimension of the last hidden state, over all their tokens, mu and
  sigma give the band [lo, hi] = [mu - sigma, mu + sigma]; every (sample, token, dimension) gets the
  base model's state: +1 above hi, -1 below lo, 0 inside. Never recomputed; kept in `state_dict`.
- `mix_batch`: general samples, on average `rate` of each micro-batch. Their labels are all -100, so
  the loop's answer-token loss is the task loss alone; their LM loss is part of `extra_loss`.
- `extra_loss`, as the reference (`GeReTrainer.compute_gere_loss` / `compute_loss` in Qznan/GeRe
  gere/gere_trainer.py) on a micro-batch that holds general rows:
  (1/2) (L_general - L_task) + tm_weight x M, so the step minimises (L_task + L_general) / 2 + tm_weight x M:
  the task and general LM losses averaged 1:1, each a token mean over its own rows (L_general over
  every next-token of the general rows, from the last hidden state through the LM head; L_task
  recomputed from the loop's logits). M is the threshold-margin hinge that keeps each activation h
  of the last hidden state in its base state: base inside: relu(h - hi) + relu(lo - h) (zero inside
  the band, positive outside); base above: relu(hi - h); base below: relu(h - lo); summed over the
  general rows' real tokens and dimensions and divided by the number of nonzero terms (0 when none).
  A micro-batch without general rows trains on the task loss alone, as in the reference.

Encoder-decoder models (T5, BART): a general text becomes a prefix-LM pair, the way T5-style models
are trained on plain text (`encode_prefix_lm`): its tokens are split at the middle, the first half
goes to the encoder (with the tokenizer's special tokens, like a prompt), the second half + eos is the
decoder target. L_general is the decoder's token NLL over that continuation, and the band is on the
*decoder's* last hidden state over the continuation's positions. Why the decoder's: it is the
counterpart of the causal model's last hidden state — the state the LM head reads to predict the
general text, i.e. the representation L_general trains — and through cross-attention its band also
constrains the encoder, while banding the encoder's output would leave the whole decoder (where a
task's answer is produced) free to drift. The batch layout stays the loop's: a general row is its
prefix as `input_ids` with all -100 labels (the loop's task loss and decoder ignore it); `extra_loss`
takes the loop's encoder states of those rows and runs the decoder once more on their continuations
(no second encoder pass), so both losses reach encoder and decoder; MIGU, when on, counts those
decoder positions with their own decoder mask. Cost: one decoder pass over the general rows.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from migu.data import IGNORE_INDEX, DataError, collate, on_model_device
from migu.data.seq2seq import _special_ends
from migu.methods.replay import replay_count
from migu.methods.seq_ft import SeqFT
from migu.seq2seq import decoder_input_ids, is_encoder_decoder

DEFAULT_GENERAL_FILE = Path(__file__).resolve().parent.parent / "assets" / "general_samples.jsonl"


@dataclass
class GereOptions:
    """General-sample replay and the threshold-margin loss."""

    general_file: Optional[str] = None
    """JSON Lines file of general (non-task) texts, one {"text": ...} per line; null: the bundled migu/assets/general_samples.jsonl (about 200 short encyclopedic and how-to passages, see migu/assets/README.md)."""
    max_samples: int = 0
    """Use only the first max_samples texts of the file; 0 = all."""
    max_tokens: int = 64
    """Each general text is cut to this many tokens (eos included)."""
    rate: float = 0.125
    """Expected fraction of each micro-batch that is general samples: n task items get n*rate/(1-rate)."""
    tm_weight: float = 100.0
    """Weight of the threshold-margin loss (mean over its nonzero hinge terms; the reference's default w_strategy '100')."""

    def validate(self, key: str) -> None:
        """Raise `ValueError` naming `key.<field>` for an invalid value."""
        if self.general_file is not None and not Path(self.general_file).expanduser().is_file():
            raise ValueError(f"{key}.general_file={self.general_file}: file not found")
        if self.max_samples < 0:
            raise ValueError(f"{key}.max_samples={self.max_samples}: must be >= 0 (0 = all)")
        if self.max_tokens < 2:
            raise ValueError(f"{key}.max_tokens={self.max_tokens}: must be >= 2")
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"{key}.rate={self.rate}: must be in [0, 1)")
        if self.tm_weight < 0:
            raise ValueError(f"{key}.tm_weight={self.tm_weight}: must be >= 0")


def read_general_texts(path: Path, limit: int = 0) -> list[str]:
    """The "text" field of every line of a JSON Lines file (DataError names the file and line)."""
    texts = []
    for number, line in enumerate(Path(path).expanduser().read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path}: line {number}: expected a JSON object with a string field 'text'") from None
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}: line {number}: field 'text' must be a non-empty string")
        texts.append(text)
    if not texts:
        raise DataError(f"{path}: no general texts")
    return texts[:limit] if limit else texts


def margin_loss(h: torch.Tensor, state: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Elementwise TM hinge of activations `h` given the base model's states (+1 / 0 / -1), same shape."""
    inside = F.relu(h - hi) + F.relu(lo - h)
    return torch.where(state == 0, inside, torch.where(state > 0, F.relu(hi - h), F.relu(h - lo)))


def task_nll(batch: dict, logits: torch.Tensor) -> torch.Tensor:
    """Token-mean answer NLL of a micro-batch from the loop's logits (kept at the positions that predict answers)."""
    target = batch["labels"][:, 1:]
    keep = (target != IGNORE_INDEX).any(0).nonzero().squeeze(1)
    if keep.numel() == 0:
        return logits.sum() * 0.0
    if logits.shape[1] == target.shape[1] + 1:  # every position's logits (a forward without logits_to_keep)
        logits = logits[:, :-1][:, keep]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target[:, keep].reshape(-1),
                           ignore_index=IGNORE_INDEX)


def encode_prefix_lm(tokenizer, texts: list[str], max_tokens: int) -> tuple[list[dict], list[list[int]]]:
    """Encoder-decoder items of general texts as prefix-LM pairs, and each one's decoder labels.

    A text's first `max_tokens - 1` tokens are split at their middle: the first half (with the
    tokenizer's special tokens, as a prompt) is the encoder input, the second half + eos the decoder
    target `[-100] + continuation + [eos]`. The item's own labels are all -100 (the loop's task loss
    ignores the row); the targets are kept apart and decoded by `extra_loss`. A text whose prefix
    repeats an earlier one's is dropped: a batch row is found by its encoder input.
    """
    before, after = _special_ends(tokenizer)
    items, targets, seen = [], [], set()
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max_tokens - 1]
        cut = max(1, len(ids) // 2)
        source = before + ids[:cut] + after
        if tuple(source) in seen:
            continue
        seen.add(tuple(source))
        target = [IGNORE_INDEX] + ids[cut:] + [tokenizer.eos_token_id]
        items.append({"input_ids": source, "labels": [IGNORE_INDEX] * len(target)})
        targets.append(target)
    return items, targets


class GeRe(SeqFT):
    """Full fine-tuning with general-sample replay and a threshold-margin loss on their hidden states."""

    name = "gere"
    Options = GereOptions
    needs_hidden_states = True

    def __init__(self, options=None):
        super().__init__(options)
        self.items: list[dict] = []  # encoded general samples
        self.index: dict[tuple, int] = {}  # input_ids -> sample number, to find them in a batch
        self.lo = self.hi = None
        self.states: list[torch.Tensor] = []  # int8 [tokens, hidden] per sample
        self.targets: list[list[int]] = []  # encoder-decoder: each sample's decoder labels (continuation + eos)
        self.seq2seq = False
        self.rng = random.Random(0)

    def _encode(self, tokenizer) -> None:
        path = self.options.general_file or DEFAULT_GENERAL_FILE
        texts = read_general_texts(path, self.options.max_samples)
        if self.seq2seq:
            self.items, self.targets = encode_prefix_lm(tokenizer, texts, self.options.max_tokens)
        else:
            self.items = []
            for text in texts:
                ids = tokenizer(text)["input_ids"][: self.options.max_tokens - 1] + [tokenizer.eos_token_id]
                self.items.append({"input_ids": ids, "labels": [IGNORE_INDEX] * len(ids)})  # LM loss: extra_loss
        self.index = {tuple(item["input_ids"]): i for i, item in enumerate(self.items)}

    @torch.no_grad()
    def _base_statistics(self, model, pad_id: int) -> None:
        was_training = model.training
        model.eval()
        hidden = []
        for start in range(0, len(self.items), 16):
            chunk = self.items[start:start + 16]
            batch = on_model_device(collate(chunk, pad_id), model)
            if self.seq2seq:  # the decoder's last hidden state over the continuation (see the module docstring)
                targets = self.targets[start:start + 16]
                encoder = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                h = self._decode(model, encoder.last_hidden_state, batch["attention_mask"],
                                 targets)[0].decoder_hidden_states[-1]
                hidden += [h[r, :len(target) - 1].float() for r, target in enumerate(targets)]
                continue
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=True, use_cache=False, logits_to_keep=1)
            hidden += [out.hidden_states[-1][r, :len(item["input_ids"])].float() for r, item in enumerate(chunk)]
        model.train(was_training)
        tokens = torch.cat(hidden)
        mu, sigma = tokens.mean(0), tokens.std(0, unbiased=False)
        self.lo, self.hi = mu - sigma, mu + sigma
        self.states = [((h >= self.hi).to(torch.int8) - (h <= self.lo).to(torch.int8)) for h in hidden]

    def before_task(self, index, tasks, ctx):
        self.seq2seq = is_encoder_decoder(ctx.model)
        if not self.items:
            self._encode(ctx.tokenizer)
        if self.lo is None:  # the first phase: the model is still the base model
            self._base_statistics(ctx.model, ctx.tokenizer.pad_token_id)
        if len(self.states) != len(self.items):
            raise DataError(f"gere: the general file now has {len(self.items)} samples, the run's saved "
                            f"statistics {len(self.states)}; use the file the run started with")
        self.rng = random.Random(f"gere:{ctx.seed}:{index}")

    def mix_batch(self, items, step):
        k = replay_count(len(items), self.options.rate, self.rng)
        return items + self.rng.sample(self.items, min(k, len(self.items)))

    def extra_loss(self, model, batch, outputs):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        found = [(r, self.index.get(tuple(ids[r][mask[r].bool()].tolist()))) for r in range(ids.shape[0])]
        found = [(r, j) for r, j in found if j is not None]
        if not found:
            return None
        rows = [r for r, _ in found]
        if self.seq2seq:
            return self._seq2seq_loss(model, batch, outputs, found)
        h = outputs.hidden_states[-1]
        # the general rows' LM loss: every next token, from the final hidden state through the LM head
        logits = model.get_output_embeddings()(h[rows, :-1]).float()
        target = ids[rows, 1:].masked_fill(mask[rows, 1:] == 0, IGNORE_INDEX)
        general = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX)
        loss = 0.5 * (general - task_nll(batch, outputs.logits))
        if self.options.tm_weight:
            lo, hi = self.lo.to(h.device), self.hi.to(h.device)  # a resumed state is loaded on the CPU
            hinge = torch.cat([margin_loss(h[r, :len(self.states[j])].float(), self.states[j].to(h.device), lo,
                                           hi).flatten() for r, j in found])
            loss = loss + self.options.tm_weight * hinge.sum() / (hinge != 0).sum().clamp(min=1)
        return loss

    @staticmethod
    def _decode(model, encoder_states, attention_mask, targets):
        """(outputs, padded labels) of the decoder on labels `targets` from given encoder states (no encoder pass)."""
        from transformers.modeling_outputs import BaseModelOutput

        labels = torch.full((len(targets), max(map(len, targets))), IGNORE_INDEX, dtype=torch.long)
        for row, target in enumerate(targets):  # right-padded with -100, as `collate` pads labels
            labels[row, :len(target)] = torch.tensor(target, dtype=torch.long)
        labels = labels.to(encoder_states.device)
        return model(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states), attention_mask=attention_mask,
                     decoder_input_ids=decoder_input_ids(model, labels),
                     decoder_attention_mask=(labels[:, 1:] != IGNORE_INDEX).long(), output_hidden_states=True,
                     use_cache=False), labels

    def _seq2seq_loss(self, model, batch, outputs, found):
        """`extra_loss` on an encoder-decoder: L_general and the band on the general rows' decoder pass."""
        rows = [r for r, _ in found]
        # the loop's forward ran the general rows' encoder (their prefix) with an all-padding decoder; their
        # decoder now runs on their continuation from those encoder states, so both losses reach the encoder
        general_out, labels = self._decode(model, outputs.encoder_last_hidden_state[rows],
                                           batch["attention_mask"][rows], [self.targets[j] for _, j in found])
        logits, target = general_out.logits.float(), labels[:, 1:]
        general = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX)
        task_logits, task_target = outputs.logits.float(), batch["labels"][:, 1:]
        task = F.cross_entropy(task_logits.reshape(-1, task_logits.shape[-1]), task_target.reshape(-1),
                               ignore_index=IGNORE_INDEX)
        loss = 0.5 * (general - task)
        if self.options.tm_weight:
            h = general_out.decoder_hidden_states[-1]
            lo, hi = self.lo.to(h.device), self.hi.to(h.device)
            hinge = torch.cat([margin_loss(h[i, :len(self.states[j])].float(), self.states[j].to(h.device), lo,
                                           hi).flatten() for i, (_, j) in enumerate(found)])
            loss = loss + self.options.tm_weight * hinge.sum() / (hinge != 0).sum().clamp(min=1)
        return loss

    def state_dict(self):
        if self.lo is None:
            return {}
        return {"lo": self.lo, "hi": self.hi, "states": list(self.states)}

    def load_state_dict(self, state):
        if "lo" in state:
            self.lo, self.hi, self.states = state["lo"], state["hi"], list(state["states"])
