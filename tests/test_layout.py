"""Prompt layouts for D, X, H (paper §4.2–4.4), tile tag styles (paper Table 1) and `nvlm inspect`.

python -m pytest tests/test_layout.py -q
"""

from __future__ import annotations

import json

import pytest

from nvlm.cli import main
from nvlm.data.layout import describe, image_block, render
from nvlm.data.tags import all_tags, tile_tags
from nvlm.vision.tiling import plan_tiles

P = "{256}"


def test_layouts_for_a_3x2_image():
    plan = plan_tiles(1000, 800)
    d, x, h = (image_block(a, plan, "1d", "<tile_global_thumbnail>") for a in "DXH")
    tags6 = "".join(f"<tile_{k}>" for k in range(1, 7))
    assert render(d, "decoder", 256) == (
        "<Image>" + "".join(f"<tile_{k}>{P}" for k in range(1, 7)) + f"<tile_global_thumbnail>{P}</Image>"
    )
    assert render(x, "decoder", 256) == f"<Image>{tags6}<tile_global_thumbnail></Image>"
    assert render(x, "xattn", 256) == P * 7
    assert render(h, "decoder", 256) == f"<Image><tile_global_thumbnail>{P}</Image>"
    assert render(h, "xattn", 256) == "".join(f"<tile_{k}>{P}" for k in range(1, 7))
    assert [p.own_tile_only for p in x.decoder if p.kind == "tag"] == [True] * 7
    assert not any(p.own_tile_only for p in d.decoder + h.decoder + h.memory)


def test_single_tile_image_has_no_thumbnail_and_global_tag():
    plan = plan_tiles(500, 400)
    assert plan.grid == (1, 1) and not plan.thumbnail
    assert (
        render(image_block("D", plan, "1d", "<tile_global_thumbnail>"), "decoder", 256)
        == f"<Image><tile_global_thumbnail>{P}</Image>"
    )
    h = image_block("H", plan, "1d", "<tile_global_thumbnail>")
    assert h.feature_tiles("decoder") == 1 and h.memory == []


def test_tag_styles():
    plan = plan_tiles(1000, 800)  # 3 cols × 2 rows
    assert tile_tags(plan, "none", "<g>") == [""] * 7
    assert tile_tags(plan, "1d", "<g>") == [f"<tile_{k}>" for k in range(1, 7)] + ["<g>"]
    assert tile_tags(plan, "2d_grid", "<g>")[:4] == ["<tile_x0_y0>", "<tile_x1_y0>", "<tile_x2_y0>", "<tile_x0_y1>"]
    assert tile_tags(plan, "2d_bbox", "<g>")[4] == "<box>(448,448),(896,896)</box>"
    assert render(image_block("D", plan, "none", "<g>"), "decoder", 256) == "<Image>" + P * 7 + "</Image>"
    assert len(all_tags("1d", "<g>", 448, 1, 6)) == 7
    grid = all_tags("2d_grid", "<g>", 448, 1, 6)
    assert "<tile_x5_y0>" in grid and "<tile_x0_y5>" in grid and len(grid) == len(set(grid))
    with pytest.raises(ValueError, match="unknown tile tag style"):
        tile_tags(plan, "3d", "<g>")


def test_describe_counts_feature_and_tag_tokens_separately():
    info = describe(plan_tiles(1000, 800), 256, "1d", "<tile_global_thumbnail>", count_tokens=lambda s: 5)
    assert info["tokens"] == {
        "D": {"decoder": 1792, "xattn": 0},
        "X": {"decoder": 0, "xattn": 1792},
        "H": {"decoder": 256, "xattn": 1536},
    }
    assert info["tag_tokens"] == {
        "D": {"decoder": 35, "xattn": 0},
        "X": {"decoder": 35, "xattn": 0},
        "H": {"decoder": 5, "xattn": 30},
    }


def test_inspect_json(capsys):
    assert main(["inspect", "--size", "1000x800", "--size", "500x400", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    a, b = report
    assert (a["width"], a["height"], a["grid"], a["num_tiles"], a["thumbnail"]) == (1000, 800, [3, 2], 7, True)
    assert a["tokens"]["D"] == {"decoder": 1792, "xattn": 0}
    assert a["tokens"]["H"] == {"decoder": 256, "xattn": 1536}
    assert a["tokens"]["X"] == {"decoder": 0, "xattn": 1792}
    assert len(a["tiles"]) == 7 and a["tiles"][-1]["kind"] == "thumbnail"
    assert (b["grid"], b["num_tiles"], b["thumbnail"]) == ([1, 1], 1, False)
    assert b["tokens"]["H"] == {"decoder": 256, "xattn": 0}


def test_inspect_file_and_errors(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (1920, 1080)).save(tmp_path / "wide.png")
    assert main(["inspect", str(tmp_path / "wide.png")]) == 0
    out = capsys.readouterr().out
    assert "grid 2×1" in out and "3 tiles" in out
    (tmp_path / "bad.png").write_text("<html>not an image</html>")
    assert main(["inspect", str(tmp_path / "bad.png")]) == 2
    assert "bad.png" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["inspect", "--size", "1000by800"])
