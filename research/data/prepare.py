"""Corpus preparation: raw text to ArrayRecord shards of token ids, once, for streaming (research/data/stream.py).

  python -m research.data.prepare --input 'corpus/*.jsonl.gz' --text_field text --tokenizer bpe:8192 \
      --output data/my_corpus --workers 2

Inputs (local paths or anything etils.epath reaches, gs:// with gcsfs): plain text (.txt: a file, each
paragraph or each line a document, --documents), JSONL (a record per line, the text in --text_field)
and Parquet (the --text_field column), .gz or .zst compressed. Tokenizers: `bpe:N` (a byte-level BPE
of N ids trained here on the first --bpe_sample_mb of the input), a Hugging Face tokenizer.json, a
sentencepiece .model, or `bytes`. Each input file becomes a train and a validation shard (a
--validation_fraction of its documents, chosen by a hash of their position), one record per document
of uint16 (or uint32) ids; a shard's statistics are written last, so an interrupted run resumes at the
unfinished files and a rerun writes byte-identical shards. manifest.json records documents, tokens,
skipped records (missing field, bad JSON, not UTF-8, empty) with reasons, checksums, the tokenizer's hash
and the command.

Chat data (`--chat_template chatml|llama3|PATH`, research/data/chat.py): each JSONL record's `messages` rendered and
tokenized as one document whose record also holds a byte per token, 1 on the assistant's turns (the loss's);
chat_template.jinja beside the shards, and each shard's document lengths in SHARD.lengths.npy (for packing).
"""

import argparse
import gzip
import io
import json
import multiprocessing
import os
import shlex
import sys
import time
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath

from research.data import chat
from research.data.files import sha256
from research.errors import ConfigError

FORMAT = 1
SPLITS = ("train", "validation")
WRITER_OPTIONS = "group_size:256"  # records per compressed chunk (readers take whole shards in order)


class Skipped(str):
    """A record that was not a document, and why (counted in the manifest)."""


def _open(path: epath.Path):
    raw = path.open("rb")
    if path.name.endswith(".gz"):
        return gzip.open(raw)
    if path.name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
    return raw


def _kind(path: epath.Path) -> str:
    name = path.name.removesuffix(".gz").removesuffix(".zst")
    for suffix, kind in ((".jsonl", "jsonl"), (".json", "jsonl"), (".parquet", "parquet"), (".txt", "text")):
        if name.endswith(suffix):
            return kind
    raise ConfigError(f"{path}: not .txt, .jsonl or .parquet (optionally .gz or .zst); rename it or convert it")


def documents(path: epath.Path, text_field: str, split_on: str) -> Iterator[str | Skipped]:
    """The documents of one input file, or a Skipped reason for each record that is not one."""
    kind = _kind(path)
    if kind == "parquet":
        import pyarrow.parquet

        with path.open("rb") as stream:
            parquet = pyarrow.parquet.ParquetFile(stream)
            names = parquet.schema_arrow.names
            if text_field not in names:
                raise ConfigError(f"{path}: no column {text_field!r}; it has {names} (--text_field)")
            for batch in parquet.iter_batches(columns=[text_field]):
                for value in batch.column(0).to_pylist():
                    yield value if isinstance(value, str) and value else Skipped("empty" if value == "" else "not_text")
        return
    with _open(path) as stream:
        if kind == "text" and split_on == "file":
            data = stream.read()
            try:
                yield data.decode("utf-8") if data else Skipped("empty")
            except UnicodeDecodeError:
                yield Skipped("not_utf8")
            return
        paragraph: list[str] = []
        for raw_line in stream:
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError:
                yield Skipped("not_utf8")
                continue
            if kind == "jsonl":
                yield _json_text(line, text_field)
            elif split_on == "line":
                yield line.rstrip("\n") or Skipped("empty")
            elif line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "".join(paragraph).rstrip("\n")
                paragraph = []
        if paragraph:
            yield "".join(paragraph).rstrip("\n")


