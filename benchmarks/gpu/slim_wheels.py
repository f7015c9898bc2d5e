"""Rewrites the wheels in a folder without the files the GPU run never loads, so they travel within 64 MiB.

    python benchmarks/gpu/slim_wheels.py .whl

pyarrow (55 MB) is most of the budget: datasets reads JSONL, Arrow and parquet through it, but never Flight or S3,
and nothing imports its C++ headers, Cython sources or tests. pyarrow imports pyarrow._flight and pyarrow._s3fs only
when asked (pyarrow.flight, pyarrow.fs.S3FileSystem), so those go with the libraries only they load. The shared
libraries appear three times in the wheel (zip has no symlinks); the loader asks for the `.so.<major>` name only.
pandas loses its tests. Each wheel's RECORD is rewritten to list exactly what stays, so pip installs it as usual.
"""

from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path

DROP = {
    "pyarrow": re.compile(r"pyarrow/(include/|src/|tests/|.*\.(pyx|pxd|pxi|h|hpp|cc)$|_pyarrow_cpp_tests\."
                          r"|_flight\.|libarrow_flight\.|libarrow_python_flight\.|_s3fs\.|libarrow_s3\."
                          r"|lib[a-z_]+\.so$|lib[a-z_]+\.so\.\d+\.\d+\.\d+$)"),
    "pandas": re.compile(r"pandas/tests/"),
}


def slim(wheel: Path) -> tuple[int, int] | None:
    """Rewrite `wheel` without the files DROP names for its project; returns (bytes before, after), None if kept."""
    pattern = DROP.get(wheel.name.split("-")[0].lower())
    if pattern is None:
        return None
    before = wheel.stat().st_size
    slimmed = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slimmed, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
        kept = [info for info in source.infolist() if not pattern.match(info.filename)]
        names = {info.filename for info in kept}
        for info in kept:
            data = source.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if line.split(",", 1)[0] in names
                               or line.split(",", 1)[0] == info.filename).encode()
            out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    slimmed.replace(wheel)
    return before, wheel.stat().st_size


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else ".whl")
    for wheel in sorted(folder.glob("*.whl")):
        sizes = slim(wheel)
        if sizes:
            print(f"slim_wheels: {wheel.name}: {sizes[0] / 2**20:.1f} -> {sizes[1] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
