"""`smolvlm-edge demo`: the whole path on this machine, offline: checkpoint, export, answer, timings."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from smolvlm_edge.runtime.bundle import MANIFEST


def cache_dir() -> Path:
    return Path(os.environ.get("SMOLVLM_EDGE_CACHE", Path.home() / ".cache" / "smolvlm-edge"))


def sample_image(path: Path) -> Path:
    """Draw a simple scene (sky, sun, sea, a house) so the demo needs no image download."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (640, 480), (135, 190, 235))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 300, 640, 480], fill=(40, 90, 170))           # sea
    draw.ellipse([480, 40, 580, 140], fill=(250, 215, 60))          # sun
    draw.rectangle([120, 200, 300, 330], fill=(200, 60, 50))        # house
    draw.polygon([(100, 200), (210, 120), (320, 200)], fill=(90, 50, 30))  # roof
    draw.rectangle([190, 260, 230, 330], fill=(60, 40, 20))         # door
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def run_demo(args) -> None:
    from smolvlm_edge.runtime.cli import answer, print_timings

    from .api import export_checkpoint

    out = Path(args.output)
    if args.model:
        model = args.model
        print(f"demo: checkpoint {model}")
    else:
        from .demo_checkpoint import build_demo_checkpoint

        model = cache_dir() / "demo-checkpoint-256m"
        if not (model / "config.json").is_file():
            print(f"demo: building the offline demo checkpoint in {model}")
            build_demo_checkpoint(model)
        print("demo: NOTE this checkpoint has the real SmolLM2-135M-Instruct language model and a RANDOM "
              "vision tower: its text is real, what it says about images is not meaningful.")
    if (out / MANIFEST).is_file() and not args.reexport:
        print(f"demo: reusing the bundle in {out} (--reexport to export again)")
    else:
        t0 = time.perf_counter()
        export_checkpoint(str(model), out, overwrite=True)
        print(f"demo: export took {time.perf_counter() - t0:.1f} s")
    images = args.image or [str(sample_image(cache_dir() / "sample.png"))]
    print(f"demo: asking {args.prompt!r} about {', '.join(images)}")
    sys.stdout.flush()
    result = answer(out, images, args.prompt, args)
    print_timings(result["timings"], out=sys.stdout)
