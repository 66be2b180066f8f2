"""``nextchat-mcp call``: mistakes answered before the model loads (it is never built), ``--save`` writes the masks
and overlays the call returns, and ``--help`` shows what applies to ``call``."""

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mcp_server.state
from mcp_server.call_command import call_main
from mcp_server.settings import Settings


REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every model the call command builds, by name; building one fails (no model is loaded in these tests)."""
    built: list[str] = []

    def factory(settings: Settings) -> Callable[[], object]:
        def build() -> object:
            built.append(settings.model)
            raise RuntimeError("this test loads no model")

        return build

    monkeypatch.setattr(mcp_server.state, "default_runner_factory", factory)
    return built


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    status = call_main(list(argv))
    return status, capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "status", "words"),
    [
        (["locat_objects", "{}"], 2, ["unknown tool 'locat_objects'", "did you mean 'locate_objects'"]),
        (["locate_objects", "{'image': 1}"], 2, ["arguments are not JSON", "one JSON object"]),
        (["locate_objects", "[1, 2]"], 2, ["must be a JSON object, not list"]),
        (["locate_objects", '{"image": "IMAGE", "qurey": "a"}'], 1, ["unknown argument 'qurey'", "'query'"]),
        (["segment_object", '{"image": "IMAGE", "query": "a", "box": [1, 2, 3, 4]}'], 1, ["exactly one of"]),
        (["visual_qa", '{"image": "IMAGE", "question": "   "}'], 1, ["question"]),
        (["locate_objects", '{"image": "DIR/missing.png", "query": "a"}'], 1, ["does not exist"]),
        (["locate_objects", '{"image": "/etc/hostname", "query": "a"}'], 1, ["not inside an allowed directory"]),
        (["locate_objects", '{"image": "DIR/text.png", "query": "a"}'], 1, ["image"]),
        (["locate_objects", '{"image": "img_' + "0" * 32 + '", "query": "a"}'], 1, ["expired or was never issued"]),
        (["segment_object", '{"image": "IMAGE", "box": [900, 900, 990, 990]}'], 1, ["outside the 64x48 image"]),
        (["status", "{}", "--save", "DIR/text.png"], 2, ["--save", "writable directory"]),
    ],
)
def test_a_mistake_is_answered_without_building_the_model(
    capsys: pytest.CaptureFixture[str],
    builds: list[str],
    tmp_path: Path,
    argv: list[str],
    status: int,
    words: list[str],
) -> None:
    image = tmp_path / "scene.png"
    Image.fromarray(np.zeros((48, 64, 3), dtype=np.uint8)).save(image)
    (tmp_path / "text.png").write_text("not a picture")
    argv = [a.replace("IMAGE", str(image)).replace("DIR", str(tmp_path)) for a in argv]
    got, err = run(capsys, *argv, "--allow-dir", str(tmp_path), "--decode-workers", "1")
    assert (got, builds) == (status, []), err
    for word in words:
        assert word in err


def test_a_call_that_gets_as_far_as_the_model_builds_it(
    capsys: pytest.CaptureFixture[str], builds: list[str], tmp_path: Path
) -> None:
    """The control for the test above: the same command with nothing wrong does reach the model."""
    image = tmp_path / "scene.png"
    Image.fromarray(np.zeros((48, 64, 3), dtype=np.uint8)).save(image)
    arguments = json.dumps({"image": str(image), "query": "a"})
    got, err = run(capsys, "locate_objects", arguments, "--allow-dir", str(tmp_path), "--decode-workers", "1")
    assert got == 1 and builds == ["demo"]
    assert "this test loads no model" in err


def clean_environment(**extra: str) -> dict[str, str]:
    kept = {k: v for k, v in os.environ.items() if not k.startswith("NEXTCHAT_")}
    return kept | {"PYTHONPATH": str(REPO)} | extra


def test_an_argument_error_comes_back_even_when_the_model_could_never_load(tmp_path: Path) -> None:
    """Through the real command: with --model naming nothing, the answer is still the mistake in the call."""
    done = subprocess.run(
        [sys.executable, "-m", "mcp_server", "call", "locate_objects", '{"image": "/x.png", "max_object": 3}',
         "--model", str(tmp_path / "no-checkpoint-here"), "--allow-dir", str(tmp_path)],
        cwd=REPO, env=clean_environment(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1 and done.stdout == ""
    assert "unknown argument 'max_object'; did you mean 'max_objects'?" in done.stderr
    assert "no-checkpoint-here" not in done.stderr and "Traceback" not in done.stderr


def test_save_writes_the_mask_and_overlay_the_call_returns(tmp_path: Path) -> None:
    from nextchat.demo.world import render_scene

    scene = render_scene(np.random.default_rng(16), min_objects=2, max_objects=3)
    image = tmp_path / "scene.png"
    Image.fromarray(scene.image).save(image)
    x1, y1, x2, y2 = scene.objects[0].box
    arguments = json.dumps({"image": str(image), "box": [x1 - 2, y1 - 2, x2 + 2, y2 + 2], "overlay": True})
    out = tmp_path / "saved" / "here"
    done = subprocess.run(
        [sys.executable, "-m", "mcp_server", "call", "segment_object", arguments, "--allow-dir", str(tmp_path),
         "--device", "cpu", "--save", str(out)],
        cwd=REPO, env=clean_environment(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # stdout is the result's JSON alone; the paths go to stderr
    mask_id = result["mask_uri"].removeprefix("mask://")
    overlay_id = result["overlay_uri"].removeprefix("overlay://")
    mask_path, overlay_path = out / f"mask-{mask_id}", out / f"overlay-{overlay_id}"
    assert sorted(out.iterdir()) == sorted([mask_path, overlay_path])
    assert f"saved {mask_path}\n" in done.stderr and f"saved {overlay_path}\n" in done.stderr
    mask = np.asarray(Image.open(mask_path))
    assert mask.shape == (scene.height, scene.width) and set(np.unique(mask)) <= {0, 255}
    assert int((mask == 255).sum()) == result["area_px"] > 0
    with Image.open(overlay_path) as overlay:
        assert overlay.format == "JPEG" and max(overlay.size) >= 640


def test_call_help_shows_save_and_no_serving_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        call_main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "--save DIR" in text and "before the model loads" in text
    for flag in ("--port", "--host", "--transport", "--token", "--ready-wait", "--drain-timeout", "--max-batch"):
        assert flag not in text
