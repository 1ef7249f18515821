"""The tokenizer: a pretrained model's own, or one trained at run time on the tasks' text.

The run-time tokenizer is word-level with RoBERTa/BART special tokens and templates
(`<s> A </s>`, `<s> A </s></s> B </s>`), so the same one serves the encoder-only and the
encoder-decoder backbones built from scratch.
"""

from __future__ import annotations

import hashlib
import pickle
from collections import OrderedDict
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


class Shipped:
    """A tokenizer sent to Ray tasks and deserialized once per process (`get`). Sent as it is,
    every Ray Data task that tokenizes unpickles it again (~17 ms for MiniLM's, hundreds of times
    while a run tokenizes its tasks: issue 24)."""

    KEEP = 4  # tokenizers a process keeps (a sweep's runs may each have their own)
    _loaded: OrderedDict[str, object] = OrderedDict()  # by their pickle's hash, newest last

    def __init__(self, tokenizer):
        self._pickled = pickle.dumps(tokenizer)
        self._key = hashlib.sha256(self._pickled).hexdigest()

    def get(self):
        loaded = Shipped._loaded
        if self._key not in loaded:
            loaded[self._key] = pickle.loads(self._pickled)
            while len(loaded) > Shipped.KEEP:
                loaded.popitem(last=False)
        loaded.move_to_end(self._key)
        return loaded[self._key]
