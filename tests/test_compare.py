"""bench.compare: one PNG and one table from runs' metrics."""

import json

import pytest

from trainer import compare


@pytest.mark.slow
def test_two_runs_give_a_table_and_a_png_and_a_bad_folder_one_line(config, tmp_path, capsys):
    import train

    folders = []
    for optim in ("adamw", "lorenza"):
        cfg = config(f"optim={optim}", "trainer.max_steps=2", "trainer.eval_every=2",
                     "trainer.save_model=false")  # fmt: skip
        cfg.trainer.run_dir = str(tmp_path / optim)
        train.fit(cfg)
        folders.append(tmp_path / optim)
    out = tmp_path / "cmp"
    assert compare.main([*map(str, folders), "--out", str(out)]) == 0
    text = (tmp_path / "cmp.md").read_text()
    assert (tmp_path / "cmp.png").stat().st_size > 10_000
    rows = [json.loads(x) for x in (folders[1] / "metrics.jsonl").read_text().splitlines()]
    last = [r["val_ppl"] for r in rows if "val_ppl" in r][-1]
    line = next(x for x in text.splitlines() if x.startswith("| lorenza |"))
    assert "| lorenza | llama_tiny | 2 |" in line and f"| {last:.2f} |" in line
    assert "| adamw | adamw | llama_tiny | 2 |" in text
    (tmp_path / "empty").mkdir()
    assert compare.main([str(folders[0]), str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{tmp_path / 'empty'} is not a run with metrics: no logged step in "
                   f"{tmp_path / 'empty' / 'metrics.jsonl'}"]  # fmt: skip
