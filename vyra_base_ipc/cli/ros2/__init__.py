"""``ros2 ipc <verb>``: the verbs of ``vyra-ipc`` as ros2cli extensions.

Registered through entry points (``ros2cli.command``: ``ipc``;
``ros2ipc.verb``: one per verb) and imported only by ros2cli: the modules
here import ros2cli, which this package does not depend on. This
``__init__`` imports nothing of it.
"""
