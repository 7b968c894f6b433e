"""Staging shards, the writer (inline and in its own process), and the pipeline around them:
same bytes whichever process renders or writes, clean failures, memory per conversation."""

import json
import os
import random
import signal
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from mt_dialog.config_utils import from_args
from mt_dialog.data import preprocess
from mt_dialog.data.config import PreprocessConfig
from mt_dialog.data.inspect import verify_dataset
from mt_dialog.data.preprocess import PreprocessError, run_preprocess
from mt_dialog.data.readers import iter_records
from mt_dialog.data.records import RecordProcessor
from mt_dialog.data.staging import ShardReader, ShardWriter, StageIndex, staging_dtype
from mt_dialog.data.storage import PackWriter, count_turns, open_indexed, output_files
from mt_dialog.data.writer import WriteJob, WriterError, WriterProcess, SplitPlan, write_job
from mt_dialog.demo import make_conversation
from tests.conftest import ROOT, preprocess_args, write_jsonl
from tools.preprocess_dialog import GROUPS, build_parser, main


def corpus_file(path, count, seed=3):
    rng = random.Random(seed)
    return write_jsonl(path, [make_conversation(rng) for _ in range(count)])


def config_of(argv):
    args = build_parser().parse_args(argv)
    return PreprocessConfig(*(from_args(cls, args) for _, cls in GROUPS))


def dataset_bytes(prefix, splits=("train", "valid")):
    return {path[len(prefix):]: open(path, "rb").read()
            for path in output_files(prefix, splits)[:-1] if os.path.exists(path)}


# --------------------------------------------------------------------------- staging shards


@pytest.mark.parametrize("dtypes", [("uint16", "uint16"), ("int32", "uint16")])
def test_shard_round_trip(tmp_path, dtypes):
    rng = np.random.default_rng(0)
    conversations = [(rng.integers(0, 60000, n), rng.integers(0, 9, n)) for n in (5, 1, 300, 17)]
    writer = ShardWriter(str(tmp_path), "a", *dtypes)
    offsets = [writer.append(tokens, counts) for tokens, counts in conversations]
    writer.flush()  # flushed, still open: what a worker leaves behind
    ShardWriter(str(tmp_path), "empty", *dtypes).close()  # a worker that kept nothing
    assert offsets == [0, 5, 6, 306]
    reader = ShardReader(str(tmp_path), ["empty", "a"], *dtypes)
    for (tokens, counts), offset in zip(conversations, offsets):
        got_tokens, got_counts = reader.conversation(1, offset, tokens.shape[0])
        assert got_tokens.dtype == np.dtype(dtypes[0]) and got_counts.dtype == np.dtype(dtypes[1])
        assert np.array_equal(got_tokens, tokens) and np.array_equal(got_counts, counts)
    assert reader.conversation(0, 0, 0)[0].size == 0
    with pytest.raises(OSError, match="staging file cut short"):
        reader.conversation(1, 300, 100)  # past the shard's end
    with pytest.raises(ValueError, match="must be equal 1-D"):
        writer.append(np.zeros(3), np.zeros(2))
    reader.close()
    writer.close()


def test_staging_dtype_and_index():
    assert staging_dtype(65535) == np.uint16 and staging_dtype(65536) == np.int32
    index = StageIndex()
    assert index.shard_id("b") == 0 and index.shard_id("a") == 1 and index.shard_id("b") == 0
    index.add(1, 0, 7, 2, 5, False)
    index.add(0, 0, 3, 1, 2, True)
    assert len(index) == 2 and index.shard_names == ["b", "a"]
    assert index.column("length").tolist() == [7, 3] and index.column("is_valid").tolist() == [0, 1]
    column = index.column("offset")
    index.add(0, 3, 1, 1, 1, False)
    assert column.tolist() == [0, 0]  # a copy: the index kept growing
    assert StageIndex().column("turns").shape == (0,)


def test_stage_matches_process(tmp_path, sp_model_path):
    """``stage`` = ``process`` with the arrays moved to the shard: same ids, counts, outcomes."""
    lines = [json.dumps(make_conversation(random.Random(seed))) for seed in range(40)]
    lines[5] = '{"messages": [}'  # one bad record
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    processor = RecordProcessor("sentencepiece", sp_model_path, "chatml", None, 256, "truncate")
    processor.setup()
    processor.token_dtype = processor.count_dtype = "uint16"
    batch = list(enumerate(iter_records(path), start=1))
    expected = processor.process(batch)
    shard = ShardWriter(str(tmp_path), "s", "uint16", "uint16")
    staged = processor.stage(batch, shard)
    reader = ShardReader(str(tmp_path), ["s"], "uint16", "uint16")
    assert [o[0] for o in staged] == [o[0] for o in expected] and staged[5] == expected[5]
    assert any(o[0] == "ok" and o[3] > 0 for o in staged)  # some were truncated
    for want, got in zip(expected, staged):
        if want[0] == "ok":
            _, number, samples, removed, notes, kind = got
            assert kind == want.kind == "conversation"
            assert (number, removed, notes) == (want[1], want[3], want[4])
            assert len(samples) == len(want[2])
            for (offset, length, turns, loss_tokens), (ids, ltn) in zip(samples, want[2]):
                tokens, counts = reader.conversation(0, offset, length)
                assert np.array_equal(tokens, ids) and np.array_equal(counts, ltn)
                assert turns == count_turns(ltn) and loss_tokens == np.count_nonzero(ltn)


# --------------------------------------------------------------------------- the writer


def staged_job(folder, vocab_size, seq_length=64):
    """Six conversations over two shards (as two workers would leave them) and two splits."""
    rng = np.random.default_rng(1)
    tdtype, cdtype = staging_dtype(vocab_size - 1).name, staging_dtype(seq_length).name
    shards = [ShardWriter(folder, name, tdtype, cdtype) for name in ("w1", "w2")]
    rows, conversations = [], []
    for number, length in enumerate((20, 5, 30, 9, 40, 12)):
        tokens = rng.integers(vocab_size - 100, vocab_size, length)
        counts = rng.integers(0, seq_length, length)
        shard = number % 2
        rows.append((shard, shards[shard].append(tokens, counts), length))
        conversations.append((tokens, counts))
    for shard in shards:
        shard.close()
    packs = {"train": [[3, 0], [1], [4, 2]], "valid": [[5]]}
    plans = [SplitPlan(name, np.array([i for p in ps for i in p]), np.array([len(p) for p in ps]))
             for name, ps in packs.items()]
    shard, offset, length = (np.array(column) for column in zip(*rows))
    job = WriteJob(folder, ["w1", "w2"], tdtype, cdtype, shard, offset, length, plans,
                   os.path.join(folder, "out"), vocab_size, seq_length)
    return job, conversations, packs


@pytest.mark.parametrize("vocab_size", [400, 65520, 70000])  # uint16 / uint16 -> int32 / int32
def test_writer_inline_and_process_write_the_same_bytes(tmp_path, vocab_size):
    job, conversations, packs = staged_job(str(tmp_path), vocab_size)
    reference = str(tmp_path / "reference")
    for name, members in packs.items():
        writer = PackWriter(reference, name, vocab_size, job.seq_length)
        for pack in members:
            writer.add_pack([conversations[i][0] for i in pack],
                            [conversations[i][1] for i in pack])
        writer.finalize()
    write_job(job)
    assert dataset_bytes(job.prefix) == dataset_bytes(reference)
    tokens = open_indexed(f"{job.prefix}.train.tokens")
    assert np.array_equal(tokens[0], conversations[3][0])  # pack 0 starts with conversation 3
    if vocab_size == 65520:  # the process writer once (it imports megatron-core: seconds)
        process = WriterProcess()
        job.prefix = str(tmp_path / "by_process")
        process.write(job)
        process.close()
        assert dataset_bytes(job.prefix) == dataset_bytes(reference)


def test_writer_process_failures_are_reported(tmp_path):
    job, _, _ = staged_job(str(tmp_path), 400)
    os.remove(tmp_path / "w2.tokens")
    process = WriterProcess()
    with pytest.raises(WriterError, match=r"^writing the dataset failed: .*w2\.tokens"):
        process.write(job)
    process.close()
    assert_gone(process)
    killed = WriterProcess()
    killed._process.kill()
    killed._process.wait()
    with pytest.raises(WriterError, match="writer process stopped unexpectedly .* nothing was"):
        killed.write(job)
    killed.close()


def assert_gone(process: WriterProcess) -> None:
    """No process is left behind: the writer exited or was killed, and was reaped."""
    with pytest.raises(ProcessLookupError):
        os.kill(process._process.pid, 0)
    assert process._process.stdin.closed and process._process.stdout.closed


def test_writer_process_is_stopped_at_once_when_the_run_fails(tmp_path):
    process = WriterProcess()  # still importing megatron-core
    process.close()
    # killed, not left to finish its import (a writer that gets no job then exits with 0)
    assert process._process.returncode == -signal.SIGKILL
    assert_gone(process)


