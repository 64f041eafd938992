"""Bad input on the command line: one paragraph naming the problem, exit status 2, no
traceback, and nothing written. Each case runs the real command; the checks must
come before any compute, so none of these cases trains, measures or starts a trial."""

import os
import socket
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from nlbench.cli import main

TINY = dict(
    name="tiny",
    models=["transformer"],
    streams=[dict(name="markov-languages", num_tasks=2, seq_len=16,
                  options=dict(vocab_size=16, order=1, branching=2, eval_size=8))],
    seeds=[0],
    train=dict(tokens_per_task=16 * 4 * 2, batch_size=4, device="cpu", optimizer=dict(name="adamw", lr=3e-3)),
    eval=dict(max_sequences=8, batch_size=8),
)

BENCH = dict(name="b", models=["transformer"], sizes=["tiny"], seq_lens=[16], batch_size=2, device="cpu",
             warmup_steps=1, steps=1, kernel_seq_len=None)

TUNE = dict(name="t", experiment=TINY, trials=1,
            space={"train.optimizer.lr": dict(type="float", low=1e-3, high=1e-2, log=True)},
            objective=dict(metric="acc_final"))


def _write(path, cfg):
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _check_refused(tmp_path, args, *needles):
    before = _files(tmp_path)
    res = CliRunner().invoke(main, args)
    text = res.output + (res.stderr if res.stderr_bytes is not None else "")
    assert res.exit_code == 2, (res.exit_code, text, res.exception)
    assert isinstance(res.exception, SystemExit), res.exception  # not an exception escaping the command
    assert "Traceback" not in text
    assert "error:" in text
    for n in needles:
        assert n in text, (n, text)
    assert _files(tmp_path) == before, "something was written"
    return text


def _cfg(tmp_path, **changes):
    cfg = yaml.safe_load(yaml.safe_dump(TINY))
    for path, value in changes.items():
        node = cfg
        *head, last = path.split("__")
        for k in head:
            node = node[k] if not isinstance(node, list) else node[int(k)]
        node[last] = value
    return _write(tmp_path / "c.yaml", cfg)


@pytest.mark.parametrize("changes, needle", [
    ({"streams__0__options__eval_size": -3}, "eval_size"),
    ({"streams__0__options__vocab_size": 0}, "vocab_size"),
    ({"train__optimizer__weight_decay": -1}, "weight_decay"),
])
def test_option_values_refused_before_anything_runs(tmp_path, changes, needle):
    _check_refused(tmp_path, ["run", _cfg(tmp_path, **changes), "--out", str(tmp_path / "out"), "--sequential"],
                   needle)


def test_non_utf8_config(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(yaml.safe_dump(TINY).encode() + b"# caf\xe9\n")
    _check_refused(tmp_path, ["run", str(p), "--out", str(tmp_path / "out"), "--sequential"], "UTF-8")


def test_duplicate_yaml_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(TINY) + "seeds: [1]\n")
    _check_refused(tmp_path, ["run", str(p), "--out", str(tmp_path / "out"), "--sequential"], "duplicate key 'seeds'")


@pytest.mark.parametrize("command", ["run", "bench", "tune", "report"])
def test_out_under_a_file_refused_before_compute(tmp_path, command):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    out = str(blocker / "out")
    if command == "run":
        args = ["run", _cfg(tmp_path), "--out", out, "--sequential"]
    elif command == "bench":
        args = ["bench", _write(tmp_path / "b.yaml", BENCH), "--out", out]
    elif command == "tune":
        args = ["tune", _write(tmp_path / "t.yaml", TUNE), "--out", out]
    else:
        (tmp_path / "res").mkdir()
        args = ["report", str(tmp_path / "res"), "--out-dir", out]
    _check_refused(tmp_path, args, str(blocker), "is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder; the under-a-file case covers it")
def test_unwritable_out_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        _check_refused(tmp_path, ["run", _cfg(tmp_path), "--out", str(ro / "out"), "--sequential"], "cannot be written")
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("address, needle", [
    ("http://127.0.0.1:8265", "nlbench submit"),
    ("not an address", "is not an address"),
    ("127.0.0.1:notaport", "is not an address"),
    (None, "no Ray cluster answers"),
])
def test_bad_address_refused(tmp_path, address, needle):
    address = address or f"127.0.0.1:{_dead_port()}"
    for cmd, cfg in (("run", _cfg(tmp_path)), ("tune", _write(tmp_path / "t.yaml", TUNE)),
                     ("bench", _write(tmp_path / "b.yaml", BENCH))):
        text = _check_refused(tmp_path, [cmd, cfg, "--out", str(tmp_path / "out"), "--address", address], needle)
        assert repr(address) in text


@pytest.mark.parametrize("storage", ["mysql://nobody@127.0.0.1:1/none", "foo://bar"])
def test_tune_bad_storage(tmp_path, storage):
    _check_refused(tmp_path, ["tune", _write(tmp_path / "t.yaml", TUNE), "--out", str(tmp_path / "out"),
                              "--storage", storage], repr(storage))


def test_tune_study_name_with_slash(tmp_path):
    cfg = dict(TUNE, study=dict(name="a/b"))
    _check_refused(tmp_path, ["tune", _write(tmp_path / "t.yaml", cfg), "--out", str(tmp_path / "out")],
                   "'a/b'", "study.name")


@pytest.mark.parametrize("changes, needle", [
    (dict(models=[]), "models"),
    (dict(models=[dict(name="transformer", options=dict(bogus=1))]), "bogus"),
])
def test_bench_bad_models_refused_before_measuring(tmp_path, changes, needle):
    text = _check_refused(tmp_path, ["bench", _write(tmp_path / "b.yaml", dict(BENCH, **changes)),
                                     "--out", str(tmp_path / "out")], needle)
    assert "matmul peak" not in text


def test_submit_validates_config_before_uploading(tmp_path, monkeypatch):
    # no cluster at this address: the config error must come first
    monkeypatch.chdir(tmp_path)
    bad = _cfg(tmp_path, **{"streams__0__options__eval_size": -3})
    _check_refused(tmp_path, ["submit", bad, "--address", f"http://127.0.0.1:{_dead_port()}", "--working-dir",
                              str(tmp_path)], "eval_size")


@pytest.mark.ray
def test_cpus_per_run_beyond_the_machine(tmp_path, monkeypatch):
    ray_tmp = os.environ.get("RAY_TMPDIR", str(tmp_path / "ray"))
    os.makedirs(ray_tmp, exist_ok=True)
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    cfg = _cfg(tmp_path, resources=dict(cpus_per_run=64, gpus_per_run=0, max_failures=0))
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "nlbench.cli", "run", cfg, "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "no node can hold one run" in res.stderr
    assert not (out / "checkpoints").exists()
