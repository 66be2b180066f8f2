"""R4 / T2: a file or directory swapped for a symlink to the outside while images are being read never leaks the
outside file: every read returns the inside image or refuses.

A thread flips, as fast as it can, ``root/race.png`` between a regular file and a symlink to an outside image, and
``root/dir`` between a real directory and a symlink to an outside directory, with atomic renames. Meanwhile the
loader reads both paths over and over. The outside image has its own size, so a leak cannot go unnoticed.
"""

import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from reliability_support import record_figures, sizes

from mcp_server import image_io
from mcp_server.image_io import ImageInputError, ImagePolicy, load_image


INSIDE_SIZE, OUTSIDE_SIZE = (16, 10), (20, 20)


def save(path: Path, size: tuple[int, int], seed: int) -> None:
    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "PNG")


def flip_forever(root: Path, outside: Path, stop: threading.Event, flips: list[int]) -> None:
    """Swap each target between its real and its symlinked form until ``stop`` is set."""
    real_file, real_dir = root / "real.png", root / "real-dir"
    count = 0
    try:
        while not stop.is_set():
            for target, inside, escape in (
                (root / "race.png", real_file, outside / "secret.png"),
                (root / "dir", real_dir, outside),
            ):
                staging = root / f".staging-{target.name}"
                if count % 2:
                    staging.symlink_to(escape)
                elif inside.is_dir():
                    staging.symlink_to(inside)  # the inside directory, reached through an inside link
                else:
                    shutil.copyfile(inside, staging)  # a fresh regular file (a new inode each time)
                os.replace(staging, target)
            count += 1
    finally:
        flips.append(count)


@pytest.mark.parametrize("reads", sizes(200, 2000))
def test_swapping_files_and_directories_for_symlinks_never_leaks_the_outside(tmp_path: Path, reads: int) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "real-dir").mkdir(parents=True)
    outside.mkdir()
    save(root / "real.png", INSIDE_SIZE, 1)
    save(root / "real-dir" / "secret.png", INSIDE_SIZE, 2)
    save(outside / "secret.png", OUTSIDE_SIZE, 3)
    shutil.copyfile(root / "real.png", root / "race.png")
    (root / "dir").symlink_to(root / "real-dir")
    policy = ImagePolicy(allowed_dirs=(root,))

    stop, flips = threading.Event(), []
    flipper = threading.Thread(target=flip_forever, args=(root, outside, stop, flips))
    flipper.start()
    served = refused = 0
    leaks: list[str] = []
    try:
        index = 0
        # At least ``reads`` reads, and on until both states of the race have been hit (a loaded machine can leave
        # the flipping thread unscheduled for a while), within a bound.
        while index < reads or (not (served and refused) and index < 20 * reads):
            index += 1
            path = root / "race.png" if index % 2 else root / "dir" / "secret.png"
            try:
                image = load_image(str(path), policy)
            except ImageInputError:
                refused += 1
                continue
            served += 1
            if (image.width, image.height) != INSIDE_SIZE:
                leaks.append(f"read {index} of {path.name} returned the outside image")
    finally:
        stop.set()
        flipper.join()
    record_figures(
        f"R4 symlink swap race ({reads} reads)",
        {"reads": index, "served_inside": served, "refused": refused, "escapes": len(leaks), "flips": flips[0]},
    )
    assert not leaks, leaks[:5]
    assert served > 0 and refused > 0, (served, refused)  # both states of the race were really hit


@pytest.mark.parametrize(
    ("swapped", "message"), [("file", "could not be opened"), ("parent directory", "not inside an allowed directory")]
)
def test_a_swap_exactly_between_the_check_and_the_open_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swapped: str, message: str
) -> None:
    """The race's worst moment, made certain: the path is swapped right after ``realpath`` approved it. A swapped
    file is refused by ``O_NOFOLLOW``; a swapped parent directory by re-checking where the open descriptor points."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "dir").mkdir(parents=True)
    outside.mkdir()
    save(root / "dir" / "secret.png", INSIDE_SIZE, 1)
    save(outside / "secret.png", OUTSIDE_SIZE, 2)
    policy = ImagePolicy(allowed_dirs=(root,))
    real_realpath = image_io.os.path.realpath

    def realpath_then_swap(path, *args, **kwargs):
        resolved = real_realpath(path, *args, **kwargs)
        if str(path).endswith("secret.png"):
            if swapped == "file":
                (root / "dir" / "secret.png").unlink()
                (root / "dir" / "secret.png").symlink_to(outside / "secret.png")
            else:
                shutil.rmtree(root / "dir")
                (root / "dir").symlink_to(outside)
        return resolved

    monkeypatch.setattr(image_io.os.path, "realpath", realpath_then_swap)
    with pytest.raises(ImageInputError, match=message):
        load_image(str(root / "dir" / "secret.png"), policy)


def test_a_link_replaced_while_it_is_being_resolved_is_a_clean_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``realpath`` raises EINVAL when a link it saw becomes a file before it reads the link (the full race run hit
    this); the caller gets a refusal, not an OS error."""
    save(tmp_path / "a.png", INSIDE_SIZE, 1)
    policy = ImagePolicy(allowed_dirs=(tmp_path,))

    def replaced_mid_resolution(path, *args, **kwargs):
        raise OSError(22, "Invalid argument", str(path))

    monkeypatch.setattr(image_io.os.path, "realpath", replaced_mid_resolution)
    with pytest.raises(ImageInputError, match="changed while it was read"):
        load_image(str(tmp_path / "a.png"), policy)
