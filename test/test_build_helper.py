"""vyra_base_ipc_build, the helper module packages use to build their own
protos (examples/my_arm builds with it in CI; these are its edges)."""

from __future__ import annotations

from pathlib import Path
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile

import pytest

from vyra_base_ipc_build import generate_protos, vyra_proto_path


def test_a_proto_importing_ours_compiles_to_importable_code_with_stubs(tmp_path: Path) -> None:
    (tmp_path / 'protos' / 'gripper').mkdir(parents=True)
    (tmp_path / 'protos' / 'gripper' / 'grip.proto').write_text(
        'syntax = "proto3";\npackage gripper;\nimport "vyra_base_ipc/shared_memory.proto";\n'
        'service Gripper { rpc Grip(GripRequest) returns (GripReply); }\n'
        'message GripRequest { vyra.ipc.SharedBufferRef image = 1; }\nmessage GripReply { bool held = 1; }\n')
    assert generate_protos(tmp_path / 'protos', tmp_path / 'out') == ['gripper/grip.proto']
    assert {path.name for path in (tmp_path / 'out' / 'gripper').iterdir()} >= {
        'grip_pb2.py', 'grip_pb2.pyi', 'grip_pb2_grpc.py'}
    probe = ('from gripper import grip_pb2, grip_pb2_grpc; '
             'print(grip_pb2.GripRequest.DESCRIPTOR.fields[0].message_type.full_name, '
             'grip_pb2_grpc.GripperStub.__name__)')
    out = subprocess.run([sys.executable, '-c', probe], cwd=tmp_path / 'out', check=True,
                         capture_output=True, text=True, env={'PYTHONPATH': f'{tmp_path / "out"}:{":".join(sys.path)}'})
    assert out.stdout.split() == ['vyra.ipc.SharedBufferRef', 'GripperStub']


def test_our_protos_are_found(tmp_path: Path) -> None:
    assert (vyra_proto_path() / 'vyra_base_ipc' / 'shared_memory.proto').is_file()


def test_a_directory_without_protos_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f'no .proto file under {tmp_path}'):
        generate_protos(tmp_path, tmp_path / 'out')


