"""Build a package's own ``.proto`` files at build time, the way
``vyra_base_ipc`` builds its own: for ``colcon build`` (with and without
``--symlink-install``) and ``pip install`` / ``pip wheel`` (also ``-e``).

In a module package's ``setup.py``::

    from vyra_base_ipc_build import proto_cmdclass, proto_data_files

    setup(name='my_arm', packages=['my_arm'], ...,
          data_files=[..., *proto_data_files('my_arm')],   # share/my_arm/protos/**/*.proto
          cmdclass=proto_cmdclass())

Every ``protos/**/*.proto`` is compiled with the grpcio-tools of the
environment doing the build into ``*_pb2.py``, ``*_pb2.pyi`` and
``*_pb2_grpc.py`` beside the package's modules (``protos/my_arm/arm.proto``
-> ``my_arm/arm_pb2.py``), never into the source tree except for editable
installs (then git-ignore ``*_pb2*``). ``import "vyra_base_ipc/shared_memory.proto";``
works in them: this package's protos are on the import path; so do another
package's protos with ``include=`` / ``include_packages=``.

Each generated file starts with a line naming the distribution and the
``.proto`` it was made from; a later build deletes such a file once its
``.proto`` is gone (renamed or deleted), in the build tree, the install tree
and, for editable builds, the source tree. Files without that line (written by
hand, or generated before this line existed) are never deleted.

This module needs nothing but the standard library to import, setuptools
for :func:`proto_cmdclass` and grpcio-tools to generate: ``vyra_base_ipc`` itself uses it before
its own generated code exists. Add ``<build_depend>vyra_base_ipc</build_depend>``
(and ``python3-grpc-tools``) to the package.xml so that colcon builds
``vyra_base_ipc`` first.
"""

from __future__ import annotations

import ast
import keyword
import os
from pathlib import Path
import re
import shutil
import sys
import tempfile
from typing import TYPE_CHECKING, Any, Callable, Collection, Iterable, Iterator, Sequence

if TYPE_CHECKING:
    from setuptools import Command, Distribution

__all__ = ['ament_protos', 'find_protos', 'generate_protos', 'proto_cmdclass', 'proto_data_files',
           'vyra_proto_path']

_HERE = Path(__file__).resolve().parent
#: Where this package's protos are: a copy beside this module once built,
#: the repository's ``protos/`` in a source checkout or symlink install.
_CANDIDATES = (_HERE / 'protos', _HERE.parent / 'protos')
_MARKER = Path('vyra_base_ipc') / 'shared_memory.proto'
#: What protoc and its gRPC plugin write for ``x.proto``: ``x_pb2.py`` and so on.
_GENERATED_SUFFIXES = ('_pb2.py', '_pb2.pyi', '_pb2_grpc.py')
#: The first line of every file this module places: ``{_STAMP}{distribution} from {proto}``.
_STAMP = '# vyra_base_ipc_build generated this for '
#: The second line: a module checked with ``mypy --strict`` from its source tree
#: (``colcon build --symlink-install`` generates there) would get protoc's
#: errors, which it cannot fix (``_pb2_grpc.py`` has no annotations, the ``.pyi``
#: bare generics). The types in the files are still read.
_NO_ERRORS = '# mypy: ignore-errors\n'


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


def ament_protos(package: str) -> Path:
    """``share/<package>/protos`` of an installed ament package, found on
    ``AMENT_PREFIX_PATH`` (as ``ament_index_python`` would, without needing it).

    :raises FileNotFoundError: no prefix on ``AMENT_PREFIX_PATH`` has the
        package, or it installs no ``protos`` directory.
    """
    prefixes = [prefix for prefix in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep) if prefix]
    for prefix in prefixes:
        if (Path(prefix) / 'share' / 'ament_index' / 'resource_index' / 'packages' / package).is_file():
            protos = Path(prefix) / 'share' / package / 'protos'
            if not protos.is_dir():
                raise FileNotFoundError(f'the ament package {package} in {prefix} installs no {protos}')
            return protos
    searched = os.pathsep.join(prefixes) or 'unset'
    raise FileNotFoundError(f'no ament package {package} on AMENT_PREFIX_PATH ({searched}): build it first'
                            ' (a <build_depend> in package.xml) and source its setup file')


