"""Chat prompts for the real-model demo (``peagle demo --real``), generated from a seed.

Nothing is copied from anywhere: every prompt is a template of this module filled from word pools of this
module by a seeded ``random.Random``. Five kinds, as a chat assistant is used:

- ``explanations``: explain a concept (to an audience, at a length);
- ``code``: write, explain or fix a small function (Python mostly, some JavaScript / shell / SQL);
- ``lists``: n items of a category (tips, ideas, examples), bulleted or numbered;
- ``math``: word problems with a known answer (``answer`` on the record: a quality check can use it);
- ``multi_turn``: one of the kinds above, then one or two follow-up questions.

About 60 % carry a system prompt (the others get the target template's default one). Assistant turns are
empty: the target writes them (``peagle regenerate``). Held-out prompts (:func:`generate_real_corpus`)
are drawn from the same generators and are never equal to a training prompt (the whole conversation's
user and system turns compared); they are written one file per kind (:func:`write_heldout`).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from peagle.demo.corpus import write_jsonl

__all__ = ["KINDS", "RealCorpus", "generate_real_corpus", "write_heldout"]

KINDS = ("explanations", "code", "lists", "math", "multi_turn")
_WEIGHTS = (0.28, 0.22, 0.15, 0.18, 0.17)  # training mix; held-out sets have the same size per kind
_SYSTEM_SHARE = 0.6

# ------------------------------------------------------------------------------------------------
# word pools

_TOPICS = (
    "photosynthesis", "gravity", "the water cycle", "plate tectonics", "black holes", "the immune system",
    "vaccines", "DNA replication", "natural selection", "climate change", "the greenhouse effect", "tides",
    "the seasons", "rainbows", "electric circuits", "magnetism", "sound waves", "the speed of light",
    "nuclear fusion", "solar panels", "wind turbines", "batteries", "semiconductors", "transistors",
    "the internet", "web browsers", "search engines", "encryption", "passwords and hashing", "compilers",
    "operating systems", "virtual memory", "recursion", "sorting algorithms", "binary search", "hash tables",
    "linked lists", "databases", "SQL joins", "version control with git", "unit testing", "APIs",
    "cloud computing", "machine learning", "neural networks", "overfitting", "gradient descent",
    "probability", "the normal distribution", "prime numbers", "fractions", "percentages", "compound interest",
    "inflation", "supply and demand", "interest rates", "budgeting", "the stock market", "taxes",
    "democracy", "the printing press", "the industrial revolution", "the Roman Empire", "ancient Egypt",
    "the Renaissance", "world trade", "the scientific method", "critical thinking", "memory and sleep",
    "healthy eating", "regular exercise", "stress", "meditation", "time management", "public speaking",
    "learning a new language", "photography", "music theory", "the rules of chess", "gardening",
    "composting", "recycling", "bread baking", "coffee brewing", "how airplanes fly", "how bicycles balance",
    "how refrigerators work", "how microwaves heat food", "how GPS works", "how vaccines are tested",
    "volcanoes", "earthquakes", "hurricanes", "coral reefs", "rainforests", "deserts", "bees and pollination",
    "the human heart", "the human brain", "digestion", "muscles", "bones", "eyesight", "evolution of birds",
    "the moon's phases", "eclipses", "the solar system", "stars and galaxies", "the big bang",
    "entropy", "friction", "buoyancy", "electricity generation", "renewable energy", "water purification",
)
_AUDIENCES = ("a beginner", "a ten-year-old", "a high school student", "a busy manager", "a new programmer",
              "someone with no science background", "a university student", "a curious grandparent")
_LENGTHS = ("in two sentences", "in one short paragraph", "in three bullet points", "briefly",
            "in simple words", "with one everyday example", "step by step", "in under 100 words")
_EXPLAIN = (
    "Explain {topic} in simple terms.",
    "What is {topic}?",
    "Can you explain how {topic} works?",
    "Explain {topic} to {audience}.",
    "Give a short explanation of {topic} for {audience}.",
    "Describe {topic} {length}.",
    "Why is {topic} important?",
    "What are the main ideas behind {topic}?",
    "I keep hearing about {topic}. What is it, {length}?",
    "How would you explain {topic} to {audience}, {length}?",
    "What are common misconceptions about {topic}?",
    "Summarize what I should know about {topic}.",
)

# (imperative task, function name): "Write a function that <third person>", "How do I <imperative>"
_CODE_TASKS = (
    ("check whether a number is prime", "is_prime"), ("reverse a string", "reverse_string"),
    ("return the largest element of a list", "largest"), ("count the vowels in a string", "count_vowels"),
    ("compute the factorial of n", "factorial"), ("merge two sorted lists into one sorted list", "merge_sorted"),
    ("remove duplicates from a list while keeping the order", "dedupe"),
    ("find the second largest number in a list", "second_largest"), ("check whether a string is a palindrome",
                                                                    "is_palindrome"),
    ("convert a temperature from Celsius to Fahrenheit", "celsius_to_fahrenheit"),
    ("compute the n-th Fibonacci number", "fibonacci"), ("sum the even numbers in a list", "sum_even"),
    ("count how often each word appears in a text", "word_counts"), ("flatten a nested list", "flatten"),
    ("split a list into chunks of size n", "chunks"), ("compute the average of a list of numbers", "average"),
    ("find the greatest common divisor of two numbers", "gcd"), ("check whether two strings are anagrams",
                                                                 "are_anagrams"),
    ("capitalize the first letter of every word", "title_case"), ("return the digits of a number as a list",
                                                                  "digits"),
    ("rotate a list by k positions", "rotate"), ("find the index of a value with binary search", "binary_search"),
    ("sort a list of dictionaries by a key", "sort_by_key"), ("count the lines of a text file", "count_lines"),
    ("validate a simple email address", "is_valid_email"), ("convert a number to its binary representation",
                                                            "to_binary"),
    ("compute the running total of a list", "running_total"), ("return the most common element of a list",
                                                               "most_common"),
    ("check whether parentheses in a string are balanced", "balanced"), ("transpose a matrix", "transpose"),
    ("compute the dot product of two vectors", "dot"), ("remove all whitespace from a string", "strip_spaces"),
    ("count the words in a sentence", "word_count"), ("find all numbers in a list greater than a threshold",
                                                      "above"),
    ("compute simple interest", "simple_interest"), ("convert minutes to hours and minutes", "to_hours"),
    ("generate the first n square numbers", "squares"), ("check whether a year is a leap year", "is_leap_year"),
    ("find the intersection of two lists", "intersection"), ("group words by their first letter", "group_by_letter"),
)
_LANGUAGES = ("Python", "Python", "Python", "Python", "JavaScript", "JavaScript")
_CODE = (
    "Write a {lang} function that {task3}.",
    "Write a {lang} function named {name} that {task3}.",
    "How do I {task} in {lang}?",
    "Show me a short {lang} example that {task3}.",
    "Write a {lang} function that {task3}, with a docstring and an example call.",
    "Write a {lang} function that {task3}. Explain how it works.",
    "I need a {lang} helper to {task}. Can you write it?",
    "Write a {lang} function that {task3} and add a few test cases.",
)
_SNIPPETS = (  # generated code the prompt asks about: (code, question)
    ("def f(xs):\n    return [x * {a} for x in xs if x % {b} == 0]", "What does this Python function do?"),
    ("total = 0\nfor i in range({a}):\n    total += i * {b}\nprint(total)", "What does this Python code print?"),
    ("def g(s):\n    return s[::-1].upper()[:{a}]", "Explain this Python function."),
    ("items = [{a}, {b}, {c}]\nitems.sort(reverse=True)\nprint(items[0] - items[-1])",
     "What is the output of this code, and why?"),
    ("def h(n):\n    if n < {a}:\n        return n\n    return h(n - {b}) + 1", "Explain what this recursive function "
                                                                             "computes."),
    ("function add(a, b) {{\n  return a + b\n}}\nconsole.log(add({a}, '{b}'))",
     "Why does this JavaScript print a string instead of a number?"),
    ("def count(xs):\n    c = {{}}\n    for x in xs:\n        c[x] = c.get(x, 0) + 1\n    return c",
     "How can I make this Python function shorter?"),
    ("for i in range({a}):\n    if i % {b} = 0:\n        print(i)", "This Python code has a bug. Can you fix it?"),
)
_SHELL_SQL = (
    "Write a shell command that counts the lines of every .{ext} file in a folder.",
    "Write a bash script that prints the numbers from 1 to {a}.",
    "Write an SQL query that returns the {a} most recent orders from a table called orders.",
    "Write an SQL query that counts the customers in each {field} in a customers table.",
    "How do I find all files larger than {a} megabytes on Linux?",
    "Write an SQL query that finds the average {field2} per department in an employees table.",
)

_LIST_THINGS = (
    "tips for better sleep", "ways to save money", "healthy breakfast ideas", "benefits of regular exercise",
    "fruits that are rich in vitamin C", "programming languages for beginners", "ways to reduce stress",
    "things to pack for a camping trip", "indoor hobbies", "board games for families", "tips for a job interview",
    "ways to learn faster", "houseplants that are easy to care for", "common mistakes new programmers make",
    "ways to reduce plastic waste", "questions to ask before buying a used car", "habits of productive people",
    "ideas for a rainy day", "vegetables that grow well in pots", "tips for writing clear emails",
    "ways to stay focused while studying", "safety tips for cycling in a city", "uses for baking soda",
    "ways to make a small room look bigger", "good habits for personal finance", "tips for public speaking",
    "ideas for a birthday party", "ways to improve your handwriting", "exercises you can do at home",
    "reasons to learn a second language", "tips for taking better photos with a phone",
    "ways to be kinder to the environment", "signs that you need a break", "facts about the ocean",
    "inventions that changed the world", "skills every student should learn", "ways to practice gratitude",
)
_LIST = (
    "List {n} {things}.",
    "Give me {n} {things}.",
    "What are {n} {things}? Use a numbered list.",
    "Make a bulleted list of {n} {things}.",
    "Can you suggest {n} {things}, with one sentence each?",
    "Name {n} {things} and explain each briefly.",
    "I need {n} {things}. Keep each one short.",
)

_NAMES = ("Ana", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Isla", "Jonas", "Kira", "Leo",
          "Maya", "Nina", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Wen", "Yusuf", "Zoe")
_ITEMS = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "cards", "shells", "coins")
_MATH_SUFFIX = ("", "", " Show your work.", " Solve it step by step.", " Explain your reasoning.",
                " Give the final answer at the end.")
_SYSTEMS = {
    "any": ("You are a helpful assistant.", "You are a friendly and knowledgeable assistant.",
            "You are a concise assistant. Keep your answers short.", "You are a careful assistant who answers "
            "clearly and accurately.", "You are a helpful assistant. Use plain language."),
    "explanations": ("You are a friendly teacher who explains things clearly.", "You are a science writer who "
                     "explains ideas with simple examples.", "You are a patient tutor."),
    "code": ("You are an experienced software engineer.", "You are a programming tutor. Explain code simply.",
             "You are a coding assistant. Answer with code first, then a short explanation."),
    "lists": ("You are a practical assistant who gives useful advice.", "You are an organized assistant. Use "
              "lists when helpful."),
    "math": ("You are a patient math tutor. Show your reasoning step by step.", "You are a math teacher for "
             "middle school students.", "You solve word problems carefully and check the answer."),
}
_FOLLOW_UPS = {
    "explanations": ("Can you give an example?", "Can you explain it more simply?", "Summarize that in one "
                     "sentence.", "Why does that matter in everyday life?", "What is a common misconception "
                     "about it?", "Can you say more about the first point?"),
    "code": ("Can you add comments to the code?", "How would I test this?", "What is the time complexity?",
             "Can you make it shorter?", "Can you rewrite it without using a loop?", "What happens with an "
             "empty input?"),
    "lists": ("Can you explain the first one in more detail?", "Which of these is the most important?",
              "Give me two more.", "Can you turn that into a short paragraph?", "Which one is the easiest to "
              "start with?"),
    "math": ("Can you check the answer another way?", "What if all the numbers were doubled?", "Can you "
             "explain the first step again?", "Can you write a similar problem for me to practice?"),
}


# ------------------------------------------------------------------------------------------------
# generators: rng -> (user text, extra fields)


def _third_person(task: str) -> str:
    """``check whether`` -> ``checks whether`` (the first word's present third person)."""
    verb, _, rest = task.partition(" ")
    verb = verb + ("es" if verb.endswith(("s", "sh", "ch", "x", "z")) else "s")
    return f"{verb} {rest}"


def _explanation(rng: random.Random) -> tuple[str, dict[str, Any]]:
    text = rng.choice(_EXPLAIN).format(topic=rng.choice(_TOPICS), audience=rng.choice(_AUDIENCES),
                                       length=rng.choice(_LENGTHS))
    return text[0].upper() + text[1:], {}


def _code(rng: random.Random) -> tuple[str, dict[str, Any]]:
    roll = rng.random()
    a, b, c = rng.randint(2, 12), rng.randint(2, 5), rng.randint(13, 40)
    if roll < 0.2:
        code, question = rng.choice(_SNIPPETS)
        lang = "javascript" if "function " in code else "python"
        return f"{question}\n\n```{lang}\n{code.format(a=a, b=b, c=c)}\n```", {}
    if roll < 0.3:
        return rng.choice(_SHELL_SQL).format(ext=rng.choice(("py", "txt", "md", "csv")), a=a * 5,
                                             field=rng.choice(("country", "city", "signup year")),
                                             field2=rng.choice(("salary", "age", "tenure"))), {}
    task, name = rng.choice(_CODE_TASKS)
    lang = rng.choice(_LANGUAGES)
    if lang == "JavaScript":  # camelCase names
        head, *rest = name.split("_")
        name = head + "".join(w.title() for w in rest)
    return rng.choice(_CODE).format(lang=lang, task=task, task3=_third_person(task), name=name), {}


def _list(rng: random.Random) -> tuple[str, dict[str, Any]]:
    return rng.choice(_LIST).format(n=rng.randint(3, 8), things=rng.choice(_LIST_THINGS)), {}


def _math(rng: random.Random) -> tuple[str, dict[str, Any]]:
    """A word problem and its answer (a number)."""
    who, other = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    a, b, c = rng.randint(3, 60), rng.randint(2, 30), rng.randint(2, 9)
    form = rng.randrange(8)
    if form == 0:
        text, answer = f"{who} has {a} {item} and buys {b} more. How many {item} does {who} have now?", a + b
    elif form == 1:
        a += b
        text, answer = f"{who} had {a} {item} and gave {b} to {other}. How many {item} are left?", a - b
    elif form == 2:
        text, answer = f"A box holds {c} {item}. How many {item} are in {b} boxes?", b * c
    elif form == 3:
        text, answer = (f"{who} shares {b * c} {item} equally among {c} friends. How many {item} does each "
                        "friend get?"), b
    elif form == 4:
        speed, hours = rng.randint(30, 90), rng.randint(2, 6)
        text, answer = f"A train travels at {speed} km per hour for {hours} hours. How far does it go?", speed * hours
    elif form == 5:
        w, h = rng.randint(3, 20), rng.randint(3, 20)
        text, answer = f"A rectangle is {w} cm wide and {h} cm long. What is its area and its perimeter?", w * h
    elif form == 6:
        price, pct = rng.randint(2, 40) * 10, rng.choice((10, 20, 25, 50))
        text, answer = (f"A jacket costs {price} dollars and is on sale for {pct}% off. What is the sale "
                        "price?"), price * (100 - pct) / 100
    else:
        text, answer = (f"{who} reads {c} pages a day for {b} days, then {a} pages on the last day. How many "
                        "pages did {who} read in total?").replace("{who}", who), c * b + a
    answer = int(answer) if float(answer).is_integer() else answer
    return text + rng.choice(_MATH_SUFFIX), {"answer": answer}


_SINGLE: dict[str, Callable[[random.Random], tuple[str, dict[str, Any]]]] = {
    "explanations": _explanation, "code": _code, "lists": _list, "math": _math}


def _system(rng: random.Random, kind: str) -> list[dict[str, str]]:
    if rng.random() >= _SYSTEM_SHARE:
        return []
    pool = _SYSTEMS["any"] + _SYSTEMS.get(kind, ())
    return [{"role": "system", "content": rng.choice(pool)}]


def _assistant() -> dict[str, str]:
    return {"role": "assistant", "content": ""}  # written by the target (`peagle regenerate`)


def make_prompt(rng: random.Random, kind: str) -> dict[str, Any]:
    """One chat record of ``kind``: system prompt (sometimes), user turn(s), empty assistant turn(s)."""
    if kind == "multi_turn":
        first = rng.choice(tuple(_SINGLE))
        text, extra = _SINGLE[first](rng)
        messages = [*_system(rng, first), {"role": "user", "content": text}, _assistant()]
        for follow in rng.sample(_FOLLOW_UPS[first], rng.choice((1, 1, 2))):
            messages += [{"role": "user", "content": follow}, _assistant()]
        return {"kind": kind, "first_kind": first, "messages": messages}
    text, extra = _SINGLE[kind](rng)
    return {"kind": kind, "messages": [*_system(rng, kind), {"role": "user", "content": text}, _assistant()], **extra}


def _key(record: dict[str, Any]) -> tuple[str, ...]:
    """What makes two prompts the same: their system and user turns."""
    return tuple(m["content"] for m in record["messages"] if m["role"] != "assistant")


@dataclasses.dataclass(frozen=True)
class RealCorpus:
    """Training prompts (assistant turns empty) and held-out prompts per kind (ending in a user turn,
    except ``multi_turn``, whose earlier assistant turns the target writes before evaluation)."""

    train: list[dict[str, Any]]
    heldout: dict[str, list[dict[str, Any]]]


def generate_real_corpus(seed: int, num_train: int, heldout_per_kind: int,
                         kinds: Sequence[str] = KINDS) -> RealCorpus:
    """``num_train`` training prompts (kinds mixed by weight) and ``heldout_per_kind`` held-out prompts of
    every kind, none equal to a training prompt; deterministic in ``seed``. Training prompts are distinct."""
    rng = random.Random(f"peagle-real-demo-{seed}")
    weights = [_WEIGHTS[KINDS.index(k)] for k in kinds]
    heldout: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    seen: set[tuple[str, ...]] = set()
    for kind in kinds:  # held-out first, from their own stream, so they do not move with num_train
        hrng = random.Random(f"peagle-real-demo-heldout-{seed}-{kind}")
        while len(heldout[kind]) < heldout_per_kind:
            rec = make_prompt(hrng, kind)
            if _key(rec) not in seen:
                seen.add(_key(rec))
                rec["id"] = f"{kind}-{len(heldout[kind]):03d}"
                if kind != "multi_turn":  # the target answers the last user turn itself
                    rec["messages"] = rec["messages"][:-1]
                heldout[kind].append(rec)
    train: list[dict[str, Any]] = []
    misses = 0
    while len(train) < num_train:
        rec = make_prompt(rng, rng.choices(kinds, weights)[0])
        if _key(rec) in seen:
            misses += 1
            if misses > 50 * num_train + 1000:
                raise RuntimeError(f"cannot draw {num_train} distinct training prompts (got {len(train)})")
            continue
        seen.add(_key(rec))
        train.append(rec)
    return RealCorpus(train, heldout)


def write_heldout(heldout: dict[str, list[dict[str, Any]]], folder: str | Path) -> dict[str, Path]:
    """One JSONL file per kind (``folder/<kind>.jsonl``); returns them by kind."""
    return {kind: write_jsonl(records, Path(folder) / f"{kind}.jsonl") for kind, records in heldout.items()}
