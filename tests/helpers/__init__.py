"""Helpers shared by the tests: one way to start each peer and the node, one phantom, one dciodvfy.

``tests/`` is on ``sys.path`` while pytest runs (its rootdir ``conftest.py`` lives there and
``tests/`` has no ``__init__.py``, so pytest's default import mode prepends it), hence
``from helpers import ...`` in any test module, of this checkout or of a worktree.

- :mod:`helpers.env`: ``REPO``, ``SHARED_DATA``, ``shared_path``, ``require_tool``, ``free_port``
- :mod:`helpers.wait`: ``wait_for``, ``port_open``
- :mod:`helpers.peers`: ``storescu``, ``echoscu``, ``stored_successes``, ``StoreSCP``, ``Orthanc``
- :mod:`helpers.node`: ``CLI``, ``PY``, ``write_config``, ``write_rules``, ``NodeProcess`` (a ``ProcessGroup``),
  ``delivered``, ``deliver_later_case``
- :mod:`helpers.data`: ``phantom``, ``image_files``, ``copy_files``, ``make_volume``, ``check_result``
- :mod:`helpers.dicom`: ``dciodvfy_report``, ``dciodvfy_errors``
"""

from .data import check_result, copy_files, image_files, make_volume, phantom
from .dicom import dciodvfy_errors, dciodvfy_report
from .env import APT_HINT, REPO, SHARED_DATA, free_port, require_tool, shared_path
from .node import CLI, PY, NodeProcess, ProcessGroup, deliver_later_case, delivered, write_config, write_rules
from .peers import Orthanc, StoreSCP, echoscu, stored_successes, storescu
from .wait import port_open, wait_for

__all__ = [
    "APT_HINT",
    "CLI",
    "PY",
    "REPO",
    "SHARED_DATA",
    "NodeProcess",
    "ProcessGroup",
    "Orthanc",
    "StoreSCP",
    "check_result",
    "copy_files",
    "dciodvfy_errors",
    "dciodvfy_report",
    "deliver_later_case",
    "delivered",
    "echoscu",
    "free_port",
    "image_files",
    "make_volume",
    "phantom",
    "port_open",
    "require_tool",
    "shared_path",
    "stored_successes",
    "storescu",
    "wait_for",
    "write_config",
    "write_rules",
]
