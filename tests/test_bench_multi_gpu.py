"""bench/multi_gpu.py: the checkpoint-portability variant end to end on 2 fake CPU devices (~20 s), and the
parent's bookkeeping (names, scheduling, efficiency) without running anything."""
import argparse
import importlib.util
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "multi_gpu.py")


def _module():
    spec = importlib.util.spec_from_file_location("multi_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_names_schedule_and_efficiency():
    mg = _module()
    names = mg.variant_names(2)
    assert names == ["parcae_medium_1gpu", "parcae_medium_dp2", "parcae_medium_fsdp2", "parcae_large_1gpu",
                     "parcae_large_dp2", "parcae_large_fsdp2", "ckpt_portability"]
    assert mg.parse_variant("parcae_large_fsdp2") == ("large", "fsdp")
    batches = mg.schedule(names, argparse.Namespace(serial=False), ["4", "5"])
    assert batches[0] == [("parcae_medium_1gpu", "4"), ("parcae_large_1gpu", "5")]  # baselines side by side
    assert all(len(b) == 1 and b[0][1] is None for b in batches[1:])  # N-device variants alone, all devices
    assert [b[0][0] for b in batches[1:3]] == ["ckpt_portability", "parcae_medium_dp2"]
    serial = mg.schedule(names, argparse.Namespace(serial=True), ["4", "5"])
    assert serial[:2] == [[("parcae_medium_1gpu", "4")], [("parcae_large_1gpu", "4")]]
    res = mg.add_efficiency([{"model": "m", "layout": "1gpu", "n_devices": 1, "tokens_per_s": 100.0},
                             {"model": "m", "layout": "dp", "n_devices": 2, "tokens_per_s": 180.0}])
    assert res[1]["efficiency"] == 0.9


def test_checkpoint_portability_smoke(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--only", "ckpt"], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.load(open(tmp_path / "multi_gpu.json"))
    assert out["meta"]["n_devices"] == 2
    (r,) = out["results"]
    assert "error" not in r, r["error"]
    assert [x["layout"] for x in r["layouts"]] == ["fsdp2", "1gpu", "dp2"]
    assert all(x["param_max_abs_diff"] == 0.0 and x["step"] == 3 for x in r["layouts"])
    assert r["max_rel_loss_diff"] < 1e-5
    assert "ckpt_portability" in proc.stdout and "loss per layout" in proc.stdout
