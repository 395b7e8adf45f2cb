"""A tiny, deterministic Qwen2-format tokenizer and a Vamba processor around it.

Built in-process (no downloads), for tests and for running a tiny random model end to end on a
fresh CPU machine. The byte-level BPE pipeline is Qwen2's (NFC, Qwen2 split regex, byte-level
pre-tokenizer and decoder) with a 298-token vocabulary trained on a fixed text, followed by the
real Qwen2-VL special tokens. Their ids match the golden fixtures' (`vision_start` 300,
`vision_end` 301, image 302, video 303, `<|endoftext|>` 304), so a tiny model with
`vocab_size >= 305` (the fixtures use 320) can read this tokenizer's output.
"""

import json
import os
import tempfile

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from .processing_vamba import VAMBA_CHAT_TEMPLATE, VambaProcessor, default_image_processor

# The pre-tokenizer split pattern of the real Qwen2 tokenizer.
QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

TINY_BASE_VOCAB_SIZE = 298

# Appended in this order after the base vocabulary, so their ids are 298..304.
TINY_SPECIAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|endoftext|>",
)

_TRAINING_TEXT = """\
You are a helpful assistant.
Describe the video. What happens in this video? Describe this image in detail.
The man is walking on the street while a dog runs after a red ball.
A woman opens the door, then the cat jumps onto the table and the camera moves to the left.
What is the person doing at the end of the clip? How many people are there in the picture?
Answer the question with a single word or phrase. The answer is yes, no, or a number: 0 1 2 3.
"""


def _train_byte_level_bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BASE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(_TRAINING_TEXT.splitlines(), trainer=trainer)
    tokenizer.add_special_tokens(list(TINY_SPECIAL_TOKENS))
    return tokenizer


def _tokenizer_config() -> dict:
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "padding_side": "left",
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "chat_template": VAMBA_CHAT_TEMPLATE,
    }


def build_tiny_tokenizer():
    """A small Qwen2 tokenizer (305 tokens) with the real Qwen2-VL special-token strings.

    Loaded through `AutoTokenizer` from files written to a temporary folder, so the object is
    exactly what `from_pretrained` gives on this transformers version (`Qwen2TokenizerFast` on 4.x,
    `Qwen2Tokenizer` on 5.x).
    """
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        _train_byte_level_bpe().save(os.path.join(folder, "tokenizer.json"))
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(_tokenizer_config(), f)
        # transformers 5 reads the folder's config to choose the tokenizer class: without Qwen2's model type it may
        # load the generic TokenizersBackend instead.
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
            json.dump({"model_type": "qwen2"}, f)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    _check_special_token_ids(tokenizer)
    return tokenizer


def _check_special_token_ids(tokenizer) -> None:
    for offset, token in enumerate(TINY_SPECIAL_TOKENS):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id != TINY_BASE_VOCAB_SIZE + offset:
            raise RuntimeError(f"tiny tokenizer: {token} has id {token_id}, expected {TINY_BASE_VOCAB_SIZE + offset}")


def special_token_ids(tokenizer=None) -> dict:
    """Ids of the Qwen2-VL special tokens, keyed by the config field names that use them."""
    if tokenizer is None:
        tokenizer = build_tiny_tokenizer()
    ids = {
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "im_start_token_id": "<|im_start|>",
        "eos_token_id": "<|im_end|>",
        "pad_token_id": "<|endoftext|>",
    }
    return {field: tokenizer.convert_tokens_to_ids(token) for field, token in ids.items()}


def build_tiny_processor(**processor_kwargs) -> VambaProcessor:
    """A `VambaProcessor` with the tiny tokenizer and the default Qwen2-VL image processor."""
    return VambaProcessor(
        image_processor=default_image_processor(),
        tokenizer=build_tiny_tokenizer(),
        **processor_kwargs,
    )


# The tiny sizes: every component present, a forward in milliseconds on CPU. The tests' model, the demo model, the
# fine-tuning example and the benchmarks' --tiny runs all use them.
TINY_SIZES = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    mrope_section=[2, 3, 3],
    vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
    vision_mamba_mixer_config=dict(hidden_dim=64, d_state=16, headdim=16, chunk_size=8),
)
# The tiny model of the tests: its special-token ids are the tiny tokenizer's (vision start/end 300/301, image/video
# pad 302/303, <|endoftext|> 304 as eos and pad).
TINY_MODEL_SETTINGS = dict(
    vocab_size=320,
    vision_start_token_id=TINY_BASE_VOCAB_SIZE + 2,
    vision_end_token_id=TINY_BASE_VOCAB_SIZE + 3,
    image_token_id=TINY_BASE_VOCAB_SIZE + 4,
    video_token_id=TINY_BASE_VOCAB_SIZE + 5,
    eos_token_id=TINY_BASE_VOCAB_SIZE + 6,
    pad_token_id=TINY_BASE_VOCAB_SIZE + 6,
    **TINY_SIZES,
)


def tiny_config(**overrides):
    """The tiny model's `VambaConfig`, with `overrides` replacing whole settings."""
    import copy

    from .configuration_vamba import VambaConfig

    return VambaConfig(**{**copy.deepcopy(TINY_MODEL_SETTINGS), **overrides})
