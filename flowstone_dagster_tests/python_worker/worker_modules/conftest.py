"""The modules here run inside Python workers (this directory is on the workers' ``paths``).

They are fixtures, not tests: pytest must not collect ``test_module.py``, which the workers
import.
"""

collect_ignore_glob = ["*.py"]
