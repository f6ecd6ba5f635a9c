"""The bad files and folders that the fault catalogues' cases name (tests/test_fault_catalogue.py,
tests/test_probe_faults.py): checkpoints that are empty, truncated, of another model or without a digest, npz
files that are not, folders where files belong, a read-only and a full file system."""

import io
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddpm.io.checkpoint import load_checkpoint, save_checkpoint

IS_ROOT = os.geteuid() == 0


def fault_files(runs: dict[str, Path], tmp: Path) -> Iterator[dict[str, Path]]:
    """Every bad file and folder a case may name, in `tmp` (with two small file systems mounted there while the
    generator is open)."""
    cond = runs["cond_run"] / "checkpoints" / "last.pt"
    state = load_checkpoint(cond)
    paths: dict[str, Path] = {"tmp": tmp, "cond": cond}

    def file(name: str, content: bytes) -> Path:
        paths[name.split(".")[0]] = tmp / name
        (tmp / name).write_bytes(content)
        return tmp / name

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    file("empty.pt", b"")
    file("truncated.pt", cond.read_bytes()[: cond.stat().st_size // 2])
    paths["png_pt"] = file("png.pt", png.getvalue())
    paths["text_pt"] = file("text.pt", b"step: 7\nweights: none\n")
    undigested = tmp / "undigested.pt"
    torch.save(state, undigested)  # a complete checkpoint without the digest
    paths["undigested"] = undigested
    swapped = {**state, "model": {k: v[..., :1] if v.ndim else v for k, v in state["model"].items()}}
    paths["swapped"] = save_checkpoint(tmp / "swapped.pt", swapped)  # intact, but weights of other shapes
    (tmp / "a_dir").mkdir()
    paths["a_dir"] = tmp / "a_dir"
    paths["a_file"] = file("a_file", b"a file where a directory should be")

    arrays = io.BytesIO()
    np.savez(arrays, arr_0=np.zeros((4, 8, 8, 1), np.uint8))
    paths["npz_truncated"] = file("npz_truncated.npz", arrays.getvalue()[:200])
    paths["png_npz"] = file("png_npz.npz", png.getvalue())
    for name, content in (("merge_truncated", arrays.getvalue()[:200]), ("merge_png", png.getvalue())):
        (tmp / name).mkdir()
        (tmp / name / "shard_0_of_1.npz").write_bytes(content)
        paths[name] = tmp / name

    last_pt_is_dir = tmp / "last_pt_is_dir"
    (last_pt_is_dir / "checkpoints" / "last.pt").mkdir(parents=True)
    paths["last_pt_is_dir"] = last_pt_is_dir

    jpeg_dir = tmp / "truncated_jpeg"
    jpeg_dir.mkdir()
    for index in range(3):
        Image.new("L", (8, 8), color=index * 80).save(jpeg_dir / f"{index}.png")
    jpeg = io.BytesIO()
    Image.effect_noise((64, 64), 40).save(jpeg, format="JPEG", quality=90)
    (jpeg_dir / "broken.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])  # the header is intact
    paths["truncated_jpeg_dir"] = jpeg_dir

    with mounted_tmpfs(tmp / "read_only", "ro,size=64m") as read_only, mounted_tmpfs(tmp / "full", "size=1m") as full:
        paths["read_only"] = read_only
        filler = full / "filler"
        with open(filler, "wb") as handle:
            try:
                while True:
                    handle.write(b"\0" * 65536)
                    handle.flush()
            except OSError:
                pass
        paths["full_disk"] = full
        yield paths


class mounted_tmpfs:
    """A small tmpfs at `path` with mount `options` (as root), or, for other users, a folder made read-only with
    chmod (options with ro) or None (a full disk cannot be made without mounting)."""

    def __init__(self, path: Path, options: str):
        self.path, self.options, self.mounted = path, options, False

    def __enter__(self) -> Path | None:
        self.path.mkdir()
        if IS_ROOT:
            result = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", self.options, "tmpfs", str(self.path)], capture_output=True, text=True
            )
            self.mounted = result.returncode == 0
        if not self.mounted and "ro" in self.options.split(","):
            self.path.chmod(0o555)
            return self.path if os.access(self.path, os.W_OK) is False else None
        return self.path if self.mounted else None

    def __exit__(self, *exc_info) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.path)], check=False)
        self.path.chmod(0o755)