def find_protos(proto_root: str | Path) -> list[str]:
    """The ``.proto`` files under ``proto_root``, relative to it, sorted.
    A dangling symlink (a ``.proto`` deleted after colcon linked it) is no file
    and is left out.
    """
    root = Path(proto_root).resolve()
    return sorted(path.relative_to(root).as_posix() for path in root.rglob('*.proto') if path.is_file())


def _module_of(proto: str) -> list[str]:
    """The Python module protoc names for ``proto`` (``my-arm/x.proto`` ->
    ``['my_arm', 'x_pb2']``)."""
    parts = proto[:-len('.proto')].replace('-', '_').split('/')
    return [*parts[:-1], parts[-1] + '_pb2']


def _name_problems(proto: str, packages: Collection[str] | None) -> list[str]:
    """What makes the code of ``proto`` unimportable, or land outside
    ``packages`` (top-level package names; ``None``: anywhere)."""
    module = _module_of(proto)
    problems = [f'its directory {part!r} becomes a package that `import` cannot name ('
                + ('a Python keyword' if keyword.iskeyword(part) else 'not a Python identifier') + ')'
                for part in module[:-1] if keyword.iskeyword(part) or not part.isidentifier()]
    if not module[-1].isidentifier():
        problems.append(f'its name becomes the module {module[-1]!r}, which `import` cannot name')
    if packages is not None:
        top = module[0]
        if len(module) == 1:
            problems.append(f'its code {module[-1]}.py would be a top-level module outside the packages'
                            f' setup() declares ({", ".join(sorted(packages)) or "none"}):'
                            ' move it into a directory named like one of them')
        elif top not in packages:
            shadows = (f" and would shadow the standard library's {top}" if top in sys.stdlib_module_names
                       else '')
            problems.append(f'its code lands in the package {top!r}, which is not one of the packages'
                            f' setup() declares ({", ".join(sorted(packages)) or "none"}){shadows}:'
                            ' move it into a directory named like one of them, or declare the package')
    return problems


#: ``package a.b;`` at the start of a line: a proto's package.
_PACKAGE = re.compile(r'^\s*package\s+([A-Za-z_][\w.]*)\s*;', re.M)


def _proto_package(path: Path) -> str | None:
    """The package ``path`` declares, if any."""
    found = _PACKAGE.search(path.read_text(encoding='utf-8', errors='replace'))
    return found.group(1) if found else None


def _package_problems(root: Path, proto: str, vyra: Path) -> list[str]:
    """That ``proto`` declares a package of vyra_base_ipc's own protos (under
    ``vyra``), if it does. Its names would share protobuf's descriptor pool
    with ours: a process importing both fails with "duplicate symbol" on
    whichever comes second, or once a later vyra_base_ipc adds the same name."""
    package = _proto_package(root / proto)
    owners = sorted(name for name in find_protos(vyra) if _proto_package(vyra / name) == package)
    if package is None or not owners:
        return []
    own = proto.split('/')[0] if '/' in proto else 'my_module'
    return [f"its package {package} is vyra_base_ipc's own ({', '.join(owners)}): its messages and"
            " services would share names with those in protobuf's descriptor pool, and a process"
            ' importing both fails ("duplicate symbol"); declare a package of your own module,'
            f' such as `package {own};`']


