"""Tiny random models and a byte-level tokenizer, built in code, for tests and `configs/tiny.yaml`.

Nothing is downloaded: the tokenizer maps every byte to one token plus ChatML special tokens, so any text round-trips,
and the models are Qwen3/Llama architectures (``tiny-qwen3-tied``: LM head tied to the embedding) with a few hundred thousand parameters and a 320-token vocab (a 49k
vocab makes every CPU test ~16x slower).
"""

from __future__ import annotations

import functools

import torch

VOCAB_SIZE = 320
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@functools.lru_cache(maxsize=1)
def _tokenizer_object():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    return tok


def tiny_tokenizer():
    """A byte-level fast tokenizer with a ChatML chat template (eos ``<|im_end|>``, pad ``<|endoftext|>``)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=_tokenizer_object(),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    tok.chat_template = CHATML
    return tok


# The built-in tiny models. ``tiny-qwen3-tied`` shares one matrix between the embedding and the LM head (as SmolLM2
# and Gemma do): the case where FSDP2 puts both in the root unit and the module takes the full forward.
TINY_NAMES = ("tiny-qwen3", "tiny-llama", "tiny-qwen3-tied")


def tiny_model(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised causal LM of :data:`TINY_NAMES`; the same seed gives the same weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=name.endswith("-tied"),
        pad_token_id=tiny_tokenizer().pad_token_id,
        eos_token_id=tiny_tokenizer().eos_token_id,
    )
    if name in ("tiny-qwen3", "tiny-qwen3-tied"):
        config = Qwen3Config(head_dim=16, **common)
    elif name == "tiny-llama":
        config = LlamaConfig(**common)
    else:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {TINY_NAMES}")
    # Built under a fixed seed so two runs (e.g. a resume test) start from bit-identical base weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.name_or_path = name
    return model
