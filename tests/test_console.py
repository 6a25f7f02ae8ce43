"""What a run prints on stderr: a banner before the first evaluation, then one line per
logged step and per evaluation when stderr is not a terminal (a bar when it is), nothing
with ``trainer.progress=false``; a large model on a CPU is warned about."""

import io
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train
from models import Llama
from models.presets import model_config
from trainer.console import Console, resolve_format


def test_a_run_not_on_a_terminal_prints_a_line_per_logged_step_and_evaluation(config, capfd):
    cfg = config(
        "trainer.progress=true",
        "trainer.max_steps=4",
        "trainer.log_every=2",
        "trainer.eval_every=2",
        "trainer.save_model=false",
    )
    train.fit(cfg)
    err = capfd.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err  # no bar
    assert (
        lines[0].startswith("llama_tiny (")
        and "parameters) on cpu x 1, fp32, optim=adamw" in lines[0]
    )
    assert f"run folder {cfg.trainer.run_dir}" in lines[0]
    assert lines[1] == "evaluating step 0 on 512 validation tokens..."
    steps = [x for x in lines if " | loss " in x]
    assert [x.split(" | ")[0] for x in steps] == ["step 2/4", "step 4/4"]
    assert all("tok/s" in x and "elapsed, eta" in x and "mem " in x for x in steps)
    evals = [x.split(" | ")[0] for x in lines if " | val_loss " in x]
    assert evals == ["step 0/4", "step 2/4", "step 4/4"]


def test_progress_false_prints_nothing_and_plot_false_draws_nothing(config, capfd):
    cfg = config("trainer.progress=false", "trainer.max_steps=2", "trainer.save_model=false")
    train.fit(cfg)
    assert capfd.readouterr().err == ""
    assert cfg.trainer.plot is False  # the tests' small runs
    assert not list(Path(cfg.trainer.run_dir).glob("*.png"))


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_is_a_bar_on_a_terminal_and_lines_elsewhere():
    assert resolve_format("auto", Terminal()) == "bar"
    assert resolve_format("auto", io.StringIO()) == "lines"
    assert resolve_format("lines", Terminal()) == "lines"
    out = Terminal()
    console = Console(True, "auto", 0, 3, "x", stream=out)
    console.say("banner")
    console.step(1, {})
    console.step(2, {"loss": 1.5, "lr": 1e-3, "tokens_per_s": 10.0})
    console.close()
    assert (
        "banner\n" in out.getvalue() and "2/3" in out.getvalue() and "loss=1.500" in out.getvalue()
    )


@pytest.mark.parametrize("name, warned", [("llama_350m", True), ("llama_60m", False)])
def test_a_large_model_on_a_cpu_is_warned_about_with_its_step_time(name, warned):
    with torch.device("meta"):
        model = Llama(model_config(name, vocab_size=32000))
    run = SimpleNamespace(
        cfg=SimpleNamespace(
            model=SimpleNamespace(name=name),
            optim=SimpleNamespace(name="lorenza", lr=0.01),
            trainer=SimpleNamespace(precision="fp32", max_steps=10),
            data=SimpleNamespace(seq_len=256),
        ),
        model=model,
        device=torch.device("cpu"),
        ranks=SimpleNamespace(world=1),
        run_dir=Path("runs/x"),
        step=0,
        val_set=[],
    )
    lines = train.banner(run, 256 * 128, evaluate_first=False)
    warning = [x for x in lines if x.startswith("warning:")]
    assert bool(warning) == warned
    if warned:
        assert "M-parameter model on a CPU: at least" in warning[0] and "per step" in warning[0]


def test_an_unknown_log_format_is_refused(config):
    with pytest.raises(ValueError, match="trainer.log_format='csv' is not one of auto, bar, lines"):
        train.check_config(config("trainer.log_format=csv"))
