"""Encoder-decoder models (T5, Flan-T5, BART) in the loop: the forward pass, the loss and hidden states.

Items follow `migu.data.seq2seq`: `labels[:, 0]` is the decoder start position (masked) and
`labels[:, 1:]` the predicted tokens, so the decoder input is `labels[:, :-1]` with the start token at
position 0 and pad for -100: exactly what Hugging Face builds from `labels=` (`_shift_right`), and
logits position t predicts `labels[:, t + 1]`, as in a causal batch. The loss is therefore the same
token NLL as HF's own `labels` loss (tests/test_seq2seq.py checks it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from migu.data import IGNORE_INDEX


def is_encoder_decoder(model) -> bool:
    """True for an encoder-decoder model (also through a PEFT wrapper, whose `config` is the base model's)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def decoder_input_ids(model, labels: torch.Tensor) -> torch.Tensor:
    """The decoder input of item labels: `labels[:, :-1]`, start token at position 0, pad for -100."""
    config = model.config
    start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.pad_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else start
    ids = labels[:, :-1].clone()
    ids[:, 0] = start
    return ids.masked_fill(ids == IGNORE_INDEX, pad)


def forward(model, batch: dict, call=None, **kwargs):
    """`model`'s outputs on a training batch (encoder input, decoder input from the labels).

    `call` is what runs the forward (a DDP wrapper); `model` (unwrapped) gives the config.
    """
    call = call if call is not None else model
    # the decoder's real positions are the ones that predict a target token (right padding: never attended
    # by a real position, so the outputs are unchanged; MIGU reads this mask to skip decoder padding)
    decoder_mask = (batch["labels"][:, 1:] != IGNORE_INDEX).long()
    return call(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                decoder_input_ids=decoder_input_ids(model, batch["labels"]), decoder_attention_mask=decoder_mask,
                use_cache=False, **kwargs)


def nll_sum(model, batch: dict, needs_hidden_states: bool = False, call=None):
    """(outputs, summed token NLL of `labels[:, 1:]`) of one batch; the step loss of `train.step_loss`."""
    kwargs = {"output_hidden_states": True} if needs_hidden_states else {}
    outputs = forward(model, batch, call, **kwargs)
    logits = outputs.logits
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["labels"][:, 1:].reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="sum")
    return outputs, nll


def token_logprobs(model, batch: dict) -> torch.Tensor:
    """Summed log-probability of each row's labelled decoder tokens (rank evaluation, EWC's Fisher)."""
    target = batch["labels"][:, 1:]
    logp = torch.log_softmax(forward(model, batch).logits.float(), dim=-1)
    picked = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * (target != IGNORE_INDEX)).sum(1)


def layer_states(model, outputs, batch: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(hidden state [B, L, H], mask [B, L]) of every layer output, the embedding outputs left out.

    Causal: `hidden_states[1:]` with the attention mask. Encoder-decoder: the encoder's layers with the
    attention mask, then the decoder's with the mask of its real (non-padding) positions.
    """
    if not is_encoder_decoder(model):
        return [(h, batch["attention_mask"]) for h in outputs.hidden_states[1:]]
    dec_mask = (batch["labels"][:, 1:] != IGNORE_INDEX).long()
    return ([(h, batch["attention_mask"]) for h in outputs.encoder_hidden_states[1:]]
            + [(h, dec_mask) for h in outputs.decoder_hidden_states[1:]])


def hidden_forward(model, batch: dict):
    """Outputs with every layer's hidden states, for a method's no-grad reference pass (I-LoRA, GeRe)."""
    if is_encoder_decoder(model):
        return forward(model, batch, output_hidden_states=True)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                 use_cache=False, logits_to_keep=1)
