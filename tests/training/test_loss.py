"""The dialogue loss on small tensors, through the path training takes: conversations rendered by
the library (firefly, one id per word as in docs/data-formats.md), packed by ``build_sample``,
flattened by ``flatten_micro_batch``, then ``pretrain_dialog.make_forward_step``'s loss function
on given per-token losses. Every normalization is compared with sums written out turn by turn and
conversation by conversation from the rendering; the report pairs add up over micro-batches to
the global batch (``loop._reduce_reports``), which a mean of micro-batch means would not."""

import os
import re

import numpy as np
import pytest
import torch

from mt_dialog.data.dataset import build_sample
from mt_dialog.data.formats import Message
from mt_dialog.data.render import render_conversation, resolve_template
from mt_dialog.data.templates import get_template
from mt_dialog.data.tokenizers import SentencePieceTokenizer
from mt_dialog.training.data import flatten_micro_batch
from mt_dialog.training.loss import NORMALIZATIONS, conversation_ids_from_cu_seqlens, dialog_loss
from pretrain_dialog import make_forward_step
from tests.conftest import ROOT

SEQ = 16
CONVERSATIONS = {  # user / assistant texts; "A" is the docs' two-turn example
    "A": ["Hi", "Hello!", "2+2?", "4"],
    "B": ["Count", "1 2 3 4 5", "Thanks", "Welcome"],
    "C": ["Bye", "See you"],
}
PACKS = (("A", "C"), ("B",))  # two packs of SEQ tokens, each with padding
P = 0.5  # --loss-turn-exponent of the 'power' normalization checked here


def readme_table():
    """The firefly table of docs/data-formats.md ("What is stored"): {row name: its cells}."""
    text = open(os.path.join(ROOT, "docs", "data-formats.md"), encoding="utf-8").read()
    rows = {}
    for name in ("text", "loss_mask", "loss_token_num"):
        match = re.search(rf"^{name} +(.+)$", text, re.M)
        assert match, f"docs/data-formats.md has no '{name}' row"
        rows[name] = match[1].split()
    return rows


@pytest.fixture(scope="module")
def firefly(sp_model_path):
    """(the resolved firefly template, an encode giving one id per word, the word ids)."""
    tokenizer = SentencePieceTokenizer(sp_model_path)
    template = resolve_template(get_template("firefly"), tokenizer)
    words = {"<s>": tokenizer.bos_id, "</s>": tokenizer.eos_id}

    def encode(text):
        return [words.setdefault(word, 1000 + len(words)) for word in text.split()]

    return template, encode, words


def render(name, firefly):
    template, encode, _ = firefly
    texts = CONVERSATIONS[name]
    messages = [Message(role="user" if i % 2 == 0 else "assistant", content=t)
                for i, t in enumerate(texts)]
    (rendered,) = render_conversation(messages, template, encode)
    return rendered


def test_the_readme_table_is_what_training_stores(firefly):
    rows = readme_table()
    rendered = render("A", firefly)
    words = firefly[2]
    assert rendered.input_ids.tolist() == [words[w] for w in rows["text"]]
    assert rendered.loss_mask.tolist() == [int(v) for v in rows["loss_mask"]]
    assert rendered.loss_token_num.tolist() == [int(v) for v in rows["loss_token_num"]]
    assert rendered.turn_num == 2


# ------------------------------------------------------------------ references from the rendering

def packed(firefly):
    """(samples of PACKS, per conversation the flattened label positions of each of its turns)."""
    samples, turns = [], {}
    for index, names in enumerate(PACKS):
        rendered = [render(name, firefly) for name in names]
        tokens = np.concatenate([r.input_ids for r in rendered])
        counts = np.concatenate([r.loss_token_num for r in rendered])
        lengths = np.array([r.num_tokens for r in rendered])
        samples.append(build_sample(tokens, counts, lengths, SEQ, pad_id=0))
        offset = index * SEQ
        for name, r in zip(names, rendered):
            # token j of the conversation is the label at position offset + j - 1
            turns[name] = [list(range(offset + end - int(r.loss_token_num[end - 1]) - 1,
                                      offset + end - 1)) for end in r.turn_ends]
            offset += r.num_tokens
    return samples, turns


