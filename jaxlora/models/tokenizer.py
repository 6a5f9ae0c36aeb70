"""Small byte-level BPE tokenizers trained locally, for built-in presets and tests.

They copy what matters of the real tokenizers without downloading them: the Llama 3 style
(BOS added by the post-processor, header/eot special tokens, digits split in groups of up to
three) and the Qwen style (no BOS, `<|im_start|>`/`<|im_end|>` turns, one digit per token),
each with its chat template. Training is deterministic: the same arguments give the same
vocabulary on every machine.
"""

from __future__ import annotations

import functools
import itertools
from typing import TYPE_CHECKING, Literal

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

if TYPE_CHECKING:  # imported where used: `jaxlora.cli` configures transformers' logging first
    from transformers import PreTrainedTokenizerFast

TokenizerStyle = Literal["llama", "qwen"]

_SPLIT_LLAMA = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_QWEN = _SPLIT_LLAMA.replace(r"\p{N}{1,3}", r"\p{N}")

LLAMA_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "their",
    "this",
    "which",
    "be",
    "are",
    "it",
    "an",
    "or",
    "not",
    "have",
    "has",
    "had",
    "were",
    "been",
    "one",
    "two",
    "three",
    "first",
    "new",
    "more",
    "other",
    "time",
    "year",
    "people",
    "question",
    "answer",
    "what",
    "who",
    "where",
    "when",
    "how",
    "why",
    "phone",
    "number",
    "name",
    "call",
    "city",
    "country",
    "born",
    "language",
    "capital",
    "president",
    "company",
    "located",
    "works",
    "plays",
    "speaks",
    "citizen",
    "official",
    "game",
    "team",
    "paper",
    "model",
    "data",
    "learning",
    "memory",
    "knowledge",
    "adapter",
    "rank",
    "training",
    "language",
    "model",
    "results",
    "method",
    "study",
    "table",
    "figure",
    "section",
    "introduction",
    "experiment",
    "capacity",
    "accuracy",
    "evaluation",
]
_NAMES = [
    "James",
    "Mary",
    "Robert",
    "Patricia",
    "John",
    "Jennifer",
    "Michael",
    "Linda",
    "David",
    "Elizabeth",
    "William",
    "Barbara",
    "Richard",
    "Susan",
    "Joseph",
    "Jessica",
    "Thomas",
    "Sarah",
    "Charles",
    "Karen",
    "Maria",
    "Jose",
    "Wei",
    "Li",
    "Ahmed",
    "Fatima",
    "Yuki",
    "Hiroshi",
    "Olga",
    "Ivan",
    "Priya",
    "Raj",
    "Chen",
    "Kim",
    "Park",
    "Nguyen",
    "Garcia",
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Taylor",
    "Moore",
]


def _corpus() -> list[str]:
    """A fixed training corpus: sentences built from common words, names and numbers."""
    lines = []
    for i, (a, b) in enumerate(itertools.product(_NAMES, _NAMES)):
        if i % 7:
            continue
        phone = f"{(i * 37) % 900 + 100}-{(i * 53) % 900 + 100}-{(i * 7919) % 9000 + 1000}"
        lines.append(f"Question: What is the phone number of {a} {b}? Answer: {phone}")
    for i in range(len(_WORDS)):
        words = [_WORDS[(i * k + k * k) % len(_WORDS)] for k in range(1, 13)]
        lines.append(" ".join(words).capitalize() + f", {i} of {1900 + i}.")
    return lines


def train_tokenizer(
    style: TokenizerStyle = "llama", vocab_size: int = 512
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of `vocab_size` entries (special tokens included).

    Training runs once per (style, size) and process; every call returns a fresh wrapper, so
    callers may change theirs (padding side, added tokens) without affecting others."""
    from transformers import PreTrainedTokenizerFast

    if style not in ("llama", "qwen"):
        raise ValueError(f"unknown tokenizer style {style!r}: use 'llama' or 'qwen'")
    tok = Tokenizer.from_str(_trained(style, vocab_size))
    if style == "llama":
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>",
            pad_token="<|finetune_right_pad_id|>",
            chat_template=LLAMA_CHAT_TEMPLATE,
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN_CHAT_TEMPLATE,
    )


@functools.lru_cache(maxsize=8)
def _trained(style: TokenizerStyle, vocab_size: int) -> str:
    """Train the BPE model and its pre/post-processing; returns the serialised tokenizer."""
    if style == "llama":
        specials = [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|finetune_right_pad_id|>",
        ]
        split = _SPLIT_LLAMA
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        split = _SPLIT_QWEN
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if style == "llama":
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.token_to_id(bos))],
        )
    return tok.to_str()
