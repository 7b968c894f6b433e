"""Every launch in examples/*.sh parses and has a valid parallel layout (no GPU needed).

Each script's variable assignments are run by bash, then every command that calls
``pretrain_dialog.py`` (or ``tools/preprocess_dialog.py``) is expanded by bash into its argument
list: torchrun's ``--nproc_per_node`` x ``--nnodes`` gives the world size, the training flags go
through ``pretrain_dialog.parse_config`` (argparse + the dataclass checks) and
``validate_world``; preprocessing flags go through the preprocessing parser and config.
"""

import argparse
import glob
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "examples", "*.sh")))
ASSIGNMENT = re.compile(r"^\s*(export\s+)?[A-Za-z_][A-Za-z0-9_]*=")


def _logical_lines(text: str):
    """Lines with backslash continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n", " ", text)
    return [line.strip() for line in joined.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def _expand(prelude, command: str):
    """The argument list bash builds for ``command`` after the script's assignments."""
    script = "\n".join(prelude + [f"set -- {command}", 'printf "%s\\0" "$@"'])
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True,
                         env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    return out.stdout.split("\0")[:-1]


def _commands(path: str, marker: str):
    lines = _logical_lines(open(path, encoding="utf-8").read())
    prelude = [line for line in lines if ASSIGNMENT.match(line)]
    return [_expand(prelude, line) for line in lines
            if marker in line and not ASSIGNMENT.match(line)]


def _split_launch(argv):
    """(world size, script arguments) of ``[torchrun ...] pretrain_dialog.py ARGS``."""
    at = next(i for i, word in enumerate(argv) if word.endswith("pretrain_dialog.py"))
    launcher, args = argv[:at], argv[at + 1:]
    if not launcher or not os.path.basename(launcher[0]) == "torchrun":
        return 1, args
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--nproc_per_node", "--nproc-per-node", default="1")
    parser.add_argument("--nnodes", default="1")
    known, _ = parser.parse_known_args(launcher[1:])
    assert known.nproc_per_node.isdigit(), f"--nproc_per_node {known.nproc_per_node} is not a count"
    nnodes = known.nnodes.split(":")[-1]  # "N" or elastic "MIN:MAX"
    return int(known.nproc_per_node) * int(nnodes), args


def test_there_are_examples():
    assert SCRIPTS, "examples/*.sh is empty"


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_training_launches_parse_and_fit_the_world(path):
    import pretrain_dialog
    from mt_dialog.training.config import validate_world

    launches = _commands(path, "pretrain_dialog.py")
    assert launches, f"{path}: no pretrain_dialog.py launch found"
    for argv in launches:
        world, args = _split_launch(argv)
        try:
            config = pretrain_dialog.parse_config(args)
        except SystemExit:
            pytest.fail(f"{path}: pretrain_dialog.py rejects the flags {args}")
        validate_world(config, world)  # raises ValueError on an impossible layout


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_preprocessing_commands_parse(path):
    from mt_dialog.config_utils import from_args
    from mt_dialog.data.config import PreprocessConfig
    from tools.preprocess_dialog import GROUPS, build_parser

    for argv in _commands(path, "tools/preprocess_dialog.py"):
        args = argv[argv.index(next(w for w in argv if w.endswith("preprocess_dialog.py"))) + 1:]
        try:
            parsed = build_parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"{path}: tools/preprocess_dialog.py rejects the flags {args}")
        PreprocessConfig(*(from_args(cls, parsed) for _, cls in GROUPS))  # field checks


def test_llama2_7b_layout():
    """The 8-GPU example is the documented Llama-2-7B layout: TP 2 x PP 2 -> DP 2."""
    import pretrain_dialog
    from mt_dialog.training.config import validate_world

    path = os.path.join(ROOT, "examples", "llama2_7b_8gpu.sh")
    (argv,) = _commands(path, "pretrain_dialog.py")
    world, args = _split_launch(argv)
    config = pretrain_dialog.parse_config(args)
    assert world == 8 and validate_world(config, world) == 2
    model, par = config.model, config.parallel
    assert (model.num_layers, model.hidden_size, model.ffn_hidden_size, model.num_attention_heads) == \
        (32, 4096, 11008, 32)
    assert model.untie_embeddings_and_output_weights and config.optim.bf16
    assert (par.tensor_model_parallel_size, par.pipeline_model_parallel_size) == (2, 2)
    assert par.use_distributed_optimizer and config.data.seq_length == 4096
    (pre,) = _commands(path, "tools/preprocess_dialog.py")
    assert pre[pre.index("--seq-length") + 1] == "4096"


def test_a_bad_layout_is_caught(tmp_path):
    """The checks above fail on a typo and on a layout that does not fit the world."""
    import pretrain_dialog
    from mt_dialog.training.config import validate_world

    script = tmp_path / "bad.sh"
    script.write_text("N=6\ntorchrun --nproc_per_node $N pretrain_dialog.py --data-path d \\\n"
                      "  --tensor-model-parallel-size 4 --train-iters 1\n")
    (argv,) = _commands(str(script), "pretrain_dialog.py")
    world, args = _split_launch(argv)
    assert world == 6
    with pytest.raises(ValueError, match="not divisible"):
        validate_world(pretrain_dialog.parse_config(args), world)
    with pytest.raises(SystemExit):
        pretrain_dialog.parse_config(args + ["--tensor-model-paralel-size", "2"])
