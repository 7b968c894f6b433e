"""Every launch in examples/ parses, has a valid parallel layout and states its memory (no GPU).

Each script's variable assignments are run by bash, then every command that calls
``pretrain_dialog.py``, ``tools/preprocess_dialog.py`` or ``tools/convert_checkpoint.py`` is
expanded by bash into its argument list (a SLURM script's ``#SBATCH --nodes`` gives
``$SLURM_NNODES``): torchrun's ``--nproc_per_node`` x ``--nnodes`` gives the world size, the
training flags go through ``pretrain_dialog.parse_config`` (argparse + the dataclass checks) and
``validate_world``, the other tools' through their own parsers and configs. A launch with
``--use-checkpoint-args`` takes the architecture of the Hugging Face model its script imports:
the model's real ``config.json`` fields (``HF_CONFIGS``) read by the importer's own
``read_hf_config``, so the layout is checked against the real heads, query groups, layers and
experts, and the script's "Memory per GPU" figure is recomputed with docs/training.md's formula.
"""

import argparse
import glob
import json
import os
import re
import shlex
import subprocess
from contextlib import contextmanager
from typing import Dict, List, Optional

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "examples", "*.sh"))
                 + glob.glob(os.path.join(ROOT, "examples", "*.sbatch")))
ASSIGNMENT = re.compile(r"^\s*(export\s+)?[A-Za-z_][A-Za-z0-9_]*=")
ENV_PREFIX = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)+")
TOOLS = ("pretrain_dialog.py", "tools/preprocess_dialog.py", "tools/convert_checkpoint.py")
DEFAULT_MODEL = "Qwen3-8B"  # a checkpoint whose import the text does not show
_QWEN3 = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "head_dim": 128,
          "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
          "max_position_embeddings": 40960, "tie_word_embeddings": False,
          "hidden_act": "silu", "attention_bias": False, "torch_dtype": "bfloat16"}
HF_CONFIGS = {  # the fields of the models' config.json on the Hugging Face hub (Qwen/...)
    "Qwen3-8B": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8),
    "Qwen3-14B": dict(_QWEN3, hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                      num_attention_heads=40, num_key_value_heads=8),
    "Qwen3-32B": dict(_QWEN3, hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                      num_attention_heads=64, num_key_value_heads=8),
    "Qwen2-7B-Instruct": {key: value for key, value in _QWEN3.items() if key != "head_dim"} | dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=3584,
        intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768),
    "Qwen3-30B-A3B": dict(_QWEN3, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"],
                          hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                          decoder_sparse_step=1, mlp_only_layers=[]),
}


def _logical_lines(text: str):
    """Lines with backslash continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n", " ", text)
    return [line.strip() for line in joined.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def _sbatch_env(text: str) -> Dict[str, str]:
    """The SLURM variables a batch script sees, from its ``#SBATCH`` lines."""
    nodes = re.search(r"^#SBATCH\s+(?:--nodes[= ]|-N\s*)(\d+)", text, re.M)
    return {"SLURM_NNODES": nodes[1], "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "node[0-1]"} \
        if nodes else {}


def _expand(prelude, command: str, env: Optional[Dict[str, str]] = None):
    """The argument list bash builds for ``command`` after the script's assignments (a trailing
    ``&`` dropped: the launch is what counts, not that it runs in the background)."""
    command = re.sub(r"\s&$", "", command)
    script = "\n".join(prelude + [f"set -- {command}", 'printf "%s\\0" "$@"'])
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True,
                         env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})})
    return out.stdout.split("\0")[:-1]


