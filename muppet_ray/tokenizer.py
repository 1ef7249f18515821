"""The tokenizer: a pretrained model's own, or one trained at run time on the tasks' text.

The run-time tokenizer is word-level with RoBERTa/BART special tokens and templates
(`<s> A </s>`, `<s> A </s></s> B </s>`), so the same one serves the encoder-only and the
encoder-decoder backbones built from scratch.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from muppet_ray.storage import local_copy

SPECIAL = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4, as in RoBERTa and BART
TEXT_FIELDS = ("text", "text_pair", "context", "question", "answer", "source", "target")


def texts_of(examples: Iterable[dict]) -> Iterable[str]:
    for example in examples:
        for name in TEXT_FIELDS:
            if isinstance(example.get(name), str):
                yield example[name]
        for choice in example.get("choices") or ():
            if isinstance(choice, str):
                yield choice


def train_tokenizer(texts: Iterable[str], vocab_size: int, max_length: int):
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator(
        texts, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIAL)
    )
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", bos), ("</s>", eos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", mask_token="<mask>", model_max_length=max_length,
        model_input_names=["input_ids", "attention_mask"],
    )


def load_tokenizer(location: str):
    """A Hub id, a directory, or a URI (copied into this node's cache first)."""
    return AutoTokenizer.from_pretrained(local_copy(location))
