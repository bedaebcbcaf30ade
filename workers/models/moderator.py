"""The moderation replica: per image and category P(Yes), with the image prefix encoded once."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from loupe.schemas.errors import UserError
from loupe.schemas.taxonomy import ANSWERS, QUESTION, Taxonomy
from loupe.workers.decode import needed_side
from loupe.workers.models.captioner import Captioner
from loupe.workers.models.devices import pin_in_dtype
from loupe.workers.models.loading import resolve_device, resolve_dtype
from loupe.workers.models.stages import Captioning, Encoded, Moderating

if TYPE_CHECKING:
    from PIL import Image
    from transformers import BatchFeature

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


@dataclass(frozen=True)
class _Split:
    """A category's prompt as prefix + shared + suffix tokens; the prefix may be the caption prompt's."""

    prefix_text: str  # chat start and image: run with the pixels
    add_special_tokens: bool
    shared_ids: list[int]  # the instruction, the same for every category
    suffix_ids: list[list[int]]  # per category: definition, end of turn, assistant start
    caption_tail: list[int] | None  # the caption prompt's tokens after the prefix, if it has the same prefix


class Moderator(Moderating):
    """Scores images against a taxonomy: P(Yes) per category, the image prefix encoded once.

    The prompt of every category is one chat turn, "<image> Answer Yes or No. Does this image
    show <definition>?", and the score is softmax(logit Yes, logit No) at the answer position
    (ShieldGemma 2's recipe). The prompt is cut in three: the prefix (chat start and image),
    the shared instruction, and each category's short suffix. The prefix is encoded once per
    image, the instruction once after it, and every category's suffix attends to both: one
    forward per batch, whatever the number of categories.

    When the moderator shares a captioner's weights and the caption prompt starts with the same
    prefix, it does not even encode the image: score_encoded() reads the prefix's keys and
    values from the cache the caption's generation left behind.
    """

    def __init__(
        self,
        model: str,
        taxonomy: Taxonomy,
        *,
        device: str | None = None,
        dtype: str | None = None,
        share: Captioner | None = None,
        gpus: Sequence[int] | None = None,
        quantize: str | None = None,
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
            and (dtype is None or resolve_dtype(share.device, dtype) == share.dtype)
            and (device is None or resolve_device(device).type == share.device.type)
        )
        loaded = (
            share
            if reusable
            else Captioner(model, device=device, dtype=dtype, max_new_tokens=1, gpus=gpus, quantize=quantize)
        )
        self.model = loaded.model
        self.processor = loaded.processor
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.decode_side = needed_side(self.processor.image_processor)
        # Also the captioner's when shared: both encode with the same tokenizer, which must not be
        # used by two threads at once.
        self.encode_lock: threading.Lock = loaded.encode_lock

        tokenizer = self.processor.tokenizer
        self.yes_ids = answer_token_ids(tokenizer, ANSWERS[0])
        self.no_ids = answer_token_ids(tokenizer, ANSWERS[1])
        if not self.yes_ids or not self.no_ids or set(self.yes_ids) & set(self.no_ids):
            raise UserError(f"model {model!r}: its tokenizer does not tell 'Yes' from 'No' in a single token")
        split = self._split_prompt(share.prompt if reusable and _full_attention(self.model) else None)
        self._prefix_text, self._add_special_tokens = split.prefix_text, split.add_special_tokens
        self.shared_ids, self.suffix_ids = split.shared_ids, split.suffix_ids
        self._captioner = share if reusable and split.caption_tail is not None else None
        self._caption_tail = torch.tensor(split.caption_tail or [], dtype=torch.long)

        # The row every image's prefix is followed by: the instruction, then the categories'
        # suffixes one after another (see _attention_mask). Segment 0 is the instruction, which
        # every category reads; segment i is category i, which only reads itself.
        lengths = torch.tensor([len(ids) for ids in self.suffix_ids])
        shared = len(self.shared_ids)
        segment = torch.cat([torch.zeros(shared, dtype=torch.long), torch.repeat_interleave(torch.arange(1, len(lengths) + 1), lengths)])
        self._row = torch.tensor(self.shared_ids + [token for ids in self.suffix_ids for token in ids])
        self._row_offsets = torch.cat([torch.arange(shared), *(torch.arange(shared, shared + n) for n in lengths.tolist())])
        self._row_blocks = ((segment[None, :] == 0) | (segment[:, None] == segment[None, :])) & (
            self._row_offsets[:, None] >= self._row_offsets[None, :]
        )
        self._answer_at = shared + lengths.cumsum(0) - 1

    def reads_prefix_of(self, captioner: Captioning | None) -> bool:
        """Whether score_encoded() can read this captioner's generation cache instead of encoding the image."""
        return captioner is not None and captioner is self._captioner

    def _render(self, text: str) -> str:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    def _split_prompt(self, caption_prompt: str | None) -> _Split:
        """Render one prompt per category and cut it where they start to differ, and where the caption's does.

        Every cut is at a token boundary of every prompt it splits: the prefix's tokens, then
        the instruction's, then a category's suffix are exactly the tokens of that category's
        whole prompt (and the prefix's tokens start the caption prompt's), so sharing changes
        nothing but the cost.
        """
        tokenizer = self.processor.tokenizer
        rendered = self._render(QUESTION.format(definition=_SLOT))
        # As apply_chat_template does: a template that writes BOS itself gets no second one.
        add_special = not (tokenizer.bos_token and rendered.startswith(tokenizer.bos_token))

        def encode(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=add_special)["input_ids"]

        whole = [encode(rendered.replace(_SLOT, c.definition)) for c in self.taxonomy.categories]
        image_end = rendered.index(self.processor.image_token) + len(self.processor.image_token)

        def cut(end: int, prompts: list[list[int]]) -> tuple[int, list[int]] | None:
            """The latest cut at or before `end`, not inside the image, that is a token boundary of all `prompts`."""
            # Leading spaces belong to the next word in both BPE flavours ("▁show", "Ġshow"), so
            # cuts go before a space; if a tokenizer still merges across it, an earlier one is tried.
            candidates = [end, *(m.start() for m in reversed(list(re.finditer(r"\s", rendered[:end])))), image_end]
            for at in candidates:
                if at < image_end:
                    break
                prefix = encode(rendered[:at])
                if all(ids[: len(prefix)] == prefix and len(ids) > len(prefix) for ids in prompts):
                    return at, prefix
            return None

        question = cut(len(rendered[: rendered.index(_SLOT)].rstrip()), whole)
        if question is None:
            raise UserError(f"model {self.model_id!r}: its chat template cannot be split into image prefix and question")
        prefix, caption_tail = question, None
        if caption_prompt is not None:
            caption = encode(self._render(caption_prompt))
            common = len(os.path.commonprefix([rendered[: question[0]], self._render(caption_prompt)]))
            shared = cut(common, [*whole, caption])
            if shared is not None:
                prefix, caption_tail = shared, caption[len(shared[1]) :]
        at, prefix_ids = prefix
        return _Split(
            prefix_text=rendered[:at],
            add_special_tokens=add_special,
            shared_ids=whole[0][len(prefix_ids) : len(question[1])],
            suffix_ids=[ids[len(question[1]) :] for ids in whole],
            caption_tail=caption_tail,
        )

    def prepare(self, images: list[Image.Image]) -> BatchFeature:
        """Each image's prefix (chat start and image tokens), left-padded, with its pixels.

        CPU only and thread-safe: it runs on a producer thread while the model scores the previous batch.
        """
        with self.encode_lock:
            inputs = self.processor(
                text=[self._prefix_text] * len(images),
                images=images,
                padding=True,
                return_tensors="pt",
                add_special_tokens=self._add_special_tokens,
            )
        if self.device.type == "cuda":
            pin_in_dtype(inputs, self.dtype)
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
        row = self._row.to(self.device)
        # Positions count real tokens only, so a left-padded prefix is placed exactly as it is
        # alone, and the row continues right where its image's prefix ends.
        inputs |= {
            "input_ids": torch.cat([inputs["input_ids"], row.expand(len(padding), -1)], -1),
            "position_ids": torch.cat([(padding.cumsum(-1) - 1).clamp(min=0), self._row_positions(padding)], -1),
            "attention_mask": self._as_mask(self._attention_mask(padding)),
        }
        # The LM head runs at the answer positions only: (images, categories, vocab).
        # No KV cache: one forward, nothing reads its keys and values again.
        logits = self.model(**inputs, logits_to_keep=width + self._answer_at.to(self.device), use_cache=False).logits
        return self._to_scores(logits)

    @torch.inference_mode()
    def score_encoded(self, encoded: Encoded) -> list[dict[str, float]]:
        """P(Yes) per category for the images a captioner has just captioned, read from its KV cache.

        The caption prompt and the moderation prompt start with the same tokens, the image's
        among them, so the cache of the caption's generation already holds the prefix's keys and
        values: only the instruction and the categories are run, no image is encoded again.
        """
        ids = encoded.input_ids
        tail = self._caption_tail.to(ids.device)
        if not self._caption_tail.numel() or ids.shape[1] <= len(tail) or not bool((ids[:, -len(tail) :] == tail).all()):
            raise RuntimeError("these inputs were not prepared by the captioner this moderator shares a prefix with")
        width = ids.shape[1] - len(tail)
        padding = encoded.attention_mask[:, :width].bool()
        # The cache also holds the rest of the caption prompt and the generated tokens: masked.
        context = padding.new_zeros(len(padding), encoded.cache.get_seq_length())
        context[:, :width] = padding
        rows = len(self._row)
        mask = torch.cat([context[:, None, :].expand(-1, rows, -1), self._row_blocks.to(self.device).expand(len(padding), -1, -1)], -1)
        logits = self.model(
            input_ids=self._row.to(self.device).expand(len(padding), -1),
            position_ids=self._row_positions(padding),
            attention_mask=self._as_mask(mask[:, None]),
            past_key_values=encoded.cache,
            logits_to_keep=self._answer_at.to(self.device),
        ).logits
        return self._to_scores(logits)

    def _row_positions(self, padding: torch.Tensor) -> torch.Tensor:
        """Each image's row of instruction and suffixes, positioned right after its real prefix tokens."""
        return padding.sum(-1, keepdim=True) + self._row_offsets.to(self.device)

    def _attention_mask(self, padding: torch.Tensor) -> torch.Tensor:
        """(images, 1, query, key): causal over the prefix; the row reads the prefix and its blocks only.

        The instruction and all categories' suffixes ride behind their image's prefix in one row,
        which is how the prefix's keys and values are computed once and read by every category:
        no KV cache to copy per category, no padding between suffixes.
        """
        images, width = padding.shape
        rows = len(self._row)
        total = width + rows
        allowed = torch.ones(total, total, dtype=torch.bool, device=self.device).tril()
        allowed[width:, width:] = self._row_blocks.to(self.device)
        keys = torch.cat([padding, padding.new_ones(images, rows)], -1)
        allowed = allowed[None] & keys[:, None, :]
        # A padding query would see no key at all, which some SDPA kernels (torch < 2.5) turn
        # into NaN; letting it see itself costs nothing, and no real token reads it.
        allowed |= torch.eye(total, dtype=torch.bool, device=self.device)
        return allowed[:, None]

    def _as_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """A boolean mask as the model's attention takes it: SDPA reads booleans, others add it to the scores."""
        if self.model.config._attn_implementation == "sdpa":
            return allowed
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
                ids = torch.tensor([self.shared_ids + suffix], device=self.device)
                ids = torch.cat([prefix["input_ids"], ids], -1)
                inputs = prefix | {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                answers.append(self.model(**inputs, logits_to_keep=1, use_cache=False).logits[0, -1])
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


def _full_attention(model) -> bool:
    """Whether every text layer attends to the whole context (a sliding-window cache drops the image)."""
    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None) or ()
    return all(kind == "full_attention" for kind in layer_types)