def _json_text(line: str, text_field: str) -> str | list | Skipped:
    """The record's text, or its conversation (a list of messages) where the field holds one."""
    if not line.strip():
        return Skipped("empty")
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return Skipped("bad_json")
    if not isinstance(record, dict) or text_field not in record:
        return Skipped("missing_field")
    value = record[text_field]
    if isinstance(value, list) and value:
        return value
    return value if isinstance(value, str) and value else Skipped("empty" if value == "" else "not_text")


def is_validation(file_index: int, document_index: int, fraction: float) -> bool:
    """A document's split, from a hash of its position: the same in every run and for any worker count."""
    return zlib.crc32(f"{file_index}:{document_index}".encode()) % 1_000_000 < fraction * 1_000_000


def shard_names(file_index: int) -> dict[str, str]:
    return {split: f"{split}-{file_index:05d}.arrayrecord" for split in SPLITS}


def prepare_file(task: dict) -> dict:
    """Tokenizes one input file into its train and validation shards; returns (and writes last) its statistics."""
    from research.data import tokenizer as tokenizer_lib

    output, index = Path(task["output"]), task["index"]
    tokenizer = tokenizer_lib.load(output)
    dtype = np.dtype(task["dtype"])
    names = shard_names(index)
    writers = {split: ArrayRecordWriter(str(output / f"{names[split]}.tmp"), WRITER_OPTIONS) for split in SPLITS}
    chat_counts = {"assistant_tokens": 0} if task["chat"] else {}
    counts = {split: {"documents": 0, "tokens": 0, "characters": 0} | chat_counts for split in SPLITS}
    skipped: dict[str, int] = {}
    batch: list[tuple[str, str | list, int]] = []

    template = chat.load_template(str(output / chat.TEMPLATE_FILE)) if task["chat"] else None
    lengths: dict[str, list[int]] = {split: [] for split in SPLITS}

    def flush():
        if template is None:
            encoded = [(ids, b"") for ids in tokenizer.encode_batch([text for _, text, _ in batch])]
        else:  # a conversation: its ids and a byte per id, 1 on what the loss counts
            encoded = []
            for split, messages, position in batch:
                ids, mask = chat.encode(tokenizer, template, messages, index=position, **task["chat_tokens"])
                encoded.append((ids, mask.astype(np.uint8).tobytes()))
                counts[split]["assistant_tokens"] += int(mask.sum())
        for (split, document, _), (ids, mask) in zip(batch, encoded):
            writers[split].write(np.asarray(ids, dtype).tobytes() + mask)
            lengths[split].append(len(ids))
            counts[split]["documents"] += 1
            counts[split]["tokens"] += len(ids)
            counts[split]["characters"] += len(document) if isinstance(document, str) else len(json.dumps(document))
        batch.clear()

    path = epath.Path(task["input"])
    try:
        for position, document in enumerate(documents(path, task["text_field"], task["split_on"])):
            if not isinstance(document, Skipped) and isinstance(document, list) != bool(task["chat"]):
                document = Skipped("not_text" if isinstance(document, list) else "not_a_conversation")
            if isinstance(document, Skipped):
                skipped[document] = skipped.get(document, 0) + 1
                continue
            split = "validation" if is_validation(index, position, task["validation_fraction"]) else "train"
            batch.append((split, document, position))
            if len(batch) >= 256:
                flush()
    except ConfigError:
        raise
    except Exception as error:  # OSError, a corrupt gzip/zstd/Parquet stream: the file, not the tool
        raise ConfigError(f"{path}: cannot be read: {type(error).__name__}: {str(error).splitlines()[0]}") from None
    flush()
    stats = {"input": task["input"], "bytes": path.stat().length, "skipped": skipped, "shards": {}}
    for split, writer in writers.items():
        writer.close()
        if task["chat"]:  # each document's length: where streaming's packs of whole conversations start
            np.save(output / f"{names[split]}.lengths.npy", np.asarray(lengths[split], np.int64))
        os.replace(output / f"{names[split]}.tmp", output / names[split])
        checksum = sha256(output / names[split])
        stats["shards"][split] = {"path": names[split], "sha256": checksum, **counts[split]}
    (output / f"stats-{index:05d}.json.tmp").write_text(json.dumps(stats, indent=1))
    os.replace(output / f"stats-{index:05d}.json.tmp", output / f"stats-{index:05d}.json")  # the commit
    return stats