# --------------------------------------------------------------------------- whole pipeline


def test_same_bytes_whoever_renders_and_writes(tmp_path, sp_model_path):
    """Inline writer with 1 worker, writer process with 2 workers, and the tool in a fresh
    interpreter (where the writer process is the default): identical files."""
    path = corpus_file(tmp_path / "in.jsonl", 300)
    argv = lambda prefix, *extra: preprocess_args(path, sp_model_path, tmp_path / prefix,  # noqa
                                                  "--seq-length", "1024", *extra)
    assert main(argv("inline")) == 0
    run_preprocess(config_of(argv("separate", "--workers", "2")), separate_writer=True)
    done = subprocess.run([sys.executable, "tools/preprocess_dialog.py", *argv("fresh")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # nothing leaks from the writer process's import
    reference = dataset_bytes(str(tmp_path / "inline"))
    assert len(reference) == 8
    for prefix in ("separate", "fresh"):
        assert dataset_bytes(str(tmp_path / prefix)) == reference
        assert verify_dataset(str(tmp_path / prefix)) == []


def test_failed_run_stops_the_writer_and_writes_nothing(tmp_path, sp_model_path, monkeypatch):
    path = write_jsonl(tmp_path / "in.jsonl", ['{"bad": 1}'] * 3)
    opened = []
    monkeypatch.setattr(preprocess, "open_writer",
                        lambda separate: opened.append(WriterProcess()) or opened[-1])
    prefix = tmp_path / "out"
    config = config_of(preprocess_args(path, sp_model_path, prefix, "--on-error", "skip"))
    with pytest.raises(PreprocessError, match="no conversation was kept"):
        run_preprocess(config)
    assert opened[0]._process.returncode == -signal.SIGKILL  # stopped, never given a job
    assert_gone(opened[0])
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_batches_close_at_records_or_bytes():
    """A batch closes at BATCH records or once it holds max_bytes of input; a larger record is
    a batch of its own."""
    from mt_dialog.data.readers import RawRecord

    items = [(i, RawRecord("f", i, raw=b"x", nbytes=n), False)
             for i, n in enumerate([10, 10, 50, 200, 5, 5, 5, 5])]
    sizes = lambda batches: [[i for i, _, _ in b] for b in batches]  # noqa: E731
    assert sizes(preprocess._batches(iter(items), 3, 60)) == [[0, 1, 2], [3], [4, 5, 6], [7]]
    assert sizes(preprocess._batches(iter(items), 64, 1000)) == [list(range(8))]
    assert sizes(preprocess._batches(iter(items), 64, 1)) == [[i] for i in range(8)]


def test_byte_bounded_batches_and_window_give_the_same_bytes(tmp_path, sp_model_path,
                                                             monkeypatch):
    """Batches of one record and a window closed by bytes (what long conversations meet) write
    the dataset the default batching writes, with 1 and 2 workers."""
    path = corpus_file(tmp_path / "in.jsonl", 120)
    argv = lambda prefix, *extra: preprocess_args(path, sp_model_path, tmp_path / prefix,  # noqa
                                                  "--seq-length", "1024", *extra)
    assert main(argv("default")) == 0
    monkeypatch.setattr(preprocess, "BATCH_BYTES", 1)
    monkeypatch.setattr(preprocess, "WINDOW_BYTES_PER_WORKER", 2000)
    assert main(argv("one", "--workers", "1")) == 0
    assert main(argv("two", "--workers", "2")) == 0
    reference = dataset_bytes(str(tmp_path / "default"))
    assert dataset_bytes(str(tmp_path / "one")) == reference
    assert dataset_bytes(str(tmp_path / "two")) == reference


def test_main_process_memory_is_per_conversation(tmp_path, sp_model_path):
    """The token stream never enters the main process: its traced peak grows by far less than
    the tokens do (a few dozen bytes per conversation are kept, the tokens are staged on disk)."""
    peaks, tokens = [], []
    for count in (200, 2000):
        path = corpus_file(tmp_path / f"in{count}.jsonl", count, seed=count)
        config = config_of(preprocess_args(path, sp_model_path, tmp_path / f"out{count}",
                                           "--seq-length", "1024"))
        tracemalloc.start()
        try:
            metadata = run_preprocess(config, separate_writer=False)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        tokens.append(sum(split["tokens"] for split in metadata["splits"].values()))
    token_bytes = 4 * (tokens[1] - tokens[0])  # uint16 ids + uint16 loss_token_num
    assert token_bytes > 1_000_000
    assert peaks[1] - peaks[0] < token_bytes / 4, (peaks, token_bytes)