def generate_protos(proto_root: str | Path, output_dir: str | Path, *, stubs: bool = True,
                    include: Iterable[str | Path] = (), packages: Collection[str] | None = None) -> list[str]:
    """Compile every ``.proto`` under ``proto_root`` into ``output_dir``:
    messages (``_pb2.py``), their type stubs (``_pb2.pyi``, with ``stubs``)
    and gRPC stubs and servicers (``_pb2_grpc.py``).

    Import paths: ``proto_root``, then ``include``, then this package's
    protos and protobuf's well-known types.

    :param packages: the top-level packages the code may land in; a proto
        whose code would land elsewhere is refused.
    :returns: the compiled files, relative to ``proto_root``.
    :raises FileNotFoundError: ``proto_root`` has no ``.proto`` file.
    :raises ValueError: a proto's code could not be imported (a directory
        named like a Python keyword, ..., or protoc wrote code that is no
        valid Python: an rpc or enum value named ``None``, ...) or lands
        outside ``packages``; each such proto is named with what is wrong
        (and the line of code). Nothing is generated then.
    :raises RuntimeError: protoc failed (its messages are on stderr); for
        each import on none of the import paths, where a file of that
        name is on them, or that another package's go on with ``include_packages``.
    """
    import grpc_tools  # a build requirement: grpcio-tools
    from grpc_tools import protoc

    root = Path(proto_root).resolve()
    protos = find_protos(root)
    if not protos:
        raise FileNotFoundError(f'no .proto file under {root}')
    vyra = vyra_proto_path()
    ours = vyra.resolve() == root  # vyra_base_ipc building its own protos
    problems = [f'{root / proto}: {problem}'
                for proto in protos for problem in [*_name_problems(proto, packages),
                                                    *([] if ours else _package_problems(root, proto, vyra))]]
    if problems:
        raise ValueError('cannot build these protos:\n  ' + '\n  '.join(problems))
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    paths = [root, *map(Path, include)]
    if not ours:
        paths.append(vyra)
    paths.append(Path(grpc_tools.__file__).parent / '_proto')
    status = protoc.main([
        'grpc_tools.protoc', *(f'--proto_path={path}' for path in paths),
        f'--python_out={output}', *([f'--pyi_out={output}'] if stubs else []),
        f'--grpc_python_out={output}', *protos,
    ])
    if status != 0:
        hints = _import_hints(root, protos, paths)
        raise RuntimeError(f'protoc failed with status {status} on {protos} in {root}'
                           + ''.join(f'\n  {hint}' for hint in hints))
    unparsable = [f'{root / proto}: {problem}'
                  for proto in protos for problem in _syntax_problems(proto, output)]
    if unparsable:
        for proto in protos:  # (nothing generated, as for the problems found before protoc)
            for path in _generated_files(proto, output):
                path.unlink(missing_ok=True)
        raise ValueError('cannot build these protos:\n  ' + '\n  '.join(unparsable))
    return protos


def _generated_files(proto: str, output: Path) -> list[Path]:
    """Where protoc writes the code of ``proto`` in ``output`` (``a/x.proto``:
    ``a/x_pb2.py``, ``a/x_pb2.pyi``, ``a/x_pb2_grpc.py``)."""
    *package, module = _module_of(proto)
    return [output.joinpath(*package, module.removesuffix('_pb2') + suffix) for suffix in _GENERATED_SUFFIXES]


def _syntax_problems(proto: str, output: Path) -> list[str]:
    """Where the code protoc made of ``proto`` in ``output`` is no valid
    Python. protoc writes the names of a .proto as they are: an rpc named
    ``None`` gives ``self.None = ...`` in ``_pb2_grpc.py``, an enum value
    ``None`` a stub line ``None: ...`` in ``_pb2.pyi`` (not even
    ``# mypy: ignore-errors`` gets past a syntax error). The build would pass
    and importing or type-checking fail."""
    problems = []
    for path in _generated_files(proto, output):
        if not path.is_file():
            continue
        try:
            ast.parse(path.read_text(encoding='utf-8'), str(path))
        except SyntaxError as error:
            problems.append(f'its code {path.relative_to(output).as_posix()} is no valid Python, line '
                            f'{error.lineno}: {(error.text or "").strip()} (a name that Python reserves, such'
                            ' as None, True, False or a keyword: rename it in the .proto)')
    return problems


#: ``import "x.proto";``, ``import public ...``, ``import weak ...``, at the start of a line.
_IMPORT = re.compile(r'^\s*import\s+(?:public\s+|weak\s+)?"([^"]+)"\s*;', re.M)


def _import_hints(root: Path, protos: Iterable[str], paths: Sequence[Path]) -> list[str]:
    """For each import of ``protos`` that is in none of ``paths``, where it
    is instead or how to put it on the path: protoc only says "File not found"."""
    known: dict[str, list[str]] = {}  # file name -> its import names, over every path
    for path in paths:
        for name in find_protos(path) if path.is_dir() else ():
            known.setdefault(name.rsplit('/', 1)[-1], []).append(name)
    hints = []
    for proto in protos:
        for imported in _IMPORT.findall((root / proto).read_text(encoding='utf-8', errors='replace')):
            if any((path / imported).is_file() for path in paths):
                continue
            where = ', '.join(map(str, paths))
            hint = f'{proto}: import "{imported}" is in none of the import paths ({where})'
            matches = sorted(set(known.get(imported.rsplit('/', 1)[-1], ())))
            if matches:
                hint += ': imports name a file from one of them, as in ' + ' or '.join(
                    f'import "{match}";' for match in matches)
            elif '/' in imported:
                hint += (": another package's protos go on the path with"
                         f" proto_cmdclass(include_packages=['{imported.split('/')[0]}']) or include=[...]")
            hints.append(hint)
    return hints


