"""Corpus preparation: every input format, skipped records counted, one-line errors, byte-identical reruns and
an exact resume after kill -9."""

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow
import pyarrow.parquet
import pytest
import zstandard
from array_record.python.array_record_module import ArrayRecordReader

from conftest import ROOT
from research.data import prepare

WORDS = "the quick brown fox jumps over a lazy dog then rests by the river bank".split()


def document(rng: np.random.Generator, words: int = 40) -> str:
    return " ".join(rng.choice(WORDS, size=words)) + "."


def write_corpus(directory: Path) -> dict[str, list[str]]:
    """Four files of four formats, with records to skip; returns each file's documents."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    made = {name: [document(rng) for _ in range(count)] for name, count in (("a", 60), ("b", 40), ("c", 30), ("d", 20))}
    with gzip.open(directory / "a.jsonl.gz", "wt") as stream:
        for text in made["a"]:
            stream.write(json.dumps({"text": text}) + "\n")
        stream.write('{"body": "no text field"}\nnot json at all\n{"text": ""}\n')
    lines = b"".join(json.dumps({"text": text}).encode() + b"\n" for text in made["b"]) + b'{"text": "\xff\xfe"}\n'
    (directory / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pyarrow.parquet.write_table(pyarrow.table({"text": made["c"]}), directory / "c.parquet")
    (directory / "d.txt").write_text("\n\n".join(made["d"]) + "\n")
    return made


def run(*arguments: str, timeout: float = 120) -> subprocess.CompletedProcess:
    environment = dict(os.environ, JAX_PLATFORMS="cpu")
    command = [sys.executable, "-m", "research.data.prepare", *arguments]
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout)


def test_every_format_and_every_skipped_record(tmp_path):
    made = write_corpus(tmp_path / "raw")
    output = tmp_path / "prepared"
    arguments = ["--input", str(tmp_path / "raw" / "*"), "--tokenizer=bytes", "--documents=paragraph"]
    assert prepare.main([*arguments, "--output", str(output), "--validation_fraction=0.2"]) == 0
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["skipped"] == {"missing_field": 1, "bad_json": 1, "empty": 1, "not_utf8": 1}
    splits = manifest["splits"]
    assert splits["train"]["documents"] + splits["validation"]["documents"] == 150
    assert 0.1 < splits["validation"]["documents"] / 150 < 0.3
    assert manifest["dtype"] == "uint16" and manifest["eos_id"] == 257 and manifest["tokenizer"]["vocab_size"] == 258
    # bytes: id = byte + 1, so the records decode to the documents, in order, split by the position hash.
    for index, name in enumerate("abcd"):
        train = [t for position, t in enumerate(made[name]) if not prepare.is_validation(index, position, 0.2)]
        records = ArrayRecordReader(str(output / f"train-{index:05d}.arrayrecord")).read_all()
        decoded = [bytes((np.frombuffer(record, np.uint16) - 1).astype(np.uint8)).decode() for record in records]
        assert decoded == train
    shard = splits["train"]["shards"][0]
    assert shard["sha256"] == hashlib.sha256((output / shard["path"]).read_bytes()).hexdigest()
    assert manifest["command"].startswith("python -m research.data.prepare --input")


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--input", "{raw}/*.nothing"], "matches no file"),
        (["--input", "{raw}/missing.jsonl"], "no such file"),
        (["--input", "{raw}/c.parquet", "--text_field=body"], "c.parquet: no column 'body'; it has ['text']"),
        (["--input", "{raw}/broken.jsonl.gz"], "broken.jsonl.gz: cannot be read: BadGzipFile"),
        (["--input", "{raw}/a.jsonl.gz", "--tokenizer=bpe:100"], "give bpe:N with N >= 258"),
        (["--input", "{raw}/notes.csv"], "notes.csv: not .txt, .jsonl or .parquet"),
    ],
)
def test_bad_input_is_one_line(tmp_path, arguments, message):
    write_corpus(tmp_path / "raw")
    (tmp_path / "raw" / "broken.jsonl.gz").write_bytes(b"this is not gzip")
    (tmp_path / "raw" / "notes.csv").write_text("a,b\n")
    arguments = [argument.format(raw=tmp_path / "raw") for argument in arguments]
    result = run(*arguments, "--output", str(tmp_path / "out"), "--tokenizer=bytes", *arguments[2:])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_another_tokenizer_into_the_same_output_is_refused(tmp_path):
    write_corpus(tmp_path / "raw")
    arguments = ["--input", str(tmp_path / "raw" / "a.jsonl.gz"), "--output", str(tmp_path / "out")]
    assert prepare.main([*arguments, "--tokenizer=bytes"]) == 0
    result = run(*arguments, "--tokenizer=bpe:300")
    assert result.returncode == 2
    expected = f"error: {tmp_path / 'out'} was prepared with other tokenizer: use a new --output, or the same arguments"
    assert result.stderr.strip() == expected + " to resume"


@pytest.mark.slow
def test_killed_and_resumed_it_writes_the_same_bytes_as_an_uninterrupted_run(tmp_path):
    rng = np.random.default_rng(1)
    raw = tmp_path / "raw"
    raw.mkdir()
    for index in range(8):  # ~8 MB: a few seconds of BPE tokenization
        (raw / f"part{index}.txt").write_text("\n\n".join(document(rng, 200) for _ in range(1000)))
    arguments = ["--input", str(raw / "*.txt"), "--documents=paragraph", "--tokenizer=bpe:600"]
    assert run(*arguments, "--output", str(tmp_path / "straight"), "--workers=2").returncode == 0
    command = [sys.executable, "-m", "research.data.prepare", *arguments, "--output", str(tmp_path / "killed")]
    process = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    deadline = time.time() + 60
    while not list((tmp_path / "killed").glob("stats-*.json")) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = len(list((tmp_path / "killed").glob("stats-*.json")))
    assert 0 < finished < 8, finished  # killed part-way
    assert run(*arguments, "--output", str(tmp_path / "killed"), "--workers=2").returncode == 0
    for name in sorted(path.name for path in (tmp_path / "straight").iterdir()):
        if name != "manifest.json":
            assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    manifests = [json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("straight", "killed")]
    assert manifests[0]["splits"] == manifests[1]["splits"]


def test_a_tokenizer_json_and_a_sentencepiece_model_prepare_and_decode(tmp_path):
    import sentencepiece

    from research.data import tokenizer as tokenizer_lib

    made = write_corpus(tmp_path / "raw")
    text = "\n".join(made["a"] + made["b"])
    (tmp_path / "sample.txt").write_text(text)
    sentencepiece.SentencePieceTrainer.train(
        input=str(tmp_path / "sample.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=40, minloglevel=2
    )
    assert prepare.main(["--input", str(tmp_path / "raw" / "a.jsonl.gz"), "--output", str(tmp_path / "bpe"),
                         "--tokenizer=bpe:300"]) == 0  # fmt: skip
    for name, spec in (("json", str(tmp_path / "bpe" / "tokenizer.json")), ("sp", str(tmp_path / "sp.model"))):
        output = tmp_path / name
        assert prepare.main(["--input", str(tmp_path / "raw" / "c.parquet"), "--output", str(output),
                             f"--tokenizer={spec}", "--validation_fraction=0"]) == 0  # fmt: skip
        tokenizer = tokenizer_lib.load(output)
        manifest = json.loads((output / "manifest.json").read_text())
        assert manifest["eos_id"] == tokenizer.eos_id and manifest["tokenizer"]["sha256"] == tokenizer.sha256
        record = ArrayRecordReader(str(output / "train-00000.arrayrecord")).read_all()[0]
        assert tokenizer.decode(np.frombuffer(record, np.uint16)) == made["c"][0]
