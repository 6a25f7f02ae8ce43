"""trainer.evaluate: EleutherAI's lm-eval harness on exported model folders, offline."""

import json
import shutil

import pytest

from data import load_tokenizer
from models import Llama, save_hf
from trainer import evaluate

pytestmark = pytest.mark.slow  # every test here runs a second process or lm-eval

pytest.importorskip("lm_eval")  # the [eval] extra; make install includes it


def accuracy(model_dir, capsys) -> float:
    out = model_dir.parent / "scores.json"
    assert evaluate.main(["--model", str(model_dir), "--tasks", "sample_order",
                            "--limit", "120", "--out", str(out)]) == 0  # fmt: skip
    assert "| sample_order | acc |" in capsys.readouterr().out
    return json.loads(out.read_text())["results"]["sample_order"]["acc,none"]


def test_the_harness_scores_a_trained_model_above_a_random_one(config, tmp_path, capsys):
    import train

    cfg = config("optim=adamw", "optim.lr=3e-3", "trainer.max_steps=150", "trainer.eval_every=150")
    train.fit(cfg)
    trained = accuracy(tmp_path / "run" / "model", capsys)

    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.vocab_size, cfg.data.path)
    random_dir = tmp_path / "random" / "model"
    save_hf(Llama(cfg.model), random_dir, tokenizer.bos_id, tokenizer.eos_id)
    shutil.copy(tokenizer.model_file, random_dir / "tokenizer.model")
    untrained = accuracy(random_dir, capsys)
    # 120 four-way questions: chance is 0.25 (standard error 0.04)
    assert untrained < 0.40 and trained > untrained + 0.15, (trained, untrained)


def test_bad_model_folder_and_unknown_task_are_one_line(tmp_path, capsys):
    assert evaluate.main(["--model", str(tmp_path), "--tasks", "sample_order"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --model {tmp_path} is not an exported model (missing ")
    assert "\n" not in err
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "tokenizer.model", "model.safetensors"):
        (folder / name).write_text("")
    assert evaluate.main(["--model", str(folder), "--tasks", "no_such_task"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --tasks no_such_task: not a task of lm-eval"), err
