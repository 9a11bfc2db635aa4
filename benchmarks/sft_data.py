"""The end-to-end benchmark's data: short chat instructions with short, checkable answers.

    user:      "Add 37 and 45."                    assistant: "37 + 45 = 82"
    user:      "Sort ascending: 7, 2, 9"           assistant: "2, 7, 9"
    user:      "Convert 3 km to meters."           assistant: "3 km = 3000 m"

Eight task families, each answer fixed by the instruction, so exact match is a fair score. With
SmolLM2's chat template (and its default system prompt) a row is ~58 tokens, ~12 of them the
answer: mostly prompt, as in much SFT data. Deterministic: the same seed writes the same files,
and no held-out instruction appears in the training split.

    python benchmarks/sft_data.py OUT_DIR [--train 3000 --test 300]   # writes train.jsonl, test.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 0
WORDS = ["garden", "window", "silver", "planet", "rocket", "forest", "bridge", "candle", "marble", "pepper",
         "ladder", "orange", "pencil", "castle", "dragon", "violin", "island", "jacket", "tomato", "butter",
         "meadow", "anchor", "circle", "harbor", "tunnel", "basket", "summer", "winter", "falcon", "copper"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
UNITS = [("km", "meters", "m", 1000), ("kg", "grams", "g", 1000), ("m", "centimeters", "cm", 100),
         ("hours", "minutes", "min", 60), ("minutes", "seconds", "s", 60)]


def _task(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(8)
    if kind == 0:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"Add {a} and {b}.", f"{a} + {b} = {a + b}"
    if kind == 1:
        a, b = rng.randint(50, 99), rng.randint(10, 49)
        return f"Subtract {b} from {a}.", f"{a} - {b} = {a - b}"
    if kind == 2:
        xs = rng.sample(range(1, 60), 4)
        return f"Sort ascending: {', '.join(map(str, xs))}", ", ".join(map(str, sorted(xs)))
    if kind == 3:
        n, (unit, name, short, factor) = rng.randint(2, 9), rng.choice(UNITS)
        return f"Convert {n} {unit} to {name}.", f"{n} {unit} = {n * factor} {short}"
    if kind == 4:
        word = rng.choice(WORDS)
        return f"Write the word {word} in capital letters.", f"{word.upper()}"
    if kind == 5:
        day, k = rng.randrange(7), rng.randint(1, 5)
        return f"What day is {k} days after {DAYS[day]}?", f"{k} days after {DAYS[day]} is {DAYS[(day + k) % 7]}."
    if kind == 6:
        word = rng.choice(WORDS)
        return f"How many letters are in the word {word}?", f"{word} has {len(word)} letters."
    a, b = rng.sample(range(10, 200), 2)
    return f"Which is larger, {a} or {b}?", f"{max(a, b)} is larger than {min(a, b)}."


def rows(n_train: int, n_test: int, seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(train, test) chat rows; test instructions never occur in train."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[dict] = []
    while len(out) < n_train + n_test:
        user, answer = _task(rng)
        if user in seen:
            continue
        seen.add(user)
        out.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
    return out[:n_train], out[n_train:]


def write(out_dir: Path, n_train: int = 3000, n_test: int = 300, seed: int = SEED) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "train.jsonl", out_dir / "test.jsonl"
    for path, part in zip(paths, rows(n_train, n_test, seed)):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--test", type=int, default=300)
    args = p.parse_args(argv)
    train, test = write(args.out_dir, args.train, args.test)
    print(f"wrote {train} and {test}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
