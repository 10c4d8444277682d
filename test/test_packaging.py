"""The package builds the ways ROS 2 and Python users build it."""

from __future__ import annotations

import os
from pathlib import Path
import shutil
import subprocess
import sys
import zipfile

import pytest

import vyra_base_ipc

SOURCE = Path(__file__).resolve().parent.parent
GENERATED = ('module_service_pb2.py', 'module_service_pb2.pyi', 'module_service_pb2_grpc.py',
             'backend_service_pb2.py', 'backend_service_pb2.pyi', 'backend_service_pb2_grpc.py')


def source_files() -> list[str]:
    """Files of the source tree as a fresh clone has them (no generated code)."""
    if shutil.which('git') is None or not (SOURCE / '.git').exists():
        pytest.skip('not a git checkout: cannot tell source files from build products')
    listed = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard'], cwd=SOURCE, check=True,
                            capture_output=True, text=True).stdout.split()
    return [name for name in listed if (SOURCE / name).is_file()]


def copy_source(destination: Path) -> Path:
    for name in source_files():
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(SOURCE / name, target)
    return destination


installed_tree_only = pytest.mark.skipif(
    Path(vyra_base_ipc.__file__).resolve().parent.parent == SOURCE,
    reason='imports the source tree: run through tools/test.sh (colcon test) to check the install')


def test_generated_code_is_never_committed() -> None:
    assert not [name for name in source_files() if '_pb2' in name]


@installed_tree_only
def test_installed_package_has_generated_code_stubs_and_marker() -> None:
    package = Path(vyra_base_ipc.__file__).parent
    for name in (*GENERATED, 'py.typed'):
        assert (package / name).is_file(), name


@installed_tree_only
def test_protos_and_package_xml_are_installed_to_share() -> None:
    from ament_index_python.packages import get_package_share_directory
    share = Path(get_package_share_directory('vyra_base_ipc'))
    assert (share / 'package.xml').is_file()
    assert (share / 'protos' / 'vyra_base_ipc' / 'module_service.proto').is_file()
    assert (share / 'protos' / 'vyra_base_ipc' / 'backend_service.proto').is_file()


def test_wheel_has_code_protos_and_resource_marker(tmp_path: Path) -> None:
    source = copy_source(tmp_path / 'src')
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--quiet', '--no-deps', '--no-build-isolation',
                    '--wheel-dir', str(tmp_path / 'dist'), str(source)], check=True)
    (wheel,) = (tmp_path / 'dist').glob('vyra_base_ipc-*.whl')
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in GENERATED:
        assert f'vyra_base_ipc/{name}' in names
    assert 'vyra_base/com/handler/ipc.py' in names
    # The build helper of module packages, with the protos they import.
    assert 'vyra_base_ipc_build/__init__.py' in names
    assert 'vyra_base_ipc_build/protos/vyra_base_ipc/shared_memory.proto' in names
    # The ipc_server entry point, outside vyra_base_ipc (see vyra_base_ipc_server).
    assert 'vyra_base_ipc_server/__init__.py' in names
    # Module packages import its note_stop_signals() (examples/my_arm's arm_node): typed for mypy.
    assert 'vyra_base_ipc_server/py.typed' in names
    assert 'vyra_base_ipc_cli/__init__.py' in names  # vyra-ipc's, for the same reason
    data = '.data/data/share/'
    assert any(n.endswith(data + 'vyra_base_ipc/protos/vyra_base_ipc/module_service.proto') for n in names)
    assert any(n.endswith(data + 'ament_index/resource_index/packages/vyra_base_ipc') for n in names)


