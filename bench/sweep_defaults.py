"""Sweep of the steering strength for one model in both roles (the CLI's defaults come from it).

    python bench/sweep_defaults.py [--max-new-tokens 40] [--T 0 1 2 5 10 20]

For each setting and each (prompt, context) case: greedy CoSteer output, then
  degenerate  repeated 3-grams > 30% of the 3-grams, or > 5% non-ASCII letters, or an empty answer
  context     the answer mentions at least one keyword of the context (case-insensitive)
  distinct2   distinct bigrams / bigrams (higher = less repetitive)
Prints a markdown table (one row per setting) and the outputs.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from costeer import Generator  # noqa: E402
from costeer_kernels import SteerConfig, steer_coefficient  # noqa: E402

CASES = [
    ("Suggest a weekend activity for me.", "I live in Zurich. I love hiking in the mountains and photography.",
     ["hik", "mountain", "photo", "zurich", "swiss", "alps", "trail"]),
    ("What should I cook for dinner tonight?", "I am vegan and allergic to peanuts. I like spicy Thai food.",
     ["vegan", "thai", "spicy", "tofu", "curry", "peanut", "plant"]),
    ("Recommend a book I might enjoy.", "My favourite genre is science fiction. I loved Dune and The Martian.",
     ["science fiction", "sci-fi", "dune", "martian", "space", "asimov", "novel by"]),
    ("Write a short birthday message for my friend.", "My friend Anna turns 30. She loves cats and plays the violin.",
     ["anna", "cat", "violin", "30", "thirty", "music"]),
    ("How should I spend my summer holiday?", "I am a student on a tight budget and I enjoy surfing.",
     ["surf", "budget", "cheap", "student", "beach", "afford"]),
]


def degenerate(text, tok):
    words = text.split()
    if not words:
        return True
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    if grams and 1 - len(set(grams)) / len(grams) > 0.3:
        return True
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(ord(c) > 127 for c in letters) / len(letters) > 0.05


def distinct2(text):
    w = text.split()
    g = [tuple(w[i:i + 2]) for i in range(len(w) - 1)]
    return len(set(g)) / len(g) if g else 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--T", type=int, nargs="+", default=[0, 1, 2, 5, 10, 20])
    ap.add_argument("--show", action="store_true", help="print every output")
    args = ap.parse_args()
    gen = Generator()
    rows, outputs = [], []
    settings = [("slm+ctx alone", None)] + [(f"T={T}", T) for T in args.T]
    for label, T in settings:
        t0 = time.perf_counter()
        deg = ctx = 0
        d2 = []
        for prompt, context, keys in CASES:
            if T is None:
                res = gen.generate(prompt, context=context, max_new_tokens=args.max_new_tokens, mode="slm")
            else:
                gen.cfg = SteerConfig(T=T)
                res = gen.generate(prompt, context=context, max_new_tokens=args.max_new_tokens,
                                   mode="llm" if T == 0 else "costeer")
            text = res.text
            deg += degenerate(text, None)
            ctx += any(k in text.lower() for k in keys)
            d2.append(distinct2(text))
            outputs.append((label, prompt, text))
        c = "1 (by definition)" if T is None else f"{steer_coefficient(T, 2, 1, 2, 10):.3f}"
        rows.append((label, c, f"{deg}/{len(CASES)}", f"{ctx}/{len(CASES)}", f"{sum(d2) / len(d2):.2f}",
                     f"{time.perf_counter() - t0:.0f}"))
        print(rows[-1], file=sys.stderr, flush=True)
    print("| setting | c_T | degenerate | context shows | distinct-2 | seconds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if args.show:
        print()
        for label, prompt, text in outputs:
            print(f"- **{label}** / {prompt} -> {text!r}")


if __name__ == "__main__":
    main()
