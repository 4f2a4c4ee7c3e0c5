"""examples/trace_summary.py: the per-kernel summary of a profiler trace and the source line
of every HLO instruction (what bench_generate --trace prints)."""

import gzip
import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import trace_summary
from samoyeds_jax.layers import RMSNorm


def test_summarize_counts_kernel_time_gaps_and_copies(tmp_path):
    gpu, host = 1, 2
    events = [
        {"ph": "M", "name": "process_name", "pid": gpu, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": host, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "thread_name", "pid": gpu, "tid": 7, "args": {"name": "MemcpyH2D"}},
        {"ph": "X", "pid": gpu, "tid": 1, "name": "fusion_a", "ts": 0.0, "dur": 10.0},
        {"ph": "X", "pid": gpu, "tid": 1, "name": "fusion_a", "ts": 20.0, "dur": 10.0},
        {"ph": "X", "pid": gpu, "tid": 2, "name": "gemm_b", "ts": 5.0, "dur": 10.0},
        {"ph": "X", "pid": gpu, "tid": 7, "name": "copy", "ts": 25.0, "dur": 15.0},
        {"ph": "X", "pid": host, "tid": 1, "name": "host_work", "ts": 0.0, "dur": 99.0},
    ]
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as fh:
        json.dump({"traceEvents": events}, fh)
    s = trace_summary.summarize(str(tmp_path))
    assert s["span_us"] == 40.0                 # GPU events only: 0 .. 40
    assert s["kernel_busy_us"] == 25.0          # [0, 15] and [20, 30]
    assert s["copy_busy_us"] == 15.0 and s["copy_under_kernel_us"] == 5.0
    assert s["top"][0] == ["fusion_a", 2, 20.0]
    with pytest.raises(FileNotFoundError, match="no \\*.json.gz trace"):
        trace_summary.summarize(str(tmp_path / "missing"))


def test_sources_name_the_project_line_of_each_instruction():
    norm = RMSNorm(8, rngs=nnx.Rngs(0))
    x = jnp.ones((4, 8), jnp.float32)
    exe = jax.jit(lambda x: norm(x) * 3.0).lower(x).compile()
    where = trace_summary.sources([exe.as_text()])
    assert where and all("." not in name for name in where)  # as trace kernel names read
    assert any("layers.py:" in w and "RMSNorm.__call__" in w for w in where.values()), where


def test_a_kernel_name_two_modules_use_lists_both_sources():
    x = jnp.ones((4, 8), jnp.float32)
    first = lambda x: jnp.sin(x) * 3.0  # noqa: E731 (two lines: two sources, same names)
    second = lambda x: jnp.sin(x) * 4.0  # noqa: E731
    texts = [jax.jit(f).lower(x).compile().as_text() for f in (first, second)]
    where = trace_summary.sources(texts)
    shared = [w for w in where.values() if " | " in w]
    assert shared, where  # each module numbers its own fusions from the same names
    assert all(len(set(w.split(" | "))) == len(w.split(" | ")) for w in shared)
