"""Image preprocessing: tiling, token counts, layout invariants, crops and patch masks.

Every expected number here is derived by hand from /work/shared/spec/molmoe-1b.md (comments show
the arithmetic); none is copied from the code's output.

Spec constants used throughout:
  crop 336 px = 24 patches of 14 px; margins 4 + 4 patches = 112 px; window = 336 - 112 = 224 px
  scale(rows, cols) = min(rows*224 / (H-112), cols*224 / (W-112)), rows*cols <= 12
  pooled per crop = 12 x 12 = 144; ViT tokens per crop = 24*24 + 1 = 577
  global block = <im_start> + 12 x (12 <im_patch> + <im_col>) + <im_end> = 1 + 12*13 + 1 = 158
  tile block   = <im_start> + R x (C <im_patch> + <im_col>) + <im_end>,
                 R = (rows*16+8)/2, C = (cols*16+8)/2
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from e1.model.arch import load_arch
from e1.model.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    build_input_ids,
    check_context,
    layout_for,
    load_image,
    preprocess,
    select_tiling,
)

ARCH = load_arch("molmoe-1b")
TOK = ARCH.tokens
GLOBAL_BLOCK = 1 + 12 * (12 + 1) + 1  # 158
assert GLOBAL_BLOCK == 158


def tile_block_len(R: int, C: int) -> int:
    return 1 + R * (C + 1) + 1


# (width, height) -> expected tiling (rows, cols), downscaled, R, C
# 336x336: H-112 = W-112 = 224; (1,1): min(224/224, 224/224) = 1 -> smallest scale >= 1. R = C = (16+8)/2 = 12
# 560x560: H-112 = 448; (1,1): 0.5; (1,2): min(0.5, 1) = 0.5; (2,2): min(448/448, 448/448) = 1;
#          (2,3)/(3,2): also 1 but more crops -> tie goes to fewer crops: (2,2). R = C = (32+8)/2 = 20
# 1008x784 (W x H): H-112 = 672, W-112 = 896; scale = min(r/3, c/4) >= 1 needs r >= 3 and c >= 4,
#          i.e. r*c >= 12, so only (3,4). R = (48+8)/2 = 28, C = (64+8)/2 = 36
# 400x1200 (portrait): H-112 = 1088, W-112 = 288; r*224 >= 1088 needs r >= 5 (4*224 = 896 < 1088),
#          c*224 >= 288 needs c >= 2; r*c <= 12 leaves (5,2): min(1120/1088, 448/288) = 1.029 and
#          (6,2): min(1344/1088, 1.556) = 1.235 -> (5,2). R = (80+8)/2 = 44, C = (32+8)/2 = 20
# 64x64: H-112 < 0 -> every tiling "fits"; (1,1) has the smallest scale -> (1,1), R = C = 12
# 4000x200: H-112 = 88, W-112 = 3888; c*224 >= 3888 needs c >= 18 > 12, so nothing reaches 1;
#          largest scale: maximise cols -> (1,12): min(224/88, 12*224/3888 = 0.691) = 0.691 (only
#          tiling with 12 cols). Downscaled. R = 12, C = (192+8)/2 = 100
# 8000x8000: H-112 = W-112 = 7888; scale = min(r, c)*224/7888, largest min(r, c) with r*c <= 12 is 3:
#          (3,3), (3,4), (4,3) tie at 672/7888 = 0.085 -> fewer crops: (3,3). Downscaled.
#          R = C = (48+8)/2 = 28
CASES = {
    (336, 336): ((1, 1), False, 12, 12),
    (560, 560): ((2, 2), False, 20, 20),
    (1008, 784): ((3, 4), False, 28, 36),
    (400, 1200): ((5, 2), False, 44, 20),
    (64, 64): ((1, 1), False, 12, 12),
    (4000, 200): ((1, 12), True, 12, 100),
    (8000, 8000): ((3, 3), True, 28, 28),
}


@pytest.mark.parametrize("size", list(CASES), ids=[f"{w}x{h}" for w, h in CASES])
def test_tiling_and_counts(size):
    w, h = size
    tiling, downscaled, R, C = CASES[size]
    lay = layout_for(ARCH, w, h)
    rows, cols = tiling
    assert lay.image_size == (w, h)
    assert lay.tiling == tiling
    assert lay.downscaled is downscaled
    assert rows * cols <= 12
    assert lay.tile_grid == (R, C)
    # R = (rows*16+8)/2, C = (cols*16+8)/2 (spec formula, cross-check of the table above)
    assert (R, C) == ((rows * 16 + 8) // 2, (cols * 16 + 8) // 2)
    crops = rows * cols + 1  # tiles + global crop
    assert lay.vit_crops == crops
    assert lay.vit_tokens == crops * 577
    assert lay.pooled_features == crops * 144
    assert lay.inserted_features == 144 + R * C
    assert lay.image_tokens == GLOBAL_BLOCK + tile_block_len(R, C)
    counts = lay.counts()
    assert counts["tiling"] == [rows, cols]
    assert counts["vit_crops"] == crops and counts["downscaled"] is downscaled


def test_study_resolutions_exact_numbers():
    # 336x336: 2 crops -> 2*144 = 288 pooled; 144 + 12*12 = 288 inserted; 158 + (1 + 12*13 + 1) = 316 tokens
    a = layout_for(ARCH, 336, 336)
    assert (a.vit_crops, a.vit_tokens, a.pooled_features, a.inserted_features, a.image_tokens) == (
        2, 1154, 288, 288, 316)
    # 560x560: 5 crops -> 5*577 = 2885 ViT tokens, 720 pooled, 144 + 400 = 544 inserted,
    # 158 + (1 + 20*21 + 1) = 158 + 422 = 580 tokens
    b = layout_for(ARCH, 560, 560)
    assert (b.vit_crops, b.vit_tokens, b.pooled_features, b.inserted_features, b.image_tokens) == (
        5, 2885, 720, 544, 580)
    # 1008x784: 13 crops -> 13*577 = 7501, 13*144 = 1872 pooled, 144 + 28*36 = 144 + 1008 = 1152 inserted,
    # 158 + (1 + 28*37 + 1) = 158 + 1038 = 1196 tokens
    c = layout_for(ARCH, 1008, 784)
    assert c.tiling == (3, 4)  # rows x cols: taller-than-wide grid would be wrong for a wide image
    assert (c.vit_crops, c.vit_tokens, c.pooled_features, c.inserted_features, c.image_tokens) == (
        13, 7501, 1872, 1152, 1196)


def test_width_height_order_matters():
    # 784x1008 (W x H) is the transpose of the study's 1008x784: tiling must transpose to (4, 3)
    assert layout_for(ARCH, 784, 1008).tiling == (4, 3)


def test_resized_size_fits_canvas_and_keeps_aspect():
    for (w, h), ((rows, cols), _, _, _) in CASES.items():
        lay = layout_for(ARCH, w, h)
        cw, ch = cols * 224 + 112, rows * 224 + 112
        nw, nh = lay.resized
        assert 1 <= nw <= cw and 1 <= nh <= ch
        # aspect kept: one side fills the canvas, the other is the scaled side (floor, +-1 for float rounding)
        s = min(ch / h, cw / w)
        assert abs(nw - w * s) <= 1 and abs(nh - h * s) <= 1
        assert nw >= cw - 1 or nh >= ch - 1


def test_select_tiling_rules():
    # exact fit (1,1) = scale 1 beats (2,2) = scale 2: smallest scale >= 1
    assert select_tiling(224, 224, 224, 12) == ((1, 1), False)
    # H = W = 448: (2,2), (2,3), (3,2), (2,4), ... all scale exactly 1 -> fewest crops (2,2)
    assert select_tiling(448, 448, 224, 12) == ((2, 2), False)
    # H = 440, W = 200: (1,c) rows give 224/440 < 1; (2,1): min(448/440, 224/200) = 1.018 -> (2,1);
    # (2,2) etc. are also 1.018 (same limiting rows) -> tie, fewer crops
    assert select_tiling(440, 200, 224, 12) == ((2, 1), False)
    # nothing fits: largest scale; (3,3), (3,4), (4,3) tie at 3*224/10000 -> fewer crops (3,3)
    assert select_tiling(10000, 10000, 224, 12) == ((3, 3), True)
    # nothing fits, wide: (1,12) is the only tiling with 12 cols -> largest scale
    assert select_tiling(100, 5000, 224, 12) == ((1, 12), True)
    # fewer allowed crops: 448x448 with max 3 crops cannot reach scale 1;
    # (1,1) 0.5, (1,2) 0.5, (2,1) 0.5, (1,3) 0.5, (3,1) 0.5 -> all tie -> fewest crops (1,1)
    assert select_tiling(448, 448, 224, 3) == ((1, 1), True)
    # non-positive sizes (images inside the margins) behave like tiny images
    assert select_tiling(-48, -48, 224, 12) == ((1, 1), False)
    assert select_tiling(0, 0, 224, 12) == ((1, 1), False)


def test_downscaled_large_image_max_tiles():
    lay = layout_for(ARCH, 8000, 8000)
    assert lay.downscaled
    assert lay.tiling[0] * lay.tiling[1] <= 12
    assert lay.vit_crops <= 13
    # canvas is 3*224+112 = 784 on both sides; a square image fills it
    assert lay.resized == (784, 784)


def test_tiny_image_no_crash():
    lay = layout_for(ARCH, 64, 64)
    assert lay.tiling == (1, 1) and not lay.downscaled
    # canvas 336x336; scale = 336/64 = 5.25 -> 64*5.25 = 336 exactly
    assert lay.resized == (336, 336)
    pp = preprocess(ARCH, Image.new("RGB", (64, 64), (200, 100, 50)))
    assert pp.crops.shape == (2, 3, 336, 336)
    assert np.all(pp.patch_masks == 1.0)


@pytest.mark.parametrize("w,h", [(0, 10), (10, 0), (-5, 10)])
def test_zero_size_raises(w, h):
    with pytest.raises(ValueError, match="positive"):
        layout_for(ARCH, w, h)


# --- layout invariants -------------------------------------------------------------------------

def expected_image_ids(R: int, C: int) -> list[int]:
    def block(r, c):
        return [TOK["im_start"]] + ([TOK["im_patch"]] * c + [TOK["im_col"]]) * r + [TOK["im_end"]]
    return block(12, 12) + block(R, C)


@pytest.mark.parametrize("size", list(CASES), ids=[f"{w}x{h}" for w, h in CASES])
def test_layout_invariants(size):
    lay = layout_for(ARCH, *size)
    tiling, _, R, C = CASES[size]
    rows, cols = tiling
    text = [11, 12, 13, 14, 15]
    ids = build_input_ids(ARCH, lay, text)
    assert ids.dtype == np.int64
    # BOS + image tokens + text, in that order, exactly as the spec's layout
    assert ids[0] == TOK["bos"] == 50279
    assert list(ids[1 : 1 + lay.image_tokens]) == expected_image_ids(R, C)
    assert list(ids[1 + lay.image_tokens :]) == text
    assert len(ids) == 1 + lay.image_tokens + len(text)

    pos, feat = lay.token_position, lay.feature_index
    assert len(pos) == len(feat) == lay.inserted_features
    # positions: unique, inside the image span (after BOS, before the text), every one an <im_patch>
    assert len(np.unique(pos)) == len(pos)
    assert pos.min() >= 1 and pos.max() <= lay.image_tokens
    assert np.all(ids[pos] == TOK["im_patch"])
    # every <im_patch> gets a feature: count of <im_patch> == inserted features
    assert int((ids == TOK["im_patch"]).sum()) == lay.inserted_features == 144 + R * C
    # feature indices: unique, < computed pooled features
    assert len(np.unique(feat)) == len(feat)
    assert feat.min() >= 0 and feat.max() < lay.pooled_features
    # global crop (crop 0) first, all 144 features, row-major into the global block:
    # BOS at 0, <im_start> at 1, row r starts at 2 + r*13
    assert np.array_equal(feat[:144], np.arange(144))
    exp_gpos = [2 + r * 13 + c for r in range(12) for c in range(12)]
    assert np.array_equal(pos[:144], exp_gpos)
    # tile features: 10 pooled rows/cols on an outer edge, 8 on an inner one (single tile: 12)
    crop_of = feat[144:] // 144
    for ti in range(rows):
        for tj in range(cols):
            k = 1 + ti * cols + tj
            n_r = 12 if rows == 1 else (10 if ti in (0, rows - 1) else 8)
            n_c = 12 if cols == 1 else (10 if tj in (0, cols - 1) else 8)
            assert int((crop_of == k).sum()) == n_r * n_c
    # geometry: tile (ti,tj) pooled cell (r,c) sits at tile-grid cell (ti*8 + r, tj*8 + c)
    # (tiles stride 224 px = 16 patches = 8 pooled cells); tile block starts at 1 + 158 (BOS + global),
    # its first <im_patch> at 1 + 158 + 1 = 160
    t_start = 1 + GLOBAL_BLOCK + 1
    for f, p in zip(feat[144:], pos[144:]):
        k, rc = divmod(int(f), 144)
        r, c = divmod(rc, 12)
        ti, tj = divmod(k - 1, cols)
        gr, gc = ti * 8 + r, tj * 8 + c
        assert 0 <= gr < R and 0 <= gc < C
        assert p == t_start + gr * (C + 1) + gc


# --- pixels ------------------------------------------------------------------------------------

def _rgb_gradient(w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def test_preprocess_shapes_square():
    pp = preprocess(ARCH, _rgb_gradient(336, 336))
    assert pp.layout.tiling == (1, 1)
    assert pp.crops.shape == (2, 3, 336, 336) and pp.crops.dtype == np.float32
    assert pp.patch_masks.shape == (2, 576) and pp.patch_masks.dtype == np.float32
    # a 336x336 image fills the global crop exactly: every patch is all real pixels
    assert np.all(pp.patch_masks[0] == 1.0)
    # and the single tile canvas 336x336 too
    assert np.all(pp.patch_masks[1] == 1.0)


def test_preprocess_uniform_colour_normalised():
    colour = np.array([255, 0, 128], dtype=np.float32)
    pp = preprocess(ARCH, Image.new("RGB", (336, 336), tuple(int(v) for v in colour)))
    want = (colour / 255.0 - CLIP_MEAN) / CLIP_STD  # CLIP normalisation of the real pixels
    got = pp.crops[0].reshape(3, -1)
    np.testing.assert_allclose(got.min(axis=1), want, atol=1e-4)
    np.testing.assert_allclose(got.max(axis=1), want, atol=1e-4)
    assert abs(float(CLIP_MEAN[0]) - 0.48145466) < 1e-7 and abs(float(CLIP_STD[2]) - 0.27577711) < 1e-7


def test_preprocess_portrait_masks_and_crops():
    # 400x1200 (W x H): tiling (5,2) (see CASES) -> 11 crops
    pp = preprocess(ARCH, _rgb_gradient(400, 1200))
    lay = pp.layout
    assert lay.tiling == (5, 2)
    assert pp.crops.shape == (11, 3, 336, 336)
    assert pp.patch_masks.shape == (11, 576)
    assert pp.patch_masks.min() >= 0.0 and pp.patch_masks.max() <= 1.0

    # global crop: scale = min(336/1200, 336/400) = 0.28 -> 336 x (400*0.28 = 112) px, centred:
    # left pad (336-112)/2 = 112 px = 8 patches -> patch cols 0-7 and 16-23 empty, 8-15 full
    g = pp.patch_masks[0].reshape(24, 24)
    assert np.all(g[:, :8] == 0) and np.all(g[:, 16:] == 0) and np.all(g[:, 8:16] == 1)

    # tile canvas: (5*224+112) x (2*224+112) = 1232 x 560 (H x W); scale = min(1232/1200, 560/400)
    # = 1.0267 -> width int(400*1.0267) = int(410.67) = 410 px, left pad (560-410)//2 = 75 px
    # = 5 patches + 5 px: patch col 5 (px 70..84) has 84-75 = 9 real px of 14 -> 9/14;
    # right edge at 75+410 = 485 = 34*14 + 9 -> canvas patch col 34 (px 476..490) has 9/14 real.
    assert lay.resized[0] == 410
    m = pp.patch_masks[1:].reshape(5, 2, 24, 24)  # (tile row, tile col, patch row, patch col)
    left = m[:, 0]  # tiles in column 0 cover canvas x 0..336
    assert np.all(left[:, :, :5] == 0)
    np.testing.assert_allclose(left[:, 1:-1, 5], 9 / 14, atol=1e-6)  # rows away from top/bottom edge
    assert np.all(left[:, 1:-1, 6:] == 1)
    right = m[:, 1]  # tiles in column 1 cover canvas x 224..560 -> canvas patch col 34 is tile col 34-16 = 18
    np.testing.assert_allclose(right[:, 1:-1, 18], 9 / 14, atol=1e-6)
    assert np.all(right[:, :, 19:] == 0)
    assert np.all(right[:, 1:-1, :18] == 1)
    # some patches padded, some partial
    assert (pp.patch_masks == 0).any()
    assert ((pp.patch_masks > 0) & (pp.patch_masks < 1)).any()

    # neighbouring tiles overlap by 336 - 224 = 112 px
    c = pp.crops[1:].reshape(5, 2, 3, 336, 336)
    np.testing.assert_array_equal(c[0, 0, :, :, 224:], c[0, 1, :, :, :112])  # left/right neighbours
    np.testing.assert_array_equal(c[0, 0, :, 224:, :], c[1, 0, :, :112, :])  # top/bottom neighbours
    # padding pixels are zero before normalisation -> -mean/std
    pad_val = -CLIP_MEAN / CLIP_STD
    np.testing.assert_allclose(c[2, 0, :, 100, 0], pad_val, atol=1e-5)


def test_preprocess_wide_masks():
    # 1008x784: canvas (3*224+112) x (4*224+112) = 784 x 1008 exactly the image size -> no padding
    pp = preprocess(ARCH, _rgb_gradient(1008, 784))
    assert pp.crops.shape == (13, 3, 336, 336)
    assert np.all(pp.patch_masks[1:] == 1.0)
    # global crop: scale = min(336/784, 336/1008) = 1/3 -> 336 x (784/3 = 261.33 -> 261) px (W x H),
    # top pad (336-261)//2 = 37 px = 2 patches + 9 px -> patch row 2 has 14-9 = 5/14 real
    g = pp.patch_masks[0].reshape(24, 24)
    assert np.all(g[:2] == 0)
    np.testing.assert_allclose(g[2], 5 / 14, atol=1e-6)
    assert np.all(g[3:20] == 1)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_non_rgb_modes_converted(mode):
    base = Image.new("RGB", (200, 300), (255, 0, 0))
    img = base.convert(mode)
    assert img.mode == mode
    pp = preprocess(ARCH, img)
    assert pp.crops.shape[1:] == (3, 336, 336)
    # the real pixels of the global crop, denormalised, equal the image's RGB conversion
    want = np.asarray(img.convert("RGB"), dtype=np.float32)[0, 0] / 255.0
    g = pp.crops[0] * CLIP_STD[:, None, None] + CLIP_MEAN[:, None, None]
    mask = pp.patch_masks[0].reshape(24, 24) == 1
    centre = g[:, 168, 168]  # the image is centred in the crop
    assert mask[12, 12]
    np.testing.assert_allclose(centre, want, atol=1e-4)
    if mode == "L":
        assert np.allclose(centre[0], centre[1], atol=1e-4) and np.allclose(centre[1], centre[2], atol=1e-4)


def test_preprocess_zero_size_raises():
    with pytest.raises(ValueError):
        preprocess(ARCH, Image.new("RGB", (0, 10)))


def test_load_image_unreadable(tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="not_an_image.png"):
        load_image(bad)
    missing = tmp_path / "missing.jpg"
    with pytest.raises(ValueError, match="missing.jpg"):
        load_image(missing)


def test_load_image_roundtrip(tmp_path):
    p = tmp_path / "ok.png"
    Image.new("RGB", (50, 40), (1, 2, 3)).save(p)
    img = load_image(p)
    assert img.size == (50, 40)
    assert preprocess(ARCH, img).layout.tiling == (1, 1)


# --- context check ---------------------------------------------------------------------------

def test_check_context():
    # N new tokens = prefill forward + N-1 decode forwards -> positions = prefill + N - 1
    check_context(ARCH, 4096, 0)
    check_context(ARCH, 4096, 1)  # 4096 + 0
    check_context(ARCH, 4000, 97)  # 4000 + 96 = 4096
    with pytest.raises(ValueError) as e:
        check_context(ARCH, 4000, 98)  # 4000 + 97 = 4097
    assert "4096" in str(e.value) and "4097" in str(e.value)
    with pytest.raises(ValueError) as e:
        check_context(ARCH, 5000)
    assert "4096" in str(e.value) and "5000" in str(e.value)


def test_study_resolutions_fit_context():
    # 1008x784: 1 + 1196 image tokens + a short prompt + 256 new tokens is well inside 4096
    lay = layout_for(ARCH, 1008, 784)
    check_context(ARCH, 1 + lay.image_tokens + 20, 256)


# --- arch ------------------------------------------------------------------------------------

def test_load_arch_unknown():
    with pytest.raises(ValueError) as e:
        load_arch("nope")
    msg = str(e.value)
    assert "nope" in msg and "molmoe-1b" in msg and "molmoe-1b-tiny" in msg


def test_arch_spec_facts():
    a = ARCH
    assert a.patches_per_side == 24 and a.pooled_per_side == 12 and a.feature_dim == 2048
    assert a.tokens == {"bos": 50279, "eos": 50279, "im_start": 50280, "im_end": 50281, "im_patch": 50282,
                        "im_col": 50283, "image": 50284, "pad": 1}
    assert a.llm["max_position_embeddings"] == 4096
    assert a.vision["num_layers"] == 23 and a.vision["feature_layers"] == [-2, -9]


def test_tiny_arch_same_token_counts():
    # the tiny arch keeps the preprocessing: token counts are identical to the full model
    tiny = load_arch("molmoe-1b-tiny")
    for size in [(336, 336), (560, 560), (1008, 784)]:
        assert layout_for(tiny, *size).counts() == layout_for(ARCH, *size).counts()
