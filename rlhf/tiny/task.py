"""The synthetic "product review" task behind the offline tiny default.

Modelled on the controlled-sentiment task of the DPO paper: a prompt asks for a short review of an item and a
programmatic gold reward scores the response. Because the reward is a known function, every stage can measure real
improvement (SFT learns the format, reward models learn to rank, DPO and PPO push sentiment up) without a human.

gold_reward(prompt, response) in [0, 1] =
    sentiment   sigmoid(positive words - negative words), from a fixed lexicon
  × form        1.0 if the response ends with . or ! and has 4..40 words, else 0.5
  × relevance   1.0 if the response names the item the prompt asks about, else 0.7

The samplers below draw responses of mixed quality (any sentiment, sometimes badly formed), so a policy that only
imitates them is mediocre under the gold reward and there is room for preference optimisation.
"""

from __future__ import annotations

import math
import random
import re

ITEMS = [
    "kettle", "backpack", "lamp", "headphones", "blender", "jacket", "umbrella", "keyboard",
    "tent", "bicycle", "camera", "notebook", "toaster", "mug", "sofa", "printer",
    "watch", "pillow", "scarf", "speaker", "drill", "stroller", "mattress", "router",
]
POSITIVE_WORDS = [
    "great", "excellent", "wonderful", "reliable", "sturdy", "comfortable", "lovely", "perfect",
    "fantastic", "brilliant", "amazing", "solid", "superb", "pleasant", "useful",
]
NEGATIVE_WORDS = [
    "awful", "terrible", "flimsy", "broken", "poor", "noisy", "cheap", "useless",
    "disappointing", "bad", "horrible", "weak", "faulty", "ugly", "annoying",
]
COLOURS = ["red", "blue", "green", "black", "white", "grey", "yellow"]
DAYS = ["monday", "tuesday", "friday", "the weekend", "time", "a rainy day"]
PROMPT_TEMPLATES = [
    "Write a short review of the {item}.",
    "Review the {item} you bought.",
    "What do you think of the {item}?",
    "Tell me about your new {item}.",
    "Give a brief opinion on the {item}.",
]

POSITIVE_SENTENCES = [
    "The {item} is {pos}.", "It feels {pos} and {pos2}.", "I think the {item} is {pos}.",
    "Overall it is {pos}.", "The build is {pos}.", "My family finds it {pos}.", "A {pos} {item} for the price.",
]
NEGATIVE_SENTENCES = [
    "The {item} is {neg}.", "It feels {neg} and {neg2}.", "I think the {item} is {neg}.",
    "Overall it is {neg}.", "The build is {neg}.", "My family finds it {neg}.", "A {neg} {item} for the price.",
]
NEUTRAL_SENTENCES = [
    "It arrived on {day}.", "The {item} is {colour}.", "I use it every day.", "The box was {colour}.",
    "I bought the {item} last week.", "It came with a manual.", "I got it on {day}.",
]

_WORD = re.compile(r"[a-z]+")
_POSITIVE = frozenset(POSITIVE_WORDS)
_NEGATIVE = frozenset(NEGATIVE_WORDS)


def item_of(prompt: str) -> str | None:
    """The item a prompt asks about (the first known item named in it)."""
    words = set(_WORD.findall(prompt.lower()))
    return next((item for item in ITEMS if item in words), None)


def gold_reward(prompt: str, response: str) -> float:
    """Programmatic gold reward in [0, 1]; see the module docstring."""
    words = _WORD.findall(response.lower())
    balance = sum(word in _POSITIVE for word in words) - sum(word in _NEGATIVE for word in words)
    sentiment = 1.0 / (1.0 + math.exp(-balance))
    stripped = response.strip()
    well_formed = stripped.endswith((".", "!")) and 4 <= len(stripped.split()) <= 40
    item = item_of(prompt)
    relevant = item is None or item in words
    return sentiment * (1.0 if well_formed else 0.5) * (1.0 if relevant else 0.7)


def gold_rewards(prompts: list, completions: list, **columns) -> list[float]:
    """The gold reward as a reward function for the online stages (TRL's signature): a verifiable reward.

        rlhf grpo --config recipes/tiny/grpo.yaml --reward_funcs rlhf.tiny.task.gold_rewards
    """
    from rlhf.data import prompt_text
    from rlhf.rewards import as_messages, completion_text

    return [gold_reward(prompt_text(as_messages(prompt, "user")), completion_text(completion))
            for prompt, completion in zip(prompts, completions)]


def is_well_formed(response: str) -> bool:
    stripped = response.strip()
    return stripped.endswith((".", "!")) and 4 <= len(stripped.split()) <= 40


