"""vaelab: config-driven variational autoencoders (PyTorch Lightning, Hydra, TensorBoard).

Importing the package imports nothing heavy (the console scripts start in vaelab.commands.cli, and a Ctrl-C that early
must already end in one line); `import vaelab.runs.settings` registers the config schemas and resolvers a
composition needs.
"""

import os.path

# The configs: a wheel carries conf/ inside the package (pyproject.toml maps it to vaelab/conf); an editable
# checkout (or PYTHONPATH=src) reads the repository's top-level conf/. An absolute path, because Hydra resolves a
# relative one against the package when started through a console script.
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
CONF_DIR = os.path.join(_PACKAGE_DIR, "conf")
if not os.path.isdir(CONF_DIR):
    CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(_PACKAGE_DIR)), "conf")
