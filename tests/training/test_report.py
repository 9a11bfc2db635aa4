"""lorakit.training.report: metrics.jsonl as steps come, loss.png, report.md; nothing from non-zero ranks."""

import json
from types import SimpleNamespace

from lorakit.training.report import RunLog, plot_losses


class Bar:
    def __init__(self):
        self.n, self.lines = 0, []

    def update(self, k):
        self.n += k

    def set_postfix(self, **kw):
        self.postfix = kw

    def write(self, line):
        self.lines.append(line)


def rec(step, loss):
    return {"step": step, "loss": loss, "lr": 1e-3, "tokens_per_s": 100.0}


def test_steps_are_logged_every_n_plus_the_first_and_last(tmp_path):
    log, bar = RunLog(tmp_path), Bar()
    for s in range(1, 8):
        log.step(rec(s, 1.0 / s), bar, every=3, last=s == 7)
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 3, 6, 7] and bar.n == 7
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])["loss"] == round(1 / 3, 6)


def test_eval_lines_are_logged_and_printed(tmp_path):
    log, bar = RunLog(tmp_path), Bar()
    log.eval(5, {"eval_loss": 0.25}, bar)
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 5, "eval_loss": 0.25}
    assert bar.lines == ["step 5: eval_loss=0.2500"]


def test_a_resumed_run_keeps_only_history_up_to_its_checkpoint(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("old junk\n")
    RunLog(tmp_path, history=[{"step": 1, "loss": 2.0}], resumed=True)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'


def test_write_false_writes_and_prints_nothing(tmp_path, capsys):
    log, bar = RunLog(tmp_path, write=False), Bar()
    log.step(rec(1, 1.0), bar, every=1, last=True)
    log.eval(1, {"eval_loss": 1.0}, None)
    log.write_run_yaml(None, None)
    assert list(tmp_path.iterdir()) == [] and capsys.readouterr().out == ""


def test_loss_plot_is_a_png(tmp_path):
    plot_losses([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}, {"step": 2, "eval_loss": 1.5}],
                tmp_path / "loss.png")
    data = (tmp_path / "loss.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]            # no temp file left


def test_report_md_has_the_run_numbers(tmp_path):
    log = RunLog(tmp_path, history=[{"step": 1, "loss": 2.0}])
    trainer = SimpleNamespace(
        cfg=SimpleNamespace(model="tiny", train_type="lora"), task="causal_lm", step=4, last_loss=0.5,
        train_data=SimpleNamespace(summary=lambda: "12 rows"),
        model=__import__("torch").nn.Linear(3, 2))
    log.finish(trainer, {"eval_loss": 0.75})
    report = (tmp_path / "report.md").read_text()
    assert "- data: 12 rows" in report and "steps: 4, final train loss 0.5000" in report
    assert "trainable params: 8 of 8 (100.0000%)" in report and "| eval_loss | 0.7500 |" in report
    assert (tmp_path / "loss.png").is_file()
