"""The pictures a run logs to TensorBoard (and <run dir>/images/): Lightning callbacks, one per picture."""