def make_prompt(rng: random.Random, item: str | None = None, template: str | None = None) -> str:
    item = item or rng.choice(ITEMS)
    template = template or rng.choice(PROMPT_TEMPLATES)
    return template.format(item=item)


def _sentence(rng: random.Random, kind: str, item: str) -> str:
    templates = {"pos": POSITIVE_SENTENCES, "neg": NEGATIVE_SENTENCES, "neutral": NEUTRAL_SENTENCES}[kind]
    return rng.choice(templates).format(
        item=item,
        pos=rng.choice(POSITIVE_WORDS),
        pos2=rng.choice(POSITIVE_WORDS),
        neg=rng.choice(NEGATIVE_WORDS),
        neg2=rng.choice(NEGATIVE_WORDS),
        colour=rng.choice(COLOURS),
        day=rng.choice(DAYS),
    )


def _mood_sentences(rng: random.Random, item: str, n_sentences: int) -> list[str]:
    """Sentences of one review with a consistent mood, as real reviews have: a language model trained on them has
    to track sentiment to predict the next words, so its hidden states carry it (which a reward model then reads)."""
    mood = rng.choices(["pos", "neg", "mixed"], weights=[0.3, 0.35, 0.35])[0]
    kinds = []
    for _ in range(n_sentences):
        if mood == "mixed":
            kinds.append(rng.choice(["pos", "neg", "neutral"]))
        else:
            kinds.append(rng.choices([mood, "neutral"], weights=[0.7, 0.3])[0])
    return [_sentence(rng, kind, item) for kind in kinds]


def sample_response(rng: random.Random, item: str) -> str:
    """One review of mixed quality: any sentiment, sometimes rambling, unfinished or off-topic."""
    n_sentences = rng.randint(2, 4)
    flaw = rng.choices(["none", "rambling", "unfinished", "off_topic"], weights=[0.7, 0.1, 0.1, 0.1])[0]
    subject = rng.choice([other for other in ITEMS if other != item]) if flaw == "off_topic" else item
    sentences = _mood_sentences(rng, subject, n_sentences)
    if flaw == "rambling":
        sentences += [_sentence(rng, "neutral", subject) for _ in range(rng.randint(7, 10))]
    text = " ".join(sentences)
    if flaw == "unfinished":
        text = text.rstrip(".!").rsplit(" ", 1)[0]
    return text


def sft_example(rng: random.Random, prompt: str) -> dict:
    item = item_of(prompt)
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": sample_response(rng, item)}]}


def preference_example(rng: random.Random, prompt: str, noise_scale: float | None = 10.0) -> dict | None:
    """Two sampled responses labelled by the gold reward. With noise_scale, Bradley-Terry noise: the higher-reward
    response is chosen with probability sigmoid(noise_scale * reward gap), as human labels are. Without it, the
    label is the gold ranking itself (held-out pairs for measuring a reward model). None when there is no pair:
    the same text twice, or (without noise) a tie."""
    item = item_of(prompt)
    first, second = sample_response(rng, item), sample_response(rng, item)
    gap = gold_reward(prompt, first) - gold_reward(prompt, second)
    if first == second or (noise_scale is None and abs(gap) < 1e-9):
        return None
    if noise_scale is None:
        first_wins = gap > 0
    else:
        first_wins = rng.random() < 1.0 / (1.0 + math.exp(-noise_scale * gap))
    chosen, rejected = (first, second) if first_wins else (second, first)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def pretraining_document(rng: random.Random) -> str:
    """Plain web-like text in the task's language (no chat format): what the tiny base model is pre-trained on."""
    item = rng.choice(ITEMS)
    header = rng.choice(["Review of the {item}:", "Customer notes on the {item}.", "About the {item}:", ""]).format(item=item)
    body = " ".join(_mood_sentences(rng, item, rng.randint(1, 8)))
    return f"{header} {body}".strip()


GENERIC_REQUESTS = ["Say something.", "Continue the text.", "Write a few sentences.", "Tell me anything.", "Go on."]


def pretraining_conversation(rng: random.Random) -> list[dict]:
    """A chat transcript as base models see them on the web: generic requests answered with random text of random
    length and topic. The base thus knows the chat format and when a turn ends, but not how to answer the task."""
    return [
        {"role": "user", "content": rng.choice(GENERIC_REQUESTS)},
        {"role": "assistant", "content": pretraining_document(rng)},
    ]


def split_prompts(seed: int = 0, test_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """All template x item prompts, split so test prompts are unseen combinations."""
    prompts = [template.format(item=item) for template in PROMPT_TEMPLATES for item in ITEMS]
    random.Random(seed).shuffle(prompts)
    n_test = int(len(prompts) * test_fraction)
    return prompts[n_test:], prompts[:n_test]