def test_a_broken_proto_fails_the_build_naming_it(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    (tmp_path / 'broken.proto').write_text('syntax = "proto3";\nmessage Broken { strin name = 1; }\n')
    with pytest.raises(RuntimeError, match=r"protoc failed with status 1 on \['broken.proto'\]"):
        generate_protos(tmp_path, tmp_path / 'out')
    assert '"strin" is not defined' in capfd.readouterr().err


@pytest.mark.parametrize(('proto', 'generated', 'line'), [
    ('service Arm { rpc None(Empty) returns (Empty); }\nmessage Empty {}\n', 'arm_pb2_grpc.py',
     'self.None = channel.unary_unary('),
    ('enum Grip { GRIP_UNSPECIFIED = 0; None = 1; }\n', 'arm_pb2.pyi', 'None: _ClassVar[Grip]'),
], ids=['rpc-None', 'enum-value-None'])
def test_a_proto_whose_code_python_cannot_parse_fails_naming_the_line_and_leaves_no_code(
        tmp_path: Path, proto: str, generated: str, line: str) -> None:
    # protoc writes names Python reserves as they are: the build passed, and importing the
    # module (or type-checking with its stub) failed with a SyntaxError.
    (tmp_path / 'protos' / 'arm').mkdir(parents=True)
    (tmp_path / 'protos' / 'arm' / 'arm.proto').write_text(f'syntax = "proto3";\npackage arm;\n{proto}')
    with pytest.raises(ValueError) as raised:
        generate_protos(tmp_path / 'protos', tmp_path / 'out')
    message = str(raised.value)
    assert message.startswith(f'cannot build these protos:\n  {tmp_path / "protos" / "arm" / "arm.proto"}: '
                              f'its code arm/{generated} is no valid Python, line '), message
    assert line in message and 'reserves' in message, message
    assert not list((tmp_path / 'out').rglob('*_pb2*'))


@pytest.mark.parametrize(('imported', 'hint'), [
    ('types.proto', 'imports name a file from one of them, as in import "gripper/types.proto";'),
    ('protos/gripper/types.proto', 'imports name a file from one of them, as in import "gripper/types.proto";'),
    ('timestamp.proto', 'imports name a file from one of them, as in import "google/protobuf/timestamp.proto";'),
    ('my_arm/arm.proto', "another package's protos go on the path with proto_cmdclass(include_packages=['my_arm'])"
                         ' or include=[...]'),
], ids=['sibling', 'from-package-root', 'well-known-type', 'other-module'])
def test_an_import_protoc_cannot_find_is_named_with_where_it_is_or_what_to_do(
        tmp_path: Path, imported: str, hint: str) -> None:
    write_proto(tmp_path / 'protos' / 'gripper' / 'types.proto', 'package gripper;\nmessage Pose { string n = 1; }\n')
    write_proto(tmp_path / 'protos' / 'gripper' / 'grip.proto', f'package gripper;\nimport "{imported}";\n')
    with pytest.raises(RuntimeError) as error:
        generate_protos(tmp_path / 'protos', tmp_path / 'out')
    assert (f'\n  gripper/grip.proto: import "{imported}" is in none of the import paths ({tmp_path / "protos"}, '
            f'{vyra_proto_path()}, ') in str(error.value)
    assert str(error.value).endswith(hint)


# Real builds of a copy of examples/my_arm (and of small packages made here),
# with colcon and setuptools as module packages are built.

EXAMPLE = Path(__file__).resolve().parent.parent / 'examples' / 'my_arm'


def colcon() -> str:
    found = shutil.which('colcon') or shutil.which('colcon', path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip('colcon is not installed in this environment')
    return found


def copy_example(destination: Path) -> Path:
    """examples/my_arm as a fresh clone has it: no generated code, no build products."""
    shutil.copytree(EXAMPLE, destination, ignore=shutil.ignore_patterns(
        '*_pb2.py', '*_pb2.pyi', '*_pb2_grpc.py', '__pycache__', '*.egg-info', 'build'))
    return destination


def colcon_build(workspace: Path, *options: str) -> None:
    result = subprocess.run([colcon(), 'build', '--event-handlers', 'console_direct+', *options], cwd=workspace,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def probe(workspace: Path, code: str) -> str:
    """What ``code`` prints, run with the workspace's install tree sourced."""
    result = subprocess.run(['bash', '-c', f'source install/setup.bash && {sys.executable} -c "{code}"'],
                            cwd=workspace, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


def write_proto(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('syntax = "proto3";\n' + text)


@pytest.mark.parametrize('symlink', [False, True], ids=['install', 'symlink-install'])
def test_protos_in_subdirectories_build_and_a_deleted_proto_leaves_no_code_behind(
        tmp_path: Path, symlink: bool) -> None:
    workspace = tmp_path / 'ws'
    arm = copy_example(workspace / 'src' / 'my_arm')
    protos = arm / 'protos' / 'my_arm'
    write_proto(protos / 'types' / 'common.proto', 'package my_arm.types;\nmessage Pose { string name = 1; }\n')
    write_proto(protos / 'motion.proto', 'package my_arm;\nimport "my_arm/types/common.proto";\n'
                'service Motion { rpc Set(my_arm.types.Pose) returns (my_arm.types.Pose); }\n')
    # A module written by hand whose name looks generated: no build may delete it.
    (arm / 'my_arm' / 'legacy_pb2.py').write_text('"""Written by hand."""\nVALUE = 7\n')
    options = ['--symlink-install'] if symlink else []
    colcon_build(workspace, *options)
    out = probe(workspace, 'import my_arm.motion_pb2_grpc as m, my_arm.types.common_pb2 as c; '
                           'print(m.MotionStub.__name__, c.Pose.DESCRIPTOR.full_name, m.__file__)').split()
    assert out[:2] == ['MotionStub', 'my_arm.types.Pose']
    assert out[2].startswith(str(workspace / ('build' if symlink else 'install')))
    share = workspace / 'install' / 'my_arm' / 'share' / 'my_arm' / 'protos' / 'my_arm'
    assert (share / 'types' / 'common.proto').is_file()

    (protos / 'motion.proto').unlink()
    shutil.rmtree(protos / 'types')
    colcon_build(workspace, *options)
    left = sorted(str(path.relative_to(workspace)) for path in workspace.rglob('*_pb2*')
                  if path.name.startswith(('motion_', 'common_')))
    assert left == []
    assert probe(workspace, 'import my_arm.arm_pb2_grpc, my_arm.legacy_pb2 as hand; print(hand.VALUE)') == '7'
    assert (arm / 'my_arm' / 'legacy_pb2.py').is_file()


def test_the_installed_modules_stubs_serve_mypy(tmp_path: Path) -> None:
    # The .pyi stubs are worth something only if mypy reads them: an installed package needs py.typed.
    workspace = tmp_path / 'ws'
    copy_example(workspace / 'src' / 'my_arm')
    colcon_build(workspace)
    (tmp_path / 'app.py').write_text('from my_arm.arm_pb2 import MoveRequest\n'
                                     "speed: str = MoveRequest(pose='ready').speed\n")
    result = subprocess.run(
        ['bash', '-c', f'source install/setup.bash && {sys.executable} -m mypy --no-incremental '
                       f'--config-file /dev/null {tmp_path / "app.py"}'],
        cwd=workspace, capture_output=True, text=True, timeout=300)
    assert 'import-untyped' not in result.stdout, result.stdout
    assert ('app.py:2: error: Incompatible types in assignment (expression has type "float", variable has type'
            ' "str")') in result.stdout, result.stdout + result.stderr


def test_a_module_copied_from_the_example_keeps_generated_code_out_of_git(tmp_path: Path) -> None:
    # --symlink-install generates into the source tree: the module's own .gitignore must cover it.
    workspace = tmp_path / 'ws'
    arm = copy_example(workspace / 'src' / 'my_arm')
    subprocess.run(['git', 'init', '-q', str(arm)], check=True, timeout=60)

    def untracked() -> list[str]:
        status = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=all'], cwd=arm, check=True,
                                capture_output=True, text=True, timeout=60)
        return sorted(status.stdout.splitlines())

    before = untracked()
    colcon_build(workspace, '--symlink-install')
    assert (arm / 'my_arm' / 'arm_pb2.py').is_file()
    assert untracked() == before


def test_switching_to_symlink_install_leaves_no_generated_code_installed(tmp_path: Path) -> None:
    # colcon undoes the earlier install with the files its --record listed: the generated ones must be there.
    workspace = tmp_path / 'ws'
    copy_example(workspace / 'src' / 'my_arm')
    colcon_build(workspace)
    site = workspace / 'install' / 'my_arm' / 'lib'
    assert {path.name for path in site.rglob('arm_pb2*')} == {'arm_pb2.py', 'arm_pb2.pyi', 'arm_pb2_grpc.py'}
    colcon_build(workspace, '--symlink-install')
    assert sorted(str(path.relative_to(site)) for path in site.rglob('*_pb2*')) == []
    assert probe(workspace, 'import my_arm.arm_pb2_grpc as g; print(g.__file__)') == str(
        workspace / 'build' / 'my_arm' / 'my_arm' / 'arm_pb2_grpc.py')


def test_a_src_layout_is_built_beside_its_modules_under_symlink_install(tmp_path: Path) -> None:
    workspace = tmp_path / 'ws'
    arm = copy_example(workspace / 'src' / 'my_arm')
    (arm / 'src').mkdir()
    (arm / 'my_arm').rename(arm / 'src' / 'my_arm')
    setup = arm / 'setup.py'
    setup.write_text(setup.read_text().replace('packages=[package_name],',
                                               "packages=[package_name], package_dir={'': 'src'},"))
    colcon_build(workspace, '--symlink-install')
    out = probe(workspace, 'import my_arm.arm_pb2_grpc as g; print(g.ArmServiceStub.__name__, g.__file__)').split()
    assert out[0] == 'ArmServiceStub'
    assert Path(out[1]).resolve() == arm / 'src' / 'my_arm' / 'arm_pb2_grpc.py'
    assert not (arm / 'my_arm').exists() and not (workspace / 'build' / 'my_arm' / 'my_arm').exists()


def build_package(tmp_path: Path, protos: dict[str, str],
                  setup_arguments: str = '') -> subprocess.CompletedProcess[str]:
    """``setup.py build`` of a package ``gadget`` with these protos (path: text)."""
    (tmp_path / 'gadget').mkdir()
    (tmp_path / 'gadget' / '__init__.py').write_text('')
    for name, text in protos.items():
        write_proto(tmp_path / 'protos' / name, text)
    (tmp_path / 'setup.py').write_text(
        'from setuptools import setup\nfrom vyra_base_ipc_build import proto_cmdclass\n'
        f"setup(name='gadget', version='0', packages=['gadget'], cmdclass=proto_cmdclass({setup_arguments}))\n")
    return subprocess.run([sys.executable, 'setup.py', 'build', '--build-base', str(tmp_path / 'build')],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(('proto', 'error'), [
    ('json/api.proto', "its code lands in the package 'json', which is not one of the packages setup() declares "
                       "(gadget) and would shadow the standard library's json: move it into a directory named like "
                       'one of them, or declare the package'),
    ('gadget/import/k.proto', "its directory 'import' becomes a package that `import` cannot name "
                              '(a Python keyword)'),
    ('loose.proto', 'its code loose_pb2.py would be a top-level module outside the packages setup() declares'),
], ids=['stdlib-name', 'keyword-directory', 'top-level'])
def test_a_proto_whose_code_would_not_import_or_would_land_outside_the_packages_fails_the_build(
        tmp_path: Path, proto: str, error: str) -> None:
    result = build_package(tmp_path, {'gadget/fine.proto': 'package gadget;\nmessage Fine {}\n',
                                      proto: 'package odd;\nmessage M { string x = 1; }\n'})
    assert result.returncode == 1
    assert f'error: gadget: cannot build these protos:\n  {tmp_path / "protos" / proto}: {error}' in result.stderr
    assert not list((tmp_path / 'build').rglob('*_pb2*'))


def test_a_module_imports_the_installed_protos_of_another_with_include_packages(tmp_path: Path) -> None:
    workspace = tmp_path / 'ws'
    copy_example(workspace / 'src' / 'my_arm')
    gripper = workspace / 'src' / 'my_gripper'
    write_proto(gripper / 'protos' / 'my_gripper' / 'grip.proto',
                'package my_gripper;\nimport "my_arm/arm.proto";\n'
                'service Gripper { rpc Grip(my_arm.MoveRequest) returns (my_arm.MoveReply); }\n')
    (gripper / 'my_gripper').mkdir()
    (gripper / 'my_gripper' / '__init__.py').write_text('')
    (gripper / 'resource').mkdir()
    (gripper / 'resource' / 'my_gripper').write_text('')
    (gripper / 'package.xml').write_text(
        '<?xml version="1.0"?>\n<package format="3"><name>my_gripper</name><version>0.1.0</version>'
        '<description>d</description><maintainer email="m@x.invalid">m</maintainer><license>Apache-2.0</license>'
        '<build_depend>vyra_base_ipc</build_depend><build_depend>my_arm</build_depend>'
        '<export><build_type>ament_python</build_type></export></package>\n')
    (gripper / 'setup.py').write_text(
        'from setuptools import setup\nfrom vyra_base_ipc_build import proto_cmdclass\n'
        "setup(name='my_gripper', version='0.1.0', packages=['my_gripper'],\n"
        "      data_files=[('share/ament_index/resource_index/packages', ['resource/my_gripper']),\n"
        "                  ('share/my_gripper', ['package.xml'])],\n"
        "      cmdclass=proto_cmdclass(include_packages=['my_arm']))\n")
    colcon_build(workspace)
    out = probe(workspace, 'import my_gripper.grip_pb2_grpc as g, my_gripper.grip_pb2 as m; '
                           "print(g.GripperStub.__name__, m.DESCRIPTOR.services_by_name['Gripper']"
                           ".methods_by_name['Grip'].input_type.full_name)")
    assert out.split() == ['GripperStub', 'my_arm.MoveRequest']
    # my_arm's code is my_arm's: my_gripper installs only its own.
    installed = workspace / 'install' / 'my_gripper'
    assert sorted(path.name for path in installed.rglob('*_pb2*.py')) == ['grip_pb2.py', 'grip_pb2_grpc.py']


def test_an_ament_package_that_is_not_installed_is_named_with_what_to_do(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('AMENT_PREFIX_PATH', str(tmp_path))
    result = build_package(tmp_path, {'gadget/fine.proto': 'package gadget;\nmessage Fine {}\n'},
                           "include_packages=['nowhere']")
    assert result.returncode == 1
    assert (f'error: gadget: no ament package nowhere on AMENT_PREFIX_PATH ({tmp_path}): build it first'
            in result.stderr)


def test_the_sdist_carries_every_proto_and_a_wheel_built_from_it_has_their_code(tmp_path: Path) -> None:
    arm = copy_example(tmp_path / 'my_arm')
    write_proto(arm / 'protos' / 'my_arm' / 'types' / 'common.proto',
                'package my_arm.types;\nmessage Pose { string name = 1; }\n')
    subprocess.run([sys.executable, 'setup.py', '-q', 'sdist', '-d', str(tmp_path / 'dist')], cwd=arm, check=True,
                   capture_output=True, timeout=120)
    (sdist,) = (tmp_path / 'dist').glob('my_arm-*.tar.gz')
    with tarfile.open(sdist) as archive:
        names = {name.partition('/')[2] for name in archive.getnames()}
    assert {'pyproject.toml', 'protos/my_arm/arm.proto', 'protos/my_arm/types/common.proto'} <= names
    # What `pip install` does with an sdist; build isolation would fetch grpcio-tools from an index, which
    # the tests have no network for.
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--quiet', '--no-deps', '--no-build-isolation',
                    '--wheel-dir', str(tmp_path / 'wheels'), str(sdist)], check=True, capture_output=True, timeout=120)
    (wheel,) = (tmp_path / 'wheels').glob('my_arm-*.whl')
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {'my_arm/types/common_pb2.py', 'my_arm/types/common_pb2_grpc.py', 'my_arm/arm_pb2_grpc.py',
            'my_arm-0.1.0.data/data/share/my_arm/protos/my_arm/types/common.proto'} <= names


def test_the_example_declares_what_an_isolated_pip_build_needs() -> None:
    build_system = tomllib.loads((EXAMPLE / 'pyproject.toml').read_text())['build-system']
    assert build_system['build-backend'] == 'setuptools.build_meta'
    # setup.py imports vyra_base_ipc_build (shipped in vyra_base_ipc's wheel), and the code grpcio-tools
    # generates must match the grpcio that vyra_base_ipc pins.
    grpc = re.search(r"grpc_version = '([^']+)'", (EXAMPLE.parent.parent / 'setup.py').read_text())
    assert grpc is not None
    assert sorted(build_system['requires']) == sorted(
        ['setuptools>=64', f'grpcio-tools=={grpc.group(1)}', 'vyra_base_ipc'])