def _setup_dir() -> Path:
    """The real directory of the ``setup.py`` being run. setuptools runs it in
    its own directory, except that ``colcon build --symlink-install`` runs it
    in ``build/<pkg>`` through a symlink, where only what colcon linked is."""
    script = Path.cwd() / 'setup.py'
    return script.resolve().parent if script.is_file() else Path.cwd()


def proto_data_files(package: str, proto_root: str | Path = 'protos') -> list[tuple[str, list[str]]]:
    """``data_files`` entries installing every ``proto_root/**/*.proto`` to
    ``share/<package>/protos/**`` (where other packages' ``include_packages``
    find them), relative to the ``setup.py`` directory as setuptools wants them.
    Listed in ``data_files``, they are in the sdist too.
    """
    here = _setup_dir()
    root = (here / proto_root).resolve()
    by_directory: dict[str, list[str]] = {}
    for proto in find_protos(root):
        directory = os.path.dirname(proto)
        by_directory.setdefault(directory, []).append(os.path.relpath(root / proto, here))
    return [(f'share/{package}/protos' + (f'/{directory}' if directory else ''), files)
            for directory, files in sorted(by_directory.items())]


def _top_packages(distribution: Distribution) -> set[str]:
    """The top-level packages ``setup()`` declares."""
    return {package.split('.')[0] for package in distribution.packages or ()}


def _stamp(distribution: str) -> str:
    """The start of the first line of the files placed for ``distribution``."""
    return f'{_STAMP}{distribution} from '


def _placed(directories: Iterable[Path], distribution: str) -> Iterator[Path]:
    """The generated files under ``directories`` that this module placed for
    ``distribution`` (their first line says so); no other file."""
    stamp = _stamp(distribution)
    for directory in directories:
        for path in directory.rglob('*_pb2*'):
            if not path.name.endswith(_GENERATED_SUFFIXES) or not path.is_file():
                continue
            with path.open(encoding='utf-8', errors='replace') as text:
                if text.readline().startswith(stamp):  # else not ours: hand-written, or someone else's
                    yield path


def _remove_stale(directories: Iterable[Path], distribution: str, keep: Callable[[Path], bool]) -> None:
    """Delete the generated files under ``directories`` that this module
    placed for ``distribution`` and ``keep`` rejects; no other file."""
    for path in list(_placed(directories, distribution)):
        if not keep(path):
            path.unlink()


class _Generation:
    """The protos of one ``setup.py``, generated for one of its commands."""

    def __init__(self, command: Command, source: Path, include: Sequence[str | Path],
                 include_packages: Sequence[str]) -> None:
        self.distribution: Distribution = command.distribution
        self.name = self.distribution.get_name()
        self.packages = _top_packages(self.distribution)
        self.build_py = command.get_finalized_command('build_py')
        self.source = source
        self.include = include
        self.include_packages = include_packages

    def package_dir(self, package: str) -> Path:
        """Where the source of ``package`` (dotted) is, ``package_dir`` honoured."""
        return _setup_dir() / self.build_py.get_package_dir(package)

    def into(self, destination: Callable[[Path], Path], tops: Iterable[Path]) -> None:
        """Generate, place each file at ``destination(relative path)`` with its
        stamp (rewriting only what changed), then delete the stale stamped
        files under ``tops``.

        :raises setuptools.errors.SetupError: the protos cannot be built; says why.
        """
        from setuptools.errors import SetupError

        with tempfile.TemporaryDirectory() as scratch:
            try:
                include = [*(_setup_dir() / path for path in self.include),
                           *map(ament_protos, self.include_packages)]
                generate_protos(self.source, scratch, include=include, packages=self.packages)
            except (FileNotFoundError, ValueError, RuntimeError) as error:
                raise SetupError(f'{self.name}: {error}') from error
            placed = set()
            for path in sorted(Path(scratch).rglob('*_pb2*')):
                relative = path.relative_to(scratch)
                proto = relative.parent / (relative.name.split('_pb2')[0] + '.proto')
                code = path.read_text(encoding='utf-8')
                content = f'{_stamp(self.name)}{proto.as_posix()}\n{_NO_ERRORS}{code}'
                target = destination(relative)
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.is_file() or target.read_text(encoding='utf-8', errors='replace') != content:
                    target.write_text(content, encoding='utf-8')
                placed.add(target.resolve())
        _remove_stale(tops, self.name, lambda path: path.resolve() in placed)

    def into_build(self, build_lib: Path) -> None:
        """Generate into the build tree, as ``build_py`` lays modules out there."""
        self.into(lambda relative: build_lib / relative, [build_lib / top for top in self.packages])

    def into_source(self) -> None:
        """Generate beside the package's modules in the source tree."""
        self.into(lambda relative: self.package_dir('.'.join(relative.parent.parts)) / relative.name,
                  [self.package_dir(top) for top in self.packages])