def references(losses, turns):
    """(loss_sum, count) of each normalization, summed turn by turn / conversation by
    conversation as their definitions say (docs/validation.md: "The loss")."""
    flat = losses.detach().double().view(-1)
    every_turn = [t for conv in turns.values() for t in conv]
    trained = [p for t in every_turn for p in t]
    conversation_means = [flat[[p for t in conv for p in t]].mean() for conv in turns.values()]
    # power: sum_t l_t / L_t^P over sum_turns L^(1-P), carried as (that x turns, turns)
    power = sum(flat[t].sum() / len(t) ** P for t in every_turn)
    power_count = sum(len(t) ** (1 - P) for t in every_turn)
    return {"turn": (sum(flat[t].mean() for t in every_turn), len(every_turn)),
            "token": (flat[trained].sum(), len(trained)),
            "conversation": (sum(conversation_means), len(turns)),
            "power": (power * len(every_turn) / power_count, len(every_turn))}


class PerTokenLosses(torch.nn.Module):
    """Stands in for GPTModel(..., labels=...): returns the given per-token losses [1, b*s]."""

    def __init__(self, losses):
        super().__init__()
        self.losses = losses

    def forward(self, tokens, position_ids, attention_mask, labels=None, packed_seq_params=None):
        assert labels.shape == tokens.shape == self.losses.shape
        return self.losses


def loss_of(batch, losses, normalization):
    """What megatron's schedule gets from pretrain_dialog's forward_step for ``batch``."""
    output, loss_func = make_forward_step(normalization)(iter([batch]), PerTokenLosses(losses))
    return loss_func(output)


@pytest.fixture(scope="module")
def global_batch(firefly):
    samples, turns = packed(firefly)
    generator = torch.Generator().manual_seed(0)
    losses = (torch.rand(1, len(samples) * SEQ, generator=generator, dtype=torch.float64) * 4)
    return samples, turns, losses.float()


@pytest.mark.parametrize("isolated", [True, False])  # --packed-attention isolated / causal
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_each_normalization_is_its_definition(global_batch, normalization, isolated):
    samples, turns, values = global_batch
    batch = flatten_micro_batch(samples, isolated, torch.device("cpu"), turn_exponent=P)
    losses = values.clone().requires_grad_(True)
    loss_sum, count, report = loss_of(batch, losses, normalization)
    want_sum, want_count = references(values, turns)[normalization]
    assert count.dtype == torch.int32 and int(count) == want_count
    assert float(loss_sum.detach()) == pytest.approx(float(want_sum), rel=1e-6)
    # the step's gradient: loss_sum / count, divided once by finalize_model_grads
    (loss_sum / count).backward()
    weights = torch.zeros(losses.numel(), dtype=torch.float64)
    spans = {"turn": [t for conv in turns.values() for t in conv],
             "token": [[p for conv in turns.values() for t in conv for p in t]],
             "conversation": [[p for t in conv for p in t] for conv in turns.values()],
             "power": [t for conv in turns.values() for t in conv]}
    power_count = sum(len(t) ** (1 - P) for t in spans["power"])
    for span in spans[normalization]:  # each sample of the split baseline: its token mean
        size = 1 if normalization == "token" else len(span)
        weights[span] += (1.0 / (len(span) ** P * power_count) if normalization == "power"
                          else 1.0 / (size * want_count))
    assert torch.allclose(losses.grad.view(-1).double(), weights, rtol=1e-6, atol=0)


def test_turns_count_equally_whatever_their_length(global_batch):
    """Turn normalization is the mean of the turns' token means: a 6-token turn weighs as much as
    a 2-token one (token normalization would weigh it 3 times more)."""
    samples, turns, values = global_batch
    batch = flatten_micro_batch(samples, True, torch.device("cpu"))
    lengths = sorted(len(t) for conv in turns.values() for t in conv)
    assert lengths[0] <= 2 and lengths[-1] >= 6  # the data has the spread
    per_turn = loss_of(batch, values, "turn")
    per_token = loss_of(batch, values, "token")
    assert float(per_turn[0] / per_turn[1]) != pytest.approx(float(per_token[0] / per_token[1]),
                                                             rel=1e-3)


