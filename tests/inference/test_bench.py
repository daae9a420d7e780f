"""The inference benchmarks run end to end in --quick mode and write well-formed results."""

import json

import pytest
import torch

from openjamba import JambaConfig
from openjamba.bench.common import parse_list, variant_configs
from openjamba.bench.decode import step_bytes
from openjamba.bench_cli import main


def _bench_script(name: str):
    """A script of benchmarks/ imported as a module (they import one another as siblings)."""
    import importlib
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_variants_have_equal_active_parameters_and_the_right_layers():
    base = JambaConfig.from_name("jamba-1b")
    v = variant_configs(base)
    active = {k: c.param_counts()["active"] for k, c in v.items()}
    for name in ("transformer", "mamba"):
        assert abs(active[name] - active["jamba"]) < 0.01 * active["jamba"], active
    assert len(v["transformer"].attention_layer_ids) == base.num_hidden_layers
    assert v["mamba"].attention_layer_ids == [] and len(v["jamba"].attention_layer_ids) == 2
    assert parse_list("1K,4k,1M") == [1024, 4096, 1024 ** 2]


def test_step_bytes_counts_routed_experts_and_the_cache():
    cfg = JambaConfig.from_name("jamba-1b")
    one = step_bytes(cfg, 1, 1024, 2, "grouped_mm")
    dense = step_bytes(cfg, 1, 1024, 2, "dense")
    longer = step_bytes(cfg, 1, 1024 + 4096, 2, "grouped_mm")
    assert dense > one and longer - one == cfg.kv_cache_bytes(4096, 1, 2)
    # batch 1, top-2 of 8: a quarter of the expert weights are read
    c = cfg.param_counts()
    assert abs(one - (dense - 0.75 * c["experts"] * 2)) < 1e3


@pytest.mark.parametrize("verb", ["decode", "memory", "prefill", "passkey"])
def test_quick_benchmarks_write_results(tmp_path, verb):
    assert main(["bench", verb, "--quick", "--out-dir", str(tmp_path)]) == 0
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert "machine" in data
    if verb == "decode":
        ok = [p for p in data["points"] if p["status"] == "ok"]
        assert {p["model"] for p in ok} == {"jamba", "transformer", "mamba"}
        assert all(p["tokens_per_s"] > 0 for p in ok) and data["ratios"]
    elif verb == "memory":
        ok = [p for p in data["points"] if p["status"] == "ok"]
        assert ok and all(p["cache_measured"] >= p["predicted_kv"] for p in ok)
    elif verb == "prefill":
        assert data["status"] == "ok" and data["finite_logits"]
    else:
        assert data["all_retrieved"] and all(p["status"] == "ok" for p in data["points"])


def test_max_seconds_skips_instead_of_running(tmp_path):
    main(["bench", "decode", "--quick", "--max-seconds", "0", "--out-dir", str(tmp_path)])
    data = json.loads((tmp_path / "decode_throughput.json").read_text())
    assert all(p["status"].startswith("skipped") for p in data["points"])


def test_quick_compare_with_transformers(tmp_path):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    main(["bench", "compare", "--quick", "--out-dir", str(tmp_path)])
    data = json.loads((tmp_path / "versus_transformers.json").read_text())
    assert data["same_weights"]
    assert all(p["status"] == "ok" and p["first_token_agreement"] == 1.0 for p in data["points"])


def test_out_of_memory_is_recorded_and_other_errors_propagate():
    from openjamba.bench.common import oom_as_status

    point = {}
    with oom_as_status(point):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert point["status"] == "out of memory"
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with oom_as_status({}):
            raise RuntimeError("shape mismatch")


