"""pale.complexity: the analytic multiply-add model against counts measured while the model runs,
the paper's equations worked by hand, the paper-table rows, and `pale info --compare-paper`."""
import json

import pytest
import torch

from pale.cli import main as pale_main
from pale.complexity import (PAPER_TABLES, PaleConfig, analytic_cost, attention_matmul_macs, compare_paper,
                             global_attention_macs, global_model_macs, measure_cost, pale_attention_macs,
                             stage_sizes)
from pale.models.pale_transformer import ATTN_MODES, PaleTransformer

# Small enough to count in a fraction of a second; two blocks in stage 2 so sequential alternates.
TINY = dict(embed_dims=(16, 32, 32, 64), depths=(1, 2, 1, 2), num_heads=(2, 2, 4, 4), num_classes=5)


def _measured(kwargs, size, device="meta"):
    model = PaleTransformer(**kwargs, device=device)
    assert next(model.parameters()).device.type == device
    return measure_cost(model, size)


CASES = [(mode, (97, 131), (3, 5)) for mode in ATTN_MODES] + [  # odd, non-square, padding both ways
    ("parallel", (224, 224), 7), ("vanilla", (224, 224), 7),              # no padding in any stage
    # per-stage pale sizes; vanilla pads stage 1 (16x50) to 56x56, stage 2 (8x25) to 10x25
    ("parallel", (64, 200), (7, 5, 5, 7)), ("vanilla", (64, 200), (7, 5, 5, 7)),
]


@pytest.mark.parametrize("mode,size,pale_size,stem_type", [case + ("overlap",) for case in CASES] + [
    ("parallel", (27, 31), 2, "deep"), ("vanilla", (28, 28), (3, 5), "deep")])  # odd sizes: a ceil-mode pool
def test_analytic_matches_measured_per_module(mode, size, pale_size, stem_type):
    kwargs = dict(TINY, attn_mode=mode, pale_size=pale_size, stripe_width=(3, 3, 5, 5), stem_type=stem_type)
    analytic = analytic_cost(PaleConfig.from_kwargs(**kwargs), size)
    measured = _measured(kwargs, size)
    assert abs(analytic.macs / measured.macs - 1) < 0.01
    assert analytic.params == measured.params and analytic.params_by_part == measured.params_by_part
    # Layer by layer: every attention, MLP, CPE and conv module the counter saw.
    modules = [m for m in measured.macs_by_module if m.endswith((".attn", ".mlp", ".cpe", ".downsample"))]
    assert len(modules) >= 3 * sum(TINY["depths"])
    for module in modules + ["stem", "head"]:
        assert analytic.macs_under(module) == measured.macs_by_module[module], module


def test_meta_device_counts_what_the_cpu_run_counts():
    kwargs = dict(TINY, attn_mode="vanilla", pale_size=3)
    cpu, meta = _measured(kwargs, (45, 70), "cpu"), _measured(kwargs, (45, 70), "meta")
    assert cpu.macs == meta.macs and cpu.macs_by_module == meta.macs_by_module and cpu.params == meta.params
    assert not next(PaleTransformer(**kwargs).parameters()).is_meta  # the context was left


