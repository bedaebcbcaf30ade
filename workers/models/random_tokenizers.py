"""The text side of random checkpoints: a built-in corpus, tokenizers trained on it, chat templates."""

from __future__ import annotations

import random
from dataclasses import dataclass

_COLOURS = (
    "red orange yellow green blue purple pink brown black white grey golden silver beige teal "
    "navy maroon olive crimson violet turquoise ivory amber bronze copper cream"
).split()
_OBJECTS = (
    "dog cat bird horse cow sheep goat pig duck chicken rabbit deer bear fox wolf lion tiger "
    "elephant giraffe zebra monkey fish whale dolphin turtle frog snake butterfly bee spider owl "
    "eagle parrot car truck bicycle motorcycle scooter boat ship train bus plane helicopter rocket "
    "tractor wagon tree flower bush rose tulip sunflower cactus palm leaf mushroom grass house "
    "building tower castle church temple bridge tunnel mountain hill valley river lake ocean sea "
    "beach island desert forest jungle waterfall volcano glacier cave chair table sofa bed desk "
    "shelf cabinet mirror cup mug glass bottle plate bowl spoon fork knife pan kettle book "
    "newspaper magazine phone laptop computer keyboard camera television radio lamp candle window "
    "door wall roof floor stairs road street path sidewalk child woman man girl boy baby family "
    "crowd player musician chef farmer teacher doctor soldier dancer guitar piano violin drum kite "
    "ball umbrella clock watch sign fence gate field cloud sky sun moon star rainbow storm garden "
    "kitchen bathroom bedroom office classroom library museum market shop restaurant cafe station "
    "airport harbor stadium playground bench statue fountain pizza sandwich cake apple banana "
    "orange grape lemon bread cheese salad soup coffee tea hat shirt dress jacket shoe bag "
    "backpack scarf glove suitcase basket box toy doll robot balloon flag map painting poster"
).split()
_ADJECTIVES = (
    "small large old new bright dark wet dry sunny cloudy rainy snowy foggy quiet busy empty "
    "crowded wooden metal plastic glass stone tall short tiny huge round square long narrow wide "
    "shiny dusty clean dirty colorful striped spotted fluffy smooth rough soft hard warm cold "
    "modern ancient rustic elegant simple fancy broken happy sleepy curious playful calm"
).split()
_VERBS = (
    "sits stands lies runs walks jumps rests waits flies floats hangs leans grows shines plays "
    "eats drinks reads sleeps swims climbs rides holds carries looks smiles watches crosses "
    "glows moves stays turns"
).split()
_PLACES = (
    "on the grass|in the park|near the water|under a tree|on a table|in the snow|at night|"
    "in the city|by the window|on the road|in a field|at the beach|in the kitchen|on a hill|"
    "in the morning|at sunset|during the day|in the rain|next to a wall|behind a fence|"
    "in front of a house|inside a room|on the shelf|along the river|across the street|"
    "in the distance|in the background|in the foreground|on the left|on the right"
).split("|")
_OPENERS = (
    "A photo of|An image of|A picture showing|A close up of|There is|This image shows|A view of|"
    "A photograph of|A painting of|A drawing of|A scene with|Here we see"
).split("|")
_NUMBERS = "one two three four five six seven eight nine ten several many few some".split()
# Every word the captioner's prompts and the chat templates use, so prompts encode as word
# pieces the way they do with a real tokenizer rather than as single characters.
_PROMPT_TEXT = (
    "USER: ASSISTANT: [INST] [/INST] system user assistant You are a helpful assistant. "
    "Describe this image in one or two sentences. What is shown in this image? "
    "Does the image show it? Answer Yes or No. yes no"
)
_VOCAB_SIZE = 1536


def _moderation_lines() -> list[str]:
    """The moderator's questions about the default categories, answered "Yes" or "No".

    Real tokenizers have "Yes" and "No" as single tokens both bare (an answer's first word,
    after the assistant's chat marker) and after a space; the moderator reads their logits.
    """
    from loupe.schemas.taxonomy import DEFAULT_TAXONOMY

    lines = []
    for category in DEFAULT_TAXONOMY.categories:
        question = f"Answer Yes or No. Does this image show {category.definition}?"
        lines += [f"{question}\nassistant\nYes", f"{question}\nassistant\nNo", f"{question} Yes. {question} No."]
    return lines


