"""The ahead-of-time compile tool (`cclm_jax.aot`): topology names, the collective inventory of a compiled program,
the batch search, per-chip state bytes; and (opt-in, `-m libtpu`, skipped without libtpu) a TPU compile of the
micro config for a v5e:2x2 slice from this CPU."""
import dataclasses
import importlib.util
import json
import math
import pathlib
import types

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cclm_jax import aot, flops

TINY = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py")

# ---------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize("name, chip, chips, topology_name, shape", [
    ("v5p-8", "v5p", 4, "v5p:2x2x1", (2, 2, 1)),  # v4/v5p names count TensorCores: 2 per chip
    ("v5p-16", "v5p", 8, "v5p:2x2x2", (2, 2, 2)),
    ("v5p-64", "v5p", 32, "v5p:2x4x4", (2, 4, 4)),
    ("v5p-128", "v5p", 64, "v5p:4x4x4", (4, 4, 4)),
    ("V4-32", "v4", 16, "v4:2x2x4", (2, 2, 4)),
    ("v4-4096", "v4", 2048, "v4:8x16x16", (8, 16, 16)),
    ("v5e-1", "v5e", 1, "v5e:1x1", (1, 1)),  # v5e/v6e names count chips
    ("v5e-8", "v5e", 8, "v5e:2x4", (2, 4)),
    ("v5e-64", "v5e", 64, "v5e:8x8", (8, 8)),
    ("v6e-64", "v6e", 64, "v6e:8x8", (8, 8)),
    ("v6e-256", "v6e", 256, "v6e:16x16", (16, 16)),
    ("v5p:4x4x12", "v5p", 192, "v5p:4x4x12", (4, 4, 12)),
    ("v5:2x2x2", "v5p", 8, "v5p:2x2x2", (2, 2, 2)),
    ("v5e:2x2", "v5e", 4, "v5e:2x2", (2, 2)),
])
def test_tpu_names(name, chip, chips, topology_name, shape):
    t = aot.parse_topology(name)
    assert (t.chip, t.num_chips, t.platform, t.topology_name, t.shape) == (chip, chips, "tpu", topology_name, shape)
    assert t.chip_config_name == ("megacore" if chip == "v4" else "")


@pytest.mark.parametrize("name, chip, n", [("8xH100", "h100", 8), ("h200x8", "h200", 8), ("A100-4", "a100", 4)])
def test_gpu_names(name, chip, n):
    t = aot.parse_topology(name)
    assert (t.chip, t.num_chips, t.platform, t.shape) == (chip, n, "cuda", (1, 1, n))


@pytest.mark.parametrize("name", ["v5p-7", "v5p-12", "v7-8", "v5e-2", "v5e:2x2x2", "v5p:2x2", "16xH100", "tpu", ""])
def test_bad_names_list_the_valid_ones(name):
    with pytest.raises(aot.TopologyError) as info:
        aot.parse_topology(name)
    message = str(info.value)
    assert "\n" not in message and "v5p-{8,16,32,64" in message and "8xH100" in message and "v5e:4x4" in message


def test_chip_table_agrees_with_the_mfu_peaks():
    for key, chip in aot.CHIPS.items():
        if key != "cpu":
            assert flops.peak_flops(chip.device_kind) == chip.peak_flops, key
            assert chip.hbm_bytes > 0 and chip.ici_bytes_per_s > 0


def test_cpu_topology_uses_the_local_devices():
    t = aot.parse_topology("cpu:8")
    assert len(aot.topology_devices(t)) == 8
    with pytest.raises(aot.TopologyError, match="xla_force_host_platform_device_count"):
        aot.topology_devices(aot.parse_topology("cpu:64"))


def test_gpu_without_the_cuda_plugin_says_what_to_install():
    if importlib.util.find_spec("jax_cuda12_plugin") or importlib.util.find_spec("jax_cuda13_plugin"):
        pytest.skip("a CUDA plugin is installed")
    with pytest.raises(aot.TopologyError, match=r"pip install 'jax\[cuda12-local\]"):
        aot.topology_devices(aot.parse_topology("8xH100"))


# ---------------------------------------------------------------------------------------- collectives

def _mesh(n=8):
    return jax.make_mesh((n,), ("x",), devices=jax.devices()[:n], axis_types=(jax.sharding.AxisType.Auto,))