def test_pale_info_json_vanilla_pale_tiny(capsys):
    # Table 8's vanilla row through the command: analytic = measured for the full Pale-T.
    assert pale_main(["info", "pale_tiny", "--attn-mode", "vanilla", "--meta", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["macs"] == out["analytic_macs"] and out["params"] == out["analytic_params"] == 21748712
    assert out["macs_by_part"] == out["analytic_macs_by_part"]
    # 224 pads no stage (N = 8, 4, 2, 1 pales), so the paper's 2cNP^2 is what the code computes
    assert out["paper_formula_macs"] == out["macs"]


# ---- the paper's equations, worked by hand --------------------------------------------------------

def test_global_attention_eq4_by_hand():
    # h = w = 2, c = 3: 4*4*9 + 2*3*16
    assert global_attention_macs(2, 2, 3) == 144 + 96


def test_parallel_layer_is_eq16_without_padding():
    cost = analytic_cost(PaleConfig.from_model_name("pale_tiny"), (224, 224))
    for i, (h, w) in enumerate(stage_sizes((224, 224))):
        c = cost.config.embed_dims[i]
        assert cost.macs_under(f"stages.{i}.blocks.0.attn") == pale_attention_macs(h, w, c, (7, 7))


def test_attention_matmuls_by_hand():
    # 9x5 map, c = 4, pale (3, 2). Row branch: Hp = 9, 3 groups of 3*5 tokens, 2 channels:
    # 2 * 3 * 15² * 2 = 2700. Column branch: Wp = 6, 3 groups of 2*9 tokens: 2 * 3 * 18² * 2 = 3888.
    assert attention_matmul_macs("parallel", 9, 5, 4, (3, 2)) == 2700 + 3888
    # Unpadded (Eq. 14): hw²c s_r + h²wc s_c = 9*25*4*3 + 81*5*4*2
    assert attention_matmul_macs("parallel", 9, 5, 4, (3, 2), formula="paper") == 2700 + 3240
    assert attention_matmul_macs("sequential", 9, 5, 4, (3, 2), "row") == 2 * 2700
    assert attention_matmul_macs("sequential", 9, 5, 4, (3, 2), "column") == 2 * 3888
    # Vanilla: N = max(3, 3) = 3 pales on the map padded to 9x6, each P = 3*6 + 2*9 - 3*2 = 30 tokens,
    # all 4 channels: 2cNP² = 2 * 4 * 3 * 30². The paper defines its pales on the padded map too.
    assert attention_matmul_macs("vanilla", 9, 5, 4, (3, 2)) == 2 * 4 * 3 * 900
    assert attention_matmul_macs("vanilla", 9, 5, 4, (3, 2), formula="paper") == 2 * 4 * 3 * 900
    # Axial (1, 1): each row against its row, each column against its column.
    assert attention_matmul_macs("axial", 9, 5, 4, (1, 1)) == 2 * 9 * 25 * 2 + 2 * 5 * 81 * 2


def test_global_network_costs_more_where_maps_are_large():
    cfg = PaleConfig.from_model_name("pale_tiny")
    for size in ((224, 224), (512, 2048)):
        assert global_model_macs(cfg, size) > analytic_cost(cfg, size).macs
    ratio = lambda s: global_model_macs(cfg, s) / analytic_cost(cfg, s).macs  # noqa: E731
    assert ratio((1024, 1024)) > 5 * ratio((224, 224))


# ---- the paper's tables ----------------------------------------------------------------------------

def test_paper_table_rows():
    rows = compare_paper(measure=False)
    assert [r.paper.label for r in rows] == [row.label for t in "789" for row in PAPER_TABLES[t][1]]
    assert all(r.measured_macs is None for r in rows)
    by = {(r.paper.table, r.paper.label): r for r in rows}
    default = by["8", "Pale (parallel)"]
    # The default model appears three times; parallel, sequential and cross-shaped cost the same at 224.
    for key in (("7", "7 7 7 7"), ("9", "CPE"), ("8", "Pale (sequential)"), ("8", "Cross-Shaped")):
        assert by[key].analytic_macs == default.analytic_macs and by[key].analytic_params == default.analytic_params
    assert by["7", "1 1 1 1"].analytic_macs == by["8", "Axial"].analytic_macs
    assert abs(default.analytic_macs / 4.2e9 - 1) < 0.01 and default.analytic_params == 21748712
    # Multiply-adds rise with the pale size (the paper's size 5 > size 7 does not).
    table7 = [r.analytic_macs for r in rows if r.paper.table == "7"]
    assert table7 == sorted(table7) and len(set(table7)) == 5
    # No padding at 224 for sizes 1 and 7: code and Eq. 16 agree; sizes 3, 5, 9 pad.
    for r in rows:
        if r.paper.table == "7":
            assert (r.analytic_macs == r.formula_macs) == (r.paper.label in ("1 1 1 1", "7 7 7 7"))
    # Position encodings: APE adds a table per stage (56²x64, 28²x128, 14²x256, 7²x512), CPE a 3x3
    # depthwise conv with bias per block.
    ape, none = by["9", "APE"], by["9", "no pos."]
    assert ape.analytic_params - none.analytic_params == 56 * 56 * 64 + 28 * 28 * 128 + 14 * 14 * 256 + 7 * 7 * 512
    assert default.analytic_params - none.analytic_params == 10 * (2 * 64 + 2 * 128 + 16 * 256 + 2 * 512)
    assert ape.analytic_macs == none.analytic_macs
    assert by["8", "Pale (vanilla)"].analytic_macs > default.analytic_macs


# ---- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,match", [
    (["info", "pale_small", "--compare-paper", "--no-measure"], "give no MODEL"),
    (["info"], "needs a MODEL"),
    (["info", "pale_tiny", "--attn-mode", "global", "--meta"], "unknown attention mode"),
])
def test_info_bad_input(argv, match, capsys):
    assert pale_main(argv) == 1
    assert match in capsys.readouterr().err


