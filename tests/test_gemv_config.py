"""GEMV configs (kernels/gemv_config.py) and the int4 asm GEMV's config choice and x planes (CPU: no kernels run)."""

from __future__ import annotations

import pytest
import torch

from quanta.kernels.gemv_config import GemvConfig, _shape_configs, default_config


@pytest.mark.parametrize("text", ["bn8_bk1024_sk1_w4_s1", "bn8_bk1024_sk1_w4_s1_nx", "bn8_bk1024_sk0_w4_s3_tma",
                                  "bn4_bk1024_sk1_w4_s1_nx_r64_xp", "bn64_bk128_sk4_w4_s3_dott",
                                  "bn64_bk128_sk0_w4_s3_dotto"])
def test_config_text_round_trip(text):
    cfg = GemvConfig.parse(text)
    assert str(cfg) == text and GemvConfig.parse(str(cfg)) == cfg


def test_config_flags():
    cfg = GemvConfig.parse("bn4_bk1024_sk1_w4_s1_nx_r64_xp")
    assert (cfg.block_n, cfg.block_k, cfg.split_k, cfg.next_step, cfg.max_regs, cfg.x_planes, cfg.tma) == (
        4, 1024, 1, True, 64, True, False)
    with pytest.raises(ValueError, match="bad GEMV config field"):
        GemvConfig.parse("bn4_bk1024_zz")


def test_shape_configs_parse_and_errors():
    table = _shape_configs("6144x4096=bn8_bk1024_sk1_w4_s1; 4096x14336=bn8_bk1024_sk1_w4_s1_nx")
    assert table[(6144, 4096)] == GemvConfig.parse("bn8_bk1024_sk1_w4_s1")
    assert table[(4096, 14336)].next_step
    with pytest.raises(ValueError, match="NxK=config"):
        _shape_configs("6144=bn8_bk1024")


def test_int4_configs_by_size():
    """5-16 rows: small weights (8B qkv / o) split K 4 ways; large ones (gate_up / down) take `_dotto`."""
    assert default_config("w4", 16, 6144, 4096) == GemvConfig.parse("bn64_bk128_sk4_w4_s3_dott")
    assert default_config("w4", 16, 28672, 4096) == GemvConfig.parse("bn64_bk128_sk0_w4_s3_dotto")
    assert default_config("w8", 16, 28672, 4096) == GemvConfig.parse("bn64_bk128_sk0_w4_s3_dott")


def test_asm_config_for_long_k():
    from quanta.quantization import w_int_gemv_asm

    assert w_int_gemv_asm.config_for(4096, 14336).next_step  # K >= LONG_K: the next step in registers
    assert w_int_gemv_asm.config_for(4096, 4096).next_step  # and below it (fifteenth session, H200 8B o_proj)
    assert w_int_gemv_asm.config_for(4096, 4096).split_k == 1


def test_x_planes_pairs():
    """Plane j of chunk c, word w holds (x[8w + j], x[8w + j + 4]) of that chunk as one int32 (low half first)."""
    from quanta.quantization.w_int_gemv_asm import x_planes

    x = torch.arange(512, dtype=torch.float32).to(torch.bfloat16)  # exact small integers
    planes = x_planes(x, 128).view(torch.bfloat16).reshape(4, 4, 16, 2)  # [chunk, j, w, (lo, hi)]
    for c, j, w in [(0, 0, 0), (1, 3, 15), (3, 2, 7)]:
        base = 128 * c + 8 * w + j
        assert planes[c, j, w].tolist() == [float(base), float(base + 4)]


def test_small_one_row_w16_config():
    # one row, <= 8M weights (the 1B o_proj): bn4_bk2048 without split-K or cp.async stages; larger keep bn4_bk512
    assert default_config("w16", 1, 2048, 2048) == GemvConfig.parse("bn4_bk2048_sk1_w4_s1")
    assert default_config("w16", 1, 4096, 4096) == GemvConfig.parse("bn4_bk512_sk0_w4_s3")
    assert default_config("w16", 2, 2048, 2048) == GemvConfig.parse("bn4_bk512_sk0_w4_s3")


def test_register_cap_launch_kwargs() -> None:
    from quanta.kernels.gemv_config import GemvConfig

    assert GemvConfig.parse("bn4_bk1024_sk1_w4_s1_nx_r128").launch_kwargs() == {"maxnreg": 128}
    assert GemvConfig.parse("bn4_bk1024_sk1_w4_s1_nx").launch_kwargs() == {}