def test_report_pairs_are_every_normalization_at_once(global_batch):
    samples, turns, values = global_batch
    batch = flatten_micro_batch(samples, True, torch.device("cpu"), turn_exponent=P)
    want = references(values, turns)
    for normalization in NORMALIZATIONS:  # the report does not depend on the normalization
        _, _, report = loss_of(batch, values, normalization)
        for key, name in (("loss per turn", "turn"), ("loss per token", "token"),
                          ("loss per conversation", "conversation")):
            total, count = report[key].tolist()
            assert report[key].dtype == torch.float64 and count == want[name][1]
            assert total == pytest.approx(float(want[name][0]), rel=1e-6)


@pytest.fixture()
def single_process():
    from mt_dialog.training.distributed import destroy_single_process, initialize_single_process

    initialize_single_process()
    yield
    destroy_single_process()


def test_micro_batch_reports_add_up_to_the_global_batch(global_batch, single_process):
    """One pack per micro-batch: the step's metrics (loop._reduce_reports) are the whole global
    batch's, by name; a mean of the micro-batches' means is not."""
    from mt_dialog.training.loop import _reduce_reports

    samples, turns, values = global_batch
    whole = flatten_micro_batch(samples, True, torch.device("cpu"))
    batches = [flatten_micro_batch([s], True, torch.device("cpu")) for s in samples]
    store = [loss_of(b, values[:, i * SEQ:(i + 1) * SEQ], "turn")[2] for i, b in enumerate(batches)]
    metrics = _reduce_reports(store, batches)
    _, _, report = loss_of(whole, values, "turn")
    for name in ("loss per turn", "loss per token", "loss per conversation"):
        total, count = report[name].tolist()
        assert metrics[name] == pytest.approx(total / count, rel=1e-6)  # fp32 sums
    want = references(values, turns)
    assert metrics["turn_num"] == want["turn"][1] == 5
    assert metrics["num_loss_tokens"] == want["token"][1]
    assert metrics["num_tokens"] == sum(int(s["num_tokens"]) for s in samples)
    assert metrics["packs"] == len(samples)
    means = [pair[0] / pair[1] for pair in (r["loss per turn"].tolist() for r in store)]
    assert metrics["loss per turn"] != pytest.approx(sum(means) / len(means), rel=1e-3)


def test_conversation_ids_follow_the_segments():
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    ids = conversation_ids_from_cu_seqlens(cu, 7)
    assert ids.dtype == torch.int64 and ids.tolist() == [[0, 0, 0, 1, 1, 2, 2]]


@pytest.mark.parametrize("kwargs, message", [
    ({"normalization": "sample"}, r"normalization must be one of \('turn', 'token', "
                                  r"'conversation', 'power'\), got 'sample'"),
    ({"normalization": "turn", "loss_token_num": None}, "'turn' normalization needs "
                                                        "loss_token_num"),
    ({"normalization": "conversation"}, "'conversation' normalization needs conversation_ids "
                                        "or cu_seqlens"),
])
def test_missing_inputs_are_named(kwargs, message):
    losses = torch.ones(1, 4)
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    arguments = {"loss_token_num": torch.tensor([[0.0, 2.0, 2.0, 0.0]]), **kwargs}
    with pytest.raises(ValueError, match=message):
        dialog_loss(losses, mask, **arguments)


def test_an_unknown_normalization_is_refused_before_the_first_step():
    from mt_dialog.training.loss import make_loss_func

    with pytest.raises(ValueError, match="got 'mean'"):
        make_loss_func(torch.ones(1, 2), normalization="mean")