@pytest.mark.parametrize('symlink', [False, True], ids=['install', 'symlink-install'])
def test_colcon_build_generates_importable_code(tmp_path: Path, symlink: bool) -> None:
    colcon = shutil.which('colcon') or shutil.which('colcon', path=str(Path(sys.executable).parent))
    if colcon is None:
        pytest.skip('colcon is not installed in this environment')
    workspace = tmp_path / 'ws'
    copy_source(workspace / 'src' / 'vyra_base_ipc')
    build = [colcon, 'build', '--event-handlers', 'console_direct-']
    subprocess.run(build + (['--symlink-install'] if symlink else []), cwd=workspace, check=True,
                   capture_output=True)
    probe = ('import vyra_base_ipc, vyra_base_ipc.backend_service_pb2_grpc as g; '
             'from vyra_base.com.handler.ipc import IPCHandler; '
             'print(vyra_base_ipc.__file__); print(g.BackendServiceStub.__name__)')
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'AMENT_PREFIX_PATH')}
    out = subprocess.run(
        ['bash', '-c', f'source install/setup.bash && {sys.executable} -c "{probe}"'],
        cwd=workspace, env=env, check=True, capture_output=True, text=True).stdout.split()
    assert out[1] == 'BackendServiceStub'
    if symlink:
        # --symlink-install runs `setup.py develop`: code is imported from the source folder.
        assert os.path.realpath(out[0]).startswith(str(workspace / 'src'))
    else:
        assert out[0].startswith(str(workspace / 'install'))
    assert (workspace / 'install' / 'vyra_base_ipc' / 'share' / 'vyra_base_ipc' / 'protos').is_dir()


def test_the_set_up_refuses_a_venv_of_another_python_than_the_one_asked_for(tmp_path: Path) -> None:
    """``PYTHON=python3.12 tools/test.sh`` on a checkout whose ``.venv`` has another Python says so
    and stops before installing anything, instead of testing on the wrong version."""
    (tmp_path / 'tools').mkdir()
    shutil.copy2(SOURCE / 'tools' / 'bootstrap.sh', tmp_path / 'tools' / 'bootstrap.sh')
    (tmp_path / '.venv' / 'bin').mkdir(parents=True)
    (tmp_path / '.venv' / 'bin' / 'python').symlink_to(sys.executable)
    other = tmp_path / 'python3.99'  # an interpreter of a version this machine has no .venv for
    other.write_text('#!/bin/sh\necho 3.99\n')
    other.chmod(0o755)
    result = subprocess.run(['bash', '-c', 'source tools/bootstrap.sh'], cwd=tmp_path,
                            env={**os.environ, 'PYTHON': str(other)}, capture_output=True, text=True, timeout=60)
    ours = '%d.%d' % sys.version_info[:2]
    assert (result.returncode, result.stdout) == (2, ''), result.stderr
    assert result.stderr == (f'error: .venv has Python {ours}, PYTHON={other} is 3.99: '
                             'remove .venv, build and install first\n')
    assert not (tmp_path / '.venv' / 'COLCON_IGNORE').exists()


def older_pythons() -> list[Path]:
    """Interpreters older than 3.11 installed beside this one (pyenv's versions, say), oldest first."""
    found = []
    for python in Path(sys.base_prefix).parent.glob('3.*/bin/python3'):
        version = tuple(int(part) for part in python.parent.parent.name.split('.')[:2])
        if (3, 6) <= version < (3, 11):
            found.append((version, python))
    return [python for _, python in sorted(found)]


@pytest.mark.skipif(not older_pythons(), reason='no Python older than 3.11 is installed beside this one')
def test_an_older_python_is_told_at_import_which_python_the_package_needs() -> None:
    """A colcon build ignores ``python_requires``: on Python 3.10 (ROS 2
    Humble's) the import itself says what is wrong, not an AttributeError in the middle of a call."""
    older = older_pythons()[-1]  # the newest of them: 3.10 where it is there
    result = subprocess.run([str(older), '-c', 'import vyra_base_ipc'], capture_output=True, text=True,
                            env={**os.environ, 'PYTHONPATH': str(Path(vyra_base_ipc.__file__).parent.parent)},
                            timeout=60)
    version = subprocess.run([str(older), '-c', 'import platform; print(platform.python_version())'],
                             capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f'ImportError: vyra_base_ipc needs Python 3.11 or newer; this is Python {version}')
