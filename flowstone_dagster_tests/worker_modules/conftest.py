"""The modules here run inside Python workers (this directory is on the workers' ``paths``).

They are fixtures, not tests: pytest must not collect ``test_module.py`` (named as in the brief).
"""

collect_ignore_glob = ["*.py"]
