"""Local lm-evaluation-harness tasks made from Tiny Shakespeare's test split: one of each kind of request.

  python -m research.data.eval_tasks --output data/evals [--count 200 --seed 0]
  python -m research.tools.evaluate --workdir runs/lm --tasks reverse_words --include_path data/evals

Writes a JSONL and a task YAML (the harness's format, `dataset_path: json` over that file) per task:
- shakespeare_next_line (multiple_choice, acc and acc_norm): a speaker's first line, and four candidates for the
  next one, the true line and three from elsewhere in the split (log-likelihood per choice);
- reverse_words (generate_until, exact_match): "Reverse: crown sword night" answered " night sword crown", two
  solved examples before it, greedy until the line ends;
- shakespeare_paragraphs (loglikelihood_rolling: word and byte perplexity, bits per byte): held-out speeches.
The harness reads the YAMLs with `--include_path`; with internet its own tasks (hellaswag, arc_easy, ...) run the
same way. A rerun with the same arguments writes byte-identical files.
"""

import argparse
import json
import random
import re
import sys
from pathlib import Path

TASKS = ("shakespeare_next_line", "reverse_words", "shakespeare_paragraphs")
PERPLEXITIES = (("word_perplexity", "weighted_perplexity"), ("byte_perplexity", "weighted_perplexity"))
PERPLEXITIES += (("bits_per_byte", "bits_per_byte"),)  # the harness's aggregations of a rolling log-likelihood
HEADER = {"dataset_path": "json", "test_split": "train"}  # a JSON file is one split the datasets library names train


def speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker, lines) of each speech: paragraphs whose first line is a name and a colon."""
    found = []
    for paragraph in text.split("\n\n"):
        lines = [line.strip() for line in paragraph.strip().splitlines() if line.strip()]
        if len(lines) >= 2 and re.fullmatch(r"[A-Z][A-Za-z ]*:", lines[0]):
            found.append((lines[0][:-1], lines[1:]))
    return found


def next_line_rows(found, count: int, rng: random.Random) -> list[dict]:
    lines = [line for _, speech in found for line in speech]
    rows = []
    for speaker, speech in [item for item in found if len(item[1]) >= 2][:count]:
        choices = [speech[1], *rng.sample([line for line in lines if line != speech[1]], 3)]
        rng.shuffle(choices)
        rows.append({"context": f"{speaker}:\n{speech[0]}\n", "choices": choices, "label": choices.index(speech[1])})
    return rows


def reverse_rows(found, count: int, rng: random.Random) -> list[dict]:
    words = sorted({word for _, speech in found for line in speech for word in re.findall(r"[a-z]{3,}", line)})
    rows = []
    for _ in range(count):
        shots = [rng.sample(words, rng.choice((3, 4))) for _ in range(3)]
        solved = "".join(f"Reverse: {' '.join(shot)}\nAnswer: {' '.join(shot[::-1])}\n" for shot in shots[:2])
        rows.append({"prompt": f"{solved}Reverse: {' '.join(shots[2])}\nAnswer:", "answer": " ".join(shots[2][::-1])})
    return rows


def configs(directory: Path) -> dict[str, dict]:
    """Each task's YAML, as a dict, over its JSONL in `directory`."""
    data = {name: {"data_files": {"train": str((directory / f"{name}.jsonl").absolute())}} for name in TASKS}
    return {
        "shakespeare_next_line": HEADER
        | {"dataset_kwargs": data["shakespeare_next_line"], "output_type": "multiple_choice"}
        | {"doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}"}
        | {
            "metric_list": [
                {"metric": name, "aggregation": "mean", "higher_is_better": True} for name in ("acc", "acc_norm")
            ]
        },
        "reverse_words": HEADER
        | {"dataset_kwargs": data["reverse_words"], "output_type": "generate_until"}
        | {"doc_to_text": "{{prompt}}", "doc_to_target": " {{answer}}", "target_delimiter": ""}
        | {"generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": 16}}
        | {"metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]},
        "shakespeare_paragraphs": HEADER
        | {"dataset_kwargs": data["shakespeare_paragraphs"], "output_type": "loglikelihood_rolling"}
        | {"doc_to_text": "", "doc_to_target": "{{text}}"}
        | {
            "metric_list": [
                {"metric": name, "aggregation": aggregation, "higher_is_better": False}
                for name, aggregation in PERPLEXITIES
            ]
        },
    }


def make(output: str | Path, count: int = 200, seed: int = 0) -> list[Path]:
    """Writes the tasks' JSONL and YAML files into `output`; returns the YAMLs."""
    from research.data import tiny_shakespeare

    found = speeches(tiny_shakespeare.split_text(tiny_shakespeare.read_text())["test"])
    rng = random.Random(seed)
    rows = {
        "shakespeare_next_line": next_line_rows(found, count, rng),
        "reverse_words": reverse_rows(found, count, rng),
        "shakespeare_paragraphs": [{"text": "\n".join(speech)} for _, speech in found[:count]],
    }
    directory = Path(output)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, config in configs(directory).items():
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[name]))
        path = directory / f"{name}.yaml"
        path.write_text(json.dumps({"task": name} | config, indent=2) + "\n")  # JSON is YAML
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m research.data.eval_tasks", description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="the directory for the tasks' JSONL and YAML files")
    parser.add_argument("--count", type=int, default=200, help="examples per task")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args(argv)
    for path in make(arguments.output, arguments.count, arguments.seed):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