def test_decode_step_tracer_threads_its_table_through_every_kernel():
    """benchmarks/trace_decode_step.py rewrites a copy of the fused kernels' source; a kernel it missed
    would drop out of the timeline (or fail to launch), so every one must take the table and mark its end."""
    import inspect
    import re

    trace_decode_step = _bench_script("trace_decode_step")
    from openjamba.inference import fused_kernels

    names = [n for n in re.findall(r"\ndef (\w+_kernel)\(", open(fused_kernels.__file__).read())
             if n != "_after_previous_kernel"]
    assert len(names) >= 9, names
    traced = trace_decode_step.traced_kernels()
    for name in names:
        params = list(inspect.signature(getattr(traced, name).fn).parameters)
        assert params[-2:] == ["TR", "KSEQ"], (name, params)
    src = trace_decode_step.traced_source(open(fused_kernels.__file__).read())
    assert src.count("    _trace_end(TR, KSEQ)\n") == len(names)
    assert src.count("_after_previous_kernel(PDL, TR, KSEQ)") == open(fused_kernels.__file__).read().count(
        "_after_previous_kernel(PDL)")


def test_tile_sweeps_start_from_the_default_tiles():
    """bench_decode_step's coordinate descent starts each family at its first candidate, which must be the
    tiles the fused step uses by default (fused.TILES), so a sweep's best is never worse than the default."""
    from openjamba.inference import fused

    bench_decode_step = _bench_script("bench_decode_step")
    for column, candidates in ((0, bench_decode_step.GEMV_CANDIDATES), (1, bench_decode_step.DOT_CANDIDATES)):
        for family, cands in candidates.items():
            assert cands[0] == fused.TILES[family][column], (family, cands[0])
    assert set(bench_decode_step.SPLIT_ONLY) <= set(bench_decode_step.GEMV_CANDIDATES)


def test_chain_floor_keeps_the_layer_schedule_at_tiny_widths():
    """bench_decode_step --chain-floor compares a preset with its TINY_WIDTHS version: the same layer kinds in the
    same order (so the fused step launches the same kernels), whose active weights take under 1 us per token to
    read at 4.27 TB/s."""
    from openjamba.config import JambaConfig

    bench_decode_step = _bench_script("bench_decode_step")
    for name in ("jamba-1b", "jamba-100m"):
        c = JambaConfig.from_name(name)
        t = c.replace(**bench_decode_step.TINY_WIDTHS)
        assert t.num_hidden_layers == c.num_hidden_layers
        assert t.attention_layer_ids == c.attention_layer_ids and t.mamba_layer_ids == c.mamba_layer_ids
        assert [t.is_moe(i) for i in range(t.num_hidden_layers)] == [c.is_moe(i) for i in range(c.num_hidden_layers)]
        assert (t.num_experts, t.num_experts_per_tok) == (c.num_experts, c.num_experts_per_tok)
        active = t.param_counts()["active"]
        assert active * 2 < 4.27e6, (name, active)


def test_ncu_decode_step_reads_ncus_raw_csv():
    """ncu_decode_step parses ncu's `--csv --page raw` output: its own and the program's lines before the table,
    a units row, numbers with thousands separators; per launch the summary fields and the largest stalls first."""
    n = _bench_script("ncu_decode_step")
    stall = n.STALL_METRIC.format
    cols = ["ID", "Kernel Name", "device__attribute_chip", "gpu__time_duration.sum", "launch__registers_per_thread",
            stall("long_scoreboard"), stall("barrier"), stall("wait")]
    text = "\n".join([
        "==PROF== Connected to process 1",
        "done",
        ",".join(f'"{c}"' for c in cols),
        '"","","","ns","register/thread","","",""',
        '"0","ffn_up_kernel(...)","GH100","8,416","96","4.33","0.85","0.84"',
        '"1","router_kernel","GH100","5,184","88","3.10","0.30","0.81"',
    ])
    raw = n.parse_raw_csv(text)
    assert len(raw) == 2 and "device__attribute_chip" not in raw[0]
    s = n.summarize(raw[0], top=2)
    assert s["kernel"] == "ffn_up_kernel" and s["duration_ns"] == 8416.0 and s["registers"] == 96.0
    assert s["dram_bytes"] is None
    assert list(s["stalls"]) == ["long_scoreboard", "barrier"] and s["stalls"]["long_scoreboard"] == 4.33
    assert n.summarize(raw[1])["stalls"] == {"long_scoreboard": 3.10, "wait": 0.81, "barrier": 0.30}
    with pytest.raises(ValueError, match="no ncu CSV table"):
        n.parse_raw_csv("==PROF== nothing profiled\n")