def test_each_blend_dataset_is_reported_and_the_datasets_add_up(global_batch, single_process):
    """A blend of the conversation packs (dataset "chat") and a pack holding a text document
    piece (dataset "text"), one pack per micro-batch: each dataset's loss per token / turn /
    conversation is its own sum over its own count, summed over micro-batches; together they
    make the totals. The text piece is one turn whose every token but the first is trained."""
    from mt_dialog.data.render import document_piece
    from mt_dialog.training.loop import _reduce_reports
    from mt_dialog.training.loss import dataset_report_names

    samples, turns, values = global_batch
    piece = document_piece(list(range(1000, 1011)))  # 11 tokens, 10 of them trained
    text = build_sample(piece.input_ids, piece.loss_token_num, np.array([11]), SEQ, pad_id=0)
    tagged = [dict(s, dataset=0) for s in samples] + [dict(text, dataset=1)]
    text_losses = torch.rand(1, SEQ, generator=torch.Generator().manual_seed(1)) * 4
    every = torch.cat([values, text_losses], 1)
    names = ["chat", "text"]
    batches = [flatten_micro_batch([s], True, torch.device("cpu"), names) for s in tagged]
    assert batches[-1]["dataset_ids"].tolist() == [[1] * SEQ]
    store = [loss_of(b, every[:, i * SEQ:(i + 1) * SEQ], "token")[2]
             for i, b in enumerate(batches)]
    metrics = _reduce_reports(store, batches, dataset_report_names(names))
    want = references(values, turns)
    text_mean = float(text_losses[0, :10].double().mean())  # labels = piece tokens 1..10
    assert metrics["dataset chat: loss per token"] == pytest.approx(
        float(want["token"][0]) / want["token"][1], rel=1e-6)
    assert metrics["dataset chat: loss per turn"] == pytest.approx(
        float(want["turn"][0]) / want["turn"][1], rel=1e-6)
    assert metrics["dataset text: loss per token"] == pytest.approx(text_mean, rel=1e-6)
    assert metrics["dataset text: loss per turn"] == pytest.approx(text_mean, rel=1e-6)
    assert (metrics["dataset chat: turns"], metrics["dataset text: turns"]) == (5, 1)
    assert metrics["dataset text: loss tokens"] == 10
    assert metrics["dataset chat: loss tokens"] == want["token"][1]
    assert metrics["loss per token"] == pytest.approx(
        (float(want["token"][0]) + 10 * text_mean) / (want["token"][1] + 10), rel=1e-6)
    assert metrics["turn_num"] == 6


# ------------------------------------------------------------------ 'power' (--loss-turn-exponent)

def test_power_weights_are_the_docstring_s_picture():
    """``position_weights`` with p: each token 1 / L^p, each turn's L^(1 - p) on its last token."""
    from mt_dialog.training.loss import position_weights

    mask = torch.tensor([[0.0, 1, 1, 1, 0, 0, 1, 1]])
    counts = torch.tensor([[0.0, 3, 3, 3, 0, 0, 2, 2]])
    weights = position_weights(mask, counts, turn_exponent=0.25)
    three, two = 3 ** -0.25, 2 ** -0.25
    assert torch.allclose(weights["power_weight"],
                          torch.tensor([[0, three, three, three, 0, 0, two, two]]), rtol=1e-7)
    assert torch.allclose(weights["turn_power_end"],
                          torch.tensor([[0, 0, 0, 3 ** 0.75, 0, 0, 0, 2 ** 0.75]]), rtol=1e-7)
    assert "power_weight" not in position_weights(mask, counts)  # only when p is given


def _step_gradient(batches, values, normalization):
    """The gradient of one step over ``batches`` (one pack each): the sum of the micro-batches'
    loss sums over the sum of their counts, as finalize_model_grads divides it."""
    losses = values.clone().requires_grad_(True)
    pieces = [loss_of(b, losses[:, i * SEQ:(i + 1) * SEQ], normalization)
              for i, b in enumerate(batches)]
    total = sum(piece[0] for piece in pieces)
    count = sum(int(piece[1]) for piece in pieces)
    (total / count).backward()
    return losses.grad, float(total.detach()) / count, [piece[2] for piece in pieces]


@pytest.mark.parametrize("p, other", [(1.0, "turn"), (0.0, "token")])
def test_power_1_is_turn_and_power_0_is_token(global_batch, p, other):
    samples, _, values = global_batch
    whole = flatten_micro_batch(samples, True, torch.device("cpu"), turn_exponent=p)
    grads = {}
    for normalization in ("power", other):
        losses = values.clone().requires_grad_(True)
        loss_sum, count, _ = loss_of(whole, losses, normalization)
        (loss_sum / count).backward()
        grads[normalization] = losses.grad
    assert torch.allclose(grads["power"], grads[other], rtol=1e-6, atol=0)
    if p == 1.0:  # 1 / L^1 and L^0 are exact: the same gradient to the bit
        assert torch.equal(grads["power"], grads["turn"])


