"""The moderation replica: per image and category P(Yes), with the image prefix encoded once."""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING

import torch

from loupe.schemas.errors import UserError
from loupe.schemas.taxonomy import Taxonomy
from loupe.workers.captioner import _DTYPES, Captioner

if TYPE_CHECKING:
    from PIL import Image
    from transformers import BatchFeature

# The shared instruction comes first so that it sits in the prefix, encoded once per image;
# only the definition, the question mark and the chat template's end of turn are per category.
QUESTION = "Answer Yes or No. Does this image show {definition}?"
ANSWERS = ("Yes", "No")
# Stands for the definition while the chat template is rendered, to find where it goes.
_SLOT = "<<loupe-moderation-category>>"


def answer_token_ids(tokenizer, word: str) -> tuple[int, ...]:
    """The first tokens of `word` as an answer is spelled: bare ("Yes") and after a space ("▁Yes", "ĠYes")."""
    ids = set()
    for text in (word, " " + word):
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if encoded:
            ids.add(encoded[0])
    # Metaspace tokenizers (Llama, Mistral) encode even "Yes" as "▁Yes"; the bare token, which a
    # model emits right after a newline or a chat marker, is only found in the vocabulary.
    bare = tokenizer.convert_tokens_to_ids(word)
    if isinstance(bare, int) and bare != tokenizer.unk_token_id:
        ids.add(bare)
    return tuple(sorted(ids))


