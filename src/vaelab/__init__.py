"""vaelab: config-driven variational autoencoders (PyTorch Lightning, Hydra, TensorBoard).

Importing the package imports nothing heavy (the console scripts start in vaelab.cli, and a Ctrl-C that early
must already end in one line); `import vaelab.schema` registers the config schemas and resolvers a
composition needs.
"""

import os.path

# conf/ sits at the repository root (editable install). An absolute path, because Hydra resolves a relative
# one against the package when started through a console script.
CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "conf")