def test_info_unknown_table_is_a_usage_error():
    with pytest.raises(SystemExit):
        pale_main(["info", "--compare-paper", "--table", "10"])


@pytest.mark.parametrize("kwargs,size,match", [
    (dict(attn_mode="diagonal"), (224, 224), "unknown attention mode"),
    (dict(pos_embed="sinusoid"), (224, 224), "unknown position encoding"),
    (dict(pale_size=0), (224, 224), "pale_size must be >= 1"),
    (dict(pale_size=(7, 7, 7)), (224, 224), "pale_size must be"),
    (dict(depths=(2, 2, 2)), (224, 224), "one entry per stage"),
    (dict(), (2, 224), "at least 3x3"),
])
def test_analytic_bad_input(kwargs, size, match):
    with pytest.raises(ValueError, match=match):
        analytic_cost(PaleConfig.from_kwargs(**dict(TINY, **kwargs)), size)


def test_vanilla_pads_a_flat_map_to_square_pales():
    # Stage 1 of a 7x200 image is 2x50: N = ceil(50/7) = 8 pales, padded to 56x56; model and analytic agree.
    kwargs = dict(TINY, attn_mode="vanilla")
    measured = _measured(kwargs, (7, 200))
    assert measured.macs == analytic_cost(PaleConfig.from_kwargs(**kwargs), (7, 200)).macs
    assert torch.isfinite(PaleTransformer(**kwargs).eval()(torch.randn(1, 3, 7, 200))).all()


def test_unknown_model_and_formula():
    with pytest.raises(ValueError, match="no analytic cost model"):
        PaleConfig.from_model_name("swin_tiny_patch4_window7_224")
    with pytest.raises(ValueError, match="formula must be"):
        attention_matmul_macs("parallel", 7, 7, 4, (7, 7), formula="fvcore")
    with pytest.raises(ValueError, match="unknown paper table"):
        compare_paper(tables=("6",), measure=False)


# ---- the full tables (slow: `make test-slow`) ---------------------------------------------------

@pytest.mark.slow
def test_every_table_row_and_report_size_agrees_within_one_percent():
    report = _complexity_report()
    COST_SIZES, MODES = report.COST_SIZES, report.MODES
    for row in compare_paper(measure=True):
        assert row.measured_params == row.analytic_params, row.paper.label
        assert abs(row.measured_macs / row.analytic_macs - 1) < 0.01, row.paper.label
    for mode in MODES:
        model = PaleTransformer(attn_mode=mode, device="meta")
        for size in COST_SIZES:
            analytic = analytic_cost(PaleConfig.from_kwargs(attn_mode=mode), size)
            assert abs(measure_cost(model, size).macs / analytic.macs - 1) < 0.01, (mode, size)


def _complexity_report():
    """benchmarks/complexity_report.py, the script that regenerates docs/complexity.md, as a module."""
    import importlib.util
    import sys
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "complexity_report.py"
    spec = importlib.util.spec_from_file_location("complexity_report", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_complexity_report_is_a_script_not_a_command(capsys):
    report = _complexity_report()
    assert report.MODES == tuple(ATTN_MODES)
    assert report.main(["--sides", "16"]) == 1
    assert "--sides must be input sides of at least 32 pixels" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pale_main(["complexity-report", "--help"])
    assert "invalid choice: 'complexity-report'" in capsys.readouterr().err


@pytest.mark.slow
def test_complexity_report_writes_doc_and_plot(tmp_path):
    out = tmp_path / "complexity.md"
    assert _complexity_report().main(["-o", str(out), "--sides", "64", "96", "--repeats", "1"]) == 0
    text = out.read_text()
    for heading in ("Table 7", "Table 8", "Table 9", "512x2048", "global (Eq. 4)", "complexity.png"):
        assert heading in text
    png = (tmp_path / "complexity.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
