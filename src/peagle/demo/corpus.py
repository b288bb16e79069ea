"""Synthetic multi-task chat corpus for the embedded demo.

Everything is generated from a seed (no text is copied from anywhere). The tasks are chosen so a
tiny target learns them in a couple of CPU minutes and its answers are highly regular, which is
what makes a draft's job predictable: counting, reversing, reformatting lists, small
additions, times tables, repeating and spelling made-up words. Answers are roughly 10-60 tokens.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["DEMO_TASKS", "TASKS", "generate_corpus", "make_record", "word_pool", "write_jsonl"]

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def word_pool(rng: random.Random, size: int = 48) -> list[str]:
    """Made-up two-syllable words (consonant-vowel pairs), unique, in a seeded order."""
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(2)))
    pool = sorted(words)  # sets iterate in hash order, which varies between processes
    rng.shuffle(pool)
    return pool


def _new_word(rng: random.Random) -> str:
    """A fresh made-up word of 2-3 syllables (for spelling: the model must read it, not recall it)."""
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3)))


# Each task: rng, word pool -> (prompt, answer). Prompts use a few phrasings so held-out prompts
# can differ from training ones while testing the same skill.


def _count_up(rng: random.Random, words: list[str]) -> tuple[str, str]:
    n = rng.randint(6, 14)
    a = rng.randint(0, 99 - n + 1)
    b = a + n - 1
    prompt = rng.choice(["Count from {a} to {b}.", "List the numbers from {a} to {b}.", "count {a} to {b}"])
    return prompt.format(a=a, b=b), " ".join(str(i) for i in range(a, b + 1))


def _count_down(rng: random.Random, words: list[str]) -> tuple[str, str]:
    n = rng.randint(6, 14)
    a = rng.randint(0, 99 - n + 1)
    b = a + n - 1
    prompt = rng.choice(["Count down from {b} to {a}.", "count backwards from {b} to {a}"])
    return prompt.format(a=a, b=b), " ".join(str(i) for i in range(b, a - 1, -1))


def _count_step(rng: random.Random, words: list[str]) -> tuple[str, str]:
    k, n = rng.choice([2, 3, 5, 10]), rng.randint(5, 10)
    a = k * rng.randint(0, (99 - k * (n - 1)) // k)
    b = a + k * (n - 1)
    prompt = rng.choice(["Count from {a} to {b} in steps of {k}.", "count by {k} from {a} to {b}"])
    return prompt.format(a=a, b=b, k=k), " ".join(str(i) for i in range(a, b + 1, k))


def _number_bullets(rng: random.Random, words: list[str]) -> tuple[str, str]:
    n = rng.randint(4, 9)
    a = rng.randint(0, 99 - n + 1)
    b = a + n - 1
    prompt = rng.choice(["Write the numbers from {a} to {b} as a bulleted list.", "Bullet list of {a} to {b}"])
    return prompt.format(a=a, b=b), "\n".join(f"- {i}" for i in range(a, b + 1))


def _reverse(rng: random.Random, words: list[str]) -> tuple[str, str]:
    items = rng.sample(words, rng.randint(3, 7))
    prompt = rng.choice(["Reverse the list: {x}", "Write these words in reverse order: {x}"])
    return prompt.format(x=" ".join(items)), " ".join(reversed(items))


def _bullets(rng: random.Random, words: list[str]) -> tuple[str, str]:
    items = rng.sample(words, rng.randint(3, 7))
    prompt = rng.choice(["Make a bulleted list: {x}", "Format as bullets: {x}"])
    return prompt.format(x=" ".join(items)), "\n".join(f"- {w}" for w in items)


def _commas(rng: random.Random, words: list[str]) -> tuple[str, str]:
    items = rng.sample(words, rng.randint(3, 8))
    prompt = rng.choice(["Join with commas: {x}", "Separate these words with commas: {x}"])
    return prompt.format(x=" ".join(items)), ", ".join(items)


def _add(rng: random.Random, words: list[str]) -> tuple[str, str]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    prompt = rng.choice(["What is {a} + {b}?", "Add {a} and {b}.", "compute {a} plus {b}"])
    return prompt.format(a=a, b=b), f"{a} + {b} = {a + b}, so the answer is {a + b}."


def _repeat(rng: random.Random, words: list[str]) -> tuple[str, str]:
    w, n = rng.choice(words), rng.randint(3, 9)
    prompt = rng.choice(["Repeat the word {w} {n} times.", "Say {w} {n} times."])
    return prompt.format(w=w, n=n), " ".join([w] * n)


def _times_table(rng: random.Random, words: list[str]) -> tuple[str, str]:
    a, n = rng.randint(2, 9), rng.randint(4, 8)
    prompt = rng.choice(["Times table of {a} up to {n}.", "Multiply {a} by 1 to {n}.", "{a} times table, {n} rows"])
    return prompt.format(a=a, n=n), ", ".join(f"{a} x {i} = {a * i}" for i in range(1, n + 1))


def _spell(rng: random.Random, words: list[str]) -> tuple[str, str]:
    w = _new_word(rng)
    prompt = rng.choice(["Spell the word {w}.", "How do you spell {w}?"])
    return prompt.format(w=w), f"The word {w} has {len(w)} letters: {'-'.join(w)}."


TASKS: dict[str, Callable[[random.Random, list[str]], tuple[str, str]]] = {
    "count_up": _count_up,
    "count_down": _count_down,
    "count_step": _count_step,
    "number_bullets": _number_bullets,
    "reverse": _reverse,
    "bullets": _bullets,
    "commas": _commas,
    "add": _add,
    "repeat": _repeat,
    "spell": _spell,
    "times": _times_table,
}


# The mix the demo target is trained on: every task here is learned by a ~1M-parameter Llama in
# about 2000 CPU steps. Forward copying of arbitrary words ("bullets", "commas") needs an
# induction circuit that does not form within that budget, so those are opt-in.
DEMO_TASKS: tuple[str, ...] = (
    "count_up", "count_down", "count_step", "number_bullets", "reverse", "add", "repeat", "spell", "times",
)  # fmt: skip


def make_record(prompt: str, answer: str, task: str) -> dict:
    """A chat record (the schema the data layer reads) plus the task name for per-task metrics."""
    return {
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
        "task": task,
    }


def generate_corpus(
    seed: int, num_train: int, num_heldout: int, tasks: Iterable[str] | None = None
) -> tuple[list[dict], list[dict]]:
    """Generate (train, heldout) chat records deterministically from ``seed``.

    Tasks (default ``DEMO_TASKS``) are drawn uniformly; held-out prompts are never equal (as
    strings) to a training prompt, so held-out accuracy measures the skill, not recall. Training
    prompts may repeat.
    """
    names = list(tasks) if tasks is not None else list(DEMO_TASKS)
    rng = random.Random(seed)
    words = word_pool(random.Random(f"peagle-demo-words-{seed}"))

    def draw(name: str) -> dict:
        prompt, answer = TASKS[name](rng, words)
        return make_record(prompt, answer, name)

    train = [draw(rng.choice(names)) for _ in range(num_train)]
    seen = {r["messages"][0]["content"] for r in train}
    heldout: list[dict] = []
    exhausted: set[str] = set()
    while len(heldout) < num_heldout:
        live = [n for n in names if n not in exhausted]
        if not live:
            raise RuntimeError("cannot draw enough held-out prompts distinct from the training ones")
        name = rng.choice(live)  # stratified: a task with a small prompt space is retried, not skipped
        for _ in range(200):
            rec = draw(name)
            prompt = rec["messages"][0]["content"]
            if prompt not in seen:
                seen.add(prompt)
                heldout.append(rec)
                break
        else:
            exhausted.add(name)
    return train, heldout


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    """Write records one JSON object per line (the format ``peagle prepare`` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path