def proto_cmdclass(proto_root: str | Path = 'protos', *, ship_vyra_protos: bool = False,
                   include: Sequence[str | Path] = (), include_packages: Sequence[str] = ()
                   ) -> dict[str, type[Any]]:
    """Return setuptools commands that generate the code of ``proto_root`` at build
    time: ``build_py`` into the build tree (or the source tree for an
    editable build), ``develop`` into the source tree, ``install_lib``
    deleting what a removed ``.proto`` left installed, and
    ``generate_protos`` on demand into the source tree.

    Relative paths (``proto_root``, ``include``) are relative to the
    directory of ``setup.py`` (its real one: also under
    ``colcon build --symlink-install``). Code lands beside the package's
    modules where ``package_dir`` puts them; a proto whose code would land
    outside the packages ``setup()`` declares fails the build, naming it.

    :param include: more directories on protoc's import path, for protos
        that import protos this package does not build.
    :param include_packages: installed ament packages whose
        ``share/<pkg>/protos`` go on the import path (see :func:`ament_protos`),
        found when the build runs.
    :param ship_vyra_protos: copy this package's protos beside
        ``vyra_base_ipc_build`` in the build (``vyra_base_ipc``'s own setup.py).
    """
    # Imported here: setuptools' develop command imports the deprecated
    # pkg_resources, which code that only generates (tests, tools) must not.
    from setuptools import Command
    from setuptools.command.build_py import build_py
    from setuptools.command.develop import develop
    from setuptools.command.install_lib import install_lib

    source = (_setup_dir() / proto_root).resolve()

    def generation(command: Command) -> _Generation:
        return _Generation(command, source, include, include_packages)

    class BuildPyWithProtos(build_py):
        """``build_py`` that also generates the protobuf code."""

        def run(self) -> None:
            super().run()
            if self.editable_mode:
                generation(self).into_source()
                return
            generation(self).into_build(Path(self.build_lib))
            if ship_vyra_protos:
                copy = Path(self.build_lib) / 'vyra_base_ipc_build' / 'protos'
                shutil.rmtree(copy, ignore_errors=True)  # no proto deleted since the last build comes back
                shutil.copytree(source, copy)

        def get_outputs(self, include_bytecode: bool = True) -> list[str]:
            """The modules and what :meth:`run` added to the build tree.

            ``install --record`` lists these, and colcon deletes what it
            lists when a package switches to ``--symlink-install``. (Their
            bytecode is install_lib's, which compiles every installed module.)
            """
            outputs: list[str] = super().get_outputs(include_bytecode)
            if self.editable_mode:
                return outputs
            build_lib = Path(self.build_lib)
            added = list(_placed([build_lib / top for top in _top_packages(self.distribution)],
                                 self.distribution.get_name()))
            if ship_vyra_protos:
                added += (path for path in (build_lib / 'vyra_base_ipc_build' / 'protos').rglob('*')
                          if path.is_file())
            # Spelled from build_lib as given: install_lib swaps that prefix for the install directory.
            return outputs + [os.path.join(self.build_lib, path.relative_to(build_lib))
                              for path in sorted(added)]

    class DevelopWithProtos(develop):
        """``develop`` that generates the protobuf code into the source tree first."""

        def run(self) -> None:
            generation(self).into_source()
            super().run()

    class InstallLibWithoutStaleProtos(install_lib):
        """``install_lib`` that also deletes the generated files an earlier
        install left and this build no longer has (``setup.py install``, as
        colcon runs it, only ever adds files)."""

        def run(self) -> None:
            super().run()
            built, installed = Path(self.build_dir), Path(self.install_dir)
            _remove_stale([installed / top for top in _top_packages(self.distribution)],
                          self.distribution.get_name(),
                          lambda path: (built / path.relative_to(installed)).is_file())

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
            generation(self).into_source()

    return {'build_py': BuildPyWithProtos, 'develop': DevelopWithProtos,
            'install_lib': InstallLibWithoutStaleProtos, 'generate_protos': GenerateProtos}
