"""The console scripts and shell scripts: cheap checks before any weight is read, refusals of
options without effect, defaults in --help, every batch row printed, no GPU claims without a
GPU, the install stamp of scripts/bootstrap.sh and the GPU check of scripts/gpu_test.sh."""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys

import jax
import pytest
from flax import nnx

from samoyeds_jax import checkpoints, converted_io, hf_import
from samoyeds_jax import model as model_lib
from samoyeds_jax.cli import compress_main, generate_main, given_options, train_main
from samoyeds_jax.generate_cli import main as generate

ROOT = pathlib.Path(__file__).parents[1]
FIXTURE = str(ROOT / "tests" / "fixtures" / "olmoe")  # a Hugging Face checkpoint, no tokenizer
ON_GPU = jax.default_backend() == "gpu"


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to read or build weights fails the test."""

    def fail(*args, **kwargs):
        raise AssertionError("weights were read before the cheap checks refused the command")

    for module, name in ((hf_import, "load_hf_checkpoint"), (checkpoints, "load_model"),
                         (checkpoints, "load_or_convert"), (converted_io, "load_converted")):
        monkeypatch.setattr(module, name, fail)
    monkeypatch.setattr(model_lib.MoETransformer, "__init__", fail)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
    """A converted tiny model (dense experts, pregate standard, float32)."""
    path = str(tmp_path_factory.mktemp("converted"))
    converted_io.save_converted(model_lib.MoETransformer(model_lib.ModelConfig.tiny(),
                                                        rngs=nnx.Rngs(0)), path)
    return path


# ----------------------------------------------------------------------------- shared helpers


def test_given_options_tells_given_from_default():
    p = argparse.ArgumentParser()
    p.add_argument("--a", type=int, default=1)
    p.add_argument("--b", default="x")
    p.add_argument("--flag", action="store_true")
    argv = ["--a", "1", "--flag"]
    assert given_options(p, p.parse_args(argv), argv) == {"a", "flag"}
    assert given_options(p, p.parse_args([]), []) == set()


@pytest.mark.parametrize("module", ["generate_cli", "eval_cli", "train_cli", "compress_cli"])
def test_help_shows_every_default(module):
    import importlib

    parser = importlib.import_module(f"samoyeds_jax.{module}").build_parser()
    text = " ".join(parser.format_help().split())
    shown = 0
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.required:
            continue
        if action.default is not None and action.default is not False:
            assert f"(default: {action.default})" in text, action.option_strings
            shown += 1
    assert shown >= 3
    assert "(default: None)" not in text and "(default: False)" not in text


# ----------------------------------------------------------------------------- samoyeds-generate


@pytest.mark.parametrize("argv, message", [
    (["--random-tiny", "--prompt", "hello world"], "must be token ids"),
    (["--checkpoint", FIXTURE, "--prompt", "hello world"], "without a tokenizer.json"),
    (["--random-tiny", "--prompt", "1,512"], r"must be in \[0, 512\), got \[512\]"),
    (["--checkpoint", "/no/such/dir"], "found no such directory"),
    (["--converted", "/tmp/x"], "--converted needs --checkpoint"),
    (["--random-tiny", "--checkpoint", FIXTURE], "--random-tiny builds its own model"),
    (["--random-tiny", "--slots", "4"], "--slots has no effect here: .*--offload"),
    (["--random-tiny", "--offload-policy", "on_demand"], "--offload-policy has no effect"),
    (["--random-tiny", "--no-eos", "--eos-id", "2"], "--eos-id has no effect here: --no-eos"),
    (["--random-tiny", "--top-k", "5"], "--top-k has no effect here: --temperature 0"),
    (["--random-tiny", "--top-p", "0.9"], "--top-p has no effect"),
    (["--seed", "1"], "--seed has no effect here: nothing is random"),
    (["--random-tiny", "--pregate", "speculative"],
     "--pregate speculative has no effect here: .*computes exactly as a standard one"),
    (["--random-tiny", "--offload", "--pregate", "speculative", "--offload-policy", "on_demand"],
     "--pregate speculative has no effect here: --offload-policy on_demand"),
    (["--random-tiny", "--offload", "--offload-policy", "pregated"],
     "--offload-policy pregated needs a pregate='pregated' model, got pregate='standard'"),
    (["--random-tiny", "--offload", "--offload-policy", "gpu_only", "--slots", "2"],
     "--slots 2: .*needs slots >= 8"),
    (["--random-tiny", "--slots", "0", "--offload"], "--slots must be >= 1, got 0"),
    (["--random-tiny", "--devices", "0"], "--devices must be >= 1, got 0"),
    (["--random-tiny", "--devices", "3"], "--devices must divide 4"),
    (["--random-tiny", "--devices", "2", "--offload"], "cannot be combined"),
    (["--random-tiny", "--implementation", "mosaic_expand"],
     "--implementation mosaic_expand needs 2:4 or Samoyeds experts"),
    (["--random-tiny", "--implementation", "mosaic_sparse_mma", "--format", "nm", "--offload"],
     "--implementation mosaic_sparse_mma cannot be combined with --offload"),
])
def test_generate_refuses_before_reading_weights(no_weights, argv, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        generate([*argv, "--max-new-tokens", "1"])


def test_generate_devices_beyond_the_machine_explain_fake_devices(no_weights, capsys):
    n = 8  # the shipped model's expert count: --devices 8 divides it
    if len(jax.devices()) >= n:
        pytest.skip(f"{len(jax.devices())} devices present: --devices {n} is not too many")
    assert generate_main(["--devices", str(n), "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert f"expected at most {len(jax.devices())}" in err
    if jax.default_backend() == "cpu":
        assert f"XLA_FLAGS=--xla_force_host_platform_device_count={n}" in err


def test_generate_converted_model_settings_are_checked_before_loading(no_weights, converted,
                                                                        tmp_path):
    with pytest.raises(ValueError, match="stores 'dense' experts; requested --format 'nm'"):
        generate(["--checkpoint", converted, "--format", "nm", "--max-new-tokens", "1"])
    with pytest.raises(ValueError, match="stores float32 weights; requested --dtype bfloat16"):
        generate(["--checkpoint", converted, "--dtype", "bfloat16", "--max-new-tokens", "1"])
    with pytest.raises(ValueError, match="stores a pregate='standard' model; requested "
                                         "--pregate 'pregated'"):
        generate(["--checkpoint", converted, "--pregate", "pregated", "--max-new-tokens", "1"])
    with pytest.raises(ValueError, match="is already a converted model; drop --converted"):
        generate(["--checkpoint", converted, "--converted", str(tmp_path / "c"),
                  "--max-new-tokens", "1"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="exists but holds no converted model"):
        generate(["--checkpoint", FIXTURE, "--converted", str(tmp_path / "full"),
                  "--max-new-tokens", "1"])
    with pytest.raises(ValueError, match="stored with pregate='standard'"):
        generate(["--checkpoint", FIXTURE, "--converted", str(tmp_path / "new"),
                  "--pregate", "pregated", "--max-new-tokens", "1"])
    assert not (tmp_path / "new").exists()


def test_generate_missing_shard_is_found_before_loading(no_weights, tmp_path):
    (tmp_path / "config.json").write_text((pathlib.Path(FIXTURE) / "config.json").read_text())
    with pytest.raises(FileNotFoundError):
        generate(["--checkpoint", str(tmp_path), "--max-new-tokens", "1"])


def test_generate_prints_every_batch_row(capsys):
    assert generate(["--random-tiny", "--batch", "6", "--max-new-tokens", "1", "--no-eos",
                     "--prompt", "1,2"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.strip().startswith("output")]
    assert [r.split()[1] for r in rows] == [str(i) for i in range(6)]


def test_generate_prints_every_batch_rows_text(capsys):
    """The reference model decodes text: one text line per row."""
    assert generate(["--batch", "2", "--max-new-tokens", "1", "--prompt", "KING."]) == 0
    texts = [line for line in capsys.readouterr().out.splitlines()
             if line.strip().startswith("text")]
    assert len(texts) == 2 and all("KING." in t for t in texts)


def test_generate_hugging_face_checkpoint_takes_pregate(capsys):
    """--pregate applies to a Hugging Face checkpoint too (the shipped model is one)."""
    assert generate(["--checkpoint", str(ROOT / "samoyeds_jax" / "assets" / "shakespeare-moe"),
                     "--pregate", "pregated", "--max-new-tokens", "1"]) == 0
    assert "pregate=pregated" in capsys.readouterr().out


@pytest.mark.skipif(ON_GPU, reason="what is printed without a GPU")
def test_generate_without_gpu_claims_no_gpu(capsys):
    assert generate(["--random-tiny", "--implementation", "triton", "--offload",
                     "--max-new-tokens", "1", "--prompt", "1,2"]) == 0
    out = capsys.readouterr().out
    assert "implementation=triton (Pallas interpret mode: no GPU)" in out
    assert "pinned host memory" not in out and "nothing page-locked" in out
    assert "memory   peak GPU memory: n/a on cpu" in out


# ----------------------------------------------------------------------------- samoyeds-train


def test_train_refusals(tmp_path, monkeypatch, capsys):
    from samoyeds_jax import corpus

    def fail(*args, **kwargs):
        raise AssertionError("the corpus was read before the cheap checks refused the command")

    monkeypatch.setattr(corpus, "read_texts", fail)
    (tmp_path / "corpus").mkdir()
    base = ["--corpus", str(tmp_path / "corpus"), "--out", str(tmp_path / "out")]
    cases = [
        (["--tokenizer", str(tmp_path / "t.json"), "--vocab-size", "300"],
         "--vocab-size has no effect here: --tokenizer"),
        (["--pregate", "standard", "--pregate-coef", "0.5"],
         "--pregate-coef has no effect here: --pregate standard"),
        (["--pregate", "standard", "--gate-agreement-coef", "5"],
         "--gate-agreement-coef has no effect here: --pregate standard"),
        (["--tokenizer", str(tmp_path / "t.json")], "found no such file"),
        (["--resume"], "--resume: expected a checkpoint to continue from"),
    ]
    for extra, message in cases:
        assert train_main([*base, *extra]) == 2
        assert message in capsys.readouterr().err, extra
    assert train_main(["--corpus", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "samoyeds-corpus fetch" in capsys.readouterr().err
    (tmp_path / "out" / "last").mkdir(parents=True)
    (tmp_path / "out" / "last" / "trainer_state.json").write_text("{}")
    assert train_main(base) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err


# ----------------------------------------------------------------------------- samoyeds-compress


@pytest.mark.parametrize("extra, message", [
    (["--sparsity", "0.3"], "--sparsity has no effect here: --format samoyeds"),
    (["--format", "2:4", "--separate-w1-w3"], "--separate-w1-w3 has no effect here"),
    (["--recover-steps", "0", "--recover-lr", "1e-3", "--distill-weight", "0.5"],
     "--recover-lr, --distill-weight have no effect here: --recover-steps 0"),
    (["--calib-windows", "0"], "--calib-windows must be >= 1, got 0"),
])
def test_compress_refusals(no_weights, tmp_path, capsys, extra, message):
    argv = ["--checkpoint", FIXTURE, "--corpus", str(tmp_path), "--out", str(tmp_path / "o")]
    assert compress_main([*argv, *extra]) == 2
    assert message in capsys.readouterr().err


def test_compress_refuses_a_converted_checkpoint(no_weights, converted, tmp_path, capsys):
    assert compress_main(["--checkpoint", converted, "--corpus", str(tmp_path),
                          "--out", str(tmp_path / "o")]) == 2
    assert "is a converted model; expected the dense Hugging Face checkpoint" in (
        capsys.readouterr().err)


# ----------------------------------------------------------------------------- shell scripts


def test_bootstrap_installs_only_when_pyproject_or_extra_changes(tmp_path):
    """ensure_installed runs pip for a missing or stale stamp only (pip itself is faked)."""
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    python = bin_dir / "python"
    python.write_text(f'#!/usr/bin/env bash\nif [ "$1 $2" = "-m pip" ]; then echo "$@" >> '
                      f'{tmp_path}/pip.log; exit 0; fi\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")

    def install(extra: str) -> list[str]:
        subprocess.run(["bash", "-c", f'source {ROOT}/scripts/bootstrap.sh && cd {tmp_path} && '
                                      f'ensure_installed "{extra}"'], check=True)
        log = tmp_path / "pip.log"
        return log.read_text().splitlines() if log.exists() else []

    assert install("test") == ["-m pip install -q -e .[test]"]
    assert len(install("test")) == 1                      # nothing changed: no reinstall
    assert install("")[-1] == "-m pip install -q -e ."    # another extra: its own install
    assert len(install("test")) == 2 and len(install("")) == 2
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\nversion = '2'\n")
    assert len(install("test")) == 3                      # pyproject.toml changed
    os.remove(tmp_path / ".venv" / ".samoyeds-install-test")
    assert len(install("test")) == 4                      # stamp missing
    # a failed install leaves no stamp, so the next run tries again
    python.write_text(python.read_text().replace("exit 0; fi", "exit 1; fi"))
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\nversion = '3'\n")
    with pytest.raises(subprocess.CalledProcessError):
        install("test")
    with pytest.raises(subprocess.CalledProcessError):
        install("test")
    assert len((tmp_path / "pip.log").read_text().splitlines()) == 6


def test_bootstrap_rejects_an_unknown_job():
    res = subprocess.run([str(ROOT / "scripts" / "bootstrap.sh"), "nope"], capture_output=True,
                         text=True)
    assert res.returncode == 2 and "usage: scripts/bootstrap.sh generate|test" in res.stderr


@pytest.mark.skipif(ON_GPU, reason="checks the refusal without a GPU")
def test_gpu_test_script_needs_a_gpu():
    res = subprocess.run([str(ROOT / "scripts" / "gpu_test.sh")], capture_output=True, text=True,
                         env=dict(os.environ, PYTHON=sys.executable))
    assert res.returncode == 2
    assert "no GPU visible to jax" in res.stderr and "passed" not in res.stdout


# ----------------------------------------------------------------------------- samoyeds-eval


@pytest.mark.skipif(ON_GPU, reason="what is printed without a GPU")
def test_eval_says_pallas_is_interpreted_without_gpu(tmp_path, capsys):
    from samoyeds_jax.eval_cli import main as evaluate

    text = tmp_path / "t.txt"
    text.write_text("KING.\nWhat news? " * 20)
    assert evaluate(["--checkpoint", str(ROOT / "samoyeds_jax" / "assets" / "shakespeare-moe"),
                     "--text", str(text), "--implementation", "triton", "--seq-len", "16",
                     "--batch-size", "1", "--max-windows", "1"]) == 0
    assert "implementation=triton (Pallas interpret mode: no GPU)" in capsys.readouterr().out


@pytest.mark.parametrize("module,argv,message", [
    ("generate_cli", ["--random-tiny", "--batch", "0"], "samoyeds-generate: error: --batch must be >= 1, got 0"),
    ("train_cli", ["--corpus", "/nonexistent/corpus", "--out", "/tmp/never-written"],
     "samoyeds-train: error: --corpus /nonexistent/corpus: no such directory"),
])
def test_python_dash_m_prints_one_error_line(module, argv, message):
    """``python -m samoyeds_jax.<cli>`` behaves as the console script: one line, exit 2."""
    res = subprocess.run([sys.executable, "-m", f"samoyeds_jax.{module}", *argv],
                         capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"))
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr
