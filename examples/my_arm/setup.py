"""Build script of my_arm: a VYRA module with its own IPC service."""

from glob import glob

from setuptools import setup

from vyra_base_ipc_build import proto_cmdclass, proto_data_files

package_name = 'my_arm'

setup(
    name=package_name,
    version='0.1.0',
    packages=[package_name],
    # py.typed: mypy reads the generated .pyi stubs (and this package's hints) of the installed package.
    package_data={package_name: ['py.typed']},
    data_files=[
        ('share/ament_index/resource_index/packages', [f'resource/{package_name}']),
        (f'share/{package_name}', ['package.xml']),
        (f'share/{package_name}/launch', glob('launch/*.launch.py')),
        # protos/**/*.proto -> share/my_arm/protos/**: for other modules' protos to import (and in the sdist).
        *proto_data_files(package_name),
    ],
    # vyra_base_ipc: the IPC runtime and the generated code's protobuf and grpcio (pip has no package.xml);
    # grpcio-status: the google.rpc.Status of Move's error (gRPC's richer error model).
    install_requires=['setuptools', 'vyra_base_ipc', 'grpcio-status', 'fastapi', 'uvicorn', 'uvloop'],
    # colcon test runs pytest for packages that name it here.
    extras_require={'test': ['pytest', 'pytest-timeout', 'httpx']},
    zip_safe=False,
    maintainer='VYRA developers',
    maintainer_email='dev@vyra.invalid',
    description='Example VYRA module with its own IPC service',
    license='Apache-2.0',
    # protos/my_arm/**/*.proto -> my_arm/**/*_pb2.py, *_pb2.pyi, *_pb2_grpc.py at build time.
    cmdclass=proto_cmdclass(),
    entry_points={
        'console_scripts': [
            'arm_node = my_arm.arm_node:main',
            'arm_frontend = my_arm.frontend:main',
            'arm_web = my_arm.web:main',
        ],
    },
)
