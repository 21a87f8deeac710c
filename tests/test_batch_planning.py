"""plan_batches: batch sizes and gradient checkpointing chosen from what a step costs in GPU memory.

On a GPU, memory_cost measures each step's cost on the real model (batches of 1 and 2 texts at --max-length). No
GPU here: these tests hand plan_batches the costs such a measurement returns and check what it makes of them."""
import json

import pytest

import peft_qlora
from conftest import classes, cpu_runtime, run_main, train_args


def gib(n):
    return int(n * 2**30)


def costs(table):
    """A measure() answering from a table {(training, checkpointing): (bytes, bytes per text) or None}, and the
    list of what was asked."""
    asked = []

    def measure(training, checkpointing):
        asked.append((training, checkpointing))
        return table[training, checkpointing]

    return measure, asked


def plan(*flags, budget, measure):
    return peft_qlora.plan_batches(peft_qlora.parse_args(list(flags)), budget, measure)


def never(*_):
    raise AssertionError("nothing should be measured")


def test_a_model_that_fits_trains_as_asked():
    """bert-base on a T4: the whole batch of 32 fits, without gradient checkpointing."""
    measure, asked = costs({(True, False): (gib(0.3), gib(0.14)), (False, False): (gib(0.1), gib(0.01))})
    assert plan(budget=gib(10), measure=measure) == (32, 1, 256, False)
    assert asked == [(True, False), (False, False)]


def test_a_large_model_on_a_small_gpu_gets_checkpointing_micro_batches_and_a_smaller_evaluation_batch():
    """An 8B decoder on a T4: 2 texts would fit without checkpointing, 18 with it; 16 divides 32."""
    measure, asked = costs({(True, False): (gib(1), gib(2.8)), (True, True): (gib(1), gib(0.35)),
                            (False, False): (gib(1), gib(0.1))})
    result = plan(budget=gib(7.5), measure=measure)
    assert result == peft_qlora.BatchPlan(micro_batch=16, accumulation=2, eval_batch=65, gradient_checkpointing=True)
    assert result.micro_batch * result.accumulation == 32, "an optimizer step still sees --batch-size texts"
    assert asked == [(True, False), (True, True), (False, False)]


def test_enough_texts_without_checkpointing_keep_it_off():
    measure, _ = costs({(True, False): (gib(1), gib(1)), (False, False): (0, 1)})
    assert plan(budget=gib(6.5), measure=measure) == (4, 8, 256, False)  # 5 fit; 4 divides 32


def test_checkpointing_off_is_kept_even_where_it_would_help():
    measure, asked = costs({(True, False): (gib(1), gib(2.8)), (False, False): (0, 1)})
    assert plan("--gradient-checkpointing", "off", budget=gib(7.5), measure=measure) == (2, 16, 256, False)
    assert (True, True) not in asked


def test_what_the_user_sets_is_not_measured():
    assert plan("--micro-batch-size", "8", "--eval-batch-size", "64", "--gradient-checkpointing", "on",
                budget=gib(1), measure=never) == (8, 4, 64, True)
    assert plan("--gradient-checkpointing", budget=None, measure=never).gradient_checkpointing is True


def test_a_user_micro_batch_still_gets_checkpointing_when_it_needs_it():
    measure, asked = costs({(True, False): (gib(1), gib(2.8)), (True, True): (gib(1), gib(0.35))})
    assert plan("--micro-batch-size", "8", "--eval-batch-size", "64", budget=gib(7.5),
                measure=measure) == (8, 4, 64, True)
    assert asked == [(True, False), (True, True)]


def test_on_the_cpu_nothing_is_measured_and_the_defaults_hold():
    assert plan(budget=None, measure=never) == (32, 1, 256, False)
    assert plan("--batch-size", "16", "--micro-batch-size", "4", budget=None, measure=never) == (4, 4, 256, False)


@pytest.mark.parametrize("table, words", [
    ({(True, False): None, (True, True): None}, "for training"),
    ({(True, False): (gib(1), gib(0.5)), (False, False): None}, "for evaluation"),
])
def test_a_text_that_cannot_fit_says_what_to_change(table, words):
    measure, _ = costs(table)
    with pytest.raises(peft_qlora.UserError,
                       match=f"does not fit the GPU's memory {words}: use a shorter --max-length"):
        plan(budget=gib(4), measure=measure)


def test_the_micro_batch_must_add_up_to_the_batch():
    with pytest.raises(SystemExit):
        peft_qlora.parse_args(["--batch-size", "32", "--micro-batch-size", "5"])


def test_choose_batches_on_the_cpu_logs_the_plan(tiny_bert, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="peft_qlora")
    cfg = peft_qlora.parse_args(["--model", tiny_bert, "--batch-size", "8", "--micro-batch-size", "4"])
    assert peft_qlora.choose_batches(cfg, None, cpu_runtime(), classes()) == (4, 2, 256, False)
    assert "Batches: 8 texts per optimizer step as 2 micro-batches of 4; evaluation in batches of 256" in caplog.text
    cfg = peft_qlora.parse_args(["--model", tiny_bert, "--batch-size", "8", "--batching", "tokens"])
    peft_qlora.choose_batches(cfg, None, cpu_runtime(), classes())
    assert ("Batches: 8 texts x 512 tokens per optimizer step as 1 micro-batch of 8 x 512 tokens (more texts where "
            "they are shorter); evaluation in batches of 256") in caplog.text


@pytest.mark.parametrize("batching, steps", [("tokens", 2 * 1), ("texts", 2 * 64 // 8)])
def test_short_texts_fill_a_step_by_tokens_not_by_count(batching, steps, tiny_bert, tmp_path, capsys, caplog):
    """64 texts of a few tokens, 8 texts of --max-length 64 a step: by tokens (512) all 64 fit one step; by count,
    8 steps an epoch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "short.parquet")
    pq.write_table(pa.table({"text": [f"{'good' if i % 2 else 'bad'} {i}" for i in range(64)],
                             "label": [i % 2 for i in range(64)]}), path)
    out = tmp_path / batching
    status, said = run_main(train_args(tiny_bert, {"train": path, "test": path}, out, "--batching", batching),
                            capsys, caplog)
    assert status == 0, said[-3000:]
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    assert metrics["training"]["optimizer_steps"] == steps and metrics["config"]["batching"] == batching
    assert metrics["training"]["train_texts_per_s"] > 0
