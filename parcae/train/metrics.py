"""Training telemetry: <workdir>/metrics.jsonl, a progress bar, optional wandb, one-step-delayed fetching.

JSONL rows: one JSON object per `log` call, `{"step": int, "time": unix seconds, <metric>: number, ...}`;
eval rows add `"kind": "eval"` and one row per loop count. Non-finite numbers (NaN, +-inf) are written as
`null` (valid JSON; pandas reads null as NaN) and their keys are listed in the row's `"nonfinite"` field,
so a diverged run stays parseable and the divergence stays visible.
"""
import json
import math
import os
import sys
import time
import warnings

import jax
import ml_collections
import numpy as np

BAR_KEYS = (("loss", "loss {:.4f}"), ("tokens_per_s", "tok/s {:,.0f}"), ("mfu", "MFU {:.1%}"))


def default_wandb_config():
    cfg = ml_collections.ConfigDict()
    cfg.enabled = True  # log to wandb on process 0 (WANDB_MODE=disabled in the environment still wins)
    cfg.mode = "offline"  # "offline" (sync later with `wandb sync`), "online" or "disabled"
    cfg.project = "parcae"  # wandb project
    cfg.entity = ""  # wandb entity (team/user); "" = your default
    cfg.name = ""  # run name; "" = the workdir's basename
    return cfg


def _to_python(v):
    """Python scalar for a metric value (numpy/jax scalars, 0-d arrays, bools)."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v)
    if hasattr(v, "shape") and np.ndim(v) == 0:
        return _to_python(np.asarray(v).item())
    return v


def json_row(row):
    """One JSON line; non-finite floats become null and are listed under "nonfinite"."""
    out, bad = {}, []
    for k, v in row.items():
        v = _to_python(v)
        if isinstance(v, float) and not math.isfinite(v):
            bad.append(k)
            v = None
        out[k] = v
    if bad:
        out["nonfinite"] = bad
    return json.dumps(out, allow_nan=False)


def _fmt_num(v):
    v = _to_python(v)
    return f"{v:.4f}" if isinstance(v, (int, float)) else str(v)


def _fmt_eta(seconds):
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


class MetricsLogger:
    """Writes metrics.jsonl on the main process, shows progress, and mirrors rows to wandb."""

    def __init__(self, workdir, *, total_steps, start_step=0, is_main=True, wandb_cfg=None, run_config=None,
                 progress=True, print_every=10):
        self.is_main, self.total_steps, self.print_every = is_main, total_steps, print_every
        self._start_step, self._start_time = start_step, time.time()
        self._file = self._bar = self._wandb = None
        self._wandb_failed = False
        if not is_main:
            return
        os.makedirs(workdir, exist_ok=True)
        self._file = open(os.path.join(workdir, "metrics.jsonl"), "a")
        if progress and sys.stderr.isatty():
            import tqdm
            self._bar = tqdm.tqdm(total=total_steps, initial=start_step, file=sys.stderr, dynamic_ncols=True,
                                  unit="step")
        self._wandb = self._init_wandb(workdir, wandb_cfg, run_config)

    def _init_wandb(self, workdir, cfg, run_config):
        if cfg is None or not cfg.enabled or cfg.mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
            return None
        try:
            import wandb
            config = run_config.to_dict() if hasattr(run_config, "to_dict") else run_config
            return wandb.init(project=cfg.project, entity=cfg.entity or None,
                              name=cfg.name or os.path.basename(os.path.abspath(workdir)), mode=cfg.mode,
                              dir=workdir, config=config, resume="allow")
        except Exception as e:  # noqa: BLE001 - wandb must never stop training
            self._warn_wandb(e)
            return None

    def _warn_wandb(self, err):
        if not self._wandb_failed:
            warnings.warn(f"wandb failed ({type(err).__name__}: {err}); training goes on, metrics.jsonl still "
                          "has everything. Set wandb.enabled=False to silence this.", stacklevel=3)
        self._wandb_failed = True

    def _send_wandb(self, step, row):
        if self._wandb is None or self._wandb_failed:
            return
        try:
            self._wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)
        except Exception as e:  # noqa: BLE001
            self._warn_wandb(e)

    def _write(self, row):
        self._file.write(json_row(row) + "\n")
        self._file.flush()

    def _progress_text(self, step, metrics):
        # a non-finite loss is shown; an unmeasured (NaN) rate is not
        parts = [fmt.format(metrics[k]) for k, fmt in BAR_KEYS if isinstance(metrics.get(k), (int, float))
                 and (k == "loss" or math.isfinite(metrics[k]))]
        done = step - self._start_step
        if done > 0 and self.total_steps:
            rate = done / (time.time() - self._start_time)
            parts.append(f"ETA {_fmt_eta((self.total_steps - step) / rate)}")
        return " | ".join(parts)

    def log(self, step, metrics: dict):
        if not self.is_main:
            return
        metrics = {k: _to_python(v) for k, v in metrics.items()}
        self._write({"step": int(step), "time": time.time(), **metrics})
        self._send_wandb(int(step), metrics)
        text = self._progress_text(step, metrics)
        if self._bar is not None:
            self._bar.n = int(step)
            self._bar.set_postfix_str(text, refresh=True)
        elif self.print_every and step % self.print_every == 0:
            print(f"step {step}/{self.total_steps} | {text}", file=sys.stderr, flush=True)

    def log_eval(self, step, rows: list[dict]):
        if not self.is_main:
            return
        for row in rows:
            self._write({"step": int(step), "time": time.time(), "kind": "eval", **row})
            loops = row.get("loops")
            self._send_wandb(int(step), {f"eval/loops{loops}/{k}": _to_python(v) for k, v in row.items()
                                         if k != "loops"})
        text = ", ".join(f"T={r.get('loops')}: {_fmt_num(r.get('val_loss'))}" for r in rows)
        print(f"eval step {step} | val_loss {text}", file=sys.stderr, flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception as e:  # noqa: BLE001
                self._warn_wandb(e)
            self._wandb = None


class DeferredMetrics:
    """Holds step t's device metrics and fetches them only after step t+1 was dispatched, so the host never
    waits on the step in flight:
        out = deferred.push(step, metrics_on_device)   # call right after dispatching `step`
        if out: logger.log(*out)
    """

    def __init__(self):
        self._pending = None

    def push(self, step, device_metrics):
        prev, self._pending = self._pending, (step, device_metrics)
        return self._fetch(prev)

    def flush(self):
        prev, self._pending = self._pending, None
        return self._fetch(prev)

    @staticmethod
    def _fetch(item):
        if item is None:
            return None
        step, device_metrics = item
        host = jax.device_get(device_metrics)
        return step, {k: _to_python(v) for k, v in host.items()}