def expand(patterns: list[str]) -> list[epath.Path]:
    """The input files, sorted within each pattern; an empty glob or a missing file is an error naming it."""
    found = []
    for pattern in patterns:
        parts = pattern.split("/")
        literal = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts))
        if literal == len(parts):
            if not epath.Path(pattern).is_file():
                raise ConfigError(f"--input {pattern!r}: no such file")
            found.append(epath.Path(pattern))
            continue
        base = epath.Path("/".join(parts[:literal]) or ".")
        matched = (
            sorted(path for path in base.glob("/".join(parts[literal:])) if path.is_file()) if base.exists() else []
        )
        if not matched:
            raise ConfigError(f"--input {pattern!r} matches no file")
        found.extend(matched)
    for path in found:
        _kind(path)  # an unknown format stops the run before any work
    return found


def sample_text(paths: list[epath.Path], text_field: str, split_on: str, megabytes: float) -> str:
    """The first `megabytes` of documents, in input order: what a BPE is trained on."""
    texts, size = [], 0
    for path in paths:
        for document in documents(path, text_field, split_on):
            if isinstance(document, list):  # a conversation: the BPE learns its messages' text
                document = "\n".join(
                    str(message.get("content", "")) for message in document if isinstance(message, dict)
                )
            if not isinstance(document, Skipped):
                texts.append(document)
                size += len(document)
                if size >= megabytes * 1e6:
                    return "\n".join(texts)
    return "\n".join(texts)


def settings_of(arguments: argparse.Namespace, inputs: list[epath.Path]) -> dict:
    """What makes the shards what they are: a rerun into the same output must match it."""
    return {
        "format": FORMAT,
        "inputs": [str(path) for path in inputs],
        "text_field": arguments.text_field,
        "documents": arguments.documents,
        "validation_fraction": arguments.validation_fraction,
        "tokenizer": arguments.tokenizer,
        "chat_template": arguments.chat_template,
        "bos_token": arguments.bos_token,
    }


def start(arguments: argparse.Namespace, inputs: list[epath.Path]):
    """The output's tokenizer: built on a first run, reloaded (and checked) when resuming."""
    from research.data import tokenizer as tokenizer_lib

    output, settings = Path(arguments.output), settings_of(arguments, inputs)
    recorded = output / "settings.json"
    if recorded.exists():
        previous = json.loads(recorded.read_text())
        changed = sorted(key for key in settings if previous.get(key) != settings[key])
        if changed:
            raise ConfigError(
                f"{output} was prepared with other {', '.join(changed)}: use a new --output, or the same arguments "
                "to resume"
            )
        return tokenizer_lib.load(output)
    sample = (
        ""
        if not arguments.tokenizer.startswith("bpe:")
        else sample_text(inputs, arguments.text_field, arguments.documents, arguments.bpe_sample_mb)
    )
    tokenizer = tokenizer_lib.build(arguments.tokenizer, sample, output)
    if arguments.chat_template:
        (output / chat.TEMPLATE_FILE).write_text(chat.load_template(arguments.chat_template))
    settings["tokenizer_sha256"] = tokenizer.sha256
    recorded.write_text(json.dumps(settings, indent=1))
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    arguments = parse(argv)
    try:
        return run(arguments)
    except ConfigError as error:
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", action="append", required=True, help="a file or glob; repeat for more")
    parser.add_argument("--output", required=True, help="the directory of the shards and manifest.json")
    parser.add_argument("--tokenizer", default="bpe:8192", help="bpe:N, bytes, path/tokenizer.json or path/x.model")
    parser.add_argument("--text_field", default="", help="the JSONL field / Parquet column: text, or messages")
    parser.add_argument("--chat_template", default="", help="chat data: chatml, llama3, or a template's path")
    parser.add_argument("--bos_token", default="", help="chat data: what the template's bos_token renders as")
    parser.add_argument("--documents", default="file", choices=("file", "paragraph", "line"), help=".txt documents")
    parser.add_argument("--validation_fraction", type=float, default=0.005, help="documents held out, by hash")
    parser.add_argument("--bpe_sample_mb", type=float, default=200.0, help="text the BPE is trained on")
    parser.add_argument("--workers", type=int, default=1, help="processes, one input file at a time each")
    arguments = parser.parse_args(argv)
    arguments.text_field = arguments.text_field or ("messages" if arguments.chat_template else "text")
    arguments.command = "python -m research.data.prepare " + shlex.join(sys.argv[1:] if argv is None else argv)
    return arguments


