"""The DVC stages: one module per stage of dvc.yaml, each run as ``python -m stages.<name>``
from the repository root, so a stage module may share its name with a library module or a
package (``select``, ``powerlaw``) without shadowing it."""
