"""``examples/agent_workflow.py --image X`` (the example with a picture of one's own) writes exactly the files it says
it wrote: the scene it did not render is neither claimed nor written."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from nextchat.demo.world import render_scene


REPO = Path(__file__).resolve().parents[1]


def test_the_example_with_an_image_writes_what_it_says(tmp_path: Path) -> None:
    pictures, out = tmp_path / "pictures", tmp_path / "out"
    pictures.mkdir()
    scene = render_scene(np.random.default_rng(23), min_objects=2, max_objects=3)
    Image.fromarray(scene.image).save(pictures / "mine.png")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXTCHAT_")} | {"PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "examples/agent_workflow.py", "--image", str(pictures / "mine.png"),
         "--query", f"the {scene.objects[0].name}", "--out", str(out)],
        cwd=REPO, env=env | {"NEXTCHAT_DEVICE": "cpu"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("wrote into ")]
    claimed = set(re.findall(r"[\w.-]+\.(?:png|jpg)", line.split(":", 1)[1]))
    assert claimed == {"mask.png", "server_overlay.jpg", "overlay.png"}
    assert {path.name for path in out.iterdir()} == claimed
    with Image.open(out / "overlay.png") as overlay:
        assert max(overlay.size) >= 640  # the readable overlay, not the image at its own 160–640 px