def test_power_over_micro_batches_is_the_global_definition(global_batch, single_process):
    """One pack per micro-batch, the step's scale from ``power_totals`` of all of them (as
    ``loop._set_power_scale``, here in one process): the step's gradient and logged loss are
    sum_t l_t / L_t^p / sum_turns L^(1-p) of the global batch, not a mean of the micro-batches'
    own; without the step's scale they differ."""
    from mt_dialog.training.loop import _reduce_reports
    from mt_dialog.training.loss import POWER_REPORT, power_totals, set_power_scale

    samples, turns, values = global_batch
    every_turn = [t for conv in turns.values() for t in conv]
    assert len({len(t) for t in every_turn}) >= 3  # turns of several lengths
    flat = values.double().view(-1)
    numerator = sum(float(flat[t].sum()) / len(t) ** P for t in every_turn)
    denominator = sum(len(t) ** (1 - P) for t in every_turn)
    want = torch.zeros(values.numel(), dtype=torch.float64)
    for t in every_turn:
        want[t] = 1.0 / (len(t) ** P * denominator)

    batches = [flatten_micro_batch([s], True, torch.device("cpu"), turn_exponent=P)
               for s in samples]
    _, alone, _ = _step_gradient(batches, values, "power")  # each micro-batch's own scale
    assert alone != pytest.approx(numerator / denominator, rel=1e-3)
    set_power_scale(batches, *power_totals(batches))
    grad, loss, store = _step_gradient(batches, values, "power")
    assert loss == pytest.approx(numerator / denominator, rel=1e-6)
    assert torch.allclose(grad.view(-1).double(), want, rtol=1e-6, atol=0)
    metrics = _reduce_reports(store, batches, [POWER_REPORT])
    assert metrics[POWER_REPORT] == pytest.approx(numerator / denominator, rel=1e-6)
    assert metrics["power turns"] == pytest.approx(denominator, rel=1e-6)
    assert metrics["turn_num"] == len(every_turn)


@pytest.mark.parametrize("kwargs, message", [
    ({"loss_normalization": "power", "loss_turn_exponent": 1.5}, "loss_turn_exponent: 1.5 is "
                                                                 "not between 0 and 1"),
    ({"loss_normalization": "power", "loss_turn_exponent": -0.1}, "not between 0 and 1"),
    ({"loss_turn_exponent": 0.5}, "only used by --loss-normalization power, not turn"),
])
def test_bad_turn_exponents_are_refused(kwargs, message):
    from mt_dialog.training.config import DataConfig

    with pytest.raises(ValueError, match=message):
        DataConfig(data_path=["unused"], **kwargs)
    assert DataConfig(data_path=["x"], loss_normalization="power").turn_exponent() == 0.5
    assert DataConfig(data_path=["x"]).turn_exponent() is None


def test_many_turns_are_each_counted_once():
    """200 turns of 25 trained tokens in one micro-batch (a 5,000-token pack of short replies):
    every turn ends once and is numbered in order. float32 rounds 1/25 down, so a running sum
    of float32 weights lost a turn after a few dozen; the count is summed in float64."""
    from mt_dialog.training.loss import position_weights
    from mt_dialog.training.turn_metrics import turn_structure

    length, turns = 25, 200
    mask = torch.ones(1, length * turns)
    ltn = torch.full((1, length * turns), float(length))
    ends = position_weights(mask, ltn)["turn_end"].view(-1)
    assert int(ends.sum()) == turns
    assert torch.nonzero(ends).view(-1).tolist() == [length * (k + 1) - 1 for k in range(turns)]
    _, turn, lengths, _ = turn_structure(mask, ltn, torch.zeros(1, length * turns))
    assert turn.tolist() == [k for k in range(turns) for _ in range(length)]
    assert lengths.tolist() == [length] * turns
    _, count, _ = dialog_loss(torch.rand(1, length * turns), mask, ltn, "turn")
    assert int(count) == turns
