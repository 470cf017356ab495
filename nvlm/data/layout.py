"""Where each tile of an image goes for NVLM-D, NVLM-X and NVLM-H (paper §4.2–4.4).

An image block is two lists of pieces: what enters the decoder sequence, and what enters the
cross-attention memory. With K ≥ 2 regular tiles (T = thumbnail, {256} = a tile's feature tokens):

    D  decoder  <Image><tile_1>{256}…<tile_K>{256}<tile_global_thumbnail>{256}</Image>
       memory   (none)
    X  decoder  <Image><tile_1>…<tile_K><tile_global_thumbnail></Image>   each tag sees only its own tile
       memory   {256} per tile, thumbnail last
    H  decoder  <Image><tile_global_thumbnail>{256 of T}</Image>
       memory   emb(<tile_1>){256}…emb(<tile_K>){256}                      tag text embeddings in the memory

A 1×1 image has one tile and no thumbnail; it is tagged <tile_global_thumbnail> and, for H, goes to the decoder.
The newline after </Image> belongs to the prompt text (``<image>\\n{question}``), as in the released model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from nvlm.data.tags import tile_tags
from nvlm.vision.tiling import TilePlan


@dataclass(frozen=True)
class Piece:
    """``text``: plain text; ``tag``: the tile tag of tile `tile`; ``tile``: that tile's feature tokens.

    `own_tile_only` marks a decoder tag whose cross-attention row sees only its own tile (NVLM-X).
    """

    kind: str
    text: str = ""
    tile: int = -1
    own_tile_only: bool = False


@dataclass(frozen=True)
class ImageBlock:
    decoder: list[Piece]
    memory: list[Piece]

    def pieces(self, where: str) -> list[Piece]:
        """`where` is "decoder" or "xattn" (the cross-attention memory)."""
        return self.decoder if where == "decoder" else self.memory

    def feature_tiles(self, where: str) -> int:
        return sum(p.kind == "tile" for p in self.pieces(where))

    def tags(self, where: str) -> list[str]:
        return [p.text for p in self.pieces(where) if p.kind == "tag"]


def image_block(
    arch: str, plan: TilePlan, style: str, thumbnail_tag: str, image_start: str = "<Image>", image_end: str = "</Image>"
) -> ImageBlock:
    tags = tile_tags(plan, style, thumbnail_tag)
    n = plan.num_tiles
    start, end = Piece("text", image_start), Piece("text", image_end)
    if arch == "D":
        body = [p for k in range(n) for p in (_tag(tags[k], k), Piece("tile", tile=k))]
        return ImageBlock(decoder=_compact([start, *body, end]), memory=[])
    if arch == "X":
        body = [_tag(tags[k], k, own_tile_only=True) for k in range(n)]
        return ImageBlock(decoder=_compact([start, *body, end]), memory=[Piece("tile", tile=k) for k in range(n)])
    if arch == "H":
        g = n - 1  # the thumbnail (or the lone tile of a 1×1 image) goes to the decoder
        decoder = _compact([start, _tag(tags[g], g), Piece("tile", tile=g), end])
        memory = [p for k in range(g) for p in (_tag(tags[k], k), Piece("tile", tile=k))]
        return ImageBlock(decoder=decoder, memory=_compact(memory))
    raise ValueError(f"unknown architecture {arch!r}; use D, X or H")


def _tag(text: str, tile: int, own_tile_only: bool = False) -> Piece | None:
    return Piece("tag", text, tile=tile, own_tile_only=own_tile_only) if text else None


def _compact(pieces: list[Piece | None]) -> list[Piece]:
    return [p for p in pieces if p is not None]


def render(block: ImageBlock, where: str, tokens_per_tile: int) -> str:
    """The block as a readable string: tiles as ``{256}``, memory pieces joined by spaces."""
    return "".join(f"{{{tokens_per_tile}}}" if p.kind == "tile" else p.text for p in block.pieces(where))


def describe(
    plan: TilePlan,
    tokens_per_tile: int,
    style: str,
    thumbnail_tag: str,
    count_tokens: Callable[[str], int] = lambda s: 1 if s else 0,
) -> dict:
    """What `nvlm inspect` reports for one image: the tiling, and per architecture the image-feature tokens
    (and, separately, tile-tag tokens) in the decoder sequence and in the cross-attention memory."""
    info = plan.to_dict()
    info["tiles"] = [{"index": k, "kind": "tile", "box": list(b)} for k, b in enumerate(plan.boxes)]
    if plan.thumbnail:
        info["tiles"].append({"index": plan.num_regular, "kind": "thumbnail", "box": [0, 0, plan.width, plan.height]})
    info["tokens"], info["tag_tokens"], info["layout"] = {}, {}, {}
    for arch in ("D", "X", "H"):
        block = image_block(arch, plan, style, thumbnail_tag)
        info["tokens"][arch] = {w: block.feature_tiles(w) * tokens_per_tile for w in ("decoder", "xattn")}
        info["tag_tokens"][arch] = {w: sum(count_tokens(t) for t in block.tags(w)) for w in ("decoder", "xattn")}
        info["layout"][arch] = {w: render(block, w, tokens_per_tile) for w in ("decoder", "xattn")}
    return info