class Moderator:
    """Scores images against a taxonomy: P(Yes) per category, the image prefix encoded once.

    The prompt of every category is one chat turn, "<image> Answer Yes or No. Does this image
    show <definition>?", and the score is softmax(logit Yes, logit No) at the answer position
    (ShieldGemma 2's recipe). Everything before the definition is the same for all categories,
    so it is run once per image with the pixels, and every category's short suffix attends to
    its keys and values: one forward per batch, whatever the number of categories.
    """

    def __init__(
        self,
        model: str,
        taxonomy: Taxonomy,
        *,
        device: str | None = None,
        dtype: str | None = None,
        share: Captioner | None = None,
    ):
        if not taxonomy.categories:
            raise UserError("the moderation taxonomy has no categories")
        self.model_id = model
        self.taxonomy = taxonomy
        # A captioner already holding this checkpoint lends its weights rather than a second copy
        # being loaded; otherwise one is loaded exactly as the captioner loads it.
        reusable = (
            isinstance(share, Captioner)
            and share.model_id == model
            and (dtype is None or _DTYPES.get(dtype) == share.dtype)
            and (device is None or torch.device(device).type == share.device.type)
        )
        loaded = share if reusable else Captioner(model, device=device, dtype=dtype, max_new_tokens=1)
        self.model = loaded.model
        self.processor = loaded.processor
        self.device = loaded.device
        self.dtype = loaded.dtype
        # Also the captioner's when shared: both encode with the same tokenizer, which must not be
        # used by two threads at once.
        self._prepare_lock: threading.Lock = loaded._prepare_lock

        tokenizer = self.processor.tokenizer
        self.yes_ids = answer_token_ids(tokenizer, ANSWERS[0])
        self.no_ids = answer_token_ids(tokenizer, ANSWERS[1])
        if not self.yes_ids or not self.no_ids or set(self.yes_ids) & set(self.no_ids):
            raise UserError(f"model {model!r}: its tokenizer does not tell 'Yes' from 'No' in a single token")
        self._prefix_text, self._add_special_tokens, self.suffix_ids = self._split_prompt()

        # The suffixes one after another, as one row behind each image's prefix (see _attention_mask).
        lengths = torch.tensor([len(ids) for ids in self.suffix_ids])
        segment = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        self._suffixes = torch.tensor([token for ids in self.suffix_ids for token in ids])
        self._suffix_offsets = torch.cat([torch.arange(n) for n in lengths.tolist()])
        self._suffix_blocks = (segment[:, None] == segment[None, :]) & (
            self._suffix_offsets[:, None] >= self._suffix_offsets[None, :]
        )
        self._answer_at = lengths.cumsum(0) - 1

    def _split_prompt(self) -> tuple[str, bool, list[list[int]]]:
        """Render one prompt per category and cut it where they start to differ.

        The cut is at a token boundary for every category: the prefix's tokens followed by a
        category's suffix tokens are exactly the tokens of that category's whole prompt, so
        sharing the prefix changes nothing but the cost.
        """
        tokenizer = self.processor.tokenizer
        conversation = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": QUESTION.format(definition=_SLOT)}],
            }
        ]
        rendered = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        # As apply_chat_template does: a template that writes BOS itself gets no second one.
        add_special = not (tokenizer.bos_token and rendered.startswith(tokenizer.bos_token))
        whole = [
            tokenizer(rendered.replace(_SLOT, c.definition), add_special_tokens=add_special)["input_ids"]
            for c in self.taxonomy.categories
        ]
        slot = rendered.index(_SLOT)
        image_end = rendered.index(self.processor.image_token) + len(self.processor.image_token)
        # Leading spaces belong to the next word in both BPE flavours ("▁show", "Ġshow"), so the
        # cut goes before a space; if a tokenizer still merges across it, an earlier space is tried.
        cuts = [len(rendered[:slot].rstrip())]
        cuts += [m.start() for m in reversed(list(re.finditer(r"\s", rendered[: cuts[0]])))]
        for cut in cuts:
            if cut < image_end:
                break
            prefix = tokenizer(rendered[:cut], add_special_tokens=add_special)["input_ids"]
            if all(ids[: len(prefix)] == prefix and len(ids) > len(prefix) for ids in whole):
                return rendered[:cut], add_special, [ids[len(prefix) :] for ids in whole]
        raise UserError(f"model {self.model_id!r}: its chat template cannot be split into image prefix and question")

    def prepare(self, images: list[Image.Image]) -> BatchFeature:
        """Each image's prefix (chat start, image tokens, instruction), left-padded, with its pixels.

        CPU only and thread-safe: it runs on a producer thread while the model scores the previous batch.
        """
        with self._prepare_lock:
            inputs = self.processor(
                text=[self._prefix_text] * len(images),
                images=images,
                padding=True,
                return_tensors="pt",
                add_special_tokens=self._add_special_tokens,
            )
        if self.device.type == "cuda":
            # Page-locked here, off the model's thread, so score()'s copy is asynchronous.
            for key, value in list(inputs.items()):
                if isinstance(value, torch.Tensor):
                    inputs[key] = value.pin_memory()
        return inputs

    def _on_device(self, inputs: BatchFeature) -> dict:
        from transformers import BatchFeature

        # A copy: to() moves in place, and the caller may score the same prepared batch again.
        return dict(BatchFeature(dict(inputs)).to(device=self.device, dtype=self.dtype, non_blocking=True))

    @torch.inference_mode()
    def score(self, prepared: BatchFeature) -> list[dict[str, float]]:
        """P(Yes) per category for each prepared image, in order: one forward, one vision pass, per batch."""
        inputs = self._on_device(prepared)
        padding = inputs["attention_mask"].bool()
        width = padding.shape[1]
        suffixes = self._suffixes.to(self.device)
        # Positions count real tokens only, so a left-padded prefix is placed exactly as it is
        # alone, and every suffix continues right where its image's prefix ends.
        prefix_positions = (padding.cumsum(-1) - 1).clamp(min=0)
        suffix_positions = padding.sum(-1, keepdim=True) + self._suffix_offsets.to(self.device)
        inputs |= {
            "input_ids": torch.cat([inputs["input_ids"], suffixes.expand(len(padding), -1)], -1),
            "position_ids": torch.cat([prefix_positions, suffix_positions], -1),
            "attention_mask": self._attention_mask(padding),
        }
        # The LM head runs at the answer positions only: (images, categories, vocab).
        logits = self.model(**inputs, logits_to_keep=width + self._answer_at.to(self.device)).logits
        return self._to_scores(logits)

    def _attention_mask(self, padding: torch.Tensor) -> torch.Tensor:
        """(images, 1, query, key): causal over the prefix, each suffix sees the prefix and itself only.

        All categories' suffixes ride behind their image's prefix in one row, which is how the
        prefix's keys and values are computed once and read by every category: no KV cache to
        copy per category, no padding between suffixes.
        """
        images, width = padding.shape
        total = width + len(self._suffixes)
        allowed = torch.ones(total, total, dtype=torch.bool, device=self.device).tril()
        allowed[width:, width:] = self._suffix_blocks.to(self.device)
        keys = torch.cat([padding, padding.new_ones(images, len(self._suffixes))], -1)
        allowed = allowed[None] & keys[:, None, :]
        # A padding query would see no key at all, which some SDPA kernels (torch < 2.5) turn
        # into NaN; letting it see itself costs nothing, and no real token reads it.
        allowed |= torch.eye(total, dtype=torch.bool, device=self.device)
        allowed = allowed[:, None]
        if self.model.config._attn_implementation == "sdpa":
            return allowed
        # Other attention implementations add the mask to the scores.
        additive = torch.zeros(allowed.shape, dtype=self.model.dtype, device=self.device)
        return additive.masked_fill_(~allowed, torch.finfo(self.model.dtype).min)

    @torch.inference_mode()
    def score_independent(self, images: list[Image.Image]) -> list[dict[str, float]]:
        """The reference: each image and category as its own full prompt, image included, one forward each."""
        results = []
        for image in images:
            prefix = self._on_device(self.prepare([image]))
            answers = []
            for suffix in self.suffix_ids:
                ids = torch.cat([prefix["input_ids"], torch.tensor([suffix], device=self.device)], -1)
                inputs = prefix | {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                answers.append(self.model(**inputs, logits_to_keep=1).logits[0, -1])
            results += self._to_scores(torch.stack(answers)[None])
        return results

    def _to_scores(self, logits: torch.Tensor) -> list[dict[str, float]]:
        """(images, categories, vocab) logits at the answer position to P(Yes) dicts."""
        # At least float32 for the softmax; float64 stays float64, so tests can compare exactly.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        yes = logits[..., list(self.yes_ids)].logsumexp(-1)
        no = logits[..., list(self.no_ids)].logsumexp(-1)
        # sigmoid(yes - no) is softmax([yes, no])[0], without forming the pair.
        p_yes = torch.sigmoid(yes - no).cpu().tolist()
        keys = self.taxonomy.keys
        return [dict(zip(keys, row, strict=True)) for row in p_yes]

    def __call__(self, images: list[Image.Image]) -> list[dict[str, float]]:
        """Score a batch of images: prepare() then score() in the calling thread."""
        return self.score(self.prepare(images))
