"""The README's drop-in example runs as written."""

import pathlib
import re

import jax


def _run_example(marker: str) -> dict:
    """Run the README's python block that contains ``marker``; its global names."""
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    example = next(b for b in blocks if marker in b)
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)
    return scope


def test_readme_moe_example_runs(capsys):
    scope = _run_example("MoEConfig(")
    assert scope["y"].shape == (4, 16, 512)
    recall = scope["block1"].recall()
    assert 0.0 <= recall["recall"] <= 1.0 and recall["set_recall"] == 1.0
    assert "recall" in capsys.readouterr().out


def test_readme_sparse_linears_example_runs(capsys):
    scope = _run_example("linear=dict(")
    w = scope["model"].layers[0].self_attn.q_proj.kernel.get_value()
    assert type(w).__name__ == "NMSparse"
    from pallas_kernels import linear_op

    name = capsys.readouterr().out.split()[0]
    assert name in linear_op.implementation_names()
    assert name == "xla" or jax.default_backend() == "gpu"


def test_readme_generate_examples_pass_the_cli_checks():
    """Each `scripts/bootstrap.sh generate ...` example of the README is accepted by
    samoyeds-generate's checks (those that need a downloaded checkpoint are left out)."""
    import shlex

    from samoyeds_jax.cli import given_options
    from samoyeds_jax.generate_cli import _check, build_parser

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            words = shlex.split(command, comments=True)
            if "scripts/bootstrap.sh" not in words:
                continue
            job = words.index("scripts/bootstrap.sh") + 1
            if words[job:job + 1] == ["generate"]:
                commands.append(words[job + 1:])
    checked = too_few_devices = 0
    for argv in commands:
        if any("~" in w for w in argv):
            continue
        if "--devices" in argv and int(argv[argv.index("--devices") + 1]) > jax.device_count():
            too_few_devices += 1   # a GPU machine with fewer GPUs (the CPU suite fakes 4)
            assert jax.default_backend() != "cpu", argv
            continue
        parser = build_parser()
        args = parser.parse_args(argv)
        plan = _check(args, given_options(parser, args, argv))
        assert plan.ids, argv
        checked += 1
    assert checked + too_few_devices >= 4 and checked >= 3


def test_readme_offload_example_runs(capsys):
    scope = _run_example("host_experts(")
    assert scope["out"].tokens.shape == (1, 8)
    assert scope["gen"].store.num_layers == scope["config"].num_layers
    assert "[[" in capsys.readouterr().out
