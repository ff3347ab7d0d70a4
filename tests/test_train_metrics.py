"""MetricsLogger JSONL/progress/wandb behaviour and one-step-delayed metric fetching."""
import json
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

from parcae.train import metrics as metrics_lib


def _strict_rows(path):
    def no_constants(name):  # json.loads would otherwise accept the non-standard NaN/Infinity tokens
        raise ValueError(f"non-standard JSON constant {name}")
    return [json.loads(line, parse_constant=no_constants) for line in path.read_text().splitlines()]


def test_rows_hold_step_loss_tokens(tmp_path):
    log = metrics_lib.MetricsLogger(tmp_path, total_steps=10, progress=False)
    log.log(1, {"loss": 3.5, "tokens_per_s": 1000.0, "mfu": 0.25})
    log.log(2, {"loss": np.float32(3.25), "tokens_per_s": jnp.asarray(2000.0), "n_loops": np.int64(4)})
    log.close()
    rows = _strict_rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == 3.5 and rows[0]["tokens_per_s"] == 1000.0 and rows[0]["mfu"] == 0.25
    assert rows[1]["loss"] == 3.25 and rows[1]["tokens_per_s"] == 2000.0
    assert rows[1]["n_loops"] == 4 and isinstance(rows[1]["n_loops"], int)
    assert all("time" in r for r in rows)


def test_file_is_appended_on_resume(tmp_path):
    log = metrics_lib.MetricsLogger(tmp_path, total_steps=10, progress=False)
    log.log(1, {"loss": 1.0})
    log.close()
    log = metrics_lib.MetricsLogger(tmp_path, total_steps=10, start_step=1, progress=False)
    log.log(2, {"loss": 0.5})
    log.close()
    assert [r["step"] for r in _strict_rows(tmp_path / "metrics.jsonl")] == [1, 2]


def test_rows_are_flushed_after_each_call(tmp_path):
    log = metrics_lib.MetricsLogger(tmp_path, total_steps=10, progress=False)
    log.log(1, {"loss": 1.0})
    assert _strict_rows(tmp_path / "metrics.jsonl")[0]["loss"] == 1.0  # readable before close
    log.close()


def test_eval_rows(tmp_path):
    log = metrics_lib.MetricsLogger(tmp_path, total_steps=10, progress=False)
    log.log_eval(5, [{"loops": 1, "val_loss": 4.0, "bpb": 1.5}, {"loops": 8, "val_loss": 3.0, "bpb": 1.1}])
    log.close()
    rows = _strict_rows(tmp_path / "metrics.jsonl")
    assert [(r["kind"], r["step"], r["loops"], r["val_loss"]) for r in rows] == [("eval", 5, 1, 4.0),
                                                                                ("eval", 5, 8, 3.0)]
    assert rows[1]["bpb"] == 1.1


def test_nonfinite_values_are_null_and_listed(tmp_path):
    log = metrics_lib.MetricsLogger(tmp_path, total_steps=10, progress=False)
    log.log(3, {"loss": float("nan"), "grad_norm": np.float32(np.inf), "lr": 1e-3})
    log.log_eval(3, [{"loops": 2, "val_loss": float("-inf")}])
    log.close()
    train, ev = _strict_rows(tmp_path / "metrics.jsonl")
    assert train["loss"] is None and train["grad_norm"] is None and train["lr"] == 1e-3
    assert sorted(train["nonfinite"]) == ["grad_norm", "loss"]
    assert ev["val_loss"] is None and ev["nonfinite"] == ["val_loss"]


def test_non_main_process_writes_nothing(tmp_path):
    log = metrics_lib.MetricsLogger(tmp_path / "w", total_steps=10, is_main=False, progress=False)
    log.log(1, {"loss": 1.0})
    log.log_eval(1, [{"loops": 1, "val_loss": 1.0}])
    log.close()
    assert not (tmp_path / "w" / "metrics.jsonl").exists()


def test_compact_line_every_n_steps_without_tty(tmp_path, capsys):
    log = metrics_lib.MetricsLogger(tmp_path, total_steps=100, progress=True, print_every=5)  # stderr not a TTY
    for step in range(1, 11):
        log.log(step, {"loss": 2.0, "tokens_per_s": 1234.0, "mfu": 0.5})
    log.close()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("step")]
    assert [ln.split()[1] for ln in lines] == ["5/100", "10/100"]
    assert "loss 2.0000" in lines[0] and "tok/s 1,234" in lines[0] and "MFU 50.0%" in lines[0]
    assert "ETA" in lines[0]


def test_bar_shows_a_nan_loss_but_not_an_unmeasured_rate(tmp_path, capsys):
    log = metrics_lib.MetricsLogger(tmp_path, total_steps=2, progress=True, print_every=1)
    log.log(1, {"loss": float("nan"), "tokens_per_s": 10.0})
    log.log(2, {"loss": 2.0, "tokens_per_s": float("nan")})  # the final step: its rate is not measured
    log.close()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("step")]
    assert "loss nan" in lines[0] and "tok/s 10" in lines[0]
    assert "loss 2.0000" in lines[1] and "tok/s" not in lines[1]


def test_wandb_disabled_by_env(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importing it would fail: it must not be imported
    log = metrics_lib.MetricsLogger(tmp_path, total_steps=3, progress=False,
                                    wandb_cfg=metrics_lib.default_wandb_config())
    log.log(1, {"loss": 1.0})
    log.close()
    assert log._wandb is None and not log._wandb_failed


def _fake_wandb(fail_init=False, fail_log=False):
    calls = []

    class Run:
        def log(self, row, step):
            if fail_log:
                raise RuntimeError("disk full")
            calls.append((step, row))

        def finish(self):
            calls.append("finish")

    def init(**kw):
        if fail_init:
            raise RuntimeError("no network")
        calls.append(("init", kw))
        return Run()

    return types.SimpleNamespace(init=init), calls


def test_wandb_receives_rows_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    fake, calls = _fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = metrics_lib.MetricsLogger(tmp_path, total_steps=3, progress=False,
                                    wandb_cfg=metrics_lib.default_wandb_config(), run_config={"lr": 1})
    log.log(1, {"loss": 1.0})
    log.log_eval(1, [{"loops": 4, "val_loss": 2.0}])
    log.close()
    assert calls[0][1]["mode"] == "offline" and calls[0][1]["config"] == {"lr": 1}
    assert calls[1] == (1, {"loss": 1.0})
    assert calls[2] == (1, {"eval/loops4/val_loss": 2.0})
    assert calls[-1] == "finish"


@pytest.mark.parametrize("fail_init,fail_log", [(True, False), (False, True)])
def test_wandb_failure_warns_once_and_training_goes_on(tmp_path, monkeypatch, fail_init, fail_log):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    fake, _ = _fake_wandb(fail_init, fail_log)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with pytest.warns(UserWarning, match="wandb failed") as record:
        log = metrics_lib.MetricsLogger(tmp_path, total_steps=3, progress=False,
                                        wandb_cfg=metrics_lib.default_wandb_config())
        for step in range(1, 4):
            log.log(step, {"loss": 1.0})
        log.close()
    assert len([w for w in record if "wandb failed" in str(w.message)]) == 1
    assert len(_strict_rows(tmp_path / "metrics.jsonl")) == 3


def test_deferred_metrics_fetch_one_step_late(monkeypatch):
    fetched = []
    real_get = metrics_lib.jax.device_get

    def spy(tree):
        fetched.append(tree)
        return real_get(tree)

    monkeypatch.setattr(metrics_lib.jax, "device_get", spy)
    d = metrics_lib.DeferredMetrics()
    m1, m2, m3 = ({"loss": jnp.asarray(float(i))} for i in (1, 2, 3))
    assert d.push(1, m1) is None and fetched == []
    assert d.push(2, m2) == (1, {"loss": 1.0})
    assert fetched == [m1]  # step 2's arrays were not touched
    assert d.push(3, m3) == (2, {"loss": 2.0})
    assert d.flush() == (3, {"loss": 3.0})
    assert d.flush() is None
    assert d.push(4, {"x": jnp.asarray(2, jnp.int32)}) is None  # nothing pending after a flush
    step, host = d.flush()
    assert step == 4 and host == {"x": 2} and isinstance(host["x"], int)
