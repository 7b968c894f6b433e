"""One command, launched as often as a cluster restarts the job: a fine-tune written as
``--pretrained-checkpoint BASE --load DIR --save DIR`` starts from BASE's weights the first time
and resumes from DIR afterwards (the losses of an uninterrupted fine-tune); relaunching a
finished run does nothing (its checkpoint is not rewritten); a checkpoint carries a copy of its
tokenizer, so it still chats when the dataset's tokenizer is gone."""

import os
import shutil

import pytest

from tests.training.conftest import iteration_dir, launch, parse_iters, train_args

pytestmark = pytest.mark.multiprocess

ITERS = 4


def _numbers(line):
    return (line["iter"], line["loss_turn"], line["loss_token"], line["lr"], line["grad_norm"])


@pytest.fixture(scope="module")
def base(packed_data, tmp_path_factory):
    """A trained checkpoint to fine-tune from."""
    folder = tmp_path_factory.mktemp("base") / "ckpt"
    launch(1, train_args(packed_data, "--save", folder, iters=3))
    return folder


@pytest.fixture(scope="module")
def relaunched(base, packed_data, tmp_path_factory):
    """The same fine-tuning command three times (stopped after 2 iterations the first time)."""
    folder = tmp_path_factory.mktemp("ft") / "ckpt"
    command = train_args(packed_data, "--pretrained-checkpoint", base, "--load", folder,
                         "--save", folder, "--lr-decay-iters", ITERS, iters=ITERS)
    first = launch(1, [*command, "--exit-interval", "2"])
    second = launch(1, command)
    finished = {name: os.path.getmtime(os.path.join(iteration_dir(folder, ITERS), name))
                for name in os.listdir(iteration_dir(folder, ITERS))}
    third = launch(1, command)
    return {"folder": folder, "runs": (first, second, third), "finished": finished}


def test_the_first_launch_starts_from_the_pretrained_weights(relaunched, base, packed_data,
                                                             tmp_path):
    first, second, _ = relaunched["runs"]
    folder = relaunched["folder"]
    assert (f"--load {folder}: no checkpoint there yet; starting from the weights of "
            f"--pretrained-checkpoint {base}") in first.stdout
    assert f"loaded {base} at iteration 0 (weights only)" in first.stdout
    assert f"loaded {folder} at iteration 2\n" in second.stdout
    straight = launch(1, train_args(packed_data, "--load", base, "--finetune", "--save",
                                    tmp_path / "s", "--lr-decay-iters", ITERS, iters=ITERS))
    assert [_numbers(r) for r in parse_iters(first.stdout) + parse_iters(second.stdout)] == \
        [_numbers(r) for r in parse_iters(straight.stdout)]


def test_relaunching_a_finished_run_changes_nothing(relaunched):
    folder = relaunched["folder"]
    third = relaunched["runs"][2]
    assert (f"the run is finished: --load {folder} is at iteration {ITERS} of --train-iters "
            f"{ITERS}; nothing to do (raise --train-iters to train on)") in third.stdout
    assert not parse_iters(third.stdout) and "saved checkpoint" not in third.stdout
    assert (folder / "latest_checkpointed_iteration.txt").read_text() == str(ITERS)
    now = {name: os.path.getmtime(os.path.join(iteration_dir(folder, ITERS), name))
           for name in os.listdir(iteration_dir(folder, ITERS))}
    assert now == relaunched["finished"]  # not rewritten


def test_a_checkpoint_chats_without_the_datasets_tokenizer(relaunched, demo_tokenizer, tmp_path):
    """The run's tokenizer is copied into CKPT/tokenizer: move the checkpoint and delete the
    tokenizer it trained with (a checkpoint copied to another machine)."""
    from mt_dialog.generate import Generator
    from mt_dialog.training.distributed import destroy_single_process

    folder = relaunched["folder"]
    name = os.path.basename(demo_tokenizer["tokenizer"])
    assert (folder / "tokenizer" / name).is_file()
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    hidden = demo_tokenizer["tokenizer"] + ".away"
    os.rename(demo_tokenizer["tokenizer"], hidden)
    try:
        generator = Generator.from_checkpoint(str(moved))
        reply = generator.generate([{"role": "user", "content": "What is 2 plus 3?"}],
                                   max_new_tokens=4)
    finally:
        os.rename(hidden, demo_tokenizer["tokenizer"])
        destroy_single_process()
    assert generator.tokenizer.path == str(moved / "tokenizer" / name)
    assert reply.token_ids
