"""Tile tags (paper §4.2, Table 1): the text that names each tile in front of its tokens.

Styles: ``none`` (InternVL-1.5 concatenation), ``1d`` (``<tile_1>`` … ``<tile_K>``, NVLM's choice),
``2d_grid`` (``<tile_x{col}_y{row}>``, 0-based) and ``2d_bbox`` (``<box>(x0,y0),(x1,y1)</box>``, the tile's
corners in the resized high-resolution canvas, pixels). The thumbnail, and the lone tile of a 1×1 image,
carry ``thumbnail_tag`` (``<tile_global_thumbnail>`` as released).
"""

from __future__ import annotations

from nvlm.vision.tiling import TilePlan, candidate_grids


def tile_tags(plan: TilePlan, style: str, thumbnail_tag: str) -> list[str]:
    """One tag per tile of `plan`, regular tiles row-major then the thumbnail; '' everywhere for style none."""
    if style == "none":
        return [""] * plan.num_tiles
    if plan.num_regular == 1:  # a lone tile is the global view: released behaviour
        return [thumbnail_tag]
    cols, _ = plan.grid
    if style == "1d":
        tags = [f"<tile_{k + 1}>" for k in range(plan.num_regular)]
    elif style == "2d_grid":
        tags = [f"<tile_x{k % cols}_y{k // cols}>" for k in range(plan.num_regular)]
    elif style == "2d_bbox":
        tags = [f"<box>({x0},{y0}),({x1},{y1})</box>" for x0, y0, x1, y1 in plan.boxes]
    else:
        raise ValueError(f"unknown tile tag style {style!r}; use none, 1d, 2d_grid or 2d_bbox")
    return tags + ([thumbnail_tag] if plan.thumbnail else [])


def all_tags(style: str, thumbnail_tag: str, tile_size: int, min_tiles: int, max_tiles: int) -> list[str]:
    """Every tag the style can produce for these tiling settings (to register them as special tokens)."""
    if style == "none":
        return []
    seen: dict[str, None] = {thumbnail_tag: None}
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        plan = TilePlan(
            width=cols * tile_size, height=rows * tile_size, tile_size=tile_size, grid=(cols, rows), thumbnail=True
        )
        for tag in tile_tags(plan, style, thumbnail_tag):
            seen.setdefault(tag, None)
    return list(seen)
