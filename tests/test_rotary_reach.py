"""`mllm.rotary_reach` against RoPE written out here from each design: LLaVA's 1-D RoPE, and Qwen2-VL's M-RoPE,
whose head_dim/2 frequency pairs go to t, h and w in that order, `mrope_section` pairs each (Qwen2-VL-7B: 16, 24, 24
of 64, theta 1e6)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import mllm
from mllm.rotary_reach import main, rotary_reach
from mllm.tiny_qwen import TinyQwenConfig, build_tiny_qwen


def wrapped(angles: np.ndarray) -> np.ndarray:
    return np.abs(np.remainder(angles + math.pi, 2 * math.pi) - math.pi)


@pytest.fixture(scope="module")
def qwen_7b_heads(tmp_path_factory):
    """A tiny Qwen2-VL whose attention heads have Qwen2-VL-7B's rotary layout: head_dim 128, sections 16/24/24."""
    sizes = TinyQwenConfig(text_hidden=256, text_heads=2, text_kv_heads=2, mrope_section=(16, 24, 24))
    return build_tiny_qwen(tmp_path_factory.mktemp("qwen-7b-heads"), "qwen2_vl", sizes)


def test_m_rope_gives_rows_and_columns_the_frequencies_qwen2_vl_assigns(qwen_7b_heads):
    model = mllm.load(qwen_7b_heads, device="meta", random_weights=True)
    rows, cols = 36, 40
    table = rotary_reach(model, rows, cols)
    frequency = 1e6 ** (-2 * np.arange(64) / 128)
    axis = np.array(["t"] * 16 + ["h"] * 24 + ["w"] * 24)
    assert list(table.axis) == list(axis)
    np.testing.assert_allclose(table.rad_per_id, frequency, rtol=1e-4)
    # a row is one h ID, a column one w ID; the t pairs turn between neither
    np.testing.assert_allclose(table.row_neighbours_rad, np.where(axis == "h", frequency, 0), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(table.column_neighbours_rad, np.where(axis == "w", frequency, 0), rtol=1e-3,
                               atol=1e-6)
    np.testing.assert_allclose(table.first_to_last_column_rad, wrapped(np.where(axis == "w", frequency, 0) * 39),
                               rtol=1e-3, atol=1e-6)
    # the finding the Qwen miniature's note rests on: across 40 columns, no pair turns by even 0.01 rad
    assert table.first_to_last_column_rad.max() < 0.01
    assert 0.5 < table.first_to_last_row_rad.max() < math.pi


def test_1d_rope_puts_row_neighbours_a_row_of_ids_apart(tiny_model):
    rows, cols = 4, 6
    table = rotary_reach(tiny_model, rows, cols)
    text = tiny_model.model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    frequency = text.rope_parameters["rope_theta"] ** (-2 * np.arange(head_dim // 2) / head_dim)
    assert set(table.axis) == {"1-D"}
    np.testing.assert_allclose(table.column_neighbours_rad, wrapped(frequency), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(table.row_neighbours_rad, wrapped(frequency * cols), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(table.first_to_last_row_rad, wrapped(frequency * cols * (rows - 1)), rtol=1e-3,
                               atol=1e-5)


def test_cli_writes_the_table_and_its_summary(qwen_7b_heads, tmp_path, capsys):
    assert main(["--model", str(qwen_7b_heads), "--grid", "8x8", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["grid"] == [8, 8] and summary["position_axes"] == 3
    assert summary["column_neighbours_rad"] == pytest.approx(1e6 ** (-80 / 128), rel=1e-3)
    assert (tmp_path / "rotary_reach.csv").read_text().startswith("pair,axis,rad_per_id")


def test_a_malformed_grid_is_refused_by_name(qwen_7b_heads, capsys):
    with pytest.raises(SystemExit):
        main(["--model", str(qwen_7b_heads), "--grid", "8by8"])
    assert "--grid '8by8'" in capsys.readouterr().err


def test_position_ids_of_another_number_of_axes_are_refused_naming_the_checkpoint():
    from types import SimpleNamespace

    model = SimpleNamespace(path="/ckpt/four-axis-rope", adapter=SimpleNamespace(position_axes=4))
    with pytest.raises(ValueError, match=r"/ckpt/four-axis-rope: position IDs with 4 axes"):
        rotary_reach(model, 2, 2)