def _corpus() -> list[str]:
    """A few hundred simple English sentences about objects, colours and scenes."""
    rng = random.Random(1234)  # fixed: the tokenizer is the same whatever the weights' seed
    lines = [_PROMPT_TEXT] * 20 + _moderation_lines()
    lines += [" ".join(words) for words in (_COLOURS, _OBJECTS, _ADJECTIVES, _VERBS, _NUMBERS)]
    for _ in range(600):
        lines.append(
            f"{rng.choice(_OPENERS)} a {rng.choice(_ADJECTIVES)} {rng.choice(_COLOURS)} "
            f"{rng.choice(_OBJECTS)} that {rng.choice(_VERBS)} {rng.choice(_PLACES)}. "
            f"The {rng.choice(_OBJECTS)} is {rng.choice(_COLOURS)} and {rng.choice(_ADJECTIVES)},\n"
            f"with {rng.choice(_NUMBERS)} {rng.choice(_OBJECTS)}s {rng.choice(_PLACES)}."
        )
    return lines


@dataclass(frozen=True)
class TokenizerSpec:
    """How a family's real tokenizer is shaped, for a small one trained like it."""

    byte_level: bool  # byte-level BPE (Qwen2, CLIP); otherwise Llama/Mistral's metaspace BPE
    special: tuple[str, ...]  # the special tokens, in the order of their ids
    bos: str | None  # prepended to every encoded text when set, as Llama and CLIP tokenizers do
    eos: str
    pad: str
    unk: str | None
    markers: tuple[str, ...] = ()  # chat markers, listed as additional special tokens (as in Qwen2's config)
    closed_by_eos: bool = False  # CLIP ends every text with EOS, where its text tower pools
    lowercase: bool = False  # CLIP lower-cases (and NFC-normalizes) what it encodes
    model_max_length: int | None = None


_LLAMA = TokenizerSpec(False, ("<unk>", "<s>", "</s>", "<pad>", "<image>"), "<s>", "</s>", "<pad>", "<unk>")
TOKENIZERS = {
    "llava": _LLAMA,
    "llava-next": _LLAMA,
    "llava-onevision": TokenizerSpec(
        True,
        ("<|im_end|>", "<|endoftext|>", "<|im_start|>", "<image>", "<video>"),
        None,
        "<|im_end|>",
        "<|endoftext|>",
        None,
        markers=("<|im_start|>",),
    ),
    # As in openai's CLIP tokenizer, padding is EOS.
    "clip": TokenizerSpec(
        True,
        ("<|startoftext|>", "<|endoftext|>"),
        "<|startoftext|>",
        "<|endoftext|>",
        "<|endoftext|>",
        "<|endoftext|>",
        closed_by_eos=True,
        lowercase=True,
        model_max_length=77,  # CLIP's context length
    ),
}


def train_tokenizer(spec: TokenizerSpec):
    """Train a small BPE tokenizer on the built-in corpus, shaped as `spec` says."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import TokenizersBackend

    if spec.byte_level:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        backend = Tokenizer(models.BPE(unk_token=spec.unk))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        # Printable ASCII and newline: any English prompt encodes without <unk>.
        alphabet = [chr(c) for c in range(33, 127)] + ["▁", "\n"]
    if spec.lowercase:
        backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE, special_tokens=list(spec.special), initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(_corpus(), trainer=trainer)
    if spec.bos:
        bos, eos = spec.bos, spec.eos
        if spec.closed_by_eos:
            single, pair, framing = f"{bos} $A {eos}", f"{bos} $A {eos} {eos} $B {eos}", (bos, eos)
        else:
            single, pair, framing = f"{bos} $A", f"{bos} $A {bos} $B", (bos,)
        backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(token, backend.token_to_id(token)) for token in framing]
        )
    roles = {"eos_token": spec.eos, "pad_token": spec.pad, "bos_token": spec.bos, "unk_token": spec.unk}
    if spec.model_max_length is not None:
        roles["model_max_length"] = spec.model_max_length
    tokenizer = TokenizersBackend(tokenizer_object=backend, **{k: v for k, v in roles.items() if v})
    if spec.markers:
        tokenizer.add_special_tokens({"additional_special_tokens": list(spec.markers)})
    return tokenizer


# Chat templates of llava-hf/llava-1.5-7b-hf, llava-hf/llava-v1.6-mistral-7b-hf and
# llava-hf/llava-onevision-qwen2-*-ov-hf, so prompts render exactly as with real weights.

CHAT_TEMPLATES = {
    "llava": (
        "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
        "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
        "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] "
        "!= 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
        "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
        "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    "llava-next": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + "
        "message['content'][0]['text'] + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}"
        "{{ '[INST] ' }}{# Render all images first #}{% for content in message['content'] | "
        "selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
        "{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + "
        "message['content'][0]['text'] + '<\\\\s> '}}{% else %}{{ raise_exception('Only user and assistant "
        "roles are supported!') }}{% endif %}{% endfor %}"
    ),
    "llava-onevision": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{# Render all images first #}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
        "{% endfor %}{# Render all video then #}{% for content in message['content'] | selectattr('type', "
        "'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] "
        "!= 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] }}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
        "'equalto', 'text') %}{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
        "{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
        "{% endif %}"
    ),
}

