"""Writes the demo dataset: short food orders in free text -> one compact JSON line.

    user:      "hey could you send two regular veggie burgers over around 7 PM thanks"
    assistant: {"item": "veggie burger", "size": "medium", "qty": 2, "time": "7:00pm"}

The values are copied or lightly normalised from the text (plural -> singular, "two" -> 2,
"7 PM" -> "7:00pm", "regular" -> "medium"); the keys and their order never change, so an exact
string match is a fair score. The base model scores 0%; LoRA gets >95% in ~30 steps of batch 8.

    python data/demo/make_dataset.py   # rewrites train.jsonl and test.jsonl beside this file

Deterministic (fixed seed). No request text in test.jsonl appears in train.jsonl.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 1234
N_TRAIN, N_TEST = 2000, 400
HERE = Path(__file__).resolve().parent

ITEMS = [  # singular; the text uses the plural when qty > 1
    "margherita pizza", "pepperoni pizza", "veggie burger", "cheeseburger", "chicken burrito",
    "beef taco", "fish taco", "caesar salad", "greek salad", "tuna sandwich", "club sandwich",
    "chicken wrap", "falafel wrap", "ramen bowl", "poke bowl", "burrito bowl", "iced latte",
    "cappuccino", "lemonade", "milkshake", "chocolate muffin", "blueberry muffin", "bagel",
    "croissant", "hot dog", "chicken wing", "spring roll", "dumpling", "smoothie", "cookie",
]
SIZES = {  # how the text may say it -> the value in the JSON
    "small": "small", "medium": "medium", "large": "large", "regular": "medium",
}
NUMBER_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

TEMPLATES = [
    "Can I get {qty} {size} {item} at {time}?",
    "{qty} {size} {item} for {time} please",
    "I'd like to order {qty} {size} {item}, ready by {time}.",
    "Please deliver {qty} {size} {item} around {time}.",
    "At {time}, {qty} {size} {item} please.",
    "hey could you send {qty} {size} {item} over around {time} thanks",
    "{time} pickup: {qty} {size} {item}",
    "Put me down for {qty} {size} {item} at {time}, thanks!",
    "order {qty} {size} {item} for {time}",
    "We need {qty} {size} {item} by {time}.",
    "Could we have {qty} {size} {item} delivered at {time}?",
    "I want {qty} {size} {item}. Time: {time}.",
    "For {time}: {qty} {size} {item}, please.",
    "Hi! {qty} {size} {item} at {time} if possible.",
    "Reserve {qty} {size} {item} for pickup at {time}.",
    "get me {qty} {size} {item} @ {time}",
    "Need {qty} {size} {item} around {time}, thank you",
    "Is it possible to order {qty} {size} {item} for {time}?",
]


def say_qty(rng: random.Random, qty: int) -> str:
    """2 -> "2" or "two"."""
    return str(qty) if rng.random() < 0.5 else NUMBER_WORDS[qty - 1]


def say_time(rng: random.Random, hour: int, minute: int) -> str:
    """(19, 30) -> one of "7:30pm", "7:30 PM", "7:30 p.m."; whole hours also as "7pm", "7 PM"."""
    if hour == 12 and minute == 0 and rng.random() < 0.3:
        return "noon"
    clock = f"{clock_12h(hour)}:{minute:02d}"
    if minute == 0 and rng.random() < 0.6:
        clock = str(clock_12h(hour))
    suffix = rng.choice([am_pm(hour), " " + am_pm(hour).upper(), " " + am_pm(hour)[0] + ".m."])
    return clock + suffix


def clock_12h(hour: int) -> int:
    return (hour - 1) % 12 + 1


def am_pm(hour: int) -> str:
    return "am" if hour < 12 else "pm"


def plural(noun: str) -> str:
    return noun + "es" if noun.endswith(("ch", "sh", "s", "x")) else noun + "s"


def make_row(rng: random.Random) -> tuple[str, str]:
    """One (request, answer) pair."""
    item = rng.choice(ITEMS)
    said_size = rng.choice(list(SIZES))
    qty = rng.randint(1, 9)
    hour, minute = rng.randint(8, 22), rng.choice([0, 0, 15, 30, 45])
    request = rng.choice(TEMPLATES).format(
        qty=say_qty(rng, qty),
        size=said_size,
        item=plural(item) if qty > 1 else item,
        time=say_time(rng, hour, minute),
    ).replace("..", ".")  # "by 7 p.m.." -> "by 7 p.m."
    time = f"{clock_12h(hour)}:{minute:02d}{am_pm(hour)}"  # always h:mm + am/pm, e.g. "7:00pm"
    answer = {"item": item, "size": SIZES[said_size], "qty": qty, "time": time}
    return request, json.dumps(answer)  # fixed key order, ", " and ": " separators


def write_jsonl(path: Path, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for request, answer in rows:
            messages = [
                {"role": "user", "content": request},
                {"role": "assistant", "content": answer},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")


def main() -> None:
    rng = random.Random(SEED)
    rows: dict[str, str] = {}  # request -> answer; one row per distinct request text
    while len(rows) < N_TRAIN + N_TEST:
        request, answer = make_row(rng)
        rows.setdefault(request, answer)
    pairs = list(rows.items())
    write_jsonl(HERE / "test.jsonl", pairs[:N_TEST])
    write_jsonl(HERE / "train.jsonl", pairs[N_TEST:])
    print(f"wrote {N_TRAIN} train and {N_TEST} test rows to {HERE}")


if __name__ == "__main__":
    main()
