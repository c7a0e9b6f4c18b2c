# Typed stubs of the part of gevent that this project uses (gevent ships no types), only under
# monkey-patching (kombu_pyamqp_threadsafe.greenlets). Shared by mypy and pyright.
from typing import Any

def get_hub() -> Any: ...
