"""Build hook: puts the public API's generated stubs into `tandem_client/_pb`.

The stubs are not kept in this folder: they are the repository's own, generated from
protos/tandem/v1/*.proto by `python -m protos.generate` and checked against the .proto files in
CI. Building a wheel (or an sdist) copies the ones the SDK needs (common, generation) from
`../../protos/tandem/v1` with their imports rewritten from `protos.tandem.v1` to
`tandem_client._pb`. An sdist carries the copies, so a wheel builds from it without the
repository. An editable install writes them into the source folder (git-ignored there).
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
REPO_STUBS = HERE.parent.parent / "protos" / "tandem" / "v1"
STUBS = ("common_pb2.py", "common_pb2.pyi", "generation_pb2.py", "generation_pb2.pyi",
         "generation_pb2_grpc.py")
PB_PACKAGE = Path("tandem_client") / "_pb"


def write_stubs(dest: Path, source: Path = REPO_STUBS) -> None:
    """Copies STUBS from `source` into `dest`, importing each other from tandem_client._pb."""
    missing = [name for name in STUBS if not (source / name).is_file()]
    if missing:
        raise FileNotFoundError(f"generated stubs {missing} not found in {source}: build from the "
                                "Tandem repository (or an sdist of tandem-client)")
    dest.mkdir(parents=True, exist_ok=True)
    for name in STUBS:
        text = (source / name).read_text()
        (dest / name).write_text(text.replace("from protos.tandem.v1 import",
                                              "from tandem_client._pb import"))


class BuildPyWithStubs(build_py):
    """build_py, then the stubs into the build (the source folder for an editable install)."""

    def run(self) -> None:
        super().run()
        if not REPO_STUBS.is_dir():  # from an sdist: the copies are package files already
            return
        root = HERE if self.editable_mode else Path(self.build_lib)
        write_stubs(root / PB_PACKAGE)


class SdistWithStubs(sdist):
    """sdist carrying the stub copies, so the wheel builds without the repository."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        if REPO_STUBS.is_dir():  # else (an sdist of an sdist) the copies are among `files`
            write_stubs(Path(base_dir) / PB_PACKAGE)


setup(cmdclass={"build_py": BuildPyWithStubs, "sdist": SdistWithStubs})