def test_collective_inventory_of_a_compiled_program():
    """A row-sharded f32[64,128] gathered once, a column sum all-reduced once, and a scan of 5 steps that gathers
    a sharded f32[64,16] carry each step: the inventory counts the loop body 5 times."""
    mesh = _mesh()
    rows, full = NamedSharding(mesh, P("x")), NamedSharding(mesh, P())

    def f(x, c):
        gathered = jax.lax.with_sharding_constraint(x * 2.0, full)
        col_sum = jnp.sum(x, axis=0)

        def body(carry, _):
            whole = jax.lax.with_sharding_constraint(jnp.sin(carry), full)
            return jax.lax.with_sharding_constraint(whole[::-1] + 1.0, rows), None

        c, _ = jax.lax.scan(body, c, None, length=5)
        return gathered, col_sum, c

    x = jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=rows)
    c = jax.ShapeDtypeStruct((64, 16), jnp.float32, sharding=rows)
    compiled = jax.jit(f, out_shardings=(full, full, rows)).lower(x, c).compile()
    inv = aot.collective_inventory(compiled.as_text(), 8)
    assert inv["unknown_trip_counts"] == 0
    ag, ar = inv["all-gather"], inv["all-reduce"]
    assert ag["count"] == 1 + 5
    assert ag["bytes"] == 64 * 128 * 4 + 5 * 64 * 16 * 4  # the gathered results
    assert ag["link_bytes"] == pytest.approx(7 / 8 * ag["bytes"])
    assert ar["count"] == 1 and ar["bytes"] == 128 * 4 and ar["link_bytes"] == pytest.approx(2 * 7 / 8 * 128 * 4)
    assert inv["all-to-all"]["count"] == inv["reduce-scatter"]["count"] == 0


def test_collective_inventory_reads_the_hlo_forms():
    """Replica-group forms (explicit, iota, mesh), async starts, a TPU all-reduce-scatter fusion, a while loop
    with a `compare(i, N), direction=LT` condition."""
    hlo = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %s = f32[] add(f32[] %a, f32[] %b)
}

%all-reduce-scatter (input: f32[256,128]) -> f32[64,128] {
  %input = f32[256,128]{1,0} parameter(0)
  %ar.1 = f32[256,128]{1,0} all-reduce(%input), replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %ds = f32[64,128]{1,0} dynamic-slice(%ar.1, %z, %z), dynamic_slice_sizes={64,128}
}

