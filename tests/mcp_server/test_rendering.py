"""COCO compressed RLE checked against strings pycocotools produced, not against the project's own decoder, so a bug
shared by the encoder and the decoder cannot pass."""

import numpy as np
import pytest

from mcp_server.rendering import coco_rle, decode_coco_rle


def golden_masks() -> dict[str, np.ndarray]:
    """The masks the golden strings were computed for (bool [H, W]; built the same way every time)."""
    rows, cols = np.indices((7, 13))
    tall_rows, tall_cols = np.indices((255, 3))
    long_runs = np.zeros((64, 48), dtype=bool)
    long_runs[:, 5:30] = True  # 25 whole columns: one run of 1,600 pixels in column-major order
    long_runs[10:50, 33] = True  # a run of 40
    long_runs[3, 40:] = True  # runs of 1 between runs of 63 zeros
    starts_with_one = np.zeros((5, 6), dtype=bool)
    starts_with_one[0:2, 0] = True
    starts_with_one[4, 5] = True
    return {
        "1x1 off": np.zeros((1, 1), dtype=bool),
        "1x1 on": np.ones((1, 1), dtype=bool),
        "1x17": (np.arange(17) % 5 < 2)[None, :],
        "17x1": (np.arange(17) % 3 == 1)[:, None],
        "7x13": (rows * 3 + cols * 5) % 7 < 3,
        "255x3": (tall_rows // (tall_cols + 7)) % 2 == 1,
        "all off 20x30": np.zeros((20, 30), dtype=bool),
        "all on 20x30": np.ones((20, 30), dtype=bool),
        "starts with one 5x6": starts_with_one,
        "long runs 64x48": long_runs,
        "random 19x23": np.random.default_rng(20_251_204).random((19, 23)) < 0.5,
        "sparse random 31x37": np.random.default_rng(7).random((31, 37)) < 0.08,
    }


# Computed once with pycocotools 2.0.11, which is not a test dependency (these strings are the reference):
#     from pycocotools import mask as coco
#     for name, mask in golden_masks().items():
#         rle = coco.encode(np.asfortranarray(mask.astype(np.uint8)))
#         print(name, rle["size"], rle["counts"].decode())
GOLDEN: dict[str, tuple[list[int], str]] = {
    "1x1 off": ([1, 1], "1"),
    "1x1 on": ([1, 1], "01"),
    "1x17": ([1, 17], "02300000"),
    "17x1": ([17, 1], "112000000000"),
    "7x13": ([7, 13], "0120O010O01000O0010O1000O0001000O10O001000O010O01000O0010O1000O0001000O0"),
    "255x3": (
        [255, 3],
        "77700000000000000000000000000000000041M0000000000000000000000000000O1200000000000000000000000000J",
    ),
    "all off 20x30": ([20, 30], "hb0"),
    "all on 20x30": ([20, 30], "0hb0"),
    "starts with one 5x6": ([5, 6], "02k0O"),
    "long runs 64x48": ([64, 48], "P:Pb1Z6X_NW6iN^E0000000000000M"),
    "random 19x23": (
        [19, 23],
        "0211062INO000011O10N002011OOO1O0101ON21NO1010N10O1100OO22O1ON0O22NO1O00O30N0O30M020N200100N01O060M4NNOO0"
        "N010O00020N1001010N21NOO13OM12ON00030N11OO0O10O10040LO00002025NLOOO0100200O25NKO010N014OO0M0010O01024M10"
        "O2M1OM24NN1N0",
    ),
    "sparse random 31x37": (
        [31, 37],
        "113080M0I060J0k00]O010M0a00C0K0j00\\O0L0M090G090C0n00VO0O0Q10RO0O031JO3060M0c00WO00070G000=0F0N0O0701020N"
        "08040D0H050<0C0:0H0;0G0N1f0OUO0407010H060L0I00010Y11oNOJ03021IOj00E0L070<0QO0g00I0I0P10^O0_O0101001l0",
    ),
}
MASKS = golden_masks()


def column_major_runs(mask: np.ndarray) -> list[int]:
    flat = mask.ravel(order="F")
    bounds = [0, *(np.flatnonzero(np.diff(flat)) + 1).tolist(), flat.size]
    return np.diff(bounds).tolist()


def test_the_golden_masks_cover_odd_sizes_a_leading_one_and_long_runs() -> None:
    assert MASKS.keys() == GOLDEN.keys()
    shapes = {mask.shape for mask in MASKS.values()}
    assert {(1, 1), (1, 17), (17, 1), (7, 13), (255, 3)} <= shapes
    assert not MASKS["all off 20x30"].any() and MASKS["all on 20x30"].all()
    assert MASKS["starts with one 5x6"][0, 0] and MASKS["1x1 on"][0, 0]
    runs = column_major_runs(MASKS["long runs 64x48"])
    assert max(runs) > 1024 and any(32 < run < 1024 for run in runs)
    assert all(mask.dtype == bool for mask in MASKS.values())


@pytest.mark.parametrize("name", GOLDEN)
def test_coco_rle_gives_exactly_the_string_pycocotools_gives(name: str) -> None:
    size, counts = GOLDEN[name]
    assert coco_rle(MASKS[name]) == {"size": size, "counts": counts}


@pytest.mark.parametrize("name", GOLDEN)
def test_a_pycocotools_string_decodes_to_its_mask(name: str) -> None:
    size, counts = GOLDEN[name]
    decoded = decode_coco_rle({"size": size, "counts": counts})
    assert decoded.dtype == bool and decoded.shape == tuple(size)
    np.testing.assert_array_equal(decoded, MASKS[name])