def run(arguments: argparse.Namespace) -> int:
    """Prepares every unfinished input file, then writes manifest.json; returns the exit status."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    inputs = expand(arguments.input)
    output = Path(arguments.output)
    tokenizer = start(arguments, inputs)
    dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"
    task = {"output": str(output), "text_field": arguments.text_field, "split_on": arguments.documents}
    task |= {
        "validation_fraction": arguments.validation_fraction,
        "dtype": dtype,
        "chat": bool(arguments.chat_template),
    }
    task["chat_tokens"] = {"bos_token": arguments.bos_token, "eos_token": tokenizer.token(tokenizer.eos_id)}
    tasks = [task | {"index": i, "input": str(path)} for i, path in enumerate(inputs)]
    todo = [t for t in tasks if not (output / f"stats-{t['index']:05d}.json").exists()]
    sizes = {t["index"]: epath.Path(t["input"]).stat().length for t in todo}
    begun, done_bytes, done_tokens = time.perf_counter(), 0, 0
    columns = (TextColumn("prepare"), BarColumn(), TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
    with Progress(*columns, transient=False) as progress:
        bar = progress.add_task("prepare", total=sum(sizes.values()) or 1, rate="")
        context = multiprocessing.get_context("spawn")
        with context.Pool(arguments.workers, _one_core) if arguments.workers > 1 else _Inline() as pool:
            for stats in pool.imap_unordered(prepare_file, todo):
                done_bytes += stats["bytes"]
                done_tokens += sum(shard["tokens"] for shard in stats["shards"].values())
                seconds = time.perf_counter() - begun
                rate = f"{done_bytes / seconds / 1e6:.1f} MB/s {done_tokens / seconds / 1e6:.2f} M tokens/s"
                progress.update(bar, advance=stats["bytes"], rate=rate)
    manifest = write_manifest(output, tasks, tokenizer, dtype, arguments.command)
    totals = manifest["splits"]
    print(
        f"{output}: {totals['train']['tokens']:,} train / {totals['validation']['tokens']:,} validation tokens in "
        f"{totals['train']['documents'] + totals['validation']['documents']:,} documents; skipped {manifest['skipped']}"
    )
    return 0


def _one_core() -> None:
    """A worker process tokenizes on one core (the tokenizers library would use them all in each)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"


class _Inline:
    """A Pool's imap_unordered in this process (one worker: nothing to spawn)."""

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        return False

    def imap_unordered(self, function, items):
        return map(function, items)


def write_manifest(output: Path, tasks: list[dict], tokenizer, dtype: str, command: str) -> dict:
    """manifest.json: the shards in input order with their counts and checksums, totals, skipped records."""
    stats = [json.loads((output / f"stats-{t['index']:05d}.json").read_text()) for t in tasks]
    skipped: dict[str, int] = {}
    for entry in stats:
        for reason, count in entry["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
    counted = [key for key in stats[0]["shards"]["train"] if key not in ("path", "sha256")]  # documents, tokens...
    splits = {
        split: {key: sum(entry["shards"][split][key] for entry in stats) for key in counted}
        | {"shards": [entry["shards"][split] for entry in stats]}
        for split in SPLITS
    }
    manifest = {
        "format": FORMAT,
        "tokenizer": {"file": tokenizer.path.name, "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size},
        "eos_id": tokenizer.eos_id,
        "dtype": dtype,
        "chat_template": chat.TEMPLATE_FILE if (output / chat.TEMPLATE_FILE).exists() else None,
        "splits": splits,
        "skipped": skipped,
        "inputs": [{"path": entry["input"], "bytes": entry["bytes"]} for entry in stats],
        "command": command,
    }
    (output / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


if __name__ == "__main__":
    sys.exit(main())
