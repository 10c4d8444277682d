"""Build a package's own ``.proto`` files at build time, the way
``vyra_base_ipc`` builds its own: for ``colcon build`` (with and without
``--symlink-install``) and ``pip install`` (also ``-e``).

In a module package's ``setup.py``::

    from vyra_base_ipc_build import proto_cmdclass

    setup(name='my_arm', packages=['my_arm'], ..., cmdclass=proto_cmdclass())

Every ``protos/**/*.proto`` is compiled with the grpcio-tools of the
environment doing the build into ``*_pb2.py``, ``*_pb2.pyi`` and
``*_pb2_grpc.py`` beside the package's modules (``protos/my_arm/arm.proto``
-> ``my_arm/arm_pb2.py``), never into the source tree except for editable
installs (then git-ignore ``*_pb2*``). ``import "vyra_base_ipc/shared_memory.proto";``
works in them: this package's protos are on the import path.

This module needs nothing but the standard library to import, setuptools
for :func:`proto_cmdclass` and grpcio-tools to generate: ``vyra_base_ipc`` itself uses it before
its own generated code exists. Add ``<build_depend>vyra_base_ipc</build_depend>``
(and ``python3-grpc-tools``) to the package.xml so that colcon builds
``vyra_base_ipc`` first.
"""

from __future__ import annotations

from pathlib import Path
import shutil
from typing import Any, Iterable

__all__ = ['generate_protos', 'proto_cmdclass', 'vyra_proto_path']

_HERE = Path(__file__).resolve().parent
#: Where this package's protos are: a copy beside this module once built,
#: the repository's ``protos/`` in a source checkout or symlink install.
_CANDIDATES = (_HERE / 'protos', _HERE.parent / 'protos')
_MARKER = Path('vyra_base_ipc') / 'shared_memory.proto'


def vyra_proto_path() -> Path:
    """The directory to put on protoc's import path for
    ``import "vyra_base_ipc/....proto"``.

    :raises FileNotFoundError: neither the installed copy nor a source
        checkout holds them (a broken installation).
    """
    for candidate in _CANDIDATES:
        if (candidate / _MARKER).is_file():
            return candidate
    raise FileNotFoundError(f'the protos of vyra_base_ipc are in none of {", ".join(map(str, _CANDIDATES))}')


def generate_protos(proto_root: str | Path, output_dir: str | Path, *, stubs: bool = True,
                    include: Iterable[str | Path] = ()) -> list[str]:
    """Compile every ``.proto`` under ``proto_root`` into ``output_dir``:
    messages (``_pb2.py``), their type stubs (``_pb2.pyi``, with ``stubs``)
    and gRPC stubs and servicers (``_pb2_grpc.py``).

    Import paths: ``proto_root``, then ``include``, then this package's
    protos and protobuf's well-known types.

    :returns: the compiled files, relative to ``proto_root``.
    :raises FileNotFoundError: ``proto_root`` has no ``.proto`` file.
    :raises RuntimeError: protoc failed (its messages are on stderr).
    """
    import grpc_tools  # a build requirement: grpcio-tools
    from grpc_tools import protoc

    root = Path(proto_root).resolve()
    protos = sorted(str(path.relative_to(root)) for path in root.rglob('*.proto'))
    if not protos:
        raise FileNotFoundError(f'no .proto file under {root}')
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    paths = [root, *map(Path, include)]
    vyra = vyra_proto_path()
    if vyra.resolve() != root:
        paths.append(vyra)
    paths.append(Path(grpc_tools.__file__).parent / '_proto')
    status = protoc.main([
        'grpc_tools.protoc', *(f'--proto_path={path}' for path in paths),
        f'--python_out={output}', *([f'--pyi_out={output}'] if stubs else []),
        f'--grpc_python_out={output}', *protos,
    ])
    if status != 0:
        raise RuntimeError(f'protoc failed with status {status} on {protos} in {root}')
    return protos


def proto_cmdclass(proto_root: str | Path = 'protos', *, ship_vyra_protos: bool = False
                   ) -> dict[str, type[Any]]:
    """Return setuptools commands that generate the code of ``proto_root`` at build
    time: ``build_py`` into the build tree (or the source tree for an
    editable build), ``develop`` into the source tree, and
    ``generate_protos`` on demand into the source tree.

    Call it from ``setup.py``: like setuptools' own relative paths,
    ``proto_root`` is relative to the directory it runs in, the source tree.

    :param ship_vyra_protos: copy this package's protos beside
        ``vyra_base_ipc_build`` in the build (``vyra_base_ipc``'s own setup.py).
    """
    # Imported here: setuptools' develop command imports the deprecated
    # pkg_resources, which code that only generates (tests, tools) must not.
    from setuptools import Command
    from setuptools.command.build_py import build_py
    from setuptools.command.develop import develop

    tree = Path.cwd()
    source = (tree / proto_root).resolve()

    class BuildPyWithProtos(build_py):
        """``build_py`` that also generates the protobuf code."""

        def run(self) -> None:
            super().run()
            generate_protos(source, tree if self.editable_mode else Path(self.build_lib))
            if ship_vyra_protos and not self.editable_mode:
                copy = Path(self.build_lib) / 'vyra_base_ipc_build' / 'protos'
                shutil.copytree(source, copy, dirs_exist_ok=True)

    class DevelopWithProtos(develop):
        """``develop`` that generates the protobuf code into the source tree first."""

        def run(self) -> None:
            generate_protos(source, tree)
            super().run()

    class GenerateProtos(Command):
        """``setup.py generate_protos``: generate into the source tree."""

        description = f'generate Python code for {source.name}/ into the source tree'
        user_options: list[Any] = []

        def initialize_options(self) -> None:
            """No options."""

        def finalize_options(self) -> None:
            """No options."""

        def run(self) -> None:
            """Generate into the source tree."""
            generate_protos(source, tree)

    return {'build_py': BuildPyWithProtos, 'develop': DevelopWithProtos,
            'generate_protos': GenerateProtos}