%cond (p: (s32[], bf16[4,8])) -> pred[] {
  %k = s32[]{:T(128)} constant(12)
  %p = (s32[], bf16[4,8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %k), direction=LT
}

%body (p.1: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %p.1 = (s32[], bf16[4,8]) parameter(0)
  %v = bf16[4,8]{1,0} get-tuple-element(%p.1), index=1
  %ags = (bf16[4,8]{1,0}, bf16[16,8]{1,0}) all-gather-start(%v), replica_groups=[2,4]<=[8], dimensions={0}
  %agd = bf16[16,8]{1,0} all-gather-done(%ags)
  %a2a = bf16[4,8]{1,0} all-to-all(%v), replica_groups=mesh['data'=2,'fsdp'=4] {'fsdp'}, dimensions={0}
  ROOT %t = (s32[], bf16[4,8]) tuple(%i, %v)
}

ENTRY %main (x: f32[256,128], y: bf16[4,8]) -> f32[64,128] {
  %x = f32[256,128]{1,0} parameter(0)
  %y = bf16[4,8]{1,0} parameter(1)
  %cps = (bf16[4,8]{1,0}, bf16[4,8]{1,0}, u32[], u32[]) collective-permute-start(%y), source_target_pairs={{0,1}}
  %cpd = bf16[4,8]{1,0} collective-permute-done(%cps)
  %w = (s32[], bf16[4,8]) while(%tup), condition=%cond, body=%body
  ROOT %f = f32[64,128]{1,0} fusion(%x), kind=kCustom, calls=%all-reduce-scatter
}
"""
    inv = aot.collective_inventory(hlo, 8)
    assert inv["reduce-scatter"] == {"count": 1, "bytes": 256 * 128 * 4, "link_bytes": 3 / 4 * 256 * 128 * 4}
    assert inv["all-reduce"]["count"] == 0
    assert inv["all-gather"] == {"count": 12, "bytes": 12 * 16 * 8 * 2, "link_bytes": 12 * 3 * 4 * 8 * 2}
    assert inv["all-to-all"] == {"count": 12, "bytes": 12 * 64, "link_bytes": 12 * 3 / 4 * 64}
    assert inv["collective-permute"] == {"count": 1, "bytes": 64, "link_bytes": 64.0}
    assert inv["unknown_trip_counts"] == 0


def test_group_size_forms():
    assert aot.group_size("replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%a", 8) == 4
    assert aot.group_size("replica_groups=[4,2]<=[8], dimensions={0}", 8) == 2
    assert aot.group_size("replica_groups=[2,4]<=[4,2]T(1,0)", 8) == 4
    assert aot.group_size("replica_groups=mesh['data'=2,'fsdp'=2,'tensor'=2] {'data','tensor'}", 8) == 4
    assert aot.group_size("replica_groups={}, to_apply=%a", 8) == 8


# ---------------------------------------------------------------------------------------------- search

@pytest.mark.parametrize("largest, start, limit", [(37, 1, 4096), (37, 64, 4096), (1, 1, 64), (0, 1, 64),
                                                   (0, 8, 64), (64, 1, 64), (100, 3, 4096), (128, 128, 4096)])
def test_largest_fitting(largest, start, limit):
    calls = []

    def fits(n):
        calls.append(n)
        return n <= largest

    assert aot.largest_fitting(fits, start=start, limit=limit) == min(largest, limit)
    assert len(calls) == len(set(calls))  # no size compiled twice
    assert len(calls) <= 2 * math.ceil(math.log2(limit)) + 2


# ----------------------------------------------------------------------------------------------- state

def test_state_bytes_show_moments_sharded_less_than_their_parameters():
    """FSDP-sharded parameters (8 ways) whose AdamW moments are replicated: the report counts those moments as
    under-sharded; moments with their parameter's sharding are not."""
    mesh = jax.make_mesh((8,), ("fsdp",), devices=jax.devices()[:8], axis_types=(jax.sharding.AxisType.Auto,))
    split, whole = NamedSharding(mesh, P("fsdp")), NamedSharding(mesh, P())
    sds = lambda shape, s, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=s)  # noqa: E731
    params = {"text": {"kernel": sds((64, 32), split)}, "temp": sds((), whole)}
    mu = {"text": {"kernel": sds((64, 32), whole)}, "temp": sds((), whole)}  # replicated: the bug
    nu = {"text": {"kernel": sds((64, 32), split)}, "temp": sds((), whole)}  # sharded like its parameter
    state = types.SimpleNamespace(step=sds((), whole, jnp.int32), params=params, opt_state=(mu, nu),
                                  rng=sds((2,), whole, jnp.uint32), nonfinite=sds((), whole, jnp.int32))
    b = aot.state_bytes_per_chip(state)
    kernel = 64 * 32 * 4
    assert b["params"] == kernel // 8 + 4 and b["params_global"] == kernel + 4
    assert b["opt_state"] == kernel + kernel // 8 + 8 and b["opt_state_global"] == 2 * kernel + 8
    assert b["opt_state_undersharded"] == kernel
    assert b["other"] == 4 + 8 + 4


# ------------------------------------------------------------------------------------------ reporting

class _Refused:
    """A jitted function whose compile fails as libtpu does for a program over HBM."""

    def __init__(self, message):
        self.message = message

    def lower(self, *args):
        return self

    def compile(self):
        raise RuntimeError(self.message)


def test_out_of_memory_is_reported_with_the_compilers_numbers():
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(357.69G) exceeds available HBM (15.75G).\nmore detail")
    row = aot.compile_step(_Refused(message), (), aot.CHIPS["v5e"], "tpu", 4)
    assert row["fits"] is False and (row["required"], row["available"]) == ("357.69G", "15.75G")
    assert row["error"].startswith("RESOURCE_EXHAUSTED") and "\n" not in row["error"]
    row = aot.compile_step(_Refused("RESOURCE_EXHAUSTED: Used 120.5G of 95.74G hbm."), (), aot.CHIPS["v5p"], "tpu", 8)
    assert (row["required"], row["available"]) == ("120.5G", "95.74G")
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
        aot.compile_step(_Refused("INVALID_ARGUMENT: something else"), (), aot.CHIPS["v5e"], "tpu", 4)


