"""Write benchmark samples (text and tiermem's token ids) as JSONL, so other systems answer the same prompts.

    .venv/bin/python benchmarks/export_prompts.py --model smollm2 --tasks needle,passkey --lengths 2k,4k \
        --depths 0.1,0.5,0.9 --samples 1 --out bench-out/prompts.jsonl

Each line: task, length, depth, index, seed, context, question, answer_prefix, answers (references), style, and
context_ids / question_ids (tiermem's tokenization of the same prompt, split where the context ends).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tiermem.bench.tasks import make_sample
from tiermem.cli import parse_tokens
from tiermem.models import load
from tiermem.prompts import build_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tasks", default="needle")
    parser.add_argument("--lengths", default="2k")
    parser.add_argument("--depths", default="0.1,0.5,0.9")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--style", default="auto")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    lm = load(args.model)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        for task in args.tasks.split(","):
            for length in (parse_tokens(x) for x in args.lengths.split(",")):
                for depth in (float(x) for x in args.depths.split(",")):
                    for index in range(args.samples):
                        s = make_sample(task, lm.tokenizer, length, depth, index, args.seed)
                        prompt = build_prompt(lm, s.context, s.question, args.style, s.answer_prefix)
                        row = {
                            "model": args.model,
                            "task": task,
                            "length": length,
                            "depth": depth,
                            "index": index,
                            "seed": args.seed,
                            "context": s.context,
                            "question": s.question,
                            "answer_prefix": s.answer_prefix,
                            "answers": list(s.answers),
                            "style": prompt.style,
                            "context_ids": prompt.context_ids[0].tolist(),
                            "question_ids": prompt.question_ids[0].tolist(),
                        }
                        handle.write(json.dumps(row) + "\n")
    print(out)


if __name__ == "__main__":
    main()