def _is_assignment(line: str) -> bool:
    """Only assignments (``A=1 B="x"``, ``export A=1``): never a command with an environment
    prefix (``OMP_NUM_THREADS=1 torchrun ...``), which bash would run."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return False
    words = words[1:] if words[:1] == ["export"] else words
    return bool(words) and ASSIGNMENT.match(line) is not None and all(
        re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", word) for word in words)


def commands_in(text: str, marker: str, env: Optional[Dict[str, str]] = None) -> List[List[str]]:
    """Every command of a shell text calling ``marker``, as bash expands it after the text's
    assignments (an environment prefix such as ``OMP_NUM_THREADS=1`` dropped)."""
    lines = _logical_lines(text)
    prelude = [line for line in lines if _is_assignment(line)
               and not any(tool in line for tool in TOOLS)]
    return [_expand(prelude, ENV_PREFIX.sub("", line), env) for line in lines
            if marker in line and not _is_assignment(line)]


def _commands(path: str, marker: str):
    text = open(path, encoding="utf-8").read()
    return commands_in(text, marker, _sbatch_env(text))


def tool_args(argv: List[str], tool: str) -> List[str]:
    """The arguments after ``tool`` in ``argv``."""
    at = next(i for i, word in enumerate(argv) if word.endswith(tool))
    return argv[at + 1:]


def _split_launch(argv):
    """(world size, script arguments) of ``[srun ...] [torchrun ...] pretrain_dialog.py ARGS``."""
    at = next(i for i, word in enumerate(argv) if word.endswith("pretrain_dialog.py"))
    launcher, args = argv[:at], argv[at + 1:]
    runs = [i for i, word in enumerate(launcher) if os.path.basename(word) == "torchrun"]
    if not runs:
        return 1, args
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--nproc_per_node", "--nproc-per-node", default="1")
    parser.add_argument("--nnodes", default="1")
    known, _ = parser.parse_known_args(launcher[runs[0] + 1:])
    assert known.nproc_per_node.isdigit(), f"--nproc_per_node {known.nproc_per_node} is not a count"
    nnodes = known.nnodes.split(":")[-1]  # "N" or elastic "MIN:MAX"
    assert nnodes.isdigit(), f"--nnodes {known.nnodes!r} is not a count"
    return int(known.nproc_per_node) * int(nnodes), args


# -- the checkpoints a launch starts from -------------------------------------------------------

def imported_models(text: str, env=None) -> Dict[str, str]:
    """{--save-dir: model name} of the text's ``hf-to-mcore`` commands (its folder's name)."""
    found = {}
    for argv in commands_in(text, "tools/convert_checkpoint.py", env):
        args = tool_args(argv, "tools/convert_checkpoint.py")
        if args and args[0] == "hf-to-mcore":
            found[args[args.index("--save-dir") + 1]] = os.path.basename(
                args[args.index("--load-dir") + 1].rstrip("/"))
    return found


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory):
    """name -> the importer's reading (``HFModel``) of that model's real config.json."""
    from mt_dialog.convert.families.registry import read_hf_config

    cache = {}

    def read(name: str):
        assert name in HF_CONFIGS, f"{name}: add its config.json fields to HF_CONFIGS"
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            (folder / "config.json").write_text(json.dumps(HF_CONFIGS[name]))
            cache[name] = read_hf_config(str(folder))
        return cache[name]

    return read


@contextmanager
def checkpoints(monkeypatch, hf_model, models: Dict[str, str]):
    """``--use-checkpoint-args`` reads ``models[root]``'s architecture (else DEFAULT_MODEL's)."""
    from mt_dialog.training import checkpoint

    def fake_args(root):
        model = hf_model(models.get(root, DEFAULT_MODEL)).model
        return {name: getattr(model, name) for name in checkpoint.architecture_fields()}

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "checkpoint_args", fake_args)
        yield


def parse_training(argv):
    """(config, data-parallel size, world) of a launch, through the real parser and checks."""
    import pretrain_dialog
    from mt_dialog.training.config import validate_world

    world, args = _split_launch(argv)
    try:
        config = pretrain_dialog.parse_config(args)
    except SystemExit:
        pytest.fail(f"pretrain_dialog.py rejects the flags {args}")
    return config, validate_world(config, world), world  # ValueError on an impossible layout


def parse_tool(argv):
    """Preprocessing and conversion commands through their own parsers and config checks."""
    from mt_dialog.config_utils import from_args

    if any(word.endswith("tools/preprocess_dialog.py") for word in argv):
        from mt_dialog.data.config import PreprocessConfig
        from tools.preprocess_dialog import GROUPS, build_parser

        args = tool_args(argv, "tools/preprocess_dialog.py")
        try:
            parsed = build_parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"tools/preprocess_dialog.py rejects the flags {args}")
        return PreprocessConfig(*(from_args(cls, parsed) for _, cls in GROUPS))
    from tools.convert_checkpoint import COMMANDS, build_parser

    args = tool_args(argv, "tools/convert_checkpoint.py")
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"tools/convert_checkpoint.py rejects the flags {args}")
    return from_args(COMMANDS[parsed.command], parsed)


# -- memory per GPU: docs/training.md's formula -------------------------------------------------

def parameters(model, vocab: int):
    """(dense, expert) parameter counts of a ModelConfig (norm weights included)."""
    h, heads, groups = model.hidden_size, model.num_attention_heads, model.num_query_groups
    head = model.kv_channels or h // heads
    attention = h * (heads + 2 * groups) * head + heads * head * h + 2 * h + 2 * head
    experts = model.num_experts or 0
    mlp = h * experts if experts else 3 * h * model.ffn_hidden_size
    expert = model.num_layers * experts * 3 * h * (model.moe_ffn_hidden_size or 0)
    embeddings = vocab * h * (2 if model.untie_embeddings_and_output_weights else 1) + h
    return model.num_layers * (attention + mlp) + embeddings, expert


def adapter_parameters(model, rank: int) -> int:
    """LoRA parameters of ``--lora-target all`` on a dense model (A and B of the four layers)."""
    h, head = model.hidden_size, model.kv_channels
    qkv = (model.num_attention_heads + 2 * model.num_query_groups) * head
    sizes = [(h, qkv), (model.num_attention_heads * head, h), (h, 2 * model.ffn_hidden_size),
             (model.ffn_hidden_size, h)]
    return model.num_layers * sum(rank * (fan_in + fan_out) for fan_in, fan_out in sizes)


def memory_gb(config, dp: int, world: int, dense: int, expert: int) -> float:
    """Model state per GPU in GB (1e9 bytes): bf16 weights, fp32 gradients, fp32 main weights
    and Adam moments sharded over d ranks with the distributed optimizer (docs/training.md)."""
    par = config.parallel
    tp, pp, ep = (par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                  par.expert_model_parallel_size)
    shard = par.use_distributed_optimizer
    d_dense = dp * par.context_parallel_size if shard else 1
    d_expert = world // (tp * pp * ep) if shard else 1
    if config.lora.lora_rank:
        adapters = adapter_parameters(config.model, config.lora.lora_rank)
        return (dense / (tp * pp) * 2 + adapters * (6 + 12 / d_dense)) / 1e9
    return (dense / (tp * pp) * (6 + 12 / d_dense)
            + expert / (ep * tp * pp) * (6 + 12 / d_expert)) / 1e9


# -- the tests ------------------------------------------------------------------------------------

def test_there_are_examples():
    names = {os.path.basename(path) for path in SCRIPTS}
    assert {"qwen3_8b_8gpu.sh", "qwen3_moe_30b_a3b_2nodes.sh", "qwen3_32b_lora_2gpu.sh",
            "qwen3_8b_long_context.sh", "slurm_qwen3_14b.sbatch"} <= names


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_training_launches_parse_fit_the_world_and_state_their_memory(path, monkeypatch,
                                                                       hf_model):
    text = open(path, encoding="utf-8").read()
    models = imported_models(text, _sbatch_env(text))
    launches = _commands(path, "pretrain_dialog.py")
    assert launches, f"{path}: no pretrain_dialog.py launch found"
    with checkpoints(monkeypatch, hf_model, models):
        for argv in launches:
            config, dp, world = parse_training(argv)
            start = config.train.pretrained_checkpoint or config.train.load
            assert start in models, f"{path}: the launch starts from {start}, imported nowhere"
            hf = hf_model(models[start])
            figure = memory_gb(config, dp, world, *parameters(hf.model, hf.vocab_size))
            assert re.search(rf"-> {figure:.1f} GB per(\n#)? GPU", text), \
                f"{path}: docs/training.md's formula gives {figure:.1f} GB of model state per GPU"


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_preprocessing_and_conversion_commands_parse(path):
    found = [argv for tool in TOOLS[1:] for argv in _commands(path, tool)]
    assert len(found) >= 3, f"{path}: expected import, preprocessing and export commands"
    for argv in found:
        parse_tool(argv)
    pre = [argv for argv in _commands(path, "tools/preprocess_dialog.py")]
    assert all(argv[argv.index("--template") + 1] == "hf" for argv in pre), path


def test_the_slurm_script_resumes_and_requeues():
    """sbatch: one torchrun per node over SLURM's nodes, the scheduler's warning signal
    forwarded, checkpoints saved where the requeued job loads them."""
    (path,) = [p for p in SCRIPTS if p.endswith(".sbatch")]
    text = open(path, encoding="utf-8").read()
    assert re.search(r"^#SBATCH --signal=B:SIGTERM@\d+$", text, re.M)
    assert re.search(r"^#SBATCH --requeue$", text, re.M)
    assert re.search(r"^#SBATCH --ntasks-per-node=1$", text, re.M)
    assert "scontrol show hostnames" in text and "scontrol requeue" in text
    (argv,) = _commands(path, "pretrain_dialog.py")
    assert argv[0] == "srun" and "torchrun" in argv
    world, args = _split_launch(argv)
    assert world == 16 and "--exit-signal-handler" in args
    assert args[args.index("--load") + 1] == args[args.index("--save") + 1]


def test_a_bad_layout_is_caught(tmp_path, monkeypatch, hf_model):
    """The checks above fail on a typo, a layout that does not fit the world or the model, and
    a memory figure the formula does not give."""
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
    launch = ("torchrun --nproc_per_node 8 --nnodes {} pretrain_dialog.py --load c --finetune "
              "--use-checkpoint-args --data-path d --train-iters 1 --tensor-model-parallel-size {}")
    (argv,) = commands_in(launch.format(2, 16), "pretrain_dialog.py")
    with checkpoints(monkeypatch, hf_model, {"c": "Qwen3-14B"}):  # 40 heads: TP 16 splits none
        with pytest.raises(ValueError, match="must divide the 40 attention heads"):
            parse_training(argv)
    (argv,) = commands_in(launch.format(1, 8), "pretrain_dialog.py")
    with checkpoints(monkeypatch, hf_model, {"c": "Qwen3-8B"}):
        config, dp, world = parse_training(argv)
    hf = hf_model("Qwen3-8B")
    assert round(memory_gb(config, dp, world, *parameters(hf.model, hf.vocab_size)), 1) == \
        round(8.19e9 / 8 * 18 / 1e9, 1)  # 18 bytes per parameter without the distributed optimizer