def test_compile_step_and_markdown_on_cpu():
    """A small sharded program compiled for the 8 CPU devices: memory, FLOPs, collectives; the Markdown report
    renders a compiled row, a refused row and a search line."""
    mesh = _mesh()
    x = jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    fn = jax.jit(lambda a: a @ a.T, out_shardings=NamedSharding(mesh, P()))
    row = aot.compile_step(fn, (x,), aot.CHIPS["cpu"], "cpu", 8)
    assert row["fits"] is None and row["argument_bytes"] == 64 * 128 * 4 // 8 and row["peak_bytes"] > 0
    assert row["xla_flops"] > 0 and row["ici_s_lower_bound"] is None
    assert sum(row["collectives"][k]["count"] for k in aot.COLLECTIVES) > 0
    row.update(step="image_caption", global_batch=8, batch_per_chip=1.0, analytic_flops=2 * 64 * 64 * 128 / 8)
    refused = aot.compile_step(_Refused("RESOURCE_EXHAUSTED: Used 20G of 15.75G hbm"), (), aot.CHIPS["v5e"], "tpu", 8)
    refused.update(step="parallel_text", global_batch=1024, batch_per_chip=128.0, analytic_flops=1e12)
    state = dict.fromkeys(("params", "opt_state", "other", "params_global", "opt_state_global",
                           "opt_state_undersharded"), 2 ** 30)
    report = {"topology": "cpu:8", "topology_name": "", "platform": "cpu", "chip": dataclasses.asdict(aot.CHIPS["cpu"]),
              "chips": 8, "mesh": {"data": 8}, "jax": jax.__version__, "dtype": "float32", "state": state,
              "steps": [row, refused],
              "search": {"image_caption": {"largest_batch_per_chip": 3,
                                           "probes": {3: {"fits": True}, 4: {"fits": False}}}}}
    text = aot.markdown(report)
    assert "params 1.000 GiB (of 1.000 GiB)" in text
    lines = [line for line in text.splitlines() if line.startswith(("| image_caption", "| parallel_text"))]
    assert len(lines) == 3  # two in the step table, the compiled one in the collectives table
    assert all(line.count("|") == 16 for line in lines[:2])
    assert "**no** (of 15.75G)" in lines[1] and "largest per-chip batch that fits: **3**" in text


# -------------------------------------------------------------------------------------- opt-in: libtpu

@pytest.mark.libtpu
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu: pip install 'jax[tpu]'")
def test_compile_micro_config_for_a_v5e_slice(tmp_path):
    """The micro config's sentence-pair step compiled for a v5e:2x2 slice (4 chips, FSDP) from this CPU."""
    out = tmp_path / "report.json"
    report = aot.main(["--config", TINY + ":micro", "--topology", "v5e:2x2", "--mesh.fsdp", "-1",
                       "--kinds", "parallel_text", "--batch-per-chip", "2", "--json", str(out)])
    assert json.loads(out.read_text())["topology"] == "v5e:2x2"
    assert report["chips"] == 4 and report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    (row,) = report["steps"]
    assert row["fits"] is True and row["global_batch"] == 8
    for key in ("argument_bytes", "output_bytes", "peak_bytes", "xla_flops", "analytic_flops"):
        assert row[key] > 0, key
    assert 0.5 < row["xla_flops"] / row["analytic_flops"] < 3
    assert row["peak_bytes"] < aot.CHIPS["v5e"].hbm_bytes
    assert report["state"]["params"] < report["state"]["params_global"]  # FSDP shards the parameters
    assert row["collectives"]["all-gather"]["count"] > 0  # ... and gathers them for the forward pass


@pytest.mark.libtpu
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu: pip install 'jax[tpu]'")
@pytest.mark.parametrize("name", ["v4-8", "v4-32", "v5p-8", "v5p-64", "v5e-4", "v5e-64", "v6e-64", "v6e-256"])
def test_slice_names_resolve_in_libtpu(name, monkeypatch):
    """libtpu builds each table entry with one device per chip, of the chip the table says."""
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    topology = aot.parse_topology(name)
    devices = aot.topology_devices(topology)
    assert len(devices) == topology.num_chips
    assert flops.peak_flops(devices[0].device_kind) == topology.spec.peak_flops
