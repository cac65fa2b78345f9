"""The wheels bench.gpu_suite needs on a device machine and its image lacks, in .whl/ of the checkout.

    python -m bench.device_wheels            # here, with network: writes .whl/ (~51 MB), git-ignored

The device image (/work/.library/device/KINDS.md) has torch, torchvision, numpy, pyarrow, pandas, fsspec, Pillow,
rich, click, filelock, msgpack, protobuf, pyyaml, requests, but not pydantic (the registries' option models) nor
Ray (the end-to-end phase's Ray Data). This downloads, for CPython 3.12 on manylinux x86_64, the versions this
venv runs: ray (repacked without ``ray/jars``, the Java workers' 32 MB jar, so the carried tree stays under the
64 MiB a call may carry), pydantic, pydantic-core, annotated-types, typing-inspection, typing-extensions
(pydantic wants a newer one than an image may hold), and jsonschema with jsonschema-specifications, referencing
and rpds-py (Ray's requirements missing there). The device command then
installs them with ``pip install --no-index --no-deps --target /tmp/site .whl/*.whl`` (bench/README.md).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

NEEDED = ("ray", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
          "jsonschema", "jsonschema-specifications", "referencing", "rpds-py")
DROP = ("ray/jars/",)  # Java workers only; the suite starts Python workers
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def git_exclude(root: Path, line: str) -> None:
    common = subprocess.run(["git", "rev-parse", "--git-common-dir"], cwd=root, check=True, capture_output=True,
                            text=True).stdout.strip()
    exclude = (root / common / "info" / "exclude").resolve()
    exclude.parent.mkdir(parents=True, exist_ok=True)
    text = exclude.read_text() if exclude.exists() else ""
    if line not in text.splitlines():
        exclude.write_text(text + ("" if text.endswith("\n") or not text else "\n") + line + "\n")


def strip_wheel(path: Path, prefixes: tuple[str, ...] = DROP) -> int:
    """Rewrite the wheel without the members under `prefixes` (and their RECORD lines); returns bytes saved."""
    before = path.stat().st_size
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename.startswith(prefixes):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(keepends=True)
                               if not line.startswith(prefixes)).encode()
            dst.writestr(info, data)
    tmp.replace(path)
    return before - path.stat().st_size


def main() -> None:
    root = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], check=True, capture_output=True,
                               text=True).stdout.strip())
    out = root / ".whl"
    out.mkdir(exist_ok=True)
    git_exclude(root, "/.whl/")
    pins = [f"{name}=={metadata.version(name)}" for name in NEEDED]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(out), *pins]
    subprocess.run(cmd, check=True)
    for wheel in out.glob("ray-*.whl"):
        print(f"{wheel.name}: {strip_wheel(wheel) / 2**20:.0f} MiB of {'/'.join(DROP)} left out")
    total = sum(p.stat().st_size for p in out.glob("*.whl"))
    print(f"{out}: {len(list(out.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB; carry '.whl' in the device call")


if __name__ == "__main__":
    main()
